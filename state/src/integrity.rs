//! The journal's identity and its durable high-water mark: how the daemon
//! tells a journal that lost records from a fresh one.
//!
//! sled can come back from a damaged file as an empty or truncated database
//! without an error. Two small files, written by podvisor beside sled's own
//! files but never by sled, survive that:
//!
//! - `podvisor-identity.json`: a random journal id, made once, when the
//!   journal is created. The same id is kept inside sled (tree `meta`), and
//!   every instance the daemon creates is tagged with it
//!   (`podvisor.io/journal`), so an instance says which journal answers for
//!   it — and one made by another daemon (a wiped state directory, or a
//!   second daemon with the same node name) is never taken for this
//!   journal's.
//! - `podvisor-mark`: the journal's write sequence (one per `put` and
//!   `remove`) as of the last completed flush, written *after* sled's flush
//!   and synced. sled's own copy of the sequence can therefore never be
//!   behind the mark unless sled lost writes.
//!
//! [`Verdict`] is what opening found. Only an [`Verdict::Intact`] (or
//! [`Verdict::Fresh`]) journal may let the orphan GC delete anything.

use crate::atomic_file::{sync_parent, write_atomically};
use crate::record::UnixMillis;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The identity file, in the journal directory.
pub const IDENTITY_FILE: &str = "podvisor-identity.json";
/// The high-water mark file, in the journal directory.
pub const MARK_FILE: &str = "podvisor-mark";
/// The mark file's fixed size: it is rewritten in place, padded.
const MARK_SIZE: usize = 256;

/// Who a journal is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalIdentity {
    /// 32 lower-case hex characters, random, made once.
    pub id: String,
    /// When the journal was made, Unix milliseconds.
    pub created_at: UnixMillis,
}

impl JournalIdentity {
    /// A new identity.
    pub fn generate(now: UnixMillis) -> Self {
        Self {
            id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            created_at: now,
        }
    }
}

/// The durable high-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Writes (puts and removes) the journal had made durable.
    pub seq: u64,
}

/// What opening the journal found about its integrity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// A new journal: no identity, no records. Nothing was lost.
    Fresh,
    /// The journal is the one its identity names and holds every write
    /// its mark says was made durable.
    Intact,
    /// The journal may have lost records: the orphan GC must not delete
    /// anything on its word.
    InDoubt {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

impl Verdict {
    /// Whether the journal can be trusted to say an instance is unowned.
    pub fn is_trusted(&self) -> bool {
        matches!(self, Verdict::Fresh | Verdict::Intact)
    }
}

/// Why the identity or the mark could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}")]
pub struct IntegrityIoError {
    /// The file.
    pub path: String,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// The two files of one journal directory.
#[derive(Debug, Clone)]
pub struct IntegrityFiles {
    identity: PathBuf,
    mark: PathBuf,
}

impl IntegrityFiles {
    /// The files in the journal directory `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            identity: dir.join(IDENTITY_FILE),
            mark: dir.join(MARK_FILE),
        }
    }

    /// The identity, if the file exists; one that does not parse is the
    /// inner `Err`, with a message naming the file.
    ///
    /// # Errors
    /// [`IntegrityIoError`] naming the identity file when it exists but
    /// cannot be read.
    pub fn read_identity(
        &self,
    ) -> Result<Option<Result<JournalIdentity, String>>, IntegrityIoError> {
        match std::fs::read(&self.identity) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                format!("{} does not parse: {e}", self.identity.display())
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.io(&self.identity, source)),
        }
    }

    /// Writes the identity (once, at creation), synced with its directory.
    ///
    /// # Errors
    /// [`IntegrityIoError`] naming the identity file when the atomic write
    /// (temporary file, rename, directory sync) fails.
    pub fn write_identity(&self, identity: &JournalIdentity) -> Result<(), IntegrityIoError> {
        let bytes = serde_json::to_vec_pretty(identity).unwrap_or_default();
        write_atomically(&self.identity, &bytes, None)
            .map_err(|source| self.io(&self.identity, source))
    }

    /// The mark, if the file exists; one that does not parse reads as the
    /// inner `Err`, with a message naming the file.
    ///
    /// # Errors
    /// [`IntegrityIoError`] naming the mark file when it exists but cannot
    /// be read.
    pub fn read_mark(&self) -> Result<Option<Result<Mark, String>>, IntegrityIoError> {
        match std::fs::read(&self.mark) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                Ok(Some(serde_json::from_str(text.trim_end()).map_err(|e| {
                    format!("{} does not parse: {e}", self.mark.display())
                })))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.io(&self.mark, source)),
        }
    }

    /// Rewrites the mark in place (one fixed-size write and a data sync:
    /// one disk round trip per flush, not three), creating it if needed.
    ///
    /// # Errors
    /// [`IntegrityIoError`] naming the mark file when it cannot be opened,
    /// written or synced, or, on creation, its directory cannot be synced.
    pub fn write_mark(&self, mark: Mark) -> Result<(), IntegrityIoError> {
        let mut text = serde_json::to_string(&mark).unwrap_or_default();
        text.push('\n');
        let mut bytes = text.into_bytes();
        bytes.resize(MARK_SIZE, b' ');
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::FileExt as _;
            let created = !self.mark.exists();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.mark)?;
            f.write_all_at(&bytes, 0)?;
            f.sync_data()?;
            if created {
                sync_parent(&self.mark)?;
            }
            Ok(())
        };
        write().map_err(|source| self.io(&self.mark, source))
    }

    fn io(&self, path: &Path, source: std::io::Error) -> IntegrityIoError {
        IntegrityIoError {
            path: path.display().to_string(),
            source,
        }
    }
}

/// What opening found, from the three witnesses: the identity file, the
/// mark file and what sled itself holds (`stored_id`, `stored_seq`,
/// and whether it holds any record: `has_records`).
pub fn judge(
    identity: Option<&Result<JournalIdentity, String>>,
    mark: Option<&Result<Mark, String>>,
    stored_id: Option<&str>,
    stored_seq: u64,
    has_records: bool,
) -> Verdict {
    let doubt = |reason: String| Verdict::InDoubt { reason };
    match identity {
        None if mark.is_none() && stored_id.is_none() && stored_seq == 0 => {
            // Made by a podvisor before journals had identities, or new.
            if !has_records {
                Verdict::Fresh
            } else {
                Verdict::Intact
            }
        }
        None => doubt(format!(
            "the journal's identity file {IDENTITY_FILE} is missing, but the journal has been written to before"
        )),
        Some(Err(why)) => doubt(why.clone()),
        // The identity was made, but the first open crashed before sled
        // held it: no flush of this journal ever completed (the mark comes
        // after sled's flush), so nothing can have been lost.
        Some(Ok(_)) if stored_id.is_none() && mark.is_none() && stored_seq == 0 => {
            if !has_records {
                Verdict::Fresh
            } else {
                Verdict::Intact
            }
        }
        Some(Ok(identity)) => {
            if stored_id != Some(identity.id.as_str()) {
                return doubt(match stored_id {
                    None => format!(
                        "the database holds no journal identity (expected {}): it was deleted, replaced or came back empty",
                        identity.id
                    ),
                    Some(other) => format!(
                        "the database belongs to journal {other}, not to {} named by {IDENTITY_FILE}",
                        identity.id
                    ),
                });
            }
            match mark {
                None => doubt(format!("the high-water mark {MARK_FILE} is missing")),
                Some(Err(why)) => doubt(why.clone()),
                Some(Ok(mark)) if stored_seq < mark.seq => doubt(format!(
                    "the database holds writes up to {stored_seq}, but {} were made durable: records were lost",
                    mark.seq
                )),
                Some(Ok(_)) => Verdict::Intact,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_of_witnesses_gets_its_verdict() {
        // Readable witnesses, as `judge` receives them.
        let id = |s: &str| -> Result<JournalIdentity, String> {
            Ok(JournalIdentity {
                id: s.into(),
                created_at: 0,
            })
        };
        let mark = |seq| Ok(Mark { seq });
        assert_eq!(judge(None, None, None, 0, false), Verdict::Fresh);
        // A journal from before identities, with records: trusted as it is.
        assert_eq!(judge(None, None, None, 0, true), Verdict::Intact);
        assert_eq!(
            judge(Some(&id("a")), Some(&mark(5)), Some("a"), 5, true),
            Verdict::Intact
        );
        // sled ahead of the mark: a crash between sled's flush and the mark.
        assert_eq!(
            judge(Some(&id("a")), Some(&mark(5)), Some("a"), 7, true),
            Verdict::Intact
        );
        // A first open that crashed between the identity file and sled.
        assert_eq!(judge(Some(&id("a")), None, None, 0, false), Verdict::Fresh);
        for (identity, m, stored, seq, words) in [
            (
                Some(id("a")),
                Some(mark(5)),
                Some("a"),
                4,
                "records were lost",
            ),
            (Some(id("a")), Some(mark(5)), None, 0, "came back empty"),
            (
                Some(id("a")),
                Some(mark(5)),
                Some("b"),
                9,
                "belongs to journal b",
            ),
            (
                Some(id("a")),
                None,
                Some("a"),
                9,
                "mark podvisor-mark is missing",
            ),
            (None, Some(mark(5)), None, 0, "identity file"),
            (None, None, Some("a"), 3, "identity file"),
            (
                Some(Err("x does not parse".into())),
                Some(mark(1)),
                Some("a"),
                1,
                "does not parse",
            ),
            (
                Some(id("a")),
                Some(Err("m does not parse".into())),
                Some("a"),
                1,
                "does not parse",
            ),
        ] {
            match judge(identity.as_ref(), m.as_ref(), stored, seq, false) {
                Verdict::InDoubt { reason } => assert!(reason.contains(words), "{reason}"),
                other => panic!("{words}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_mark_is_rewritten_in_place_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = IntegrityFiles::in_dir(dir.path());
        assert!(files.read_mark().unwrap().is_none());
        files.write_mark(Mark { seq: 123_456 }).unwrap();
        files.write_mark(Mark { seq: 7 }).unwrap();
        assert_eq!(
            files.read_mark().unwrap().unwrap().unwrap(),
            Mark { seq: 7 }
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(MARK_FILE)).unwrap().len(),
            256
        );
        std::fs::write(dir.path().join(MARK_FILE), b"\x00garbage").unwrap();
        assert!(files.read_mark().unwrap().unwrap().is_err());
        let identity = JournalIdentity::generate(1);
        files.write_identity(&identity).unwrap();
        assert_eq!(files.read_identity().unwrap().unwrap().unwrap(), identity);
        assert_eq!(identity.id.len(), 32);
    }
}
