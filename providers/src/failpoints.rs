//! Crash points inside providers, for the crash-safety tests.
//!
//! As the daemon's own (`src/failpoints.rs` in the podvisor crate, which
//! arms them all from `FAILPOINTS` at start-up): compiled in only with the
//! cargo feature `failpoints`, and a no-op without it. An armed point kills
//! the process with SIGKILL; `return(MS)` waits MS milliseconds first, so a
//! test can act while a provider call hangs at that step, then see it die
//! there — e.g. `FAILPOINTS='libvirt-volumes-before-define=return(8000)'`.

/// In a libvirt create, after the instance's volumes are made, before its
/// domain is defined.
pub const LIBVIRT_VOLUMES_BEFORE_DEFINE: &str = "libvirt-volumes-before-define";

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
