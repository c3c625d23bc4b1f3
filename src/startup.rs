//! `/startup`: whether every sandbox this daemon found `Creating` or
//! `Running` in its journal at start-up is `Running` again — its instance
//! verified by recovery, or its create finished and its agent answering —
//! or has ended (failed, deleting, gone). A DaemonSet's startup probe on it
//! makes a rolling update wait, node by node, until the node's peer pods
//! are back (the reference's `/startup` on `PROBE_PORT` waits for every
//! `kata-remote` pod to be Ready again).
//!
//! Once passed it stays passed: a sandbox that fails later is the
//! lifecycle's business, not start-up's.

use crate::view::InstanceView;
use podvisor_state::{InstanceRecord, State};
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The sandboxes start-up waits for.
#[derive(Debug)]
pub struct StartupGate {
    /// Sandboxes not yet back (shrinks as they come back).
    waiting: Mutex<HashSet<String>>,
    /// Every one came back once.
    passed: AtomicBool,
}

/// Where start-up stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Every sandbox is back.
    Done,
    /// Start-up recovery has not finished (`/readyz` is not ready).
    Recovering,
    /// Recovery finished; this many sandboxes are not `Running` yet.
    Waiting(usize),
}

impl StartupGate {
    /// A gate for the journal's `records` as start-up loaded them.
    pub fn new<'a>(records: impl IntoIterator<Item = &'a InstanceRecord>) -> Self {
        let waiting: HashSet<String> = records
            .into_iter()
            .filter(|r| matches!(r.state, State::Creating | State::Running))
            .map(|r| r.sandbox_id.clone())
            .collect();
        crate::metrics::gauge!(crate::metrics::STARTED).set(0.0);
        Self {
            passed: AtomicBool::new(false),
            waiting: Mutex::new(waiting),
        }
    }

    /// Where start-up stands now, by `view`: a sandbox is back when its
    /// record is `Running` after recovery finished, or when it is not
    /// `Creating` or `Running` any more (or has no record).
    pub fn check(&self, view: &InstanceView) -> Startup {
        if self.passed.load(Ordering::Acquire) {
            return Startup::Done;
        }
        if !view.is_ready() {
            return Startup::Recovering;
        }
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting.retain(|id| {
            view.get(id)
                .is_some_and(|r| matches!(r.state, State::Creating))
        });
        if waiting.is_empty() {
            self.passed.store(true, Ordering::Release);
            crate::metrics::gauge!(crate::metrics::STARTED).set(1.0);
            Startup::Done
        } else {
            Startup::Waiting(waiting.len())
        }
    }
}

/// Checks `gate` every second until start-up is done, so that
/// [`crate::metrics::STARTED`] turns 1 whether or not anything asks
/// `/startup`.
pub async fn watch(gate: std::sync::Arc<StartupGate>, view: std::sync::Arc<InstanceView>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        if gate.check(&view) == Startup::Done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::InstanceSpec;

    fn record(id: &str, state: State) -> InstanceRecord {
        let mut r = InstanceRecord::pending(id, "pod", "ns", InstanceSpec::default(), 0);
        r.state = state;
        r
    }

    #[test]
    fn start_up_waits_for_creating_and_running_sandboxes_after_recovery() {
        let records = [
            record("creating", State::Creating),
            record("running", State::Running),
            record("pending", State::Pending),
            record("deleting", State::Deleting),
        ];
        let view = InstanceView::new();
        view.load(records.iter().cloned());
        let gate = StartupGate::new(&records);
        assert_eq!(gate.check(&view), Startup::Recovering);
        view.set_ready();
        // The Running one is verified (recovery finished); the create is not done.
        assert_eq!(gate.check(&view), Startup::Waiting(1));
        view.update(record("creating", State::Running));
        assert_eq!(gate.check(&view), Startup::Done);
        // Passed stays passed.
        view.update(record("creating", State::Creating));
        assert_eq!(gate.check(&view), Startup::Done);
    }

    #[test]
    fn a_failed_or_removed_sandbox_no_longer_holds_start_up() {
        let records = [record("a", State::Creating), record("b", State::Creating)];
        let view = InstanceView::new();
        view.load(records.iter().cloned());
        let gate = StartupGate::new(&records);
        view.set_ready();
        view.update(record("a", State::Failed));
        assert_eq!(gate.check(&view), Startup::Waiting(1));
        view.remove("b");
        assert_eq!(gate.check(&view), Startup::Done);
        let empty = StartupGate::new(&[]);
        assert_eq!(empty.check(&view), Startup::Done);
    }
}
