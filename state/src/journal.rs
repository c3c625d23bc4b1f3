//! The journal: where every pod VM record lives between daemon runs.
//!
//! [`Journal`] is the contract; [`SledJournal`] is the implementation, on
//! sled 0.34.7. A value that does not decode is moved to a quarantine tree,
//! reported, and never crashes the daemon or vanishes silently.

use crate::atomic_file::write_atomically;
use crate::group_commit::GroupCommit;
use crate::integrity::{IntegrityFiles, IntegrityIoError, JournalIdentity, Mark, Verdict, judge};
use crate::record::{DecodeError, InstanceRecord, UnixMillis, now_millis};
use crate::report::report;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A journal operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal directory could not be opened.
    #[error("Cannot open the journal at {path}: {reason}")]
    Open {
        /// The directory.
        path: String,
        /// What went wrong, in words an operator can act on.
        reason: String,
    },
    /// A read, write or flush failed; the storage error is the
    /// [`source`](std::error::Error::source) (see [`crate::report()`]).
    #[error("Journal {operation} failed")]
    Io {
        /// What the journal was doing.
        operation: &'static str,
        /// The storage error.
        #[source]
        source: sled::Error,
    },
    /// The identity, the high-water mark or the doubt marker could not be
    /// read or written.
    #[error("Journal integrity file {0}")]
    Integrity(#[from] IntegrityIoError),
    /// The failed flush of a batch of writers ([`Journal::flush`] groups
    /// concurrent flushes): every writer of the batch gets the same error.
    /// Reads as the error itself.
    #[error(transparent)]
    Shared(std::sync::Arc<JournalError>),
}

impl JournalError {
    /// The error itself, through any [`JournalError::Shared`].
    pub fn cause(&self) -> &JournalError {
        match self {
            JournalError::Shared(e) => e.cause(),
            e => e,
        }
    }
}

/// A value that did not decode, kept aside for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedRecord {
    /// This entry's stable id: its key in the quarantine,
    /// `<key>@<quarantined_at>` — with `-<n>` appended when an entry of the
    /// same key was quarantined in the same millisecond. Opaque to callers;
    /// [`Journal::drop_quarantined`] takes it. Filled from the quarantine's
    /// key when read, so entries written before ids existed have one too.
    #[serde(default)]
    pub id: String,
    /// The journal key it was stored under: the sandbox id, when readable.
    pub key: String,
    /// Why it could not be read.
    pub reason: String,
    /// When it was moved aside.
    pub quarantined_at: UnixMillis,
    /// The stored bytes, unchanged.
    pub bytes: Vec<u8>,
}

/// What [`Journal::load`] found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Every record that decoded.
    pub records: Vec<InstanceRecord>,
    /// The values quarantined by this load.
    pub quarantined: Vec<QuarantinedRecord>,
}

/// What [`Journal::flush_async`] returns.
pub type JournalFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), JournalError>> + Send>>;

/// Durable storage of instance records, keyed by sandbox id.
///
/// `put` and `remove` may buffer; `flush` makes everything before it durable.
/// All methods may block on disk — the daemon calls them off actor threads —
/// except [`Journal::flush_async`] and [`Journal::put_durable`], which the
/// pod VM actors call on their own thread and await: they must return a
/// future at once and wait inside it without holding a thread.
///
/// Concurrent callers of `flush` may share one flush (group commit): a
/// caller returns `Ok` only after a flush that started after its call
/// succeeded.
pub trait Journal: Send + Sync + 'static {
    /// Stores `record`, replacing the sandbox's previous one.
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `write`) when the storage refuses the
    /// write.
    fn put(&self, record: &InstanceRecord) -> Result<(), JournalError>;
    /// Deletes the sandbox's record; a missing record is fine.
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `remove`) when the storage refuses the
    /// delete.
    fn remove(&self, sandbox_id: &str) -> Result<(), JournalError>;
    /// Makes every earlier `put` and `remove` durable: it returns after a
    /// flush that started after the call has ended, which may be one that
    /// another caller runs for both (group commit).
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `write` or `flush`) when the storage
    /// cannot record the sequence or flush to disk;
    /// [`JournalError::Integrity`] when the high-water mark file cannot be
    /// written; [`JournalError::Shared`] holding one of those when the
    /// flush ran for a batch of callers.
    fn flush(&self) -> Result<(), JournalError>;
    /// [`Journal::flush`] as a future that holds no thread while it waits
    /// (a [`SledJournal`]'s flush runs on its flusher thread). The flush is
    /// asked for when this is called, not when the future is first polled.
    /// The default runs the blocking `flush` at the call.
    ///
    /// # Errors
    /// As [`Journal::flush`].
    fn flush_async(&self) -> JournalFuture {
        let result = self.flush();
        Box::pin(std::future::ready(result))
    }
    /// Stores `record` and makes it durable: [`Journal::put`], then
    /// [`Journal::flush_async`], as one future that ends after a flush
    /// covering the write. A [`SledJournal`] hands the encoded record to its
    /// flusher thread, which applies the writes handed over for a batch just
    /// before that batch's flush: the caller needs no thread of its own for
    /// the write, and concurrent writers share the flush (group commit).
    /// Writes handed over are applied in the order of these calls. No
    /// default: a wrapper that forgot to forward it would block its caller's
    /// thread on the disk.
    ///
    /// # Errors
    /// As [`Journal::put`] and [`Journal::flush`], in
    /// [`JournalError::Shared`]: the outcome of exactly the batch that
    /// applied (or dropped) this write. A write of another caller in the
    /// same batch that fails fails this one too, as a failed flush would
    /// (the writes after it in the batch are not applied).
    fn put_durable(&self, record: &InstanceRecord) -> JournalFuture;
    /// Reads the sandbox's record, quarantining it if it does not decode
    /// (then `Ok(None)`).
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `read` or `quarantine`) when the
    /// storage cannot be read, or the undecodable value cannot be moved
    /// aside; the errors of [`Journal::flush`] after quarantining.
    fn get(&self, sandbox_id: &str) -> Result<Option<InstanceRecord>, JournalError>;
    /// Reads every record, quarantining those that do not decode.
    ///
    /// # Errors
    /// As [`Journal::get`]: [`JournalError::Io`] when a record cannot be read
    /// or a bad one cannot be moved aside.
    fn load(&self) -> Result<LoadReport, JournalError>;
    /// Everything ever quarantined and not yet cleared by an operator.
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `read`) when the quarantine cannot be
    /// read.
    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, JournalError>;
    /// Removes the quarantine entry `id` ([`QuarantinedRecord::id`]) and
    /// makes the removal durable: an operator's decision that the record is
    /// not needed. Returns the entry removed, or `Ok(None)` when no entry
    /// has that id (nothing is written then).
    ///
    /// # Errors
    /// [`JournalError::Io`] (operation `remove`) when the storage refuses the
    /// delete; the errors of [`Journal::flush`] after it — the entry is then
    /// gone from this run's view but may come back at the next start.
    fn drop_quarantined(&self, id: &str) -> Result<Option<QuarantinedRecord>, JournalError>;
    /// Writes something harmless and flushes it: whether writes work now
    /// (after a failure, to learn whether the journal healed).
    ///
    /// # Errors
    /// [`JournalError::Io`] when the write or the flush fails — the journal
    /// has not healed; [`JournalError::Integrity`] when the mark cannot be
    /// written.
    fn probe(&self) -> Result<(), JournalError> {
        self.flush()
    }
    /// Who this journal is: instances the daemon creates carry its id.
    fn identity(&self) -> JournalIdentity;
    /// What opening found about the journal's integrity, or a doubt
    /// declared since ([`Journal::declare_doubt`]).
    fn verdict(&self) -> Verdict;
    /// The writes made durable by the last completed flush. An instance is
    /// tagged with it when created, after its `Creating` record was flushed:
    /// an instance whose tag is above the journal's sequence proves the
    /// journal older than the instance (a state directory restored from a
    /// copy).
    fn durable_sequence(&self) -> u64;
    /// Records that the journal may have lost records, found after opening
    /// (by the GC): durable across restarts until the loss is accepted.
    ///
    /// # Errors
    /// [`JournalError::Integrity`] when the doubt marker cannot be written
    /// (the verdict is then left unchanged).
    fn declare_doubt(&self, reason: &str) -> Result<(), JournalError>;
}

/// The sled-backed journal.
pub struct SledJournal {
    /// sandbox id → encoded [`InstanceRecord`].
    records: sled::Tree,
    /// `<key>@<millis>` → encoded [`QuarantinedRecord`].
    quarantine: sled::Tree,
    /// The journal id and write sequence, as sled holds them.
    meta: sled::Tree,
    /// What a flush writes; shared with the flusher thread.
    durable: Arc<Durable>,
    /// This journal's identity.
    identity: JournalIdentity,
    /// What opening found, or a doubt declared since.
    verdict: Mutex<Verdict>,
    /// The doubt marker's path.
    doubt_file: std::path::PathBuf,
    /// Runs every flush on its own thread, batching concurrent ones, and
    /// the writes handed over with them.
    commits: GroupCommit<JournalError, QueuedPut>,
}

/// A group commit's outcome as a [`JournalFuture`].
fn answered(commit: crate::group_commit::Commit<JournalError, QueuedPut>) -> JournalFuture {
    Box::pin(async move { commit.await.map_err(JournalError::Shared) })
}

/// A [`Journal::put_durable`]'s write, encoded by its caller, applied by
/// the flusher thread.
#[derive(Debug)]
struct QueuedPut {
    /// The sandbox id.
    key: String,
    /// The encoded record.
    value: Vec<u8>,
}

/// What a flush needs, shared by the journal and its flusher thread.
#[derive(Debug)]
struct Durable {
    /// The database; it holds an exclusive lock on its directory until the
    /// journal and its flusher thread are gone.
    db: sled::Db,
    /// The `meta` tree, where the sequence goes.
    meta: sled::Tree,
    /// The `records` tree, where handed-over writes go.
    records: sled::Tree,
    /// The identity and the mark, beside sled's files.
    files: IntegrityFiles,
    /// Writes made so far (puts and removes), durable or not.
    seq: AtomicU64,
    /// The sequence the mark last recorded. Only the flusher writes it, one
    /// flush at a time, so marks are written in order.
    marked: Mutex<u64>,
}

impl Durable {
    /// One batch: the handed-over `writes`, in order, then [`Durable::flush`].
    /// A write that fails ends the batch (those after it are not applied).
    fn apply_and_flush(&self, writes: &mut Vec<QueuedPut>) -> Result<(), JournalError> {
        for QueuedPut { key, value } in writes.drain(..) {
            self.put(&key, value)?;
        }
        self.flush()
    }

    /// Stores `value` under `key` (not yet durable) and counts the write
    /// in the sequence the next flush marks.
    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), JournalError> {
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.records
            .insert(key.as_bytes(), value)
            .map(drop)
            .map_err(|source| JournalError::Io {
                operation: "write",
                source,
            })
    }

    /// One flush, for every write completed before it: the sequence, sled's
    /// flush, then the mark — so the mark only moves forward, and only
    /// after sled holds what it counts.
    fn flush(&self) -> Result<(), JournalError> {
        let seq = self.seq.load(Ordering::SeqCst);
        let io = |operation| move |source| JournalError::Io { operation, source };
        self.meta
            .insert(META_SEQ, &seq.to_be_bytes())
            .map_err(io("write"))?;
        self.db.flush().map(drop).map_err(io("flush"))?;
        let mut marked = self
            .marked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seq > *marked || *marked == 0 {
            self.files.write_mark(Mark { seq })?;
            *marked = seq;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SledJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledJournal")
            .field("identity", &self.identity)
            .field("doubt_file", &self.doubt_file)
            .field("seq", &self.durable.seq)
            .finish_non_exhaustive()
    }
}

/// sled's database file in the journal directory: the file it locks.
const SLED_DB_FILE: &str = "db";

/// Whether another open file holds the lock on sled's database file `db`
/// (sled takes an exclusive `flock` on it and reports a held one only in
/// the words of an `ErrorKind::Other` error). Asked after sled refused to
/// open: if the holder let go in between, the refusal is reported as it is.
fn locked_by_another(db: &Path) -> bool {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = std::fs::File::open(db) else {
        return false;
    };
    // Taken and at once let go (the `Flock` unlocks on drop).
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// `meta` keys.
const META_ID: &[u8] = b"journal_id";
const META_SEQ: &[u8] = b"seq";
/// Marks a journal found in doubt until an operator accepts the loss
/// (`podvisor journal accept-loss`); its content says why.
pub const DOUBT_FILE: &str = "podvisor-doubt.json";

impl SledJournal {
    /// Opens (or creates) the journal in `dir`.
    ///
    /// Two daemons must never share a journal: sled locks the directory, and
    /// a second opener gets an error saying so.
    ///
    /// # Errors
    /// [`JournalError::Open`], naming `dir`, when the directory cannot be
    /// created, sled cannot open it (its reason says "it is locked" when
    /// another process holds it), the identity, mark or doubt marker cannot
    /// be read or written, or the first flush fails.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let open_err = |reason: String| JournalError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            if locked_by_another(&dir.join(SLED_DB_FILE)) {
                open_err(format!(
                    "it is locked, most likely by another running podvisor ({e})"
                ))
            } else {
                open_err(e.to_string())
            }
        })?;
        let records = db
            .open_tree("records")
            .map_err(|e| open_err(e.to_string()))?;
        let quarantine = db
            .open_tree("quarantine")
            .map_err(|e| open_err(e.to_string()))?;
        let meta = db.open_tree("meta").map_err(|e| open_err(e.to_string()))?;
        let stored_id = meta
            .get(META_ID)
            .map_err(|e| open_err(e.to_string()))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let stored_seq = meta
            .get(META_SEQ)
            .map_err(|e| open_err(e.to_string()))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let files = IntegrityFiles::in_dir(dir);
        let integrity_err = |e: IntegrityIoError| open_err(crate::report(&e));
        let identity_file = files.read_identity().map_err(integrity_err)?;
        let mark = files.read_mark().map_err(integrity_err)?;
        let doubt_file = dir.join(DOUBT_FILE);
        let verdict = match std::fs::read_to_string(&doubt_file) {
            // An earlier start found the loss; it stands until accepted.
            Ok(text) => Verdict::InDoubt {
                reason: serde_json::from_str::<Verdict>(&text)
                    .ok()
                    .and_then(|v| match v {
                        Verdict::InDoubt { reason } => Some(reason),
                        _ => None,
                    })
                    .unwrap_or(text),
            },
            // A marker that exists but cannot be read is no proof of health.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Verdict::InDoubt {
                reason: format!("{}: {e}", doubt_file.display()),
            },
            Err(_) => judge(
                identity_file.as_ref(),
                mark.as_ref(),
                stored_id.as_deref(),
                stored_seq,
                // Not `len()`: sled counts by reading every record.
                !records.is_empty(),
            ),
        };
        let identity = match (&identity_file, &stored_id) {
            (Some(Ok(identity)), _) => identity.clone(),
            (_, Some(id)) => JournalIdentity {
                id: id.clone(),
                created_at: now_millis(),
            },
            _ => JournalIdentity::generate(now_millis()),
        };
        if let Verdict::InDoubt { .. } = &verdict {
            // Keep the doubt across restarts: later writes would otherwise
            // carry the sequence past the mark and hide the loss.
            write_atomically(
                &doubt_file,
                &serde_json::to_vec(&verdict).unwrap_or_default(),
                None,
            )
            .map_err(|e| open_err(format!("{}: {e}", doubt_file.display())))?;
        }
        if !matches!(identity_file, Some(Ok(_))) {
            files.write_identity(&identity).map_err(integrity_err)?;
        }
        let start = match &mark {
            Some(Ok(m)) => m.seq.max(stored_seq),
            _ => stored_seq,
        };
        let durable = Arc::new(Durable {
            db,
            meta: meta.clone(),
            records: records.clone(),
            files,
            seq: AtomicU64::new(start),
            marked: Mutex::new(0),
        });
        let flusher = durable.clone();
        let commits = GroupCommit::spawn(
            "journal-flush",
            move |writes: &mut Vec<QueuedPut>| flusher.apply_and_flush(writes),
            |panic| JournalError::Io {
                operation: "flush",
                source: sled::Error::ReportableBug(format!(
                    "the journal's flush panicked: {panic}"
                )),
            },
        )
        .map_err(|e| open_err(format!("cannot start the journal's flusher thread: {e}")))?;
        let journal = Self {
            records,
            quarantine,
            meta,
            durable,
            identity,
            verdict: Mutex::new(verdict),
            doubt_file,
            commits,
        };
        journal
            .meta
            .insert(META_ID, journal.identity.id.as_bytes())
            .map_err(|e| open_err(e.to_string()))?;
        journal.flush().map_err(|e| open_err(report(&e)))?;
        Ok(journal)
    }

    /// Records that the operator accepts the loss of the journal in `dir`:
    /// the doubt marker goes, the mark is set to what the database holds,
    /// and from the next start the orphan GC may delete this journal's
    /// instances that no record owns. The daemon must not be running (sled
    /// locks the directory).
    ///
    /// # Errors
    /// The errors of [`SledJournal::open`] (a running daemon holds the lock);
    /// [`JournalError::Io`] when the sequence cannot be written or flushed;
    /// [`JournalError::Integrity`] when the mark cannot be written or the
    /// doubt marker cannot be removed.
    pub fn accept_loss(dir: &Path) -> Result<Verdict, JournalError> {
        let before = {
            let journal = Self::open(dir)?;
            let verdict = journal.verdict();
            let seq = journal.durable.seq.load(Ordering::SeqCst);
            journal
                .meta
                .insert(META_SEQ, &seq.to_be_bytes())
                .map_err(|source| JournalError::Io {
                    operation: "write",
                    source,
                })?;
            journal.flush()?;
            journal.durable.files.write_mark(Mark { seq })?;
            verdict
        };
        match std::fs::remove_file(dir.join(DOUBT_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(JournalError::Integrity(IntegrityIoError {
                    path: dir.join(DOUBT_FILE).display().to_string(),
                    source,
                }));
            }
        }
        Ok(before)
    }

    /// Moves one undecodable value aside and deletes it from `records`.
    fn quarantine_value(
        &self,
        key: &[u8],
        bytes: &[u8],
        reason: String,
    ) -> Result<QuarantinedRecord, JournalError> {
        let entry = self.insert_quarantined(QuarantinedRecord {
            id: String::new(),
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
            quarantined_at: now_millis(),
            bytes: bytes.to_vec(),
        })?;
        // Only remove the original if it is still the bad value we read.
        let _ = self
            .records
            .compare_and_swap(key, Some(bytes), None as Option<&[u8]>)
            .map_err(|source| JournalError::Io {
                operation: "quarantine",
                source,
            })?;
        self.flush()?;
        Ok(entry)
    }

    /// Stores `entry` in the quarantine under an id no other entry has —
    /// `<key>@<quarantined_at>`, or `<key>@<quarantined_at>-<n>` for the
    /// first free `n` — and returns it with that id. An entry is never
    /// overwritten. Not flushed.
    fn insert_quarantined(
        &self,
        mut entry: QuarantinedRecord,
    ) -> Result<QuarantinedRecord, JournalError> {
        let base = format!("{}@{}", entry.key, entry.quarantined_at);
        // Ends: each taken id is an entry, and there are finitely many.
        for n in 0u64.. {
            entry.id = if n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let value = serde_json::to_vec(&entry).expect("a QuarantinedRecord always serializes");
            let inserted = self
                .quarantine
                .compare_and_swap(entry.id.as_bytes(), None as Option<&[u8]>, Some(value))
                .map_err(|source| JournalError::Io {
                    operation: "quarantine",
                    source,
                })?;
            if inserted.is_ok() {
                break;
            }
        }
        Ok(entry)
    }
}

/// The quarantine entry stored under `id` as `value`. Its id is always the
/// quarantine's key, whatever the JSON says; an entry that does not decode
/// is still reported, with its raw bytes, and the key its id names.
fn quarantine_entry(id: &[u8], value: &[u8]) -> QuarantinedRecord {
    let id = String::from_utf8_lossy(id).into_owned();
    match serde_json::from_slice::<QuarantinedRecord>(value) {
        Ok(entry) => QuarantinedRecord { id, ..entry },
        Err(e) => QuarantinedRecord {
            key: id
                .rsplit_once('@')
                .map_or_else(|| id.clone(), |(key, _)| key.to_owned()),
            id,
            reason: format!("Unreadable quarantine entry: {e}"),
            quarantined_at: 0,
            bytes: value.to_vec(),
        },
    }
}

impl Journal for SledJournal {
    fn put(&self, record: &InstanceRecord) -> Result<(), JournalError> {
        self.durable.put(&record.sandbox_id, record.encode())
    }

    fn remove(&self, sandbox_id: &str) -> Result<(), JournalError> {
        self.durable.seq.fetch_add(1, Ordering::SeqCst);
        self.records
            .remove(sandbox_id.as_bytes())
            .map(drop)
            .map_err(|source| JournalError::Io {
                operation: "remove",
                source,
            })
    }

    fn flush(&self) -> Result<(), JournalError> {
        self.commits.flush().map_err(JournalError::Shared)
    }

    fn flush_async(&self) -> JournalFuture {
        answered(self.commits.commit())
    }

    fn put_durable(&self, record: &InstanceRecord) -> JournalFuture {
        answered(self.commits.commit_with(QueuedPut {
            key: record.sandbox_id.clone(),
            value: record.encode(),
        }))
    }

    fn get(&self, sandbox_id: &str) -> Result<Option<InstanceRecord>, JournalError> {
        let Some(bytes) =
            self.records
                .get(sandbox_id.as_bytes())
                .map_err(|source| JournalError::Io {
                    operation: "read",
                    source,
                })?
        else {
            return Ok(None);
        };
        match InstanceRecord::decode(&bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.quarantine_value(sandbox_id.as_bytes(), &bytes, e.to_string())?;
                Ok(None)
            }
        }
    }

    fn load(&self) -> Result<LoadReport, JournalError> {
        let mut report = LoadReport::default();
        let mut bad = Vec::new();
        let entries = self
            .records
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| JournalError::Io {
                operation: "read",
                source,
            })?;
        // Decoding costs more than reading (JSON against sled's pages):
        // start-up spreads it over the cores.
        let decoded = decode_all(&entries);
        for ((key, value), decoded) in entries.into_iter().zip(decoded) {
            match decoded {
                Ok(r) if r.sandbox_id.as_bytes() == key.as_ref() => report.records.push(r),
                Ok(r) => bad.push((
                    key,
                    value,
                    format!(
                        "Record for sandbox {} is stored under another key",
                        r.sandbox_id
                    ),
                )),
                Err(e) => bad.push((key, value, e.to_string())),
            }
        }
        for (key, value, reason) in bad {
            report
                .quarantined
                .push(self.quarantine_value(&key, &value, reason)?);
        }
        Ok(report)
    }

    fn probe(&self) -> Result<(), JournalError> {
        // A flush with nothing dirty may succeed on a database that fails
        // every write: write first.
        self.meta
            .insert(b"probe", &now_millis().to_be_bytes())
            .map_err(|source| JournalError::Io {
                operation: "write",
                source,
            })?;
        self.flush()
    }

    fn identity(&self) -> JournalIdentity {
        self.identity.clone()
    }

    fn verdict(&self) -> Verdict {
        self.verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn durable_sequence(&self) -> u64 {
        *self
            .durable
            .marked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn declare_doubt(&self, reason: &str) -> Result<(), JournalError> {
        let verdict = Verdict::InDoubt {
            reason: reason.to_owned(),
        };
        write_atomically(
            &self.doubt_file,
            &serde_json::to_vec(&verdict).unwrap_or_default(),
            None,
        )
        .map_err(|source| {
            JournalError::Integrity(IntegrityIoError {
                path: self.doubt_file.display().to_string(),
                source,
            })
        })?;
        *self
            .verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verdict;
        Ok(())
    }

    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, JournalError> {
        let mut out = Vec::new();
        for entry in &self.quarantine {
            let (id, value) = entry.map_err(|source| JournalError::Io {
                operation: "read",
                source,
            })?;
            out.push(quarantine_entry(&id, &value));
        }
        Ok(out)
    }

    fn drop_quarantined(&self, id: &str) -> Result<Option<QuarantinedRecord>, JournalError> {
        let Some(value) =
            self.quarantine
                .remove(id.as_bytes())
                .map_err(|source| JournalError::Io {
                    operation: "remove",
                    source,
                })?
        else {
            return Ok(None);
        };
        self.flush()?;
        Ok(Some(quarantine_entry(id.as_bytes(), &value)))
    }
}

impl SledJournal {
    /// Flushes run so far: one per batch of concurrent [`Journal::flush`]
    /// calls.
    pub fn flushes(&self) -> u64 {
        self.commits.batches()
    }

    /// Writes raw bytes under a key, bypassing encoding: for tests that need
    /// a corrupt record on disk.
    #[doc(hidden)]
    pub fn put_raw(&self, key: &str, bytes: &[u8]) -> Result<(), JournalError> {
        self.records
            .insert(key.as_bytes(), bytes)
            .map(drop)
            .map_err(|source| JournalError::Io {
                operation: "write",
                source,
            })
    }
}

/// [`InstanceRecord::decode`] of every value, in order, on up to one
/// thread per core (each taking a contiguous share).
fn decode_all(entries: &[(sled::IVec, sled::IVec)]) -> Vec<Result<InstanceRecord, DecodeError>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(entries.len().div_ceil(MIN_DECODE_SHARE))
        .max(1);
    if threads == 1 {
        return entries
            .iter()
            .map(|(_, v)| InstanceRecord::decode(v))
            .collect();
    }
    let share = entries.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = entries
            .chunks(share)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(_, v)| InstanceRecord::decode(v))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(decoded) => decoded,
                // decode does not panic on any input; were it to, its
                // panic is the caller's.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Fewest records worth a decoding thread of their own.
const MIN_DECODE_SHARE: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::State;
    use crate::record::InstanceSpec;

    fn record(id: &str) -> InstanceRecord {
        InstanceRecord::pending(id, "pod", "ns", InstanceSpec::default(), 1)
    }

    #[test]
    fn records_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = reopen(dir.path());
            j.put(&record("a")).unwrap();
            let mut b = record("b");
            b.state = State::Running;
            j.put(&b).unwrap();
            j.put(&record("c")).unwrap();
            j.remove("c").unwrap();
            j.flush().unwrap();
        }
        let j = reopen(dir.path());
        let report = j.load().unwrap();
        let mut ids: Vec<_> = report
            .records
            .iter()
            .map(|r| (r.sandbox_id.as_str(), r.state))
            .collect();
        ids.sort();
        assert_eq!(ids, vec![("a", State::Pending), ("b", State::Running)]);
        assert!(report.quarantined.is_empty());
        assert_eq!(j.get("b").unwrap().unwrap().state, State::Running);
        assert!(j.get("c").unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn durable_puts_apply_in_order_and_are_marked_durable_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = reopen(dir.path());
            let before = j.durable_sequence();
            // Twenty versions of one record and one of another, handed over
            // together: the last version handed over is the one stored.
            let mut futures = Vec::new();
            for version in 1..=20 {
                let mut r = record("a");
                r.created_at = version;
                futures.push(j.put_durable(&r));
            }
            futures.push(j.put_durable(&record("b")));
            for f in futures {
                f.await.unwrap();
            }
            // Every write counted in the mark before its answer.
            assert_eq!(j.durable_sequence(), before + 21);
            assert_eq!(j.get("a").unwrap().unwrap().created_at, 20);
        }
        let j = reopen(dir.path());
        assert!(matches!(j.verdict(), Verdict::Intact), "{:?}", j.verdict());
        let mut stored: Vec<_> = j
            .load()
            .unwrap()
            .records
            .into_iter()
            .map(|r| (r.sandbox_id, r.created_at))
            .collect();
        stored.sort();
        assert_eq!(stored, [("a".to_owned(), 20), ("b".to_owned(), 1)]);
    }

    #[test]
    fn a_corrupt_record_is_quarantined_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let j = reopen(dir.path());
        j.put(&record("good")).unwrap();
        let mut truncated = record("bad").encode();
        truncated.truncate(20);
        j.put_raw("bad", &truncated).unwrap();
        j.put_raw("moved", &record("elsewhere").encode()).unwrap();

        let report = j.load().unwrap();
        assert_eq!(report.records.len(), 1);
        assert_eq!(report.records[0].sandbox_id, "good");
        let mut keys: Vec<_> = report.quarantined.iter().map(|q| q.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, vec!["bad", "moved"]);
        let bad = report.quarantined.iter().find(|q| q.key == "bad").unwrap();
        assert_eq!(bad.bytes, truncated, "the bytes are kept as they were");
        assert!(bad.reason.starts_with("Malformed record"), "{}", bad.reason);

        // Moved aside: a second load is clean, and the quarantine remembers.
        let again = j.load().unwrap();
        assert_eq!(again.records.len(), 1);
        assert!(again.quarantined.is_empty());
        assert_eq!(j.quarantined().unwrap().len(), 2);
    }

    #[test]
    fn a_large_journal_decoded_on_many_threads_keeps_each_record_with_its_key() {
        // More records than one decoding thread takes, with bad ones in
        // several threads' shares: each verdict stays with its own key.
        let dir = tempfile::tempdir().unwrap();
        let j = reopen(dir.path());
        let n = 4 * MIN_DECODE_SHARE + 7;
        let key = |i: usize| format!("{i:06}");
        let bad = [3, MIN_DECODE_SHARE + 1, n - 1];
        for i in 0..n {
            if bad.contains(&i) {
                j.put_raw(&key(i), b"{\"schema_version\": 1, \"torn")
                    .unwrap();
            } else if i == 2 * MIN_DECODE_SHARE {
                // A valid record under another sandbox's key.
                j.put_raw(&key(i), &record(&key(i + 1)).encode()).unwrap();
            } else {
                j.put(&record(&key(i))).unwrap();
            }
        }
        let report = j.load().unwrap();
        let expected: Vec<String> = (0..n)
            .filter(|i| !bad.contains(i) && *i != 2 * MIN_DECODE_SHARE)
            .map(key)
            .collect();
        let loaded: Vec<&str> = report
            .records
            .iter()
            .map(|r| r.sandbox_id.as_str())
            .collect();
        assert_eq!(loaded, expected);
        let mut quarantined: Vec<&str> =
            report.quarantined.iter().map(|q| q.key.as_str()).collect();
        quarantined.sort_unstable();
        let mut want: Vec<String> = bad
            .iter()
            .copied()
            .chain([2 * MIN_DECODE_SHARE])
            .map(key)
            .collect();
        want.sort_unstable();
        assert_eq!(quarantined, want);
    }

    #[test]
    fn get_quarantines_a_corrupt_value() {
        let dir = tempfile::tempdir().unwrap();
        let j = reopen(dir.path());
        j.put_raw("x", b"not json").unwrap();
        assert!(j.get("x").unwrap().is_none());
        assert_eq!(j.quarantined().unwrap()[0].key, "x");
    }

    #[test]
    fn quarantine_ids_are_unique_and_stable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let j = reopen(dir.path());
            j.put_raw("x", b"not json").unwrap();
            let first = j.load().unwrap().quarantined.remove(0);
            assert!(first.id.starts_with("x@"), "{}", first.id);
            // Two entries of the same key in the same millisecond.
            let same_ms = |reason: &str| QuarantinedRecord {
                id: String::new(),
                key: "y".into(),
                reason: reason.into(),
                quarantined_at: 42,
                bytes: b"y".to_vec(),
            };
            let a = j.insert_quarantined(same_ms("a")).unwrap();
            let b = j.insert_quarantined(same_ms("b")).unwrap();
            let c = j.insert_quarantined(same_ms("c")).unwrap();
            assert_eq!(
                [a.id.as_str(), b.id.as_str(), c.id.as_str()],
                ["y@42", "y@42-1", "y@42-2"]
            );
            j.flush().unwrap();
            let mut listed: Vec<_> = j
                .quarantined()
                .unwrap()
                .into_iter()
                .map(|q| (q.id, q.reason))
                .collect();
            listed.sort();
            assert_eq!(listed.len(), 4, "nothing overwritten: {listed:?}");
            assert_eq!(
                listed[1..],
                [
                    ("y@42".to_owned(), "a".to_owned()),
                    ("y@42-1".to_owned(), "b".to_owned()),
                    ("y@42-2".to_owned(), "c".to_owned())
                ]
            );
            listed.into_iter().map(|(id, _)| id).collect::<Vec<_>>()
        };
        let j = reopen(dir.path());
        let mut again: Vec<_> = j.quarantined().unwrap().into_iter().map(|q| q.id).collect();
        again.sort();
        assert_eq!(again, ids, "the same ids after a reopen");
    }

    #[test]
    fn a_quarantine_entry_gets_its_id_from_its_key_not_from_its_json() {
        let dir = tempfile::tempdir().unwrap();
        let j = reopen(dir.path());
        // Written before ids existed: no `id` in the JSON.
        let old = br#"{"key":"s1","reason":"Malformed record","quarantined_at":7,"bytes":[1,2]}"#;
        j.quarantine.insert("s1@7", old.as_slice()).unwrap();
        // An id in the JSON that is not the entry's key.
        let lying = QuarantinedRecord {
            id: "s9@1".into(),
            key: "s2".into(),
            reason: "r".into(),
            quarantined_at: 8,
            bytes: vec![],
        };
        j.quarantine
            .insert("s2@8", serde_json::to_vec(&lying).unwrap())
            .unwrap();
        // And an entry that is not JSON at all: its key still says whose.
        j.quarantine.insert("s3@9", b"\xff".as_slice()).unwrap();
        let listed = j.quarantined().unwrap();
        let found: Vec<_> = listed
            .iter()
            .map(|q| (q.id.as_str(), q.key.as_str()))
            .collect();
        assert_eq!(found, [("s1@7", "s1"), ("s2@8", "s2"), ("s3@9", "s3")]);
        assert_eq!(listed[0].bytes, [1, 2]);
        assert!(listed[2].reason.starts_with("Unreadable quarantine entry"));
        assert_eq!(j.drop_quarantined("s2@8").unwrap().unwrap().id, "s2@8");
        assert!(j.drop_quarantined("s9@1").unwrap().is_none());
    }

    #[test]
    fn a_dropped_quarantine_entry_is_gone_for_good_and_an_unknown_id_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let (dropped, kept) = {
            let j = reopen(dir.path());
            j.put_raw("a", b"not json").unwrap();
            j.put_raw("b", b"not json either").unwrap();
            j.load().unwrap();
            let all = j.quarantined().unwrap();
            assert_eq!(all.len(), 2);
            let (a, b) = (all[0].clone(), all[1].clone());
            assert_eq!((a.key.as_str(), b.key.as_str()), ("a", "b"));
            let dropped = j.drop_quarantined(&a.id).unwrap();
            assert_eq!(dropped.as_ref(), Some(&a), "the entry removed, whole");
            assert!(j.drop_quarantined(&a.id).unwrap().is_none(), "only once");
            assert!(j.drop_quarantined("nope@1").unwrap().is_none());
            assert!(j.drop_quarantined("").unwrap().is_none());
            (a, b)
            // Closed without a flush of its own: the drop's flush stands.
        };
        let j = reopen(dir.path());
        assert_eq!(j.quarantined().unwrap(), std::slice::from_ref(&kept));
        assert!(j.drop_quarantined(&dropped.id).unwrap().is_none());
        assert_eq!(j.drop_quarantined(&kept.id).unwrap(), Some(kept));
    }

    /// Set in the child process of
    /// [`a_dropped_quarantine_entry_stays_dropped_after_a_crash`]: the
    /// journal directory and the id to drop.
    const CRASH_CHILD: &str = "PODVISOR_TEST_DROP_THEN_ABORT";

    #[test]
    fn a_dropped_quarantine_entry_stays_dropped_after_a_crash() {
        if let Ok(task) = std::env::var(CRASH_CHILD) {
            // The child: drop, then die at once, with no destructor run
            // (sled would flush on the way out).
            let (dir, id) = task.split_once('\n').unwrap();
            let j = reopen(Path::new(dir));
            assert!(j.drop_quarantined(id).unwrap().is_some());
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let j = reopen(dir.path());
            j.put_raw("crashed", b"not json").unwrap();
            j.load().unwrap().quarantined.remove(0).id
        };
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "journal::tests::a_dropped_quarantine_entry_stays_dropped_after_a_crash",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CRASH_CHILD, format!("{}\n{id}", dir.path().display()))
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(nix::sys::signal::Signal::SIGABRT as i32),
            "the child dropped the entry and aborted: {status}"
        );
        let j = reopen(dir.path());
        assert!(
            j.quarantined().unwrap().is_empty(),
            "the drop was durable before it returned"
        );
    }

    /// Opens the journal in `dir`, waiting up to 10 s for a journal this
    /// process just dropped to let go of its lock: sled's background
    /// threads hold the database a moment after the last handle is gone
    /// (a process that exits lets go at once).
    fn reopen(dir: &Path) -> SledJournal {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledJournal::open(dir) {
                Ok(j) => return j,
                Err(e)
                    if e.to_string().contains("locked") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A journal with `n` records, closed.
    fn written(dir: &Path, n: usize) -> JournalIdentity {
        let j = reopen(dir);
        assert_eq!(j.verdict(), Verdict::Fresh);
        for i in 0..n {
            j.put(&record(&format!("s{i}"))).unwrap();
            j.flush().unwrap();
        }
        j.identity()
    }

    #[test]
    fn a_reopened_journal_is_intact_and_keeps_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let identity = written(dir.path(), 3);
        let j = reopen(dir.path());
        assert_eq!(j.verdict(), Verdict::Intact);
        assert_eq!(j.identity(), identity);
        assert_eq!(j.load().unwrap().records.len(), 3);
    }

    #[test]
    fn a_deleted_database_is_in_doubt_not_fresh() {
        let dir = tempfile::tempdir().unwrap();
        written(dir.path(), 3);
        std::fs::remove_file(dir.path().join("db")).unwrap();
        let j = reopen(dir.path());
        assert!(j.load().unwrap().records.is_empty());
        match j.verdict() {
            Verdict::InDoubt { reason } => assert!(reason.contains("came back empty"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_database_is_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        written(dir.path(), 20);
        let db = dir.path().join("db");
        let len = std::fs::metadata(&db).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        file.set_len(len / 3).unwrap();
        drop(file);
        // sled may refuse the damaged file: that too deletes nothing.
        if let Ok(j) = SledJournal::open(dir.path()) {
            let kept = j.load().map_or(0, |r| r.records.len());
            assert!(
                !j.verdict().is_trusted() || kept == 20,
                "{kept} records kept, verdict {:?}",
                j.verdict()
            );
        }
    }

    #[test]
    fn the_doubt_stays_after_more_writes_until_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        written(dir.path(), 2);
        std::fs::remove_file(dir.path().join("db")).unwrap();
        {
            let j = reopen(dir.path());
            assert!(!j.verdict().is_trusted());
            for i in 0..10 {
                j.put(&record(&format!("new{i}"))).unwrap();
                j.flush().unwrap();
            }
        }
        let j = reopen(dir.path());
        assert!(!j.verdict().is_trusted(), "{:?}", j.verdict());
        drop(j);
        let before = SledJournal::accept_loss(dir.path()).unwrap();
        assert!(!before.is_trusted());
        let j = reopen(dir.path());
        assert_eq!(j.verdict(), Verdict::Intact);
        assert_eq!(j.load().unwrap().records.len(), 10);
    }

    #[test]
    fn a_database_from_another_journal_is_in_doubt() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        written(a.path(), 2);
        let other = written(b.path(), 2);
        std::fs::copy(b.path().join("db"), a.path().join("db")).unwrap();
        let j = reopen(a.path());
        match j.verdict() {
            Verdict::InDoubt { reason } => {
                assert!(
                    reason.contains(&format!("belongs to journal {}", other.id)),
                    "{reason}"
                );
            }
            verdict => panic!("{verdict:?}"),
        }
    }

    #[test]
    fn an_io_error_names_the_operation_and_keeps_its_cause_as_the_source() {
        use std::error::Error as _;
        let e = JournalError::Io {
            operation: "flush",
            source: sled::Error::Io(std::io::Error::from_raw_os_error(28)),
        };
        assert_eq!(e.to_string(), "Journal flush failed");
        let cause = e.source().expect("the storage error").to_string();
        assert!(cause.contains("No space left"), "{cause}");
        let line = report(&e);
        assert!(line.starts_with("Journal flush failed: "), "{line}");
        assert_eq!(line.matches("No space left").count(), 1, "{line}");
    }

    #[test]
    fn a_journal_whose_lock_another_holder_has_is_refused_as_locked() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        drop(reopen(dir.path()));
        // Once sled's threads let go (see `reopen`).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let held = loop {
            let db = std::fs::File::open(dir.path().join(SLED_DB_FILE)).unwrap();
            match Flock::lock(db, FlockArg::LockExclusiveNonblock) {
                Ok(held) => break held,
                Err((_, e)) => {
                    assert!(std::time::Instant::now() < deadline, "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        let err = SledJournal::open(dir.path()).expect_err("it is locked");
        let text = err.to_string();
        assert!(text.starts_with("Cannot open the journal at"), "{text}");
        assert!(
            text.contains("locked, most likely by another running podvisor"),
            "{text}"
        );
        drop(held);
        drop(reopen(dir.path()));
    }

    #[test]
    fn a_second_opener_of_the_same_directory_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let _first = reopen(dir.path());
        // sled's lock is a per-process file lock; a second handle in the same
        // process shares the lock, so prove it across processes elsewhere
        // (tests/daemon.rs). Here: a path that is a file is a clear error.
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = SledJournal::open(&file).expect_err("a file is not a journal");
        assert!(
            err.to_string().starts_with("Cannot open the journal at"),
            "{err}"
        );
    }
}
