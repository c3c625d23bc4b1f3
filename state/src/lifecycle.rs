//! The pod VM lifecycle: its states and the one table of legal transitions.
//!
//! Actors never decide legality themselves: they call [`check_transition`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a pod VM is in its life.
///
/// `Removed` is the terminal pseudo-state: its record is deleted from the
/// journal, so no stored record is ever `Removed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// CreateVM recorded the sandbox; no cloud call yet.
    Pending,
    /// StartVM journaled an idempotency token; the instance is being created
    /// and its agent awaited.
    Creating,
    /// The instance exists and its agent endpoint answered.
    Running,
    /// StopVM (or an expiry) was journaled; the instance is being deleted.
    Deleting,
    /// Creation gave up; the instance, if any, is still deleted.
    Failed,
    /// The record is gone from the journal.
    Removed,
}

impl State {
    /// Every state, in lifecycle order (for tables, metrics and tests).
    pub const ALL: [State; 6] = [
        State::Pending,
        State::Creating,
        State::Running,
        State::Deleting,
        State::Failed,
        State::Removed,
    ];

    /// The states a stored record can be in.
    pub const STORED: [State; 5] = [
        State::Pending,
        State::Creating,
        State::Running,
        State::Deleting,
        State::Failed,
    ];

    /// The lower-case name used in the admin API, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Creating => "creating",
            State::Running => "running",
            State::Deleting => "deleting",
            State::Failed => "failed",
            State::Removed => "removed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The legal transitions, and nothing else.
///
/// - `Pending → Creating` (StartVM), `Pending → Deleting` (StopVM, expiry)
/// - `Creating → Running` (agent answered), `→ Failed` (gave up),
///   `→ Deleting` (StopVM during creation)
/// - `Running → Deleting` (StopVM), `→ Failed` (the instance vanished)
/// - `Failed → Deleting` (StopVM, expiry)
/// - `Deleting → Removed` (the provider says the instance is gone)
const TRANSITIONS: &[(State, State)] = &[
    (State::Pending, State::Creating),
    (State::Pending, State::Deleting),
    (State::Creating, State::Running),
    (State::Creating, State::Failed),
    (State::Creating, State::Deleting),
    (State::Running, State::Deleting),
    (State::Running, State::Failed),
    (State::Failed, State::Deleting),
    (State::Deleting, State::Removed),
];

/// Whether `from → to` is a legal transition.
pub fn valid_transition(from: State, to: State) -> bool {
    TRANSITIONS.contains(&(from, to))
}

/// A transition the lifecycle table forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("A pod VM cannot move from {from} to {to}")]
pub struct IllegalTransition {
    /// The state the pod VM is in.
    pub from: State,
    /// The state it was asked to move to.
    pub to: State,
}

/// `Ok` if `from → to` is legal, else the error naming both states.
pub fn check_transition(from: State, to: State) -> Result<(), IllegalTransition> {
    if valid_transition(from, to) {
        Ok(())
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of the 36 pairs, spelled out, so that changing the table
    /// means changing this test on purpose.
    #[test]
    fn every_pair_of_states_is_legal_or_illegal_as_specified() {
        use State::*;
        let legal: &[(State, &[State])] = &[
            (Pending, &[Creating, Deleting]),
            (Creating, &[Running, Failed, Deleting]),
            (Running, &[Deleting, Failed]),
            (Deleting, &[Removed]),
            (Failed, &[Deleting]),
            (Removed, &[]),
        ];
        let mut checked = 0;
        for from in State::ALL {
            let allowed = legal.iter().find(|(f, _)| *f == from).unwrap().1;
            for to in State::ALL {
                checked += 1;
                assert_eq!(
                    valid_transition(from, to),
                    allowed.contains(&to),
                    "{from} -> {to}"
                );
                assert_eq!(check_transition(from, to).is_ok(), allowed.contains(&to));
            }
        }
        assert_eq!(checked, 36);
    }

    #[test]
    fn no_state_moves_to_itself_and_removed_is_terminal() {
        for s in State::ALL {
            assert!(!valid_transition(s, s), "{s} -> {s}");
            assert!(!valid_transition(State::Removed, s));
        }
    }

    #[test]
    fn illegal_transition_message_names_both_states() {
        let e = check_transition(State::Running, State::Creating).unwrap_err();
        assert_eq!(
            e.to_string(),
            "A pod VM cannot move from running to creating"
        );
    }

    #[test]
    fn states_serialize_in_lower_case() {
        for s in State::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
