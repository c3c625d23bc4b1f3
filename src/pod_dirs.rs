//! Pod directories (`<pods-dir>/<sandbox id>/`) that outlived their
//! sandbox: left by a daemon stopped between removing a record and its
//! directory, or by a release that made one for every CreateVM, refused
//! ones too. The GC removes those no record owns.
//!
//! Only what podvisor made is ever removed: a directory (not a symlink)
//! directly under `--pods-dir`, owned by this daemon's user, named as a
//! sandbox id, and holding nothing but its agent socket. Whatever else sits
//! there is somebody else's, and is left alone.

use crate::proxy::socket::AGENT_SOCKET;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Longest sandbox id accepted (containerd's are 64 hex characters).
const MAX_SANDBOX_ID: usize = 128;

/// Checks a sandbox id, which names a directory under the pods dir: the
/// rule CreateVM ([`crate::api::validate_sandbox_id`]) and the sweep of
/// stale pod directories share.
///
/// # Errors
/// A sentence naming the problem when the id is empty, longer than 128
/// characters, `.` or `..`, or holds anything but letters, digits, `-`,
/// `_` and `.`.
pub fn check_sandbox_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("The sandbox id is empty".to_owned());
    }
    let length = id.chars().count();
    if length > MAX_SANDBOX_ID {
        return Err(format!(
            "The sandbox id is {length} characters long; at most {MAX_SANDBOX_ID} are accepted"
        ));
    }
    // Made of allowed characters, yet no directory of its own under the
    // pods dir.
    let names = match id {
        "." => Some("the pods dir itself"),
        ".." => Some("the pods dir's parent"),
        _ => None,
    };
    if let Some(names) = names {
        return Err(format!(
            "The sandbox id {id:?} names a directory, {names}, not one of its own under the pods dir"
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "The sandbox id {id:?} may only hold letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The names of the directories under `pods_dir` that podvisor made (see
/// the module documentation), whether or not a record owns them.
///
/// # Errors
/// `pods_dir` cannot be listed. An entry that cannot be read is skipped.
pub fn made_by_podvisor(pods_dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(pods_dir)? {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if check_sandbox_id(&name).is_ok()
            && is_made_by_podvisor(&pods_dir.join(&name)).unwrap_or(false)
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Removes the pod directory `name` under `pods_dir` if it is still one
/// podvisor made: its agent socket, then the directory, which must then be
/// empty (never a recursive removal). `Ok(false)` when there was nothing
/// of podvisor's to remove.
///
/// # Errors
/// The socket or the directory cannot be removed.
pub fn remove(pods_dir: &Path, name: &str) -> io::Result<bool> {
    if check_sandbox_id(name).is_err() {
        return Ok(false);
    }
    let dir = pods_dir.join(name);
    if !is_made_by_podvisor(&dir).unwrap_or(false) {
        return Ok(false);
    }
    match std::fs::remove_file(dir.join(AGENT_SOCKET)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `dir` is a pod directory as podvisor makes it: a directory of
/// this user's, holding nothing or only its agent socket.
fn is_made_by_podvisor(dir: &Path) -> io::Result<bool> {
    // Not followed: a symlink is not podvisor's.
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != AGENT_SOCKET || !entry.file_type()?.is_socket() {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pod_directories_podvisor_made_are_found_and_removed() {
        let pods = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let path = pods.path().join(name);
            std::fs::create_dir(&path).unwrap();
            path
        };
        dir("empty");
        let with_socket = dir("with-socket");
        drop(std::os::unix::net::UnixListener::bind(with_socket.join(AGENT_SOCKET)).unwrap());
        let with_file = dir("with-file");
        std::fs::write(with_file.join(AGENT_SOCKET), "").unwrap();
        let with_other = dir("with-other");
        std::fs::write(with_other.join("notes"), "").unwrap();
        dir("lost+found");
        std::fs::write(pods.path().join("a-file"), "").unwrap();
        let target = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(target.path(), pods.path().join("a-link")).unwrap();

        let found = made_by_podvisor(pods.path()).unwrap();
        assert_eq!(found, ["empty", "with-socket"]);
        for name in &found {
            assert!(remove(pods.path(), name).unwrap(), "{name}");
            assert!(!pods.path().join(name).exists(), "{name}");
        }
        for name in [
            "with-file",
            "with-other",
            "lost+found",
            "a-file",
            "a-link",
            "..",
        ] {
            assert!(!remove(pods.path(), name).unwrap(), "{name}");
        }
        assert!(with_file.join(AGENT_SOCKET).is_file());
        assert!(with_other.join("notes").is_file());
        assert!(target.path().is_dir());
        assert!(!remove(pods.path(), "empty").unwrap(), "gone already");
    }
}
