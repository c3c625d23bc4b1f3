//! The pod VM lifecycle, its records and its journal.
//!
//! The state machine ([`machine::PodVmMachine`]) and the lifecycle table
//! ([`lifecycle`]) do no I/O and read no clock; the journal
//! ([`journal::SledJournal`]), [`write_atomically`] and [`now_millis`] do.

pub mod atomic_file;
mod group_commit;
pub mod integrity;
pub mod journal;
pub mod lifecycle;
pub mod machine;
pub mod naming;
pub mod record;
pub mod report;

pub use atomic_file::write_atomically;
pub use integrity::{JournalIdentity, Verdict};
pub use journal::{
    Journal, JournalError, JournalFuture, LoadReport, QuarantinedRecord, SledJournal,
};
pub use lifecycle::{IllegalTransition, State, check_transition, valid_transition};
pub use machine::{
    Backoff, Command, Ensured, Event, MachineConfig, OpFailure, Operation, PodVmMachine,
    RecoveryAction, StartError, TimerKind, Waiter,
};
pub use naming::{idempotency_token, instance_name};
pub use record::{
    InstanceRecord, InstanceRef, InstanceSpec, SCHEMA_VERSION, UnixMillis, now_millis,
};
pub use report::report;
