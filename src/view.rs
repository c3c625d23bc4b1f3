//! The instance view: the durable state of every pod VM, for the admin
//! endpoint, the gRPC admin API, GetInfo, the GC and the gauges.
//!
//! Pod VM actors update it after each journal write succeeds, so it never
//! shows what is not on disk.

use crate::metrics;
use podvisor_state::{InstanceRecord, State};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

/// A change to the view.
#[derive(Debug, Clone)]
pub enum ViewEvent {
    /// A record was written (or loaded at start-up).
    Updated(InstanceRecord),
    /// A record was deleted; this was its last content.
    Removed(InstanceRecord),
}

/// Every durable record, with change notifications.
pub struct InstanceView {
    /// sandbox id → last durable record.
    records: RwLock<BTreeMap<String, InstanceRecord>>,
    /// Subscribers: WatchInstances streams and waiting GetInfo calls.
    events: broadcast::Sender<ViewEvent>,
    /// Start-up recovery has finished.
    ready: AtomicBool,
}

impl Default for InstanceView {
    fn default() -> Self {
        Self {
            records: RwLock::new(BTreeMap::new()),
            events: broadcast::channel(1024).0,
            ready: AtomicBool::new(false),
        }
    }
}

// By hand: a record carries its pod's initdata; the count says enough.
impl std::fmt::Debug for InstanceView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceView")
            .field("records", &self.read().len())
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl InstanceView {
    /// An empty view.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, InstanceRecord>> {
        // A panic while holding the lock cannot leave the map half-written
        // (each update is one insert or remove), so a poisoned lock is usable.
        self.records
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, InstanceRecord>> {
        self.records
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the records read from the journal at start-up (not
    /// transitions): one lock for all, and events only for subscribers.
    pub fn load(&self, records: impl IntoIterator<Item = InstanceRecord>) {
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        let watched = self.events.receiver_count() > 0;
        let mut map = self.write();
        for record in records {
            *by_state.entry(record.state.as_str()).or_default() += 1;
            if watched {
                let _ = self.events.send(ViewEvent::Updated(record.clone()));
            }
            map.insert(record.sandbox_id.clone(), record);
        }
        drop(map);
        for (state, n) in by_state {
            metrics::gauge!(metrics::INSTANCES, "state" => state).increment(n as f64);
        }
    }

    /// Records a durable write, counting the transition it made.
    pub fn update(&self, record: InstanceRecord) {
        let previous = self
            .write()
            .insert(record.sandbox_id.clone(), record.clone());
        let from = previous.as_ref().map(|p| p.state);
        if from != Some(record.state) {
            let from_label = from.map_or("new", State::as_str);
            metrics::counter!(metrics::STATE_TRANSITIONS, "from" => from_label, "to" => record.state.as_str())
                .increment(1);
            if let Some(from) = from {
                metrics::gauge!(metrics::INSTANCES, "state" => from.as_str()).decrement(1.0);
            }
            metrics::gauge!(metrics::INSTANCES, "state" => record.state.as_str()).increment(1.0);
        }
        let _ = self.events.send(ViewEvent::Updated(record));
    }

    /// Records that a sandbox's record was deleted.
    pub fn remove(&self, sandbox_id: &str) {
        let Some(last) = self.write().remove(sandbox_id) else {
            return;
        };
        metrics::counter!(metrics::STATE_TRANSITIONS, "from" => last.state.as_str(), "to" => State::Removed.as_str())
            .increment(1);
        metrics::gauge!(metrics::INSTANCES, "state" => last.state.as_str()).decrement(1.0);
        let _ = self.events.send(ViewEvent::Removed(last));
    }

    /// One sandbox's record.
    pub fn get(&self, sandbox_id: &str) -> Option<InstanceRecord> {
        self.read().get(sandbox_id).cloned()
    }

    /// How many of the sandboxes `ids` pass `check`, given each one's
    /// record (`None`: none yet); under one read lock, copying nothing.
    pub fn count<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        check: impl Fn(Option<&InstanceRecord>) -> bool,
    ) -> usize {
        let map = self.read();
        ids.into_iter().filter(|id| check(map.get(*id))).count()
    }

    /// The VNIs the records hold (see [`crate::network::vni`]), under one
    /// read lock, copying no record.
    pub fn vnis(&self) -> std::collections::BTreeSet<u32> {
        self.read().values().filter_map(|r| r.vni).collect()
    }

    /// Every record, by sandbox id.
    pub fn list(&self) -> Vec<InstanceRecord> {
        self.read().values().cloned().collect()
    }

    /// The record of a pod, by name and namespace.
    pub fn find_pod(&self, pod_name: &str, pod_namespace: &str) -> Option<InstanceRecord> {
        self.read()
            .values()
            .filter(|r| r.pod_name == pod_name && r.pod_namespace == pod_namespace)
            .max_by_key(|r| r.created_at)
            .cloned()
    }

    /// Change notifications from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ViewEvent> {
        self.events.subscribe()
    }

    /// Marks start-up recovery finished.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        metrics::gauge!(metrics::READY).set(1.0);
    }

    /// Whether start-up recovery has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::InstanceSpec;

    fn rec(id: &str, pod: &str, at: u64) -> InstanceRecord {
        InstanceRecord::pending(id, pod, "ns", InstanceSpec::default(), at)
    }

    #[test]
    fn updates_removals_and_pod_lookup() {
        let view = InstanceView::new();
        let mut events = view.subscribe();
        view.update(rec("a", "web", 1));
        view.update(rec("b", "web", 2));
        view.update(rec("c", "db", 3));
        assert_eq!(view.list().len(), 3);
        assert_eq!(
            view.find_pod("web", "ns").unwrap().sandbox_id,
            "b",
            "the newest sandbox of a pod"
        );
        assert!(view.find_pod("web", "other").is_none());
        view.remove("b");
        view.remove("zzz");
        assert_eq!(view.find_pod("web", "ns").unwrap().sandbox_id, "a");
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(match e {
                ViewEvent::Updated(r) => format!("+{}", r.sandbox_id),
                ViewEvent::Removed(r) => format!("-{}", r.sandbox_id),
            });
        }
        assert_eq!(seen, ["+a", "+b", "+c", "-b"]);
        assert!(!view.is_ready());
        view.set_ready();
        assert!(view.is_ready());
    }
}
