//! Test support (feature `testing`), for this crate's tests and other
//! crates' tests and benchmarks:
//!
//! - locating this crate's binaries (`podvisor-forwarder`,
//!   `podvisor-userdata`): Cargo only exposes `CARGO_BIN_EXE_*` to a
//!   binary's own package, so tests elsewhere find it in the target
//!   directory beside their own executable, building it once if it is not
//!   there;
//! - [`free_port`]: a loopback port for a test to bind later.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A free TCP port on 127.0.0.1, for a test to bind later (a daemon, a
/// stand-in server, a forwarder) or to find closed.
///
/// The port is below the kernel's ephemeral range (32768 and up), so no
/// outgoing connection can take it between now and then, and it is never
/// handed out twice in one process: candidates in 20000..32000 are walked
/// from a random start, each checked by binding it and letting it go.
///
/// # Panics
///
/// When no port in 20000..32000 can be bound.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    // Random per process, so test processes running at once start apart.
    let next = NEXT.get_or_init(|| {
        let start = RandomState::new().hash_one(std::process::id()) % u64::from(SPAN);
        AtomicU32::new(start as u32)
    });
    for _ in 0..SPAN {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {LOW}..{}", LOW + SPAN)
}

/// The path of an up-to-date `podvisor-forwarder` (and `podvisor-userdata`
/// beside it), built once per test process.
///
/// # Errors
/// A message saying why when the test binary's path is not inside a cargo
/// target directory, cargo cannot be run, or the build fails; the first
/// answer is kept for the whole process.
pub fn forwarder_binary() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(locate_or_build).clone()
}

/// The path of a built `podvisor-userdata` (built with the forwarder).
///
/// # Errors
/// Those of [`forwarder_binary`], or "… is not built" when the binary is
/// not beside the forwarder.
pub fn userdata_binary() -> Result<PathBuf, String> {
    let path = forwarder_binary()?.with_file_name("podvisor-userdata");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is not built", path.display()))
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test> → target/<profile>/podvisor-forwarder
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| format!("unexpected test path {}", exe.display()))?;
    let candidate = profile_dir.join("podvisor-forwarder");
    // Always ask cargo (a no-op when up to date): a binary left by an
    // earlier build of other sources would test the wrong code.
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected target layout {}", profile_dir.display()))?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "podvisor-podvm", "--bins"])
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build the pod VM binaries: {e}"))?;
    if status.success() && candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "building podvisor-forwarder failed ({status}); expected {}",
            candidate.display()
        ))
    }
}
