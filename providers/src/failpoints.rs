//! Crash points, for the crash-safety tests: the one mechanism behind the
//! daemon's points (`src/failpoints.rs` in the podvisor crate, which names
//! them) and the providers' own (below).
//!
//! Compiled in only with the cargo feature `failpoints`; without it,
//! [`arm`] and [`hit`] are empty inline functions. With it, the `FAILPOINTS`
//! environment variable arms them at start-up (the `fail` crate's syntax):
//! `FAILPOINTS='creating-before-create=return'` makes the process kill
//! itself with SIGKILL the first time it gets there — exactly what a crash
//! or an OOM kill at that step would do. `1*return` fires once, `20%return`
//! at random; `return(MS)` waits MS milliseconds first, so a test can act
//! while a call hangs at that step, then see it die there — e.g.
//! `FAILPOINTS='libvirt-volumes-before-define=return(8000)'`. Any other
//! `fail` action (`sleep(100)`, `pause`) works too.

/// In a libvirt create, after the instance's volumes are made, before its
/// domain is defined.
pub const LIBVIRT_VOLUMES_BEFORE_DEFINE: &str = "libvirt-volumes-before-define";

/// In an IBM Cloud create, after VPC accepted the instance, before its
/// tags are attached (VPC takes no tags in the create call).
pub const IBMCLOUD_CREATED_BEFORE_TAGS: &str = "ibmcloud-created-before-tags";

/// In an Azure create, after ARM accepted the VM's PUT, before its
/// long-running operation is followed (and so before the daemon journals
/// the instance).
pub const AZURE_PUT_BEFORE_WAIT: &str = "azure-put-before-wait";

/// Arms every crash point, the daemon's and the providers', from
/// `FAILPOINTS`. Call once at start-up.
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
    fail::fail_point!(name, |wait: Option<String>| crash(name, wait));
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
fn crash(name: &'static str, wait: Option<String>) {
    use nix::sys::signal::{Signal, kill};
    if let Some(ms) = wait.and_then(|w| w.parse::<u64>().ok()) {
        eprintln!("podvisor: crash point {name}: SIGKILL in {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    eprintln!("podvisor: crash point {name}: SIGKILL");
    let _ = kill(nix::unistd::Pid::this(), Signal::SIGKILL);
    std::process::abort();
}
