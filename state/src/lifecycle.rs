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
    /// Every state, in lifecycle order (for tables, metrics and tests):
    /// `Pending` and every state the table reaches from it, in declaration
    /// order. Derived from [`State::next_states`], so it cannot miss a state
    /// a transition names.
    pub const ALL: [State; STATE_COUNT] = all();

    /// The states a stored record can be in: all but `Removed`.
    pub const STORED: [State; STATE_COUNT - 1] = stored();

    /// The lifecycle table, one row per state: the states this one may move
    /// to, and nothing else. The `match` is exhaustive, so a new state does
    /// not compile without its row; [`State::ALL`], [`valid_transition`] and
    /// [`check_transition`] all read this one table.
    ///
    /// - `Pending → Creating` (StartVM), `Pending → Deleting` (StopVM, expiry)
    /// - `Creating → Running` (agent answered), `→ Failed` (gave up),
    ///   `→ Deleting` (StopVM during creation)
    /// - `Running → Deleting` (StopVM), `→ Failed` (the instance vanished)
    /// - `Failed → Deleting` (StopVM, expiry)
    /// - `Deleting → Removed` (the provider says the instance is gone)
    pub const fn next_states(self) -> &'static [State] {
        use State::*;
        match self {
            Pending => &[Creating, Deleting],
            Creating => &[Running, Failed, Deleting],
            Running => &[Deleting, Failed],
            Deleting => &[Removed],
            Failed => &[Deleting],
            Removed => &[],
        }
    }

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

/// How many states [`State::ALL`] holds: those the table reaches from
/// `Pending`.
const STATE_COUNT: usize = reachable().1;

/// More states than the lifecycle will ever have: the scratch space of
/// [`reachable`] (checked there at compile time).
const MAX_STATES: usize = 32;

/// `Pending` and every state the table reaches from it, sorted in
/// declaration order, and how many there are. Runs at compile time.
const fn reachable() -> ([State; MAX_STATES], usize) {
    let mut found = [State::Pending; MAX_STATES];
    let mut count = 1;
    // Breadth first: `found[..count]` grows as rows name new states.
    let mut next = 0;
    while next < count {
        let row = found[next].next_states();
        let mut i = 0;
        while i < row.len() {
            if !contains(&found, count, row[i]) {
                assert!(count < MAX_STATES, "raise MAX_STATES");
                found[count] = row[i];
                count += 1;
            }
            i += 1;
        }
        next += 1;
    }
    // Insertion sort into declaration (lifecycle) order.
    let mut i = 1;
    while i < count {
        let mut j = i;
        while j > 0 && (found[j - 1] as u8) > (found[j] as u8) {
            let swap = found[j - 1];
            found[j - 1] = found[j];
            found[j] = swap;
            j -= 1;
        }
        i += 1;
    }
    (found, count)
}

/// Whether `states[..count]` holds `state`.
const fn contains(states: &[State], count: usize, state: State) -> bool {
    let mut i = 0;
    while i < count {
        if states[i] as u8 == state as u8 {
            return true;
        }
        i += 1;
    }
    false
}

/// The first [`STATE_COUNT`] of [`reachable`]: [`State::ALL`].
const fn all() -> [State; STATE_COUNT] {
    let (found, _) = reachable();
    let mut out = [State::Pending; STATE_COUNT];
    let mut i = 0;
    while i < STATE_COUNT {
        out[i] = found[i];
        i += 1;
    }
    out
}

/// [`State::ALL`] but the states without a stored record (`Removed`).
const fn stored() -> [State; STATE_COUNT - 1] {
    let mut out = [State::Pending; STATE_COUNT - 1];
    let mut n = 0;
    let mut i = 0;
    while i < STATE_COUNT {
        let state = State::ALL[i];
        if !matches!(state, State::Removed) {
            out[n] = state;
            n += 1;
        }
        i += 1;
    }
    assert!(n == STATE_COUNT - 1, "Removed is reachable");
    out
}

/// Whether `from → to` is a legal transition (a row of
/// [`State::next_states`]).
pub const fn valid_transition(from: State, to: State) -> bool {
    let row = from.next_states();
    contains(row, row.len(), to)
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
///
/// # Errors
/// [`IllegalTransition`] naming `from` and `to` when the lifecycle table
/// has no such row.
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
    fn all_and_stored_list_every_state_once_in_lifecycle_order() {
        use State::*;
        assert_eq!(
            State::ALL,
            [Pending, Creating, Running, Deleting, Failed, Removed]
        );
        assert_eq!(
            State::STORED,
            [Pending, Creating, Running, Deleting, Failed]
        );
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
