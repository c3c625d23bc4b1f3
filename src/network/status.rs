//! Each sandbox's tunnel as this run of the daemon last left it, for
//! `/v1/instances` and the gauge `podvisor_tunnels_up`.
//!
//! Memory only, by design: the kernel holds the tunnel and the journal the
//! VNI; what a restart has not checked yet shows as `pending` (see
//! [`TunnelStates::state_of`]), and start-up recovery checks every Running
//! sandbox's tunnel before long.

use crate::metrics;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Where a sandbox's tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelPhase {
    /// The sandbox has a VNI; its tunnel is not built (or, after a restart,
    /// not checked) yet.
    Pending,
    /// The worker's end was set up (or found intact after a restart).
    Up,
    /// The last set-up, check or teardown failed: `error` says why.
    Failed,
    /// Torn down (the sandbox is being deleted).
    Down,
}

/// One sandbox's tunnel, as `/v1/instances/{id}` shows it under `tunnel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelState {
    /// Where it stands.
    pub state: TunnelPhase,
    /// The failed step's error chain (`state` = `failed`), else `None`.
    pub error: Option<String>,
    /// When it got there, RFC 3339 (`None` for `pending` not yet acted on).
    pub since: Option<String>,
}

/// Every sandbox's tunnel state in this run; sandboxes without an entry
/// are `pending` if they have a VNI.
#[derive(Debug, Default)]
pub struct TunnelStates {
    states: Mutex<BTreeMap<String, TunnelState>>,
}

impl TunnelStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TunnelState>> {
        // The map is replaced or read whole under the lock: a panic while
        // holding it cannot leave an entry half-written.
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `phase` (with `error` for [`TunnelPhase::Failed`]) for
    /// `sandbox_id`, now, and updates the gauge.
    pub fn set(&self, sandbox_id: &str, phase: TunnelPhase, error: Option<String>) {
        let since = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut states = self.lock();
        states.insert(
            sandbox_id.to_owned(),
            TunnelState {
                state: phase,
                error,
                since: Some(since),
            },
        );
        publish(&states);
    }

    /// Forgets `sandbox_id` (its record is gone) and updates the gauge.
    pub fn remove(&self, sandbox_id: &str) {
        let mut states = self.lock();
        if states.remove(sandbox_id).is_some() {
            publish(&states);
        }
    }

    /// The tunnel of `sandbox_id`: `None` when it has none (`has_vni`
    /// false), `pending` when it has one this run has not acted on.
    pub fn state_of(&self, sandbox_id: &str, has_vni: bool) -> Option<TunnelState> {
        if !has_vni {
            return None;
        }
        Some(self.lock().get(sandbox_id).cloned().unwrap_or(TunnelState {
            state: TunnelPhase::Pending,
            error: None,
            since: None,
        }))
    }

    /// How many tunnels are up.
    pub fn up(&self) -> usize {
        count_up(&self.lock())
    }
}

fn count_up(states: &BTreeMap<String, TunnelState>) -> usize {
    states
        .values()
        .filter(|s| s.state == TunnelPhase::Up)
        .count()
}

fn publish(states: &BTreeMap<String, TunnelState>) {
    metrics::gauge!(metrics::TUNNELS_UP).set(count_up(states) as f64);
}

/// Records a finished teardown's duration (seconds).
pub fn record_teardown(took: Duration) {
    metrics::histogram!(metrics::TUNNEL_TEARDOWN_DURATION).record(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_without_a_vni_has_no_tunnel_and_one_with_a_vni_starts_pending() {
        let states = TunnelStates::default();
        assert_eq!(states.state_of("a", false), None);
        assert_eq!(
            states.state_of("a", true).map(|s| s.state),
            Some(TunnelPhase::Pending)
        );
    }

    #[test]
    fn only_tunnels_up_are_counted_and_a_removed_sandbox_is_forgotten() {
        let states = TunnelStates::default();
        states.set("a", TunnelPhase::Up, None);
        states.set("b", TunnelPhase::Up, None);
        states.set("c", TunnelPhase::Failed, Some("no IPv4".into()));
        assert_eq!(states.up(), 2);
        states.set("b", TunnelPhase::Down, None);
        assert_eq!(states.up(), 1);
        states.remove("a");
        assert_eq!(states.up(), 0);
        let c = states.state_of("c", true).expect("c has a tunnel");
        assert_eq!(c.state, TunnelPhase::Failed);
        assert_eq!(c.error.as_deref(), Some("no IPv4"));
        assert!(c.since.is_some());
        assert_eq!(
            states.state_of("a", true).map(|s| s.state),
            Some(TunnelPhase::Pending),
            "a forgotten sandbox's state is gone"
        );
    }
}
