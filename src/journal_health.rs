//! Whether the journal can still be written, for `/livez`.
//!
//! A failed write either heals by itself or makes the daemon not live, so
//! that the kubelet (or systemd) restarts it: sled 0.34 keeps failing every
//! write after an I/O error such as ENOSPC, even once space is back, until
//! the database is reopened. [`HealthJournal`] wraps the journal and records
//! the outcome of every write and flush; while writes fail, a probe write
//! (every [`PROBE_INTERVAL`]) finds out whether the journal healed.

use podvisor_state::{
    InstanceRecord, Journal, JournalError, JournalFuture, JournalIdentity, LoadReport,
    QuarantinedRecord, Verdict,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a failing journal is probed with a write.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The journal's write health, shared with the admin endpoint.
#[derive(Debug, Default)]
pub struct JournalHealth {
    /// Since when writes fail, and the last error; `None` while they work.
    failing: Mutex<Option<(Instant, String)>>,
}

impl JournalHealth {
    /// A healthy journal.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a write's outcome. Only a completed flush (or probe) proves
    /// writes work again: a `put` may succeed in memory while every flush
    /// fails.
    fn record<T>(&self, result: &Result<T, JournalError>, durable: bool) {
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(_) if !durable => {}
            Ok(_) => {
                if failing.take().is_some() {
                    tracing::info!("journal writes work again");
                }
            }
            Err(e) => {
                let since = failing.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                *failing = Some((since, podvisor_state::report(e)));
            }
        }
    }

    /// How long writes have failed, and the last error; `None` if they work.
    pub fn failing(&self) -> Option<(Duration, String)> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()))
    }
}

/// A journal whose writes report to a [`JournalHealth`].
pub struct HealthJournal {
    /// The journal itself.
    inner: Arc<dyn Journal>,
    /// Where outcomes go.
    health: Arc<JournalHealth>,
}

impl std::fmt::Debug for HealthJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthJournal")
            .field("journal", &self.inner.identity())
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl HealthJournal {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Journal>, health: Arc<JournalHealth>) -> Self {
        Self { inner, health }
    }
}

impl Journal for HealthJournal {
    fn put(&self, record: &InstanceRecord) -> Result<(), JournalError> {
        let r = self.inner.put(record);
        self.health.record(&r, false);
        r
    }
    fn remove(&self, sandbox_id: &str) -> Result<(), JournalError> {
        let r = self.inner.remove(sandbox_id);
        self.health.record(&r, false);
        r
    }
    fn flush(&self) -> Result<(), JournalError> {
        let r = self.inner.flush();
        self.health.record(&r, true);
        r
    }
    fn flush_async(&self) -> JournalFuture {
        let flush = self.inner.flush_async();
        let health = self.health.clone();
        Box::pin(async move {
            let r = flush.await;
            health.record(&r, true);
            r
        })
    }
    fn put_durable(&self, record: &InstanceRecord) -> JournalFuture {
        let commit = self.inner.put_durable(record);
        let health = self.health.clone();
        Box::pin(async move {
            let r = commit.await;
            health.record(&r, true);
            r
        })
    }
    fn probe(&self) -> Result<(), JournalError> {
        let r = self.inner.probe();
        self.health.record(&r, true);
        r
    }
    fn get(&self, sandbox_id: &str) -> Result<Option<InstanceRecord>, JournalError> {
        self.inner.get(sandbox_id)
    }
    fn load(&self) -> Result<LoadReport, JournalError> {
        self.inner.load()
    }
    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, JournalError> {
        self.inner.quarantined()
    }
    fn drop_quarantined(&self, id: &str) -> Result<Option<QuarantinedRecord>, JournalError> {
        let r = self.inner.drop_quarantined(id);
        // Only a drop that removed something flushed: an unknown id proves
        // nothing about writes.
        let durable = !matches!(r, Ok(None));
        self.health.record(&r, durable);
        r
    }
    fn identity(&self) -> JournalIdentity {
        self.inner.identity()
    }
    fn verdict(&self) -> Verdict {
        self.inner.verdict()
    }
    fn durable_sequence(&self) -> u64 {
        self.inner.durable_sequence()
    }
    fn declare_doubt(&self, reason: &str) -> Result<(), JournalError> {
        self.inner.declare_doubt(reason)
    }
}

/// Probes the journal every [`PROBE_INTERVAL`] while its writes fail, until
/// `stop` is set: a journal that heals is noticed without waiting for the
/// next pod's write.
pub async fn probe_while_failing(
    journal: Arc<dyn Journal>,
    health: Arc<JournalHealth>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if health.failing().is_some() {
            let j = journal.clone();
            let _ = tokio::task::spawn_blocking(move || j.probe()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_remembered_from_its_start_until_a_success() {
        let h = JournalHealth::default();
        assert!(h.failing().is_none());
        let err = || -> Result<(), JournalError> {
            Err(JournalError::Open {
                path: "x".into(),
                reason: "No space left on device".into(),
            })
        };
        h.record(&err(), false);
        std::thread::sleep(Duration::from_millis(20));
        h.record(&err(), true);
        // A put that works in memory proves nothing while flushes fail.
        h.record(&Ok::<(), JournalError>(()), false);
        let (for_how_long, why) = h.failing().unwrap();
        assert!(
            for_how_long >= Duration::from_millis(20),
            "counted from the first failure"
        );
        assert!(why.contains("No space left"), "{why}");
        h.record(&Ok::<(), JournalError>(()), true);
        assert!(h.failing().is_none());
    }
}
