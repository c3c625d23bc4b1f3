//! A token bucket: keeps mutating cloud calls below the cloud's rate limits.

use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The bucket's arithmetic, separate from the clock and the async wait.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// Tokens now (may go negative: reservations made ahead).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            updated: now,
        }
    }

    /// Reserves one token; returns how long to wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A shared token bucket.
#[derive(Debug)]
pub struct TokenBucket(Mutex<Bucket>);

impl TokenBucket {
    /// `rate` tokens per second, up to `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self(Mutex::new(Bucket::new(rate, burst, Instant::now())))
    }

    /// Waits for a token.
    pub async fn take(&self) {
        let wait = self.0.lock().await.reserve(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
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
    fn idle_time_never_exceeds_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 2, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert!(b.reserve(later) > Duration::ZERO);
    }
}
