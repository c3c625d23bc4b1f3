//! Pacing of cloud requests: one token bucket per class of request
//! ([`RequestClass`]: mutating, read) keeps them below the cloud's rate
//! limits, and slows down when the cloud throttles (AIMD: the rate halves
//! at each throttle and climbs back by a twentieth of the configured rate
//! at each accepted call, as TCP's congestion window does).
//!
//! The daemon makes one [`Pacer`] from its [`CallLimits`] and hands it to
//! the provider in [`crate::ProviderContext`]: a provider whose calls make
//! several cloud requests paces each of them ([`crate::Provider::paces_requests`]);
//! for the others the daemon takes one token per call.

use crate::manager::CallLimits;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a cloud request does, for its token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestClass {
    /// Creates and deletes anything (`--provider-rate`, `--provider-burst`).
    Mutating,
    /// Reads: lookups, listings (`--provider-read-rate`,
    /// `--provider-read-burst`).
    Read,
}

impl RequestClass {
    /// Its name in metrics and logs: `mutating`, `read`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Mutating => "mutating",
            RequestClass::Read => "read",
        }
    }
}

/// The bucket's arithmetic, separate from the clock and the async wait.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// The configured rate: tokens per second when the cloud accepts all.
    base_rate: f64,
    /// Tokens added per second now: `base_rate`, or less after throttles.
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// Tokens now (may go negative: reservations made ahead).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

/// The lowest rate throttles bring the bucket to, as a fraction of the
/// configured one: a cloud that throttles everything still gets tries.
pub const MIN_RATE_FRACTION: f64 = 1.0 / 64.0;

/// How much of the configured rate each accepted call gives back.
pub const RECOVERY_STEP: f64 = 1.0 / 20.0;

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            base_rate: rate,
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// Reserves one token; returns how long to wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// The cloud throttled a call: the rate halves (down to
    /// [`MIN_RATE_FRACTION`] of the configured one) and the saved-up burst
    /// is dropped, so the next calls come at the new rate.
    pub fn throttled(&mut self, now: Instant) {
        self.refill(now);
        self.rate = (self.rate / 2.0).max(self.base_rate * MIN_RATE_FRACTION);
        self.tokens = self.tokens.min(0.0);
    }

    /// The cloud accepted a call: the rate climbs back by
    /// [`RECOVERY_STEP`] of the configured rate, never above it.
    pub fn accepted(&mut self, now: Instant) {
        self.refill(now);
        self.rate = (self.rate + self.base_rate * RECOVERY_STEP).min(self.base_rate);
    }

    /// Tokens added per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// A shared token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    /// The arithmetic, held only for a few arithmetic operations.
    bucket: Mutex<Bucket>,
    /// Tokens taken so far.
    taken: AtomicU64,
}

impl TokenBucket {
    /// `rate` tokens per second, up to `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            bucket: Mutex::new(Bucket::new(rate, burst, Instant::now())),
            taken: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // Every update leaves the bucket consistent (plain arithmetic on
        // numbers), so a poisoned lock is usable.
        self.bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves a token; returns how long to wait before using it.
    pub fn reserve(&self) -> Duration {
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.lock().reserve(Instant::now())
    }

    /// Waits for a token.
    pub async fn take(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Tokens taken since the bucket was made.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Tokens added per second now.
    pub fn rate(&self) -> f64 {
        self.lock().rate()
    }

    /// See [`Bucket::throttled`]; returns the new rate (tokens per second).
    pub fn throttled(&self) -> f64 {
        let mut bucket = self.lock();
        bucket.throttled(Instant::now());
        bucket.rate()
    }

    /// See [`Bucket::accepted`]; returns the new rate (tokens per second).
    pub fn accepted(&self) -> f64 {
        let mut bucket = self.lock();
        bucket.accepted(Instant::now());
        bucket.rate()
    }
}

/// The token buckets of one daemon's cloud requests, one per
/// [`RequestClass`].
#[derive(Debug)]
pub struct Pacer {
    mutating: TokenBucket,
    read: TokenBucket,
}

impl Pacer {
    /// Buckets at `limits`, full.
    pub fn new(limits: CallLimits) -> Self {
        Self {
            mutating: TokenBucket::new(limits.rate, limits.burst),
            read: TokenBucket::new(limits.read_rate, limits.read_burst),
        }
    }

    /// Buckets that never make anyone wait in practice (a billion tokens a
    /// second), for tests of providers on their own.
    pub fn unlimited() -> Self {
        Self::new(CallLimits {
            rate: 1e9,
            burst: u32::MAX,
            read_rate: 1e9,
            read_burst: u32::MAX,
        })
    }

    /// The bucket of `class`.
    pub fn bucket(&self, class: RequestClass) -> &TokenBucket {
        match class {
            RequestClass::Mutating => &self.mutating,
            RequestClass::Read => &self.read,
        }
    }

    /// Waits for a token of `class`.
    pub async fn take(&self, class: RequestClass) {
        self.bucket(class).take().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_calls_are_spaced_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
        assert_eq!(b.reserve(t0), Duration::from_millis(500));
        assert_eq!(b.reserve(t0), Duration::from_millis(1000));
        // After two idle seconds the debt is paid and 2 more tokens accrued.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(b.reserve(later), Duration::ZERO);
    }

    #[test]
    fn a_throttle_halves_the_rate_and_drops_the_burst_then_calls_win_it_back() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4.0, 10, t0);
        b.throttled(t0);
        assert_eq!(b.rate(), 2.0);
        // The 10 saved tokens are gone: the next call waits for the new rate.
        assert_eq!(b.reserve(t0), Duration::from_millis(500));
        b.throttled(t0);
        assert_eq!(b.rate(), 1.0);
        // Additive increase: a twentieth of the configured rate per call.
        for _ in 0..5 {
            b.accepted(t0);
        }
        assert!((b.rate() - 2.0).abs() < 1e-9, "{}", b.rate());
        for _ in 0..100 {
            b.accepted(t0);
        }
        assert_eq!(b.rate(), 4.0, "never above the configured rate");
    }

    #[test]
    fn throttles_never_stop_the_bucket() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 1, t0);
        for _ in 0..100 {
            b.throttled(t0);
        }
        assert_eq!(b.rate(), 2.0 * MIN_RATE_FRACTION);
        let wait = b.reserve(t0);
        assert!(wait > Duration::ZERO && wait.as_secs_f64().is_finite());
    }

    #[test]
    fn idle_time_never_exceeds_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 2, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert!(b.reserve(later) > Duration::ZERO);
    }
}
