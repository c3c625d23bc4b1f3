//! Replacing a small file so that a crash leaves its old content or its new
//! content, never a part: the journal's identity and doubt marker, the
//! daemon's TLS keys, the local provider's instance files.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Replaces the file at `path` with `bytes`, atomically and durably.
///
/// The bytes go to `<path>.tmp` beside it, which gets `mode` (`None`: the
/// process's default, `0o666` less the umask) before anything is written to
/// it, and is synced; then it is renamed over `path`, and the directory is
/// synced so that the new name survives a crash too. A reader sees the old
/// content or the new, never a part.
///
/// # Errors
///
/// The I/O error of the step that failed; `path` then still holds its old
/// content. A `<path>.tmp` may be left behind: the next write replaces it.
/// `path` without a file name is [`io::ErrorKind::InvalidInput`].
pub fn write_atomically(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if let Some(mode) = mode {
        options.mode(mode);
    }
    let mut file = options.open(&tmp)?;
    if let Some(mode) = mode {
        // A stale temporary file keeps the mode it was made with.
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Syncs the directory holding `path`, so that a name just made or renamed
/// in it is durable.
///
/// # Errors
///
/// The directory cannot be opened or synced.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => File::open(".")?.sync_all(),
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `<path>.tmp`, in the same directory (a rename never crosses file systems).
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        ));
    };
    let mut tmp = name.to_owned();
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_file_is_replaced_whole_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        write_atomically(&path, b"old", None).unwrap();
        write_atomically(&path, b"new content", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new content");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["identity.json"]);
    }

    #[test]
    fn the_mode_is_set_even_over_a_stale_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let stale = dir.path().join("client.key.tmp");
        std::fs::write(&stale, b"left by a crash").unwrap();
        std::fs::set_permissions(&stale, Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"secret", Some(0o600)).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert!(!stale.exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mark");
        write_atomically(&path, b"old", None).unwrap();
        // The temporary file cannot be made: a directory holds its name.
        std::fs::create_dir(dir.path().join("mark.tmp")).unwrap();
        assert!(write_atomically(&path, b"new", None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let e = write_atomically(Path::new("/"), b"x", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
