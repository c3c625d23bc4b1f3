//! What the benchmarks share.

/// The count after the flag `name` on the command line (`--writes 500`),
/// or `default` when the flag is absent.
///
/// # Panics
///
/// When the value after the flag is not a whole number.
// Not every bench takes counts.
#[allow(dead_code)]
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a count"))
}

/// Prints one promise's verdict (`SPECIFICATION.md`): its figures, the
/// measured ratio to its floor, the bound and PASS or FAIL; returns whether
/// it held.
// Not every bench checks a promise.
#[allow(dead_code)]
pub fn verdict(promise: &str, figures: &str, ratio: f64, bound: &str, held: bool) -> bool {
    println!(
        "{promise}: {figures}; ratio {ratio:.2}, bound {bound}: {}",
        if held { "PASS" } else { "FAIL" }
    );
    held
}

/// A pods dir (agent sockets): a new directory on tmpfs (`/dev/shm`) where
/// there is one, as a node's `/run/peerpod/pods` is — binding sockets in
/// fresh directories on a disk file system costs what no node pays — else
/// `fallback`. Keep the guard alive as long as the directory is used.
// Not every bench binds agent sockets.
#[allow(dead_code)]
pub fn tmpfs_pods_dir(
    fallback: std::path::PathBuf,
) -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    let tmpfs = tempfile::tempdir_in("/dev/shm").ok();
    let pods = tmpfs.as_ref().map_or(fallback, |d| d.path().to_owned());
    (tmpfs, pods)
}

/// The daemon's pods dir, as [`tmpfs_pods_dir`] makes it; prints which.
// Not every bench runs a daemon.
#[allow(dead_code)]
pub fn pods_dir(fallback: std::path::PathBuf) -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    let (tmpfs, pods) = tmpfs_pods_dir(fallback);
    println!("pods dir (agent sockets): {}", pods.display());
    (tmpfs, pods)
}
