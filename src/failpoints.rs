//! The daemon's crash points, for the crash-safety tests.
//!
//! Their mechanism is the providers' (`podvisor_providers::failpoints`):
//! compiled in only with the cargo feature `failpoints` (which enables it
//! there), a no-op without it. [`arm`] arms the daemon's points and the
//! providers' from the `FAILPOINTS` environment variable at start-up:
//! `FAILPOINTS='creating-before-create=return'` makes the daemon kill
//! itself with SIGKILL the first time it gets there — exactly what a crash
//! or an OOM kill at that step would do.

pub use podvisor_providers::failpoints::{arm, hit};

/// After `Creating` is journaled, before the cloud create is sent.
pub const CREATING_BEFORE_CREATE: &str = "creating-before-create";
/// After the cloud create returned, before `Running` is journaled.
pub const CREATED_BEFORE_RUNNING: &str = "created-before-running";
/// While waiting for the pod VM's agent to answer.
pub const DURING_READINESS: &str = "during-readiness";
/// After `Deleting` is journaled, before the cloud delete is sent.
pub const DELETING_BEFORE_DELETE: &str = "deleting-before-delete";
/// After the cloud delete succeeded, before the record is removed.
pub const DELETED_BEFORE_REMOVE: &str = "deleted-before-remove";
/// Half-way through start-up recovery.
pub const MID_RECOVERY: &str = "mid-recovery";
/// In an orphan GC pass, after the listing, before any delete.
pub const DURING_GC: &str = "during-gc";

/// In a pod tunnel's set-up (StartVM, or recovery rebuilding a missing
/// tunnel), after the VXLAN device is made in the host network namespace,
/// before it is moved into the pod's. Only reached with a pod network, so
/// not in [`ALL`] (the crash test's daemon has none): the pod network's
/// end-to-end test crashes here.
pub const TUNNEL_CREATED_BEFORE_MOVE: &str = "tunnel-created-before-move";

/// Every crash point of the lifecycle, in its order.
pub const ALL: &[&str] = &[
    CREATING_BEFORE_CREATE,
    CREATED_BEFORE_RUNNING,
    DURING_READINESS,
    DELETING_BEFORE_DELETE,
    DELETED_BEFORE_REMOVE,
    MID_RECOVERY,
    DURING_GC,
];
