//! Group commit: flushes asked for while one is under way share the next.
//!
//! One flusher thread runs every flush. A caller asks for a flush and waits
//! until a flush that *started after its call* has ended — that flush's data
//! sync covers every write the caller completed before asking. Calls that
//! arrive while a flush runs cannot be covered by it (their writes may have
//! missed it), so they wait for the next one, which the flusher starts as
//! soon as the running one ends, once for all of them. Under load a batch
//! therefore covers everyone who arrived during the previous one: N
//! concurrent writers cost about two flushes, not N.
//!
//! Callers wait either blocking a thread ([`GroupCommit::flush`]) or as a
//! future ([`GroupCommit::commit`]) that holds no thread while it waits —
//! with hundreds of pod VMs in flight, a thread per waiting writer costs
//! more in wake-ups than the flush itself.
//!
//! A batch that fails fails every caller it covers, each with the same
//! error ([`Arc`]-shared); nobody is told `Ok` without a successful flush
//! that started after their call. A failure is not remembered as a verdict
//! on later calls: the next call gets a fresh batch.
//!
//! A caller may also hand its write to the flusher with the request
//! ([`GroupCommit::commit_with`]): the flusher applies the queued writes of
//! a batch, in the order they were handed over, just before that batch's
//! flush, so a write and its flush cost the caller one hand-off to the
//! flusher thread, not one to a blocking pool for the write and one more for
//! the flush. A batch that fails — a write or the flush — fails every caller
//! it covers.
//!
//! This is the group commit of database logs (PostgreSQL's WAL writer,
//! InnoDB's group commit) without an added delay: a batch starts as soon as
//! the previous one ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

/// Runs flushes on its own thread, batching concurrent requests. `E` is
/// the flush's error, `W` a write handed over with a request (`()` where
/// callers write for themselves). Dropping it runs the flushes still asked
/// for, with their writes, then ends the thread.
pub(crate) struct GroupCommit<E, W = ()> {
    shared: Arc<Shared<E, W>>,
    flusher: Option<JoinHandle<()>>,
}

impl<E, W> std::fmt::Debug for GroupCommit<E, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("batches", &self.batches())
            .finish_non_exhaustive()
    }
}

struct Shared<E, W> {
    state: Mutex<State<E, W>>,
    /// Signalled when a flush is asked for (the flusher waits on it) and
    /// when a batch ends (blocked callers wait on it).
    changed: Condvar,
}

/// The outcome of one batch, for the callers whose writes it applied.
type Slot<E> = Arc<OnceLock<Result<(), Arc<E>>>>;

struct State<E, W> {
    /// Writes handed over for the next batch, in the order of their calls.
    queue: Vec<W>,
    /// Where the next batch to start leaves its outcome for the callers
    /// whose writes it applies. Their outcome is that batch's and no
    /// other: a later batch's success covers a plain flush request (its
    /// writes were in the database already), but not a write that a
    /// failed batch dropped.
    next_slot: Slot<E>,
    /// Batches started so far; the running one, if any, is number `started`.
    started: u64,
    /// Whether batch `started` is still running.
    running: bool,
    /// Whether a caller waits for a batch not yet started.
    requested: bool,
    /// The latest batch that succeeded (0: none yet).
    succeeded: u64,
    /// The latest batch that failed (0: none yet), and its error.
    failed: u64,
    failure: Option<Arc<E>>,
    /// The wakers of waiting futures, by future.
    wakers: HashMap<u64, Waker>,
    /// The next future's key in `wakers`.
    next_key: u64,
    /// Set on drop: the flusher ends once nothing is asked for.
    closing: bool,
    /// Callers waiting now (for tests and statistics).
    waiting: usize,
    /// Of those, callers blocked in [`GroupCommit::flush`]: the end of a
    /// batch wakes them through the condition variable (futures through
    /// their wakers), only when there are any.
    blocked: usize,
}

impl<E, W> State<E, W> {
    /// The outcome for a call made when `after` batches had started, once
    /// a batch that started later has ended. Batches end in order, so a
    /// later success covers the call too.
    fn outcome(&self, after: u64) -> Option<Result<(), Arc<E>>> {
        if self.succeeded > after {
            return Some(Ok(()));
        }
        match (&self.failure, self.failed > after) {
            (Some(e), true) => Some(Err(e.clone())),
            _ => None,
        }
    }
}

impl<E, W> Shared<E, W> {
    fn lock(&self) -> MutexGuard<'_, State<E, W>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a call: asks the flusher for a batch and returns the
    /// number of batches started before the call.
    ///
    /// The flusher is woken only when it may be waiting: neither running a
    /// batch nor already asked for one. Otherwise it looks at `requested`
    /// under the lock before it waits again — so under load a write costs
    /// no wake-up system call of its own.
    fn ask(&self, state: &mut State<E, W>) -> u64 {
        let idle = !state.running && !state.requested;
        state.requested = true;
        if idle {
            self.changed.notify_all();
        }
        state.started
    }
}

impl<E: Send + Sync + 'static, W: Send + 'static> GroupCommit<E, W> {
    /// Starts the flusher thread. `flush` gets the batch's handed-over
    /// writes, oldest first (empty when none was); it must apply them, then
    /// make durable every write completed before it started. A panic in
    /// `flush` fails its batch with `panicked(message)`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn spawn(
        name: &str,
        mut flush: impl FnMut(&mut Vec<W>) -> Result<(), E> + Send + 'static,
        panicked: impl Fn(String) -> E + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Vec::new(),
                next_slot: Arc::new(OnceLock::new()),
                started: 0,
                running: false,
                requested: false,
                succeeded: 0,
                failed: 0,
                failure: None,
                wakers: HashMap::new(),
                next_key: 0,
                closing: false,
                waiting: 0,
                blocked: 0,
            }),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // The batch's writes; swapped with the queue, so that both
                // keep their allocations.
                let mut writes = Vec::new();
                loop {
                    let mut state = s.lock();
                    while !state.requested && !state.closing {
                        state = s
                            .changed
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    if !state.requested {
                        return;
                    }
                    state.requested = false;
                    state.started += 1;
                    state.running = true;
                    let batch = state.started;
                    std::mem::swap(&mut writes, &mut state.queue);
                    // A new slot only when a caller holds this one.
                    let slot = (Arc::strong_count(&state.next_slot) > 1).then(|| {
                        std::mem::replace(&mut state.next_slot, Arc::new(OnceLock::new()))
                    });
                    drop(state);
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        flush(&mut writes)
                    }))
                    .unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".to_owned());
                        Err(panicked(message))
                    });
                    writes.clear();
                    let outcome = outcome.map_err(Arc::new);
                    let mut state = s.lock();
                    state.running = false;
                    match &outcome {
                        Ok(()) => state.succeeded = batch,
                        Err(e) => {
                            state.failed = batch;
                            state.failure = Some(e.clone());
                        }
                    }
                    // Under the lock, as futures check it under the lock.
                    if let Some(slot) = slot {
                        let _ = slot.set(outcome);
                    }
                    // Every waiting future is covered by this batch or
                    // waits for the next: each checks for itself.
                    let wakers: Vec<Waker> = state.wakers.drain().map(|(_, w)| w).collect();
                    let blocked = state.blocked > 0;
                    drop(state);
                    if blocked {
                        s.changed.notify_all();
                    }
                    for w in wakers {
                        w.wake();
                    }
                }
            })?;
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }
}

impl<E, W> GroupCommit<E, W> {
    /// Returns once a flush that started after this call has ended: `Ok`
    /// if it succeeded, its error otherwise. Blocks the calling thread.
    ///
    /// # Errors
    /// The error of the batch that covered this call.
    pub(crate) fn flush(&self) -> Result<(), Arc<E>> {
        let mut state = self.shared.lock();
        let after = self.shared.ask(&mut state);
        state.waiting += 1;
        state.blocked += 1;
        loop {
            if let Some(outcome) = state.outcome(after) {
                state.waiting -= 1;
                state.blocked -= 1;
                return outcome;
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// As [`GroupCommit::flush`], as a future that holds no thread while it
    /// waits. The flush is asked for at this call, not at the first poll.
    pub(crate) fn commit(&self) -> Commit<E, W> {
        let mut state = self.shared.lock();
        self.wait_for_next(&mut state, None)
    }

    /// Hands `write` to the flusher, which applies it in the next batch
    /// it starts, before that batch's flush; the future ends with exactly
    /// that batch's outcome (the write's, if a write of the batch failed,
    /// or the flush's) — never with a later batch's. Writes are applied in
    /// the order of these calls.
    pub(crate) fn commit_with(&self, write: W) -> Commit<E, W> {
        let mut state = self.shared.lock();
        state.queue.push(write);
        let slot = state.next_slot.clone();
        self.wait_for_next(&mut state, Some(slot))
    }

    /// A future for the outcome of the next batch to start — read from
    /// `slot` when given, the batch's own.
    fn wait_for_next(&self, state: &mut State<E, W>, slot: Option<Slot<E>>) -> Commit<E, W> {
        let after = self.shared.ask(state);
        let key = state.next_key;
        state.next_key += 1;
        state.waiting += 1;
        Commit {
            shared: self.shared.clone(),
            after,
            slot,
            key,
            done: false,
        }
    }

    /// Batches started so far: how many flushes ran.
    pub(crate) fn batches(&self) -> u64 {
        self.shared.lock().started
    }

    /// Callers waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.shared.lock().waiting
    }
}

impl<E, W> Drop for GroupCommit<E, W> {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(flusher) = self.flusher.take() {
            // The flusher catches panics of the flush: it ends normally.
            let _ = flusher.join();
        }
    }
}

/// A waiting [`GroupCommit::commit`] or [`GroupCommit::commit_with`].
pub(crate) struct Commit<E, W> {
    shared: Arc<Shared<E, W>>,
    /// Batches started before the call.
    after: u64,
    /// For a handed-over write: where the batch that applies it leaves
    /// its outcome.
    slot: Option<Slot<E>>,
    key: u64,
    done: bool,
}

impl<E, W> Future for Commit<E, W> {
    type Output = Result<(), Arc<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = this.shared.lock();
        let outcome = match &this.slot {
            Some(slot) => slot.get().cloned(),
            None => state.outcome(this.after),
        };
        if let Some(outcome) = outcome {
            state.wakers.remove(&this.key);
            if !this.done {
                state.waiting -= 1;
                this.done = true;
            }
            return Poll::Ready(outcome);
        }
        state.wakers.insert(this.key, cx.waker().clone());
        Poll::Pending
    }
}

impl<E, W> Drop for Commit<E, W> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.wakers.remove(&self.key);
        if !self.done {
            state.waiting -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A group commit whose flushes count themselves in `ran`; the first
    /// one waits for `release` (after telling `started`), and the second
    /// fails when `fail_second`.
    struct Bed {
        commit: Arc<GroupCommit<String>>,
        ran: Arc<AtomicUsize>,
        release: mpsc::Sender<()>,
        started: mpsc::Receiver<()>,
    }

    fn bed(fail_second: bool, panic_first: bool) -> Bed {
        let ran = Arc::new(AtomicUsize::new(0));
        let (release, wait) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let counted = ran.clone();
        let commit = GroupCommit::spawn(
            "test-flusher",
            move |_: &mut Vec<()>| {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    let _ = started_tx.send(());
                    let _ = wait.recv();
                    if panic_first {
                        panic!("a bug in the flush");
                    }
                }
                if n == 2 && fail_second {
                    return Err("disk full".to_owned());
                }
                Ok(())
            },
            |m| format!("panicked: {m}"),
        )
        .expect("the flusher thread");
        Bed {
            commit: Arc::new(commit),
            ran,
            release,
            started,
        }
    }

    /// Waits until `n` callers wait.
    fn until_waiting<W>(commit: &GroupCommit<String, W>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while commit.waiting() < n {
            assert!(Instant::now() < deadline, "{n} callers never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts a blocking caller whose flush is batch 1, and waits until
    /// that batch runs (held until `release`).
    fn first_batch(bed: &Bed) -> std::thread::JoinHandle<Result<(), Arc<String>>> {
        let c = bed.commit.clone();
        let first = std::thread::spawn(move || c.flush());
        bed.started.recv().expect("the first batch starts");
        first
    }

    fn callers(bed: &Bed, n: usize) -> Vec<std::thread::JoinHandle<Result<(), Arc<String>>>> {
        (0..n)
            .map(|_| {
                let c = bed.commit.clone();
                std::thread::spawn(move || c.flush())
            })
            .collect()
    }

    #[test]
    fn callers_that_arrive_during_a_flush_share_one_next_flush() {
        let bed = bed(false, false);
        let first = first_batch(&bed);
        let waiting = callers(&bed, 16);
        until_waiting(&bed.commit, 17);
        // None of them is covered by the running flush.
        assert_eq!(bed.ran.load(Ordering::SeqCst), 1);
        bed.release.send(()).expect("the flusher waits");
        assert_eq!(first.join().expect("the first caller"), Ok(()));
        for w in waiting {
            assert_eq!(w.join().expect("a caller"), Ok(()));
        }
        // All sixteen were covered by one more flush.
        assert_eq!(bed.ran.load(Ordering::SeqCst), 2);
        assert_eq!(bed.commit.batches(), 2);
    }

    #[test]
    fn a_failed_flush_fails_every_caller_of_its_batch_and_only_them() {
        let bed = bed(true, false);
        let first = first_batch(&bed);
        let waiting = callers(&bed, 8);
        until_waiting(&bed.commit, 9);
        bed.release.send(()).expect("the flusher waits");
        // The first batch succeeded; the second, covering the eight, failed.
        assert_eq!(first.join().expect("the first caller"), Ok(()));
        let errors: Vec<Arc<String>> = waiting
            .into_iter()
            .map(|w| w.join().expect("a caller").expect_err("the batch failed"))
            .collect();
        assert!(errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])));
        assert_eq!(*errors[0], "disk full");
        // A failure is not a verdict on later writes.
        assert_eq!(bed.commit.flush(), Ok(()));
        assert_eq!(bed.ran.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_panicking_flush_fails_its_batch_and_the_flusher_goes_on() {
        let bed = bed(false, true);
        let first = first_batch(&bed);
        bed.release.send(()).expect("the flusher waits");
        let e = first
            .join()
            .expect("the caller")
            .expect_err("the batch panicked");
        assert_eq!(*e, "panicked: a bug in the flush");
        assert_eq!(bed.commit.flush(), Ok(()));
    }

    #[test]
    fn a_lone_caller_gets_a_flush_of_its_own_every_time() {
        let bed = bed(false, false);
        let first = first_batch(&bed);
        bed.release.send(()).expect("the flusher waits");
        assert_eq!(first.join().expect("the first caller"), Ok(()));
        for _ in 0..5 {
            assert_eq!(bed.commit.flush(), Ok(()));
        }
        assert_eq!(bed.ran.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn futures_wait_without_a_thread_and_share_batches_with_blocking_callers() {
        let bed = bed(false, false);
        let first = first_batch(&bed);
        // Asked for at the call, while batch 1 runs: covered by batch 2.
        let futures: Vec<_> = (0..100).map(|_| bed.commit.commit()).collect();
        let blocking = callers(&bed, 2);
        until_waiting(&bed.commit, 103);
        bed.release.send(()).expect("the flusher waits");
        for f in futures {
            assert_eq!(f.await, Ok(()));
        }
        for b in blocking {
            assert_eq!(b.join().expect("a caller"), Ok(()));
        }
        assert_eq!(first.join().expect("the first caller"), Ok(()));
        assert_eq!(bed.ran.load(Ordering::SeqCst), 2);
        // A dropped future leaves nothing behind.
        drop(bed.commit.commit());
        assert_eq!(bed.commit.waiting(), 0);
    }

    #[test]
    fn dropping_it_runs_what_was_asked_for_and_ends_the_thread() {
        let bed = bed(false, false);
        let first = first_batch(&bed);
        let pending = bed.commit.commit();
        bed.release.send(()).expect("the flusher waits");
        assert_eq!(first.join().expect("the first caller"), Ok(()));
        let commit = Arc::try_unwrap(bed.commit).expect("the only owner");
        drop(commit);
        // The batch asked for before the drop ran.
        assert_eq!(bed.ran.load(Ordering::SeqCst), 2);
        drop(pending);
    }

    /// A group commit whose writes are numbers: each batch appends the
    /// writes it applied to `log` as one entry, and fails if it holds 13.
    /// The first batch waits for `release` (after telling `started`).
    #[allow(clippy::type_complexity)]
    fn writing_bed() -> (
        Arc<GroupCommit<String, u32>>,
        Arc<Mutex<Vec<Vec<u32>>>>,
        mpsc::Sender<()>,
        mpsc::Receiver<()>,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (release, wait) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let logged = log.clone();
        let commit = GroupCommit::spawn(
            "test-writer",
            move |writes: &mut Vec<u32>| {
                let first = logged.lock().expect("the log").is_empty();
                logged.lock().expect("the log").push(writes.clone());
                if first {
                    let _ = started_tx.send(());
                    let _ = wait.recv();
                }
                if writes.contains(&13) {
                    return Err("cannot write 13".to_owned());
                }
                Ok(())
            },
            |m| format!("panicked: {m}"),
        )
        .expect("the flusher thread");
        (Arc::new(commit), log, release, started)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_handed_over_together_are_applied_in_order_by_one_batch() {
        let (commit, log, release, started) = writing_bed();
        let first = commit.commit_with(0);
        started.recv().expect("the first batch starts");
        // Handed over while batch 1 runs: all applied by batch 2, in order,
        // and none acknowledged before it.
        let futures: Vec<_> = (100..150).map(|n| commit.commit_with(n)).collect();
        let blocking = {
            let c = commit.clone();
            std::thread::spawn(move || c.flush())
        };
        until_waiting(&commit, 52);
        release.send(()).expect("the flusher waits");
        assert_eq!(first.await, Ok(()));
        for f in futures {
            assert_eq!(f.await, Ok(()));
        }
        assert_eq!(blocking.join().expect("a caller"), Ok(()));
        let log = log.lock().expect("the log").clone();
        assert_eq!(log, vec![vec![0], (100..150).collect::<Vec<u32>>()]);
        assert_eq!(commit.batches(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_write_fails_every_caller_of_its_batch_and_only_them() {
        let (commit, log, release, started) = writing_bed();
        let first = commit.commit_with(1);
        started.recv().expect("the first batch starts");
        let batch: Vec<_> = [12, 13, 14].map(|n| commit.commit_with(n)).into();
        let plain = commit.commit();
        until_waiting(&commit, 5);
        release.send(()).expect("the flusher waits");
        assert_eq!(first.await, Ok(()));
        let mut errors = Vec::new();
        for f in batch {
            errors.push(f.await.expect_err("the batch failed"));
        }
        // A caller with no write of its own, covered by that batch, fails too:
        // its earlier writes may not be durable.
        errors.push(plain.await.expect_err("the batch failed"));
        assert!(errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])));
        assert_eq!(*errors[0], "cannot write 13");
        // The next batch starts afresh.
        assert_eq!(commit.commit_with(15).await, Ok(()));
        assert_eq!(
            log.lock().expect("the log").clone(),
            vec![vec![1], vec![12, 13, 14], vec![15]]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_dropped_by_a_failed_batch_fails_even_after_a_later_success() {
        let (commit, _log, release, started) = writing_bed();
        let first = commit.commit_with(1);
        started.recv().expect("the first batch starts");
        let dropped: Vec<_> = [12, 13, 14].map(|n| commit.commit_with(n)).into();
        release.send(()).expect("the flusher waits");
        assert_eq!(first.await, Ok(()));
        // Batch 2 (12, 13, 14) fails; batch 3 succeeds — all before the
        // futures of batch 2 are polled.
        let deadline = Instant::now() + Duration::from_secs(30);
        while commit.shared.lock().failed != 2 {
            assert!(Instant::now() < deadline, "batch 2 never failed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(commit.commit().await, Ok(()));
        assert_eq!(commit.shared.lock().succeeded, 3);
        for f in dropped {
            let e = f.await.expect_err("a later success does not cover it");
            assert_eq!(*e, "cannot write 13");
        }
    }

    #[test]
    fn writes_handed_over_before_the_drop_are_applied() {
        let (commit, log, release, started) = writing_bed();
        let first = commit.commit_with(1);
        started.recv().expect("the first batch starts");
        let pending = commit.commit_with(2);
        release.send(()).expect("the flusher waits");
        let commit = Arc::try_unwrap(commit).expect("the only owner");
        drop(commit);
        drop((first, pending));
        assert_eq!(log.lock().expect("the log").clone(), vec![vec![1], vec![2]]);
    }
}
