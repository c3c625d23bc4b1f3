//! The pod VM state machine: a plain struct that turns events into commands.
//!
//! The actor around it only delivers events (API calls, results of the
//! commands it ran, timers) and performs the commands. Nothing here does I/O
//! or reads a clock, so every path is tested without a runtime.
//!
//! Two records are kept: `durable`, the last one the journal confirmed, and
//! `target`, what the record should become. At most one journal write and one
//! provider call are in flight. Provider calls follow only *durable* states:
//! nothing touches the cloud before the journal says why.

use crate::lifecycle::{IllegalTransition, State, check_transition};
use crate::naming::idempotency_token;
use crate::record::{InstanceRecord, InstanceRef, UnixMillis};
use std::net::IpAddr;
use std::time::Duration;

/// Identifies one API caller awaiting an answer; assigned by the actor.
pub type Waiter = u64;

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry.
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based): `base · 2^(attempt-1)`
    /// capped at `cap`, then "equal jitter" — half fixed, half scaled by
    /// `jitter` in `[0, 1)` — so that many sandboxes retrying together spread out.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let half = full / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Tunables of the lifecycle.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Creation attempts (each may itself retry transient errors) before the
    /// pod VM is marked `Failed`.
    pub max_create_attempts: u32,
    /// Delay between failed operations.
    pub backoff: Backoff,
    /// How long a `Pending` record waits for StartVM before it is dropped.
    pub pending_ttl: Duration,
    /// How long a `Failed` record stays visible after its cleanup.
    pub failed_ttl: Duration,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            max_create_attempts: 3,
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
            },
            pending_ttl: Duration::from_secs(15 * 60),
            failed_ttl: Duration::from_secs(60 * 60),
        }
    }
}

/// A failed provider operation, as the machine needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFailure {
    /// What went wrong, for the record and the caller.
    pub message: String,
    /// Whether trying again may succeed.
    pub retryable: bool,
    /// The provider asked to wait at least this long.
    pub retry_after: Option<Duration>,
}

/// A successful create: the instance, and whether it already existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The instance the provider made or found.
    pub instance: InstanceRef,
    /// True if it was found by its token rather than made by this call.
    pub adopted: bool,
}

/// The machine's timers; each has its own epoch so a stale one is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// Retry a failed provider operation.
    Retry = 0,
    /// Retry a failed journal write.
    JournalRetry = 1,
    /// A `Pending` or `Failed` record has lived out its time.
    Expiry = 2,
}

/// Something that happened to the pod VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// StartVM arrived.
    Start(Waiter),
    /// StopVM arrived.
    Stop(Waiter),
    /// The daemon restarted with this record in the journal.
    Recover,
    /// The last [`Command::Persist`] finished.
    Persisted(Result<(), String>),
    /// The last [`Command::Ensure`] finished.
    Ensured(Result<Ensured, OpFailure>),
    /// The last [`Command::Find`] finished.
    Found(Result<Option<InstanceRef>, OpFailure>),
    /// The last [`Command::Delete`] finished.
    Deleted(Result<(), OpFailure>),
    /// The last [`Command::Probe`] reached the agent endpoint.
    AgentReady,
    /// The last [`Command::Probe`] gave up.
    AgentUnreachable(String),
    /// A [`Command::Schedule`]d timer fired.
    Timer(TimerKind, u64),
}

/// Why StartVM did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// Creation gave up.
    #[error("Pod VM creation failed: {0}")]
    Failed(String),
    /// StopVM (or an expiry) came first.
    #[error("The sandbox is being stopped")]
    Stopping,
    /// The Creating record could not be journaled, so nothing was created.
    #[error("Could not journal the start, nothing was created: {0}")]
    Journal(String),
}

/// What the recovery of one record did; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryAction {
    /// A `Pending` or cleaned-up `Failed` record was kept as it was.
    Kept,
    /// A `Pending` record had outlived its TTL and is being dropped.
    Expired,
    /// A `Creating` record's instance was found and adopted.
    Adopted,
    /// A `Creating` record's instance was not found and the same idempotent
    /// create was issued again.
    Recreated,
    /// A `Creating` record's create failed again.
    CreateFailed,
    /// A `Running` record's instance still exists.
    Verified,
    /// A `Running` or `Creating` record's instance no longer exists.
    Vanished,
    /// A `Deleting` record's deletion was resumed.
    ResumedDelete,
    /// A `Failed` record's cleanup was resumed.
    ResumedCleanup,
}

impl RecoveryAction {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryAction::Kept => "kept",
            RecoveryAction::Expired => "expired",
            RecoveryAction::Adopted => "adopted",
            RecoveryAction::Recreated => "recreated",
            RecoveryAction::CreateFailed => "create_failed",
            RecoveryAction::Verified => "verified",
            RecoveryAction::Vanished => "vanished",
            RecoveryAction::ResumedDelete => "resumed_delete",
            RecoveryAction::ResumedCleanup => "resumed_cleanup",
        }
    }
}

/// The operation a retry repeats; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Creating the instance.
    Create,
    /// Looking the instance up.
    Find,
    /// Deleting the instance.
    Delete,
    /// Writing the journal.
    Journal,
}

impl Operation {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Find => "find",
            Operation::Delete => "delete",
            Operation::Journal => "journal",
        }
    }
}

/// Something the actor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Write this record to the journal and flush; answer with
    /// [`Event::Persisted`].
    Persist(Box<InstanceRecord>),
    /// Create the instance of the durable record (its token, name and spec);
    /// unless `first_attempt`, look it up by token first and adopt it.
    /// Answer with [`Event::Ensured`].
    Ensure {
        /// No earlier attempt can have made the instance.
        first_attempt: bool,
    },
    /// Look the instance up by the record's token and name; answer with
    /// [`Event::Found`].
    Find,
    /// Delete this instance (gone counts as done); answer with [`Event::Deleted`].
    Delete {
        /// The provider's instance id.
        instance_id: String,
    },
    /// Wait for the agent endpoint at this address to answer; answer with
    /// [`Event::AgentReady`] or [`Event::AgentUnreachable`].
    Probe {
        /// The instance's first address.
        ip: IpAddr,
    },
    /// Answer CreateVM.
    ReplyCreate(Result<(), String>),
    /// Answer one StartVM.
    ReplyStart(Waiter, Result<(), StartError>),
    /// Answer one StopVM.
    ReplyStop(Waiter, Result<(), String>),
    /// Deliver `Event::Timer(kind, epoch)` after `after`.
    Schedule {
        /// Which timer.
        kind: TimerKind,
        /// Its epoch, echoed back.
        epoch: u64,
        /// The delay.
        after: Duration,
    },
    /// Start-up recovery of this record is decided.
    RecoveryDone(RecoveryAction),
    /// An operation is being retried (for the retry counter).
    Retrying(Operation),
    /// The pod VM is gone: delete the record and stop.
    Forget,
    /// The machine asked for a move the lifecycle table forbids and refused
    /// it (the state did not change): a bug in the machine, in any build.
    /// Log it as an error and count it.
    Refused(IllegalTransition),
}

/// What an outstanding [`Command::Find`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FindPurpose {
    /// Recovery: does the known instance still exist?
    Verify,
    /// Teardown: did the token's create make an instance?
    Lookup,
}

/// One pod VM's lifecycle logic.
#[derive(Debug)]
pub struct PodVmMachine {
    /// Tunables.
    config: MachineConfig,
    /// Jitter source; seeded, so tests are repeatable.
    rng: fastrand::Rng,
    /// The last record the journal confirmed; `None` before the first write.
    durable: Option<InstanceRecord>,
    /// What the record should become.
    target: InstanceRecord,
    /// The record of the journal write in flight.
    writing: Option<InstanceRecord>,
    /// A provider call or probe is in flight.
    provider_busy: bool,
    /// What the in-flight `Find` is for.
    find_purpose: Option<FindPurpose>,
    /// Waiting for the retry timer before the next provider call.
    retry_armed: bool,
    /// Waiting for the journal-retry timer before the next write.
    journal_blocked: bool,
    /// Consecutive failed journal writes, for their backoff.
    journal_failures: u32,
    /// Consecutive failed cleanup calls of a `Failed` record, for their
    /// backoff: its `attempts` keep the creation attempts its error names.
    cleanup_failures: u32,
    /// Current epoch per [`TimerKind`].
    epochs: [u64; 3],
    /// StartVM asked for the instance.
    start_requested: bool,
    /// StopVM (or an expiry) asked for the end.
    stop_requested: bool,
    /// CreateVM awaits the first write.
    create_waiting: bool,
    /// StartVM callers awaiting `Running` (or a failure).
    start_waiters: Vec<Waiter>,
    /// StopVM callers awaiting a durable `Deleting`.
    stop_waiters: Vec<Waiter>,
    /// The next create may be the first for this token (no lookup needed).
    first_attempt: bool,
    /// The agent endpoint answered.
    agent_ready: bool,
    /// Recovery must confirm that the known instance still exists.
    verify_pending: bool,
    /// Teardown: the token lookup found nothing to delete.
    lookup_done: bool,
    /// Recovery began and its outcome is not reported yet.
    recovering: bool,
    /// The record was deleted; nothing more happens.
    forgotten: bool,
    /// Moves the table refused since the last event, reported as
    /// [`Command::Refused`] at its end.
    refused: Vec<IllegalTransition>,
}

impl PodVmMachine {
    /// A machine for a sandbox CreateVM just made: it writes the `Pending`
    /// record, then answers CreateVM with [`Command::ReplyCreate`].
    pub fn create(
        record: InstanceRecord,
        config: MachineConfig,
        seed: u64,
    ) -> (Self, Vec<Command>) {
        let mut m = Self::new(None, record, config, seed);
        m.create_waiting = true;
        let mut out = Vec::new();
        m.advance(0, &mut out);
        m.report_refused(&mut out);
        (m, out)
    }

    /// A machine for a record read back from the journal; send it
    /// [`Event::Recover`].
    pub fn recovered(record: InstanceRecord, config: MachineConfig, seed: u64) -> Self {
        Self::new(Some(record.clone()), record, config, seed)
    }

    /// Whether `record`, read back at start-up at `now` (Unix ms), can wait
    /// without a machine until the instant answered (Unix ms): its recovery
    /// would only keep it and arm its expiry — [`Event::Recover`] would
    /// answer exactly `Schedule(Expiry, until − now)` and
    /// `RecoveryDone(Kept)`. That holds for a `Pending` record younger than
    /// `pending_ttl` and a `Failed` one whose cleanup is done and whose
    /// `failed_ttl` has not run out. `None` when recovery has work to do (a
    /// cloud check, a delete, a cleanup, an expiry already due). Until that
    /// instant, a machine made with [`PodVmMachine::recovered`] from the
    /// same record decides anything that arrives as it would have then.
    pub fn sleeps_until(
        record: &InstanceRecord,
        config: &MachineConfig,
        now: UnixMillis,
    ) -> Option<UnixMillis> {
        if record.state == State::Failed && !record.released {
            return None; // its cleanup is to be resumed
        }
        let left = expiry_left(record, config, now).filter(|left| !left.is_zero())?;
        Some(now.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)))
    }

    fn new(
        durable: Option<InstanceRecord>,
        target: InstanceRecord,
        config: MachineConfig,
        seed: u64,
    ) -> Self {
        Self {
            config,
            rng: fastrand::Rng::with_seed(seed),
            durable,
            target,
            writing: None,
            provider_busy: false,
            find_purpose: None,
            retry_armed: false,
            journal_blocked: false,
            journal_failures: 0,
            cleanup_failures: 0,
            epochs: [0; 3],
            start_requested: false,
            stop_requested: false,
            create_waiting: false,
            start_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            first_attempt: false,
            agent_ready: false,
            verify_pending: false,
            lookup_done: false,
            recovering: false,
            forgotten: false,
            refused: Vec::new(),
        }
    }

    /// The record as the journal last confirmed it.
    pub fn durable(&self) -> Option<&InstanceRecord> {
        self.durable.as_ref()
    }

    /// The record as it should become (what the provider calls work from).
    pub fn target(&self) -> &InstanceRecord {
        &self.target
    }

    /// True once the record is deleted.
    pub fn is_forgotten(&self) -> bool {
        self.forgotten
    }

    /// True when no journal write, provider call or probe is in flight: what
    /// the machine has done so far is in the journal. (A retry timer may be
    /// armed; it starts nothing until it fires.)
    pub fn is_settled(&self) -> bool {
        self.forgotten || (self.writing.is_none() && !self.provider_busy)
    }

    /// Feeds one event; returns the commands to perform, in order.
    pub fn on_event(&mut self, event: Event, now: UnixMillis) -> Vec<Command> {
        let mut out = Vec::new();
        if self.forgotten {
            // Late callers of a forgotten sandbox: it is stopped.
            match event {
                Event::Start(w) => out.push(Command::ReplyStart(w, Err(StartError::Stopping))),
                Event::Stop(w) => out.push(Command::ReplyStop(w, Ok(()))),
                _ => {}
            }
            return out;
        }
        match event {
            Event::Start(w) => self.on_start(w, &mut out),
            Event::Stop(w) => {
                self.stop_requested = true;
                self.stop_waiters.push(w);
            }
            Event::Recover => self.on_recover(now, &mut out),
            Event::Persisted(result) => self.on_persisted(result, now, &mut out),
            Event::Ensured(result) => self.on_ensured(result, now, &mut out),
            Event::Found(result) => self.on_found(result, now, &mut out),
            Event::Deleted(result) => self.on_deleted(result, now, &mut out),
            Event::AgentReady => {
                self.provider_busy = false;
                self.agent_ready = true;
                if self.target.state == State::Creating {
                    self.transition(State::Running, now);
                    self.target.last_error = None;
                }
            }
            Event::AgentUnreachable(reason) => {
                self.provider_busy = false;
                if self.target.state == State::Creating {
                    self.fail(reason, now);
                }
            }
            Event::Timer(kind, epoch) => {
                if self.epochs[kind as usize] != epoch {
                    return out; // superseded
                }
                match kind {
                    TimerKind::Retry => self.retry_armed = false,
                    TimerKind::JournalRetry => self.journal_blocked = false,
                    TimerKind::Expiry => self.on_expiry(now),
                }
            }
        }
        self.advance(now, &mut out);
        self.report_refused(&mut out);
        out
    }

    fn on_start(&mut self, w: Waiter, out: &mut Vec<Command>) {
        if self.stop_requested {
            out.push(Command::ReplyStart(w, Err(StartError::Stopping)));
            return;
        }
        match self.target.state {
            State::Pending => {
                self.start_requested = true;
                self.start_waiters.push(w);
            }
            State::Creating | State::Running => self.start_waiters.push(w),
            State::Failed => out.push(Command::ReplyStart(
                w,
                Err(StartError::Failed(
                    self.target.last_error.clone().unwrap_or_default(),
                )),
            )),
            State::Deleting | State::Removed => {
                out.push(Command::ReplyStart(w, Err(StartError::Stopping)));
            }
        }
    }

    fn on_recover(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        let state = self.target.state;
        match state {
            State::Pending => {
                let left = expiry_left(&self.target, &self.config, now).unwrap_or_default();
                if left.is_zero() {
                    self.expire_pending();
                    out.push(Command::RecoveryDone(RecoveryAction::Expired));
                } else {
                    self.schedule(TimerKind::Expiry, left, out);
                    out.push(Command::RecoveryDone(RecoveryAction::Kept));
                }
            }
            State::Creating => {
                self.recovering = true;
                self.first_attempt = false;
                self.verify_pending = self.target.instance.is_some();
            }
            State::Running => {
                self.recovering = true;
                self.verify_pending = true;
                self.agent_ready = true;
            }
            State::Deleting => out.push(Command::RecoveryDone(RecoveryAction::ResumedDelete)),
            State::Failed => {
                let left = expiry_left(&self.target, &self.config, now).unwrap_or_default();
                self.schedule(TimerKind::Expiry, left, out);
                out.push(Command::RecoveryDone(if self.target.released {
                    RecoveryAction::Kept
                } else {
                    RecoveryAction::ResumedCleanup
                }));
            }
            State::Removed => {}
        }
    }

    fn on_persisted(
        &mut self,
        result: Result<(), String>,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        let Some(written) = self.writing.take() else {
            return; // no write in flight: a confused caller, ignore
        };
        match result {
            Ok(()) => {
                self.journal_failures = 0;
                let before = self.durable.as_ref().map(|d| d.state);
                let after = written.state;
                self.durable = Some(written);
                if before != Some(after) {
                    match after {
                        State::Pending => {
                            self.schedule(TimerKind::Expiry, self.config.pending_ttl, out);
                        }
                        State::Failed => {
                            self.schedule(TimerKind::Expiry, self.config.failed_ttl, out);
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                let Some(durable) = self.durable.clone() else {
                    // The sandbox never existed on disk: CreateVM fails.
                    self.create_waiting = false;
                    out.push(Command::ReplyCreate(Err(e)));
                    self.forgotten = true;
                    out.push(Command::Forget);
                    return;
                };
                if written.state == State::Creating && durable.state == State::Pending {
                    // Nothing was created: give StartVM the error, stay Pending.
                    self.roll_back(&durable);
                    self.target.generation = durable.generation;
                    self.target.token = durable.token.clone();
                    self.start_requested = false;
                    for w in self.start_waiters.drain(..) {
                        out.push(Command::ReplyStart(w, Err(StartError::Journal(e.clone()))));
                    }
                } else if written.state == State::Deleting && durable.state != State::Deleting {
                    self.roll_back(&durable);
                    self.stop_requested = false;
                    for w in self.stop_waiters.drain(..) {
                        out.push(Command::ReplyStop(
                            w,
                            Err(format!("Could not journal the stop: {e}")),
                        ));
                    }
                } else {
                    // An internal transition: it must land; retry the write.
                    // StartVM callers are not kept waiting on a journal that
                    // may never heal: they get the error now (StartVM is
                    // idempotent, so a retry finds the pod VM as it is then).
                    for w in self.start_waiters.drain(..) {
                        out.push(Command::ReplyStart(
                            w,
                            Err(StartError::Journal(format!(
                                "{e} (the pod VM's state is retried in the background; StartVM may be retried)"
                            ))),
                        ));
                    }
                    self.journal_failures += 1;
                    self.journal_blocked = true;
                    let after = self
                        .config
                        .backoff
                        .delay(self.journal_failures, self.rng.f64());
                    self.schedule(TimerKind::JournalRetry, after, out);
                    out.push(Command::Retrying(Operation::Journal));
                }
                self.target.last_error = Some(format!("Journal write failed: {e}"));
                self.touch(now);
            }
        }
    }

    fn on_ensured(
        &mut self,
        result: Result<Ensured, OpFailure>,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        self.provider_busy = false;
        self.first_attempt = false;
        self.target.attempts += 1;
        // A create that names no address cannot be reached: retried as a
        // failure, so that it is bounded by the create attempts.
        let result = result.and_then(|ensured| {
            if ensured.instance.ips.is_empty() {
                Err(OpFailure {
                    message: format!("Instance {} has no IP address", ensured.instance.id),
                    retryable: true,
                    retry_after: None,
                })
            } else {
                Ok(ensured)
            }
        });
        match result {
            Ok(ensured) => {
                if self.recovering {
                    self.recovering = false;
                    out.push(Command::RecoveryDone(if ensured.adopted {
                        RecoveryAction::Adopted
                    } else {
                        RecoveryAction::Recreated
                    }));
                }
                self.target.instance = Some(ensured.instance);
                self.touch(now);
            }
            Err(failure) => {
                if self.recovering {
                    self.recovering = false;
                    out.push(Command::RecoveryDone(RecoveryAction::CreateFailed));
                }
                self.target.last_error = Some(failure.message.clone());
                self.touch(now);
                // Whatever the failure, the create may have happened.
                self.lookup_done = false;
                if self.target.state != State::Creating {
                    return; // being stopped: teardown looks the token up
                }
                if failure.retryable && self.target.attempts < self.config.max_create_attempts {
                    self.arm_retry(self.target.attempts, failure.retry_after, out);
                    out.push(Command::Retrying(Operation::Create));
                } else {
                    let attempts = self.target.attempts;
                    self.fail(
                        format!("{} (after {attempts} attempt(s))", failure.message),
                        now,
                    );
                }
            }
        }
    }

    fn on_found(
        &mut self,
        result: Result<Option<InstanceRef>, OpFailure>,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        self.provider_busy = false;
        let purpose = self.find_purpose.take();
        match result {
            Err(failure) => {
                self.target.last_error = Some(failure.message);
                self.touch(now);
                let failures = self.count_failure();
                self.arm_retry(failures, failure.retry_after, out);
                out.push(Command::Retrying(Operation::Find));
            }
            Ok(found) => match purpose {
                Some(FindPurpose::Verify) => {
                    self.verify_pending = false;
                    let creating = self.target.state == State::Creating;
                    match found {
                        Some(instance) => {
                            if self.target.instance.as_ref() != Some(&instance) {
                                self.target.instance = Some(instance);
                                self.touch(now);
                            }
                            if self.recovering {
                                self.recovering = false;
                                out.push(Command::RecoveryDone(if creating {
                                    RecoveryAction::Adopted
                                } else {
                                    RecoveryAction::Verified
                                }));
                            }
                        }
                        None => {
                            let id = self
                                .target
                                .instance
                                .take()
                                .map(|i| i.id)
                                .unwrap_or_default();
                            if self.recovering {
                                self.recovering = false;
                                out.push(Command::RecoveryDone(RecoveryAction::Vanished));
                            }
                            if matches!(self.target.state, State::Creating | State::Running) {
                                self.fail(format!("Instance {id} no longer exists"), now);
                                // It is gone: nothing is left to delete.
                                self.lookup_done = true;
                                self.target.released = true;
                            }
                        }
                    }
                }
                Some(FindPurpose::Lookup) | None => match found {
                    Some(instance) => {
                        self.target.instance = Some(instance);
                        self.touch(now);
                    }
                    None => self.lookup_done = true,
                },
            },
        }
    }

    fn on_deleted(
        &mut self,
        result: Result<(), OpFailure>,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        self.provider_busy = false;
        match result {
            Ok(()) => {
                // The token names this same instance: no lookup is needed.
                self.target.instance = None;
                self.lookup_done = true;
                self.cleanup_failures = 0;
                if self.target.state != State::Failed {
                    self.target.attempts = 0;
                }
                self.touch(now);
            }
            Err(failure) => {
                // Deletes never give up.
                let failures = self.count_failure();
                self.target.last_error = Some(failure.message);
                self.touch(now);
                self.arm_retry(failures, failure.retry_after, out);
                out.push(Command::Retrying(Operation::Delete));
            }
        }
    }

    fn on_expiry(&mut self, now: UnixMillis) {
        let durable_state = self.durable.as_ref().map(|d| d.state);
        match (durable_state, self.target.state) {
            (Some(State::Pending), State::Pending) => self.expire_pending(),
            (Some(State::Failed), State::Failed) => self.stop_requested = true,
            _ => {}
        }
        self.touch(now);
    }

    fn expire_pending(&mut self) {
        self.stop_requested = true;
        self.target.last_error = Some(format!(
            "StartVM did not arrive within {}s of CreateVM",
            self.config.pending_ttl.as_secs()
        ));
    }

    /// Decides what happens next, from the requests, the durable record and
    /// what is in flight. Called after every event.
    fn advance(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        if self.forgotten {
            return;
        }
        // 1. Requests move the target.
        if self.stop_requested && self.target.state != State::Deleting {
            self.transition(State::Deleting, now);
            self.target.attempts = 0;
            // A pending create retry is moot: teardown starts at once.
            if self.retry_armed {
                self.retry_armed = false;
                self.epochs[TimerKind::Retry as usize] += 1;
            }
        }
        if self.start_requested && self.target.state == State::Pending {
            self.start_requested = false;
            self.transition(State::Creating, now);
            self.target.generation += 1;
            self.target.token = Some(idempotency_token(
                &self.target.sandbox_id,
                self.target.generation,
            ));
            self.target.attempts = 0;
            self.first_attempt = true;
        }

        // 2. Teardown bookkeeping that changes the target without a call.
        if let Some(durable) = &self.durable
            && durable.state == State::Failed
            && self.target.state == State::Failed
            && !self.target.released
            && self.nothing_left_to_delete()
            && !self.provider_busy
        {
            self.target.released = true;
            self.touch(now);
        }

        // 3. The journal lane.
        if self.can_forget() {
            self.forgotten = true;
            for w in self.start_waiters.drain(..) {
                out.push(Command::ReplyStart(w, Err(StartError::Stopping)));
            }
            for w in self.stop_waiters.drain(..) {
                out.push(Command::ReplyStop(w, Ok(())));
            }
            out.push(Command::Forget);
            return;
        }
        if self.writing.is_none()
            && !self.journal_blocked
            && self.durable.as_ref() != Some(&self.target)
        {
            self.writing = Some(self.target.clone());
            out.push(Command::Persist(Box::new(self.target.clone())));
        }

        // 4. Answers that follow the durable state.
        let Some(durable) = self.durable.clone() else {
            return;
        };
        if self.create_waiting {
            self.create_waiting = false;
            out.push(Command::ReplyCreate(Ok(())));
        }
        match durable.state {
            State::Deleting => {
                for w in self.stop_waiters.drain(..) {
                    out.push(Command::ReplyStop(w, Ok(())));
                }
                for w in self.start_waiters.drain(..) {
                    out.push(Command::ReplyStart(w, Err(StartError::Stopping)));
                }
            }
            State::Running => {
                for w in self.start_waiters.drain(..) {
                    out.push(Command::ReplyStart(w, Ok(())));
                }
            }
            State::Failed => {
                let reason = durable.last_error.clone().unwrap_or_default();
                for w in self.start_waiters.drain(..) {
                    out.push(Command::ReplyStart(
                        w,
                        Err(StartError::Failed(reason.clone())),
                    ));
                }
            }
            _ => {}
        }

        // 5. The provider lane: at most one call, only from durable states.
        if self.provider_busy || self.retry_armed {
            return;
        }
        match durable.state {
            State::Pending | State::Removed => {}
            State::Running => {
                if self.verify_pending && self.target.state == State::Running {
                    self.find(FindPurpose::Verify, out);
                }
            }
            State::Creating => {
                if self.target.state != State::Creating {
                    return; // a stop or failure is being journaled first
                }
                match &self.target.instance {
                    None => {
                        self.provider_busy = true;
                        out.push(Command::Ensure {
                            first_attempt: self.first_attempt,
                        });
                    }
                    Some(_) if self.verify_pending => self.find(FindPurpose::Verify, out),
                    Some(instance) if durable.instance.as_ref() == Some(instance) => {
                        if !self.agent_ready {
                            self.provider_busy = true;
                            if let Some(ip) = instance.ips.first() {
                                out.push(Command::Probe { ip: *ip });
                            } else {
                                // Found (after a restart) before it had an
                                // address: the idempotent create adopts it
                                // and waits for one, within the attempts.
                                out.push(Command::Ensure {
                                    first_attempt: false,
                                });
                            }
                        }
                    }
                    Some(_) => {} // the instance id is being journaled first
                }
            }
            State::Deleting | State::Failed => {
                if self.target.state != durable.state || self.target.released {
                    return;
                }
                if let Some(instance) = &self.target.instance {
                    self.provider_busy = true;
                    out.push(Command::Delete {
                        instance_id: instance.id.clone(),
                    });
                } else if !self.nothing_left_to_delete() {
                    self.find(FindPurpose::Lookup, out);
                }
            }
        }
    }

    fn nothing_left_to_delete(&self) -> bool {
        self.target.instance.is_none() && (self.target.token.is_none() || self.lookup_done)
    }

    fn can_forget(&self) -> bool {
        self.durable.as_ref().map(|d| d.state) == Some(State::Deleting)
            && self.target.state == State::Deleting
            && self.writing.is_none()
            && !self.provider_busy
            && (self.nothing_left_to_delete() || self.target.released)
    }

    fn find(&mut self, purpose: FindPurpose, out: &mut Vec<Command>) {
        self.provider_busy = true;
        self.find_purpose = Some(purpose);
        out.push(Command::Find);
    }

    /// Marks the pod VM failed. Its `attempts` stay the creation attempts
    /// made, which `reason` may name; its cleanup counts apart.
    fn fail(&mut self, reason: String, now: UnixMillis) {
        self.transition(State::Failed, now);
        self.target.last_error = Some(reason);
        self.cleanup_failures = 0;
        self.lookup_done = false;
    }

    /// Counts one more failed call of the current operation; the count, for
    /// its backoff. A `Failed` record's cleanup counts apart, so that its
    /// `attempts` keep the creation attempts its error names.
    fn count_failure(&mut self) -> u32 {
        let count = if self.target.state == State::Failed {
            &mut self.cleanup_failures
        } else {
            &mut self.target.attempts
        };
        *count += 1;
        *count
    }

    /// Moves the target to `to` if the lifecycle table allows it. The table
    /// is the only judge, in every build: an illegal move leaves the state
    /// as it is and is reported as [`Command::Refused`].
    fn transition(&mut self, to: State, now: UnixMillis) {
        match check_transition(self.target.state, to) {
            Ok(()) => {
                self.target.state = to;
                self.touch(now);
            }
            Err(illegal) => self.refused.push(illegal),
        }
    }

    /// Undoes a move of the target that the journal did not take: the
    /// target goes back to the `durable` state. Only a move the table allows
    /// (`durable → target`) is undone, so a rollback never makes a path the
    /// table lacks; anything else is refused like an illegal transition.
    fn roll_back(&mut self, durable: &InstanceRecord) {
        match check_transition(durable.state, self.target.state) {
            Ok(()) => self.target.state = durable.state,
            Err(illegal) => self.refused.push(illegal),
        }
    }

    /// Turns the moves refused during this event into commands.
    fn report_refused(&mut self, out: &mut Vec<Command>) {
        out.extend(self.refused.drain(..).map(Command::Refused));
    }

    fn touch(&mut self, now: UnixMillis) {
        self.target.updated_at = self.target.updated_at.max(now);
    }

    fn arm_retry(&mut self, attempt: u32, at_least: Option<Duration>, out: &mut Vec<Command>) {
        let mut after = self.config.backoff.delay(attempt, self.rng.f64());
        if let Some(min) = at_least {
            after = after.max(min);
        }
        self.retry_armed = true;
        self.schedule(TimerKind::Retry, after, out);
    }

    fn schedule(&mut self, kind: TimerKind, after: Duration, out: &mut Vec<Command>) {
        self.epochs[kind as usize] += 1;
        out.push(Command::Schedule {
            kind,
            epoch: self.epochs[kind as usize],
            after,
        });
    }
}

/// How long `record` has left at `now` (Unix ms) before it expires: a
/// `Pending` record `pending_ttl` after its CreateVM, a `Failed` one
/// `failed_ttl` after its last write; zero once due, `None` for a state
/// that does not expire.
fn expiry_left(
    record: &InstanceRecord,
    config: &MachineConfig,
    now: UnixMillis,
) -> Option<Duration> {
    let (since, ttl) = match record.state {
        State::Pending => (record.created_at, config.pending_ttl),
        State::Failed => (record.updated_at, config.failed_ttl),
        _ => return None,
    };
    Some(ttl.saturating_sub(Duration::from_millis(now.saturating_sub(since))))
}

#[cfg(test)]
mod tests;
