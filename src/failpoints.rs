//! Crash points for the crash-safety tests.
//!
//! Compiled in only with the cargo feature `failpoints`; without it,
//! [`hit`] is an empty inline function. With it, the `FAILPOINTS`
//! environment variable arms them at start-up (the `fail` crate's syntax):
//! `FAILPOINTS='creating-before-create=return'` makes the daemon kill
//! itself with SIGKILL the first time it gets there — exactly what a crash
//! or an OOM kill at that step would do. `1*return` fires once, `20%return`
//! at random; any other `fail` action (`sleep(100)`, `pause`) works too.
//! The same variable arms the crash points inside providers
//! (`podvisor_providers::failpoints`, enabled by this feature).

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

/// Every crash point, in lifecycle order.
pub const ALL: &[&str] = &[
    CREATING_BEFORE_CREATE,
    CREATED_BEFORE_RUNNING,
    DURING_READINESS,
    DELETING_BEFORE_DELETE,
    DELETED_BEFORE_REMOVE,
    MID_RECOVERY,
    DURING_GC,
];

/// Arms the crash points from `FAILPOINTS`. Call once at start-up.
pub fn arm() {
    #[cfg(feature = "failpoints")]
    {
        // The scenario's guard must live as long as the process.
        std::mem::forget(fail::FailScenario::setup());
    }
}

/// Passes the crash point `name`: kills the process if it is armed.
#[inline]
pub fn hit(name: &'static str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| crash(name));
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
fn crash(name: &'static str) {
    use nix::sys::signal::{Signal, kill};
    eprintln!("podvisor: crash point {name}: SIGKILL");
    let _ = kill(nix::unistd::Pid::this(), Signal::SIGKILL);
    std::process::abort();
}
