//! Each sandbox's tunnel as this run of the daemon last left it, for
//! `/v1/instances` and the gauge `podvisor_tunnels_up`.
//!
//! Memory only, by design: the kernel holds the tunnel and the journal the
//! VNI. What this run has not acted on shows as `pending` (a sandbox being
//! created, or Running and not yet checked since a restart — recovery
//! checks every Running sandbox's tunnel before long) or `unknown` (a
//! Failed or Deleting sandbox this run has not touched); see
//! [`TunnelStates::state_of`].

use crate::metrics;
use podvisor_state::State;
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
    /// A Failed or Deleting sandbox whose tunnel this run of the daemon has
    /// not touched (it was in that state at start-up).
    Unknown,
    /// The worker's end was set up (or found intact after a restart).
    Up,
    /// The last set-up, check or teardown failed: `error` says why.
    Failed,
    /// Torn down (the sandbox is being deleted); `error` keeps the failure
    /// before it, if there was one.
    Down,
}

/// One sandbox's tunnel, as `/v1/instances/{id}` shows it under `tunnel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelState {
    /// Where it stands.
    pub state: TunnelPhase,
    /// The failed step's error chain (`failed`; `down` after a failure),
    /// else `None`.
    pub error: Option<String>,
    /// When it got there, RFC 3339 (`None` for `pending` not yet acted on).
    pub since: Option<String>,
}

/// Every sandbox's tunnel state in this run.
#[derive(Debug, Default)]
pub struct TunnelStates {
    /// Whether this daemon builds tunnels at all (records may carry VNIs
    /// from a run that did).
    enabled: bool,
    states: Mutex<BTreeMap<String, TunnelState>>,
}

impl TunnelStates {
    /// The states of a daemon that builds tunnels (`enabled`) or not.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            states: Mutex::default(),
        }
    }

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

    /// Records that the tunnel of `sandbox_id` was torn down, keeping the
    /// error of a failure before it.
    pub fn set_down(&self, sandbox_id: &str) {
        let error = self
            .lock()
            .get(sandbox_id)
            .filter(|s| s.state != TunnelPhase::Up)
            .and_then(|s| s.error.clone());
        self.set(sandbox_id, TunnelPhase::Down, error);
    }

    /// Whether the tunnel of `sandbox_id` was torn down by this run.
    pub fn is_down(&self, sandbox_id: &str) -> bool {
        self.lock()
            .get(sandbox_id)
            .is_some_and(|s| s.state == TunnelPhase::Down)
    }

    /// Forgets `sandbox_id` (its record is gone, or a new attempt starts)
    /// and updates the gauge.
    pub fn remove(&self, sandbox_id: &str) {
        let mut states = self.lock();
        if states.remove(sandbox_id).is_some() {
            publish(&states);
        }
    }

    /// The tunnel of a sandbox in `state` with `vni`: `None` when it has
    /// none (no VNI, or this daemon builds no tunnels); what this run last
    /// did to it; else `pending` (Pending, Creating, Running) or `unknown`.
    pub fn state_of(
        &self,
        sandbox_id: &str,
        state: State,
        vni: Option<u32>,
    ) -> Option<TunnelState> {
        if !self.enabled || vni.is_none() {
            return None;
        }
        Some(self.lock().get(sandbox_id).cloned().unwrap_or(TunnelState {
            state: match state {
                State::Pending | State::Creating | State::Running => TunnelPhase::Pending,
                State::Failed | State::Deleting | State::Removed => TunnelPhase::Unknown,
            },
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
        let states = TunnelStates::new(true);
        assert_eq!(states.state_of("a", State::Running, None), None);
        for (state, phase) in [
            (State::Pending, TunnelPhase::Pending),
            (State::Creating, TunnelPhase::Pending),
            (State::Running, TunnelPhase::Pending),
            (State::Failed, TunnelPhase::Unknown),
            (State::Deleting, TunnelPhase::Unknown),
        ] {
            assert_eq!(
                states.state_of("a", state, Some(1)).map(|s| s.state),
                Some(phase),
                "{state:?}"
            );
        }
        let off = TunnelStates::new(false);
        assert_eq!(off.state_of("a", State::Running, Some(1)), None);
    }

    #[test]
    fn a_teardown_after_a_failure_keeps_its_error_and_one_after_up_has_none() {
        let states = TunnelStates::new(true);
        states.set("a", TunnelPhase::Failed, Some("iptables".into()));
        states.set_down("a");
        let a = states.state_of("a", State::Deleting, Some(1)).expect("a");
        assert_eq!(
            (a.state, a.error.as_deref()),
            (TunnelPhase::Down, Some("iptables"))
        );
        assert!(states.is_down("a"));
        states.set("b", TunnelPhase::Up, None);
        states.set_down("b");
        let b = states.state_of("b", State::Deleting, Some(2)).expect("b");
        assert_eq!((b.state, b.error), (TunnelPhase::Down, None));
    }

    #[test]
    fn only_tunnels_up_are_counted_and_a_removed_sandbox_is_forgotten() {
        let states = TunnelStates::new(true);
        states.set("a", TunnelPhase::Up, None);
        states.set("b", TunnelPhase::Up, None);
        states.set("c", TunnelPhase::Failed, Some("no IPv4".into()));
        assert_eq!(states.up(), 2);
        states.set("b", TunnelPhase::Down, None);
        assert_eq!(states.up(), 1);
        states.remove("a");
        assert_eq!(states.up(), 0);
        let c = states
            .state_of("c", State::Running, Some(3))
            .expect("c has a tunnel");
        assert_eq!(c.state, TunnelPhase::Failed);
        assert_eq!(c.error.as_deref(), Some("no IPv4"));
        assert!(c.since.is_some());
        assert_eq!(
            states
                .state_of("a", State::Running, Some(1))
                .map(|s| s.state),
            Some(TunnelPhase::Pending),
            "a forgotten sandbox's state is gone"
        );
    }
}
