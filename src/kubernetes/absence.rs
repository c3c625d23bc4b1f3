//! How long things have been missing from successful listings: the clocks
//! that stale sandboxes ([`super::stale`], keyed by sandbox id) and deleted
//! nodes ([`super::node_gone`], keyed by node name) are judged by. Only a
//! successful listing starts, reads or ends a clock; a failed one leaves
//! them all as they were.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::Duration;
use tokio::time::Instant;

/// When each key was first missing from a successful listing.
#[derive(Debug)]
pub struct Absence<K> {
    since: HashMap<K, Instant>,
}

impl<K: Eq + Hash + Clone> Default for Absence<K> {
    fn default() -> Self {
        Self {
            since: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> Absence<K> {
    /// Notes `key` missing from the listing made at `now`: how long it has
    /// been missing (zero the first time).
    pub fn missing(&mut self, key: &K, now: Instant) -> Duration {
        let since = *self.since.entry(key.clone()).or_insert(now);
        now.saturating_duration_since(since)
    }

    /// After a listing: keeps the clocks of `still_missing` only (a key
    /// that is back, or no longer judged, starts afresh next time).
    pub fn keep_only(&mut self, still_missing: &HashSet<K>) {
        self.since.retain(|k, _| still_missing.contains(k));
    }

    /// Ends `key`'s clock (it was acted on).
    pub fn end(&mut self, key: &K) {
        self.since.remove(key);
    }

    /// Ends every clock.
    pub fn clear(&mut self) {
        self.since.clear();
    }

    /// How many clocks run.
    pub fn len(&self) -> usize {
        self.since.len()
    }

    /// Whether no clock runs.
    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

/// How often a check judged by `grace` runs: a quarter of it, at least 1 s
/// and at most `cap`.
pub fn check_interval(grace: Duration, cap: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_runs_from_the_first_miss_until_the_key_is_back() {
        let mut a = Absence::default();
        let t0 = Instant::now();
        assert_eq!(a.missing(&"x", t0), Duration::ZERO);
        assert_eq!(
            a.missing(&"x", t0 + Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        a.keep_only(&HashSet::new());
        assert!(a.is_empty(), "x was back");
        assert_eq!(a.missing(&"x", t0 + Duration::from_secs(9)), Duration::ZERO);
        a.end(&"x");
        assert_eq!(a.len(), 0);
        assert_eq!(
            check_interval(Duration::from_secs(2), Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            check_interval(Duration::from_secs(600), Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            check_interval(Duration::from_secs(60), Duration::from_secs(30)),
            Duration::from_secs(15)
        );
    }
}
