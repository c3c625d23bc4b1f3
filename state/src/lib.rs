//! The pod VM lifecycle, its records and its journal.
//!
//! Pure except for [`journal::SledJournal`]: the state machine
//! ([`machine::PodVmMachine`]) does no I/O and reads no clock.

pub mod integrity;
pub mod journal;
pub mod lifecycle;
pub mod machine;
pub mod naming;
pub mod record;

pub use integrity::{JournalIdentity, Verdict};
pub use journal::{Journal, JournalError, LoadReport, QuarantinedRecord, SledJournal};
pub use lifecycle::{IllegalTransition, State, check_transition, valid_transition};
pub use machine::{
    Backoff, Command, Ensured, Event, MachineConfig, OpFailure, Operation, PodVmMachine,
    RecoveryAction, StartError, TimerKind, Waiter,
};
pub use naming::{idempotency_token, instance_name};
pub use record::{InstanceRecord, InstanceRef, InstanceSpec, SCHEMA_VERSION, UnixMillis};
