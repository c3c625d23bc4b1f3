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
//! This is the group commit of database logs (PostgreSQL's WAL writer,
//! InnoDB's group commit) without an added delay: a batch starts as soon as
//! the previous one ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

/// Runs flushes on its own thread, batching concurrent requests. `E` is
/// the flush's error. Dropping it runs the flushes still asked for, then
/// ends the thread.
pub(crate) struct GroupCommit<E> {
    shared: Arc<Shared<E>>,
    flusher: Option<JoinHandle<()>>,
}

impl<E> std::fmt::Debug for GroupCommit<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("batches", &self.batches())
            .finish_non_exhaustive()
    }
}

struct Shared<E> {
    state: Mutex<State<E>>,
    /// Signalled when a flush is asked for (the flusher waits on it) and
    /// when a batch ends (blocked callers wait on it).
    changed: Condvar,
}

struct State<E> {
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
}

impl<E> State<E> {
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

impl<E> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a call: asks the flusher for a batch and returns the
    /// number of batches started before the call.
    fn ask(&self, state: &mut State<E>) -> u64 {
        state.requested = true;
        self.changed.notify_all();
        state.started
    }
}

impl<E: Send + Sync + 'static> GroupCommit<E> {
    /// Starts the flusher thread; `flush` must make durable every write
    /// completed before it starts. A panic in `flush` fails its batch with
    /// `panicked(message)`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn spawn(
        name: &str,
        mut flush: impl FnMut() -> Result<(), E> + Send + 'static,
        panicked: impl Fn(String) -> E + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
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
            }),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
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
                    drop(state);
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut flush))
                            .unwrap_or_else(|panic| {
                                let message = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| (*s).to_owned())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "a panic".to_owned());
                                Err(panicked(message))
                            });
                    let mut state = s.lock();
                    state.running = false;
                    match outcome {
                        Ok(()) => state.succeeded = batch,
                        Err(e) => {
                            state.failed = batch;
                            state.failure = Some(Arc::new(e));
                        }
                    }
                    // Every waiting future is covered by this batch or
                    // waits for the next: each checks for itself.
                    let wakers: Vec<Waker> = state.wakers.drain().map(|(_, w)| w).collect();
                    drop(state);
                    s.changed.notify_all();
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

impl<E> GroupCommit<E> {
    /// Returns once a flush that started after this call has ended: `Ok`
    /// if it succeeded, its error otherwise. Blocks the calling thread.
    ///
    /// # Errors
    /// The error of the batch that covered this call.
    pub(crate) fn flush(&self) -> Result<(), Arc<E>> {
        let mut state = self.shared.lock();
        let after = self.shared.ask(&mut state);
        state.waiting += 1;
        loop {
            if let Some(outcome) = state.outcome(after) {
                state.waiting -= 1;
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
    pub(crate) fn commit(&self) -> Commit<E> {
        let mut state = self.shared.lock();
        let after = self.shared.ask(&mut state);
        let key = state.next_key;
        state.next_key += 1;
        state.waiting += 1;
        Commit {
            shared: self.shared.clone(),
            after,
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

impl<E> Drop for GroupCommit<E> {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(flusher) = self.flusher.take() {
            // The flusher catches panics of the flush: it ends normally.
            let _ = flusher.join();
        }
    }
}

/// A waiting [`GroupCommit::commit`].
pub(crate) struct Commit<E> {
    shared: Arc<Shared<E>>,
    after: u64,
    key: u64,
    done: bool,
}

impl<E> Future for Commit<E> {
    type Output = Result<(), Arc<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = this.shared.lock();
        if let Some(outcome) = state.outcome(this.after) {
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

impl<E> Drop for Commit<E> {
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
            move || {
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
    fn until_waiting(commit: &GroupCommit<String>, n: usize) {
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
}
