//! The supervisor: owns sandbox id → pod VM actor, routes API calls, runs
//! start-up recovery and the periodic orphan GC, and brings back a pod VM
//! actor that died (from its journal record).

use super::pod_vm::{IsSettled, PodVm, PodVmDeps, RecoveryListing, Start, Stop};
use super::provider::{DeleteInstance, ListInstances};
use crate::failpoints;
use crate::gc::{Ownership, Spared, select_orphans};
use crate::metrics;
use actix::prelude::*;
use podvisor_providers::TAG_NODE;
use podvisor_state::{
    InstanceRecord, InstanceSpec, Journal, PodVmMachine, RecoveryAction, StartError, State,
    UnixMillis, now_millis,
};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Why the supervisor refused an API call or could not finish it. Each
/// variant is a domain fact; `src/api` maps it to the wire's status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// CreateVM named a sandbox that exists for another pod, or that has
    /// left `Pending`.
    #[error("Sandbox {sandbox_id} already exists (pod {pod_namespace}/{pod_name}, state {state})")]
    AlreadyExists {
        /// The sandbox id.
        sandbox_id: String,
        /// The namespace of the pod it belongs to.
        pod_namespace: String,
        /// The name of the pod it belongs to.
        pod_name: String,
        /// Its state.
        state: State,
    },
    /// CreateVM named a sandbox whose first journal write is in flight.
    #[error("Sandbox {sandbox_id} is already being created")]
    BeingCreated {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// `--peerpods-limit-per-node` pod VMs hold (or may soon hold) an
    /// instance.
    #[error(
        "The peer pods limit of this node is reached: {live} of {limit} pod VMs are live \
         (--peerpods-limit-per-node)"
    )]
    LimitReached {
        /// Pod VMs live now.
        live: usize,
        /// The limit.
        limit: usize,
    },
    /// Every VNI of `--vxlan-min-id`'s range is held by a sandbox.
    #[error("Cannot give sandbox {sandbox_id} a tunnel: {source}")]
    NoVni {
        /// The sandbox id.
        sandbox_id: String,
        /// The range and how many are held.
        source: crate::network::vni::VnisExhausted,
    },
    /// The sandbox has no actor: CreateVM was not called, or it was stopped.
    #[error("Sandbox {sandbox_id} is not known: CreateVM was not called, or it was stopped")]
    NotKnown {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// The sandbox's actor died and its record could not be read back.
    #[error("Sandbox {sandbox_id} is not known")]
    Lost {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// CreateVM's `Pending` record could not be journaled.
    #[error("Cannot journal sandbox {sandbox_id}: {reason}")]
    CreateNotJournaled {
        /// The sandbox id.
        sandbox_id: String,
        /// The journal's error.
        reason: String,
    },
    /// The sandbox's actor stopped before it answered CreateVM.
    #[error("The actor of sandbox {sandbox_id} stopped unexpectedly")]
    ActorStopped {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// StartVM: creating the pod VM gave up.
    #[error("Sandbox {sandbox_id}: pod VM creation failed: {reason}")]
    CreationFailed {
        /// The sandbox id.
        sandbox_id: String,
        /// The last error, with the attempts made.
        reason: String,
    },
    /// StartVM: StopVM (or an expiry) came first.
    #[error("Sandbox {sandbox_id} is being stopped")]
    Stopping {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// StartVM: the `Creating` record could not be journaled, so nothing
    /// was created.
    #[error("Sandbox {sandbox_id}: cannot journal the start: {reason}")]
    StartNotJournaled {
        /// The sandbox id.
        sandbox_id: String,
        /// The journal's error.
        reason: String,
    },
    /// StopVM: the `Deleting` record could not be journaled.
    #[error("Sandbox {sandbox_id}: {reason}")]
    StopNotJournaled {
        /// The sandbox id.
        sandbox_id: String,
        /// What the pod VM said.
        reason: String,
    },
}

impl SupervisorError {
    /// The StartVM error of sandbox `sandbox_id` for the machine's answer.
    fn start(sandbox_id: String, error: StartError) -> Self {
        match error {
            StartError::Failed(reason) => Self::CreationFailed { sandbox_id, reason },
            StartError::Stopping => Self::Stopping { sandbox_id },
            StartError::Journal(reason) => Self::StartNotJournaled { sandbox_id, reason },
        }
    }
}

/// Orphan GC settings.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Time between passes.
    pub interval: Duration,
    /// Least age of an unowned instance before it is deleted.
    pub grace: Duration,
}

/// The supervisor actor.
pub struct Supervisor {
    /// Shared with every pod VM actor.
    deps: Arc<PodVmDeps>,
    /// Live pod VM actors.
    pods: HashMap<String, Addr<PodVm>>,
    /// Sandboxes whose records, read back at start-up, wait without an
    /// actor, with the instant (Unix ms) their expiry falls due: their
    /// recovery only kept them ([`PodVmMachine::sleeps_until`]). The first
    /// request for the sandbox, or that instant, gives each its actor
    /// ([`Supervisor::wake`]), made from its record in the view — which is
    /// its durable record, as nothing writes it meanwhile.
    dormant: HashMap<Arc<str>, UnixMillis>,
    /// `dormant`'s instants, earliest first; an entry whose sandbox woke
    /// before (no longer in `dormant` with that instant) is skipped when it
    /// comes up. Built in one go at start-up.
    wakeups: BinaryHeap<Reverse<(UnixMillis, Arc<str>)>>,
    /// The one timer for the earliest of `wakeups`, and its instant.
    wakeup_timer: Option<(UnixMillis, SpawnHandle)>,
    /// Most live pod VMs (`None`: no limit).
    limit: Option<usize>,
    /// Sandboxes whose start-up recovery has not reported yet.
    recovering: HashSet<String>,
    /// Start-up recovery has been submitted.
    recovery_submitted: bool,
    /// Sandbox ids of quarantined records (the GC spares their instances).
    quarantined: HashSet<String>,
    /// Counts additions to `quarantined`: a re-read of the quarantine that
    /// an addition overtook must not take a sandbox out.
    quarantine_epoch: u64,
    /// GC settings.
    gc: GcPolicy,
    /// When the GC first saw each unowned instance without a creation time.
    first_seen: HashMap<String, UnixMillis>,
    /// A GC pass is running.
    gc_running: bool,
    /// Unowned instances already reported, so each is logged once.
    reported_spared: HashSet<String>,
    /// The journal's durable write sequence when this run began.
    journal_seq_at_open: u64,
    /// Every sandbox this run has known (created or recovered).
    known_sandboxes: HashSet<String>,
    /// VNIs handed out to sandboxes whose `Pending` record is not in the
    /// view yet (its first write is in flight); see [`Supervisor::allocate_vni`].
    vnis_in_flight: HashMap<String, u32>,
    /// A sandbox of this run held a VNI since the last NOTRACK sweep, or
    /// rules were found at start-up: the next GC pass sweeps. A node whose
    /// pods have no tunnels runs no `iptables` after start-up.
    tunnels_seen: bool,
    /// VNIs whose NOTRACK rules were on the node at start-up: never handed
    /// out by this run, whoever holds them — a record the journal lost or
    /// quarantined may (the journal alone cannot say; CAA #3280's fix
    /// also skips VNIs in use on the node).
    vnis_found_at_start: BTreeSet<u32>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("pods", &self.pods.len())
            .field("dormant", &self.dormant.len())
            .field("limit", &self.limit)
            .field("recovering", &self.recovering.len())
            .field("gc", &self.gc)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor for pod VMs sharing `deps`.
    pub fn new(deps: Arc<PodVmDeps>, limit: Option<usize>, gc: GcPolicy) -> Self {
        Self {
            pods: HashMap::new(),
            dormant: HashMap::new(),
            wakeups: BinaryHeap::new(),
            wakeup_timer: None,
            limit,
            recovering: HashSet::new(),
            recovery_submitted: false,
            quarantined: HashSet::new(),
            quarantine_epoch: 0,
            gc,
            first_seen: HashMap::new(),
            gc_running: false,
            reported_spared: HashSet::new(),
            journal_seq_at_open: deps.journal.durable_sequence(),
            known_sandboxes: HashSet::new(),
            vnis_in_flight: HashMap::new(),
            tunnels_seen: false,
            vnis_found_at_start: BTreeSet::new(),
            deps,
        }
    }

    /// The lowest VNI of the range that no record holds and no CreateVM in
    /// flight was given, reserved for `sandbox_id` until its record is in
    /// the view. The journal is the truth of which VNIs are held (a record
    /// keeps its VNI until it is removed), so a restart cannot hand out a
    /// live pod's VNI again (the reference's in-memory counter did: CAA
    /// #3280).
    fn allocate_vni(
        &mut self,
        sandbox_id: &str,
        range: crate::network::vni::VniRange,
    ) -> Result<u32, crate::network::vni::VnisExhausted> {
        // A reservation ends once its record is in the view (which then
        // holds the VNI) or its actor is gone (its first write failed).
        let view = &self.deps.view;
        let pods = &self.pods;
        self.vnis_in_flight
            .retain(|id, _| pods.contains_key(id) && view.get(id).is_none());
        let mut taken = view.vnis();
        taken.extend(self.vnis_in_flight.values().copied());
        taken.extend(self.vnis_found_at_start.iter().copied());
        let vni = range.lowest_free(&taken)?;
        self.vnis_in_flight.insert(sandbox_id.to_owned(), vni);
        self.tunnels_seen = true;
        Ok(vni)
    }

    /// The VNIs of the NOTRACK rules found on the node at start-up
    /// ([`Supervisor::vnis_found_at_start`]).
    pub fn with_vnis_found_at_start(mut self, vnis: BTreeSet<u32>) -> Self {
        self.tunnels_seen = !vnis.is_empty();
        self.vnis_found_at_start = vnis;
        self
    }

    /// Pod VMs that hold (or may soon hold) a cloud instance.
    fn live_count(&self) -> usize {
        let ids = self
            .pods
            .keys()
            .map(String::as_str)
            .chain(self.dormant.keys().map(|id| &**id));
        self.deps.view.count(ids, |record| match record {
            None => true, // its first write is in flight
            Some(r) => !(r.state == State::Deleting || (r.state == State::Failed && r.released)),
        })
    }

    fn check_recovery_done(&mut self, ctx: &mut Context<Self>) {
        if self.recovery_submitted && self.recovering.is_empty() && !self.deps.view.is_ready() {
            self.deps.view.set_ready();
            tracing::info!(
                sandboxes = self.pods.len() + self.dormant.len(),
                "start-up recovery finished; ready"
            );
            ctx.notify(RunGc);
            ctx.run_interval(self.gc.interval, |_, ctx| ctx.notify(RunGc));
        }
    }

    /// Starts a pod VM actor from its journal record (recovery, or after the
    /// previous actor died).
    fn spawn_recovered(
        &mut self,
        record: InstanceRecord,
        listing: Option<RecoveryListing>,
        ctx: &mut Context<Self>,
    ) -> Addr<PodVm> {
        let id = record.sandbox_id.clone();
        self.known_sandboxes.insert(id.clone());
        let addr = PodVm::recover(record, self.deps.clone(), ctx.address(), listing).start();
        self.pods.insert(id, addr.clone());
        addr
    }

    /// Keeps the sandboxes of `sleepers` — (sandbox id, until) — whose
    /// records read back at start-up are in the view, without an actor
    /// until `until` (Unix ms) or their first request.
    fn sleep(&mut self, sleepers: Vec<(Arc<str>, UnixMillis)>) {
        self.dormant.extend(sleepers.iter().cloned());
        self.wakeups
            .extend(sleepers.into_iter().map(|(id, until)| Reverse((until, id))));
    }

    /// The actor of sandbox `id`, woken if its record was dormant; `None`
    /// if the sandbox is not known.
    fn actor_of(&mut self, id: &str, ctx: &mut Context<Self>) -> Option<Addr<PodVm>> {
        match self.pods.get(id) {
            Some(addr) => Some(addr.clone()),
            None => self.wake(id, ctx),
        }
    }

    /// Gives the dormant record of sandbox `id` its actor; its recovery,
    /// already counted, is not reported again. `None` if it is not dormant.
    fn wake(&mut self, id: &str, ctx: &mut Context<Self>) -> Option<Addr<PodVm>> {
        self.dormant.remove(id)?;
        // Only now can its instance be made by this run (see `gc::Ownership`).
        self.known_sandboxes.insert(id.to_owned());
        let Some(record) = self.deps.view.get(id) else {
            // Nothing removes a dormant record from the view; were it gone,
            // the sandbox would have no record left to act on.
            tracing::error!(sandbox = %id, "a kept sandbox's record is missing from the view; it is treated as unknown");
            return None;
        };
        let addr = PodVm::woken(record, self.deps.clone(), ctx.address()).start();
        self.pods.insert(id.to_owned(), addr.clone());
        Some(addr)
    }

    /// Arms the one timer for the earliest dormant record's expiry, unless
    /// it is armed for that instant already.
    fn arm_wakeup(&mut self, ctx: &mut Context<Self>) {
        while let Some(Reverse((at, id))) = self.wakeups.peek()
            && self.dormant.get(id) != Some(at)
        {
            self.wakeups.pop();
        }
        let first = self.wakeups.peek().map(|Reverse((at, _))| *at);
        if self.wakeup_timer.as_ref().map(|(at, _)| *at) == first {
            return;
        }
        if let Some((_, handle)) = self.wakeup_timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(at) = first {
            let after = Duration::from_millis(at.saturating_sub(now_millis()));
            let handle = ctx.run_later(after, |act, ctx| {
                act.wakeup_timer = None;
                act.wake_due(ctx);
            });
            self.wakeup_timer = Some((at, handle));
        }
    }

    /// Wakes every dormant record whose expiry is due: its actor expires it.
    fn wake_due(&mut self, ctx: &mut Context<Self>) {
        let now = now_millis();
        while let Some(Reverse((at, _))) = self.wakeups.peek()
            && *at <= now
        {
            if let Some(Reverse((at, id))) = self.wakeups.pop()
                && self.dormant.get(&id) == Some(&at)
            {
                self.wake(&id, ctx);
            }
        }
        self.arm_wakeup(ctx);
    }

    /// Lists this node's instances once, when any of `records` must be
    /// checked against the cloud (see [`must_verify`]): the pod VMs read
    /// their instance from the listing instead of each looking it up.
    fn list_for_recovery(&self, records: &[InstanceRecord]) -> Option<RecoveryListing> {
        if !records.iter().any(must_verify) {
            return None;
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        let list = self.deps.provider.send(ListInstances {
            key: TAG_NODE.to_owned(),
            value: self.deps.node_name.clone(),
        });
        actix::spawn(async move {
            let listed = match list.await {
                Ok(Ok(instances)) => {
                    tracing::debug!(
                        instances = instances.len(),
                        "start-up recovery listed this node's instances"
                    );
                    Ok(instances.into_iter().map(|i| (i.id.clone(), i)).collect())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = &listed {
                tracing::warn!(error = %why, "start-up recovery cannot list this node's instances; each pod VM looks its own up");
            }
            let _ = tx.send(Some(Arc::new(listed)));
        });
        Some(rx)
    }

    /// The GC spares the instances of these sandboxes from now on: their
    /// records are in the journal's quarantine.
    fn add_quarantined(&mut self, ids: impl IntoIterator<Item = String>) {
        self.quarantined.extend(ids);
        self.quarantine_epoch += 1;
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Whether recovering `record` checks its instance against the cloud: a
/// `Running` record, or a `Creating` one that names its instance (as
/// [`podvisor_state::PodVmMachine`] decides on `Recover`).
fn must_verify(record: &InstanceRecord) -> bool {
    match record.state {
        State::Running => true,
        State::Creating => record.instance.is_some(),
        _ => false,
    }
}

/// CreateVM, validated.
#[derive(Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct CreateVm {
    /// The sandbox id.
    pub sandbox_id: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's namespace.
    pub pod_namespace: String,
    /// What the pod asks of its VM.
    pub spec: InstanceSpec,
    /// The pod's initdata, in the form the pod VM receives (gzip + base64).
    pub initdata: Option<String>,
    /// The network namespace path.
    pub netns: String,
}

// By hand: the initdata may hold attestation credentials.
impl std::fmt::Debug for CreateVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateVm")
            .field("sandbox_id", &self.sandbox_id)
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("spec", &self.spec)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl Handler<CreateVm> for Supervisor {
    type Result = ResponseFuture<Result<(), SupervisorError>>;

    fn handle(&mut self, msg: CreateVm, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.sandbox_id;
        if self.pods.contains_key(&id) || self.dormant.contains_key(id.as_str()) {
            let result = match self.deps.view.get(&id) {
                // A retried CreateVM of the same pod: same answer.
                Some(r)
                    if r.state == State::Pending
                        && r.pod_name == msg.pod_name
                        && r.pod_namespace == msg.pod_namespace =>
                {
                    Ok(())
                }
                Some(r) => Err(SupervisorError::AlreadyExists {
                    sandbox_id: id,
                    pod_namespace: r.pod_namespace,
                    pod_name: r.pod_name,
                    state: r.state,
                }),
                None => Err(SupervisorError::BeingCreated { sandbox_id: id }),
            };
            return Box::pin(async move { result });
        }
        if let Some(limit) = self.limit {
            let live = self.live_count();
            if live >= limit {
                return Box::pin(async move { Err(SupervisorError::LimitReached { live, limit }) });
            }
        }
        let mut record = InstanceRecord::pending(
            &id,
            &msg.pod_name,
            &msg.pod_namespace,
            msg.spec,
            now_millis(),
        );
        if let Some(settings) = self.deps.pod_network.clone()
            && !msg.netns.is_empty()
        {
            match self.allocate_vni(&id, settings.vnis) {
                Ok(vni) => record.vni = Some(vni),
                Err(source) => {
                    return Box::pin(async move {
                        Err(SupervisorError::NoVni {
                            sandbox_id: id,
                            source,
                        })
                    });
                }
            }
        }
        record.network_namespace_path = msg.netns;
        record.initdata = msg.initdata;
        let (tx, rx) = oneshot::channel();
        let addr = PodVm::create(record, self.deps.clone(), ctx.address(), tx).start();
        self.known_sandboxes.insert(id.clone());
        self.pods.insert(id.clone(), addr);
        Box::pin(async move {
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(SupervisorError::CreateNotJournaled {
                    sandbox_id: id,
                    reason,
                }),
                Err(_) => Err(SupervisorError::ActorStopped { sandbox_id: id }),
            }
        })
    }
}

/// StartVM.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct StartVm(pub String);

impl Handler<StartVm> for Supervisor {
    type Result = ResponseFuture<Result<(), SupervisorError>>;

    fn handle(&mut self, msg: StartVm, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let Some(addr) = self.actor_of(&id, ctx) else {
            return Box::pin(async move { Err(SupervisorError::NotKnown { sandbox_id: id }) });
        };
        let me = ctx.address();
        Box::pin(async move {
            let answer = match addr.send(Start).await {
                Ok(r) => r,
                Err(_) => match me.send(Revive(id.clone())).await.ok().flatten() {
                    Some(addr) => addr.send(Start).await.unwrap_or(Err(StartError::Stopping)),
                    None => return Err(SupervisorError::Lost { sandbox_id: id }),
                },
            };
            answer.map_err(|e| SupervisorError::start(id, e))
        })
    }
}

/// StopVM.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SupervisorError>")]
pub struct StopVm(pub String);

impl Handler<StopVm> for Supervisor {
    type Result = ResponseFuture<Result<(), SupervisorError>>;

    fn handle(&mut self, msg: StopVm, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        // StopVM of an unknown sandbox succeeds: it is as stopped as can be.
        let Some(addr) = self.actor_of(&id, ctx) else {
            return Box::pin(async { Ok(()) });
        };
        let me = ctx.address();
        Box::pin(async move {
            let answer = match addr.send(Stop).await {
                Ok(r) => r,
                Err(_) => match me.send(Revive(id.clone())).await.ok().flatten() {
                    Some(addr) => addr.send(Stop).await.unwrap_or(Ok(())),
                    None => Ok(()),
                },
            };
            answer.map_err(|reason| SupervisorError::StopNotJournaled {
                sandbox_id: id,
                reason,
            })
        })
    }
}

/// Brings back the actor of a sandbox whose actor died, from the journal.
#[derive(Message)]
#[rtype(result = "Option<Addr<PodVm>>")]
struct Revive(String);

impl Handler<Revive> for Supervisor {
    type Result = ResponseActFuture<Self, Option<Addr<PodVm>>>;

    fn handle(&mut self, msg: Revive, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        if let Some(addr) = self.pods.get(&id)
            && addr.connected()
        {
            return Box::pin(fut::ready(Some(addr.clone())));
        }
        if let Some(addr) = self.wake(&id, ctx) {
            return Box::pin(fut::ready(Some(addr)));
        }
        tracing::error!(sandbox = %id, "pod VM actor died; restarting it from the journal");
        let journal = self.deps.journal.clone();
        let key = id.clone();
        // A record that does not decode goes to quarantine on this read:
        // whether it did is told by the quarantine's entries for the key
        // before and after.
        let read = async move {
            tokio::task::spawn_blocking(move || {
                let entries = |j: &dyn Journal| {
                    j.quarantined()
                        .map(|q| q.iter().filter(|e| e.key == key).count())
                };
                let before = entries(journal.as_ref());
                let record = journal.get(&key);
                let quarantined = match (&record, before) {
                    (Ok(None), Ok(before)) => entries(journal.as_ref()).is_ok_and(|n| n > before),
                    _ => false,
                };
                (record, quarantined)
            })
            .await
        };
        Box::pin(
            read.into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((Ok(Some(record)), _)) => Some(act.spawn_recovered(record, None, ctx)),
                    Ok((_, quarantined)) => {
                        if quarantined {
                            metrics::counter!(metrics::JOURNAL_QUARANTINED).increment(1);
                            tracing::error!(sandbox = %id, "journal record quarantined: it could not be read and was moved aside; the GC spares its instance until an operator drops it");
                            act.add_quarantined([id.clone()]);
                        }
                        act.pods.remove(&id);
                        None
                    }
                    Err(_) => {
                        act.pods.remove(&id);
                        None
                    }
                }),
        )
    }
}

/// Start-up recovery: one actor per journal record.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recover {
    /// The records that decoded.
    pub records: Vec<InstanceRecord>,
    /// Sandbox ids of records that went to quarantine.
    pub quarantined: Vec<String>,
}

// By hand: the records carry pods' initdata.
impl std::fmt::Debug for Recover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recover")
            .field("records", &self.records.len())
            .field("quarantined", &self.quarantined)
            .finish()
    }
}

impl Handler<Recover> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Recover, ctx: &mut Context<Self>) {
        self.add_quarantined(msg.quarantined);
        // A record whose recovery only keeps it gets no actor until it is
        // needed: start-up makes no actor per waiting sandbox.
        let now = now_millis();
        let records = msg.records;
        let half = records.len() / 2;
        let (mut sleepers, mut awake) = (Vec::new(), Vec::new());
        for (i, record) in records.iter().enumerate() {
            if i == half && i > 0 {
                failpoints::hit(failpoints::MID_RECOVERY);
            }
            match PodVmMachine::sleeps_until(record, &self.deps.machine, now) {
                Some(until) => sleepers.push((Arc::from(record.sandbox_id.as_str()), until)),
                None => awake.push(record.clone()),
            }
        }
        let kept = sleepers.len();
        self.sleep(sleepers);
        self.deps.view.load(records);
        let listing = self.list_for_recovery(&awake);
        for record in awake {
            self.recovering.insert(record.sandbox_id.clone());
            let listing = listing.as_ref().filter(|_| must_verify(&record)).cloned();
            self.spawn_recovered(record, listing, ctx);
        }
        if kept > 0 {
            metrics::counter!(metrics::RECOVERED_INSTANCES, "action" => RecoveryAction::Kept.as_str())
                .increment(kept as u64);
            tracing::info!(
                records = kept,
                action = RecoveryAction::Kept.as_str(),
                "recovered: Pending and cleaned-up Failed records kept as they were; each gets its actor at its first request or its expiry"
            );
            self.arm_wakeup(ctx);
        }
        self.recovery_submitted = true;
        self.check_recovery_done(ctx);
    }
}

/// An operator dropped a quarantine entry of sandbox `sandbox_id`
/// (`DropQuarantined`): the GC stops sparing the sandbox's instance if the
/// quarantine holds no other entry for it. Answers whether the sandbox is
/// still spared as quarantined — also when the quarantine cannot be read,
/// or an entry for any sandbox was added while it was being read (the next
/// drop, or a restart, decides then).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct QuarantineDropped {
    /// The dropped entry's key.
    pub sandbox_id: String,
}

impl Handler<QuarantineDropped> for Supervisor {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: QuarantineDropped, _: &mut Context<Self>) -> Self::Result {
        let id = msg.sandbox_id;
        let epoch = self.quarantine_epoch;
        let journal = self.deps.journal.clone();
        let read = async move { tokio::task::spawn_blocking(move || journal.quarantined()).await };
        Box::pin(read.into_actor(self).map(move |read, act, _| {
            let remaining = match read {
                Ok(Ok(entries)) => entries.iter().any(|e| e.key == id),
                Ok(Err(e)) => {
                    tracing::warn!(sandbox = %id, error = %podvisor_state::report(&e), "cannot read the journal's quarantine after a drop: the GC still spares the sandbox's instance until a later drop or the next start finds no entry of it");
                    true
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "the quarantine read after a drop did not finish: the GC still spares the sandbox's instance until a later drop or the next start finds no entry of it");
                    true
                }
            };
            if remaining {
                // Known or not before (a record quarantined where nobody
                // told the supervisor), it is spared from now on.
                if !act.quarantined.contains(&id) {
                    act.add_quarantined([id]);
                }
                return true;
            }
            if act.quarantine_epoch != epoch {
                return act.quarantined.contains(&id);
            }
            if act.quarantined.remove(&id) {
                tracing::info!(sandbox = %id, "no quarantined record of the sandbox is left: the GC no longer spares its instance for it");
            }
            false
        }))
    }
}

/// Shutdown: waits until every pod VM has nothing in flight — every
/// operation under way has reached a journaled state — or `limit` passes.
/// Answers whether everything settled.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Drain {
    /// The longest wait.
    pub limit: Duration,
}

impl Handler<Drain> for Supervisor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        // No dormant record wakes to expire during the drain: its delete
        // would not be waited for (the next start expires it instead).
        if let Some((_, handle)) = self.wakeup_timer.take() {
            ctx.cancel_future(handle);
        }
        let pods: Vec<Addr<PodVm>> = self.pods.values().cloned().collect();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + msg.limit;
            loop {
                let mut busy = 0usize;
                for pod in &pods {
                    // A stopped actor has nothing in flight.
                    if let Ok(false) = pod.send(IsSettled).await {
                        busy += 1;
                    }
                }
                if busy == 0 {
                    return true;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        busy,
                        "shutdown: operations still in flight; recovery resumes them"
                    );
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}

/// What a pod VM actor tells the supervisor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum PodVmReport {
    /// Its start-up recovery is decided.
    Recovered(String),
    /// Its record is deleted and it stopped.
    Forgotten(String, Addr<PodVm>),
}

impl Handler<PodVmReport> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: PodVmReport, ctx: &mut Context<Self>) {
        match msg {
            PodVmReport::Recovered(id) => {
                self.recovering.remove(&id);
            }
            PodVmReport::Forgotten(id, addr) => {
                self.recovering.remove(&id);
                if self.pods.get(&id) == Some(&addr) {
                    self.pods.remove(&id);
                }
            }
        }
        self.check_recovery_done(ctx);
    }
}

impl Supervisor {
    /// An instance of this journal was made at a write the journal did not
    /// hold when it was opened: the state directory is older than its
    /// instances (restored from a copy). The journal is declared in doubt,
    /// durably, and the GC deletes nothing from now on.
    fn journal_older_than(&self, instance: &podvisor_providers::Instance, seq: u64) {
        if !self.deps.journal.verdict().is_trusted() {
            return;
        }
        let reason = format!(
            "instance {} ({}) was created at journal write {seq}, but the journal held only {} writes when it was opened: the state directory is older than its instances (restored from a copy?), records may be missing",
            instance.id, instance.name, self.journal_seq_at_open
        );
        tracing::error!(%reason, "the journal may have lost records: the orphan GC deletes nothing until an operator decides");
        metrics::gauge!(metrics::JOURNAL_IN_DOUBT).set(1.0);
        let journal = self.deps.journal.clone();
        // A small synced file write: off the actor's thread.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = journal.declare_doubt(&reason) {
                tracing::error!(error = %podvisor_state::report(&e), "cannot record the journal's doubt; it holds for this run only");
            }
        });
    }

    /// Counts the unowned instances the GC left alone, by reason, and says
    /// once per instance why it was left (an operator decides: `podvisor
    /// journal accept-loss`, or delete or keep it by hand).
    fn report_spared(&mut self, spared: &[(podvisor_providers::Instance, Spared)]) {
        for reason in Spared::ALL {
            let n = spared.iter().filter(|(_, why)| *why == reason).count();
            metrics::gauge!(metrics::UNOWNED_INSTANCES, "reason" => reason.as_str()).set(n as f64);
        }
        let now: HashSet<String> = spared.iter().map(|(i, _)| i.id.clone()).collect();
        self.reported_spared.retain(|id| now.contains(id));
        for (instance, why) in spared {
            if *why == Spared::WithinGrace || !self.reported_spared.insert(instance.id.clone()) {
                continue;
            }
            let tag = |key: &str| instance.tags.get(key).map_or("none", String::as_str);
            let journal = tag(podvisor_providers::TAG_JOURNAL);
            // What `podvisor journal adopt` needs to keep it.
            let sandbox = tag(podvisor_providers::TAG_SANDBOX);
            let token = tag(podvisor_providers::TAG_TOKEN);
            match why {
                Spared::OtherJournal => tracing::error!(
                    instance = %instance.id, name = %instance.name, journal,
                    node = %self.deps.node_name,
                    "an instance tagged with this node belongs to another journal: a daemon whose state directory was lost, or a second daemon with the same --node-name; it is left alone"
                ),
                Spared::JournalInDoubt => tracing::error!(
                    instance = %instance.id, name = %instance.name, sandbox, token,
                    "no record owns this instance, but the journal may have lost records: it is left alone until an operator decides (podvisor journal adopt, or accept-loss)"
                ),
                _ => tracing::warn!(
                    instance = %instance.id, name = %instance.name,
                    "no record owns this instance and it names no journal: it is left alone"
                ),
            }
        }
    }
}

impl Supervisor {
    /// Whether a record owns the sandbox `id`, in any state: it has an
    /// actor (CreateVM's first write may still be in flight), a record in
    /// the view, or a record in quarantine.
    fn owns(&self, id: &str) -> bool {
        self.pods.contains_key(id)
            || self.dormant.contains_key(id)
            || self.deps.view.get(id).is_some()
            || self.quarantined.contains(id)
    }

    /// Removes the NOTRACK rules of tunnels whose VNI no record holds (a
    /// teardown that failed, or a crash between a record's removal and its
    /// rules'). Only with an intact journal and no quarantined record: a
    /// record that cannot be read may hold a VNI. Also the `ppvxlan<VNI>`
    /// devices a set-up cut short left in the node's namespace, of VNIs no
    /// record holds. (The tunnels' devices in the pods' namespaces go with
    /// those namespaces.)
    fn sweep_tunnel_rules(&mut self, ctx: &mut Context<Self>) {
        let Some(settings) = self.deps.pod_network.clone() else {
            return;
        };
        if !self.deps.journal.verdict().is_trusted() || !self.quarantined.is_empty() {
            return;
        }
        let mut in_flight: BTreeSet<u32> = self.vnis_in_flight.values().copied().collect();
        let held = !self.deps.view.vnis().is_empty() || !in_flight.is_empty();
        if !self.tunnels_seen && !held {
            return;
        }
        // Sweep again next pass while tunnels exist (their teardowns are
        // not reported here), once more after the last one went.
        self.tunnels_seen = held;
        // Left set-up devices: a tunnel being set up belongs to a durable
        // record, so one of a VNI no record or create holds is a leftover.
        let device_owners = in_flight.clone();
        // Rules found at start-up are kept: a record the journal lost may
        // hold them.
        in_flight.extend(self.vnis_found_at_start.iter().copied());
        let view = self.deps.view.clone();
        let device_view = view.clone();
        let host_netns = settings.host_netns.clone();
        let sweep = async move {
            let host = podvisor_podvm::network::netns::Netns::open(&settings.host_netns)
                .map_err(|e| podvisor_state::report(&e))?;
            tokio::task::spawn_blocking(move || {
                // The records are read under the rules' lock, after the
                // rules: a tunnel's rules are added only once its record is
                // durable, so none added meanwhile can be missed.
                crate::network::notrack::sweep(&host, |vni| {
                    in_flight.contains(&vni) || view.vnis().contains(&vni)
                })
                .map_err(|e| podvisor_state::report(&e))
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let devices = async move {
            crate::network::tunnel::sweep_host_devices(&host_netns, |vni| {
                device_owners.contains(&vni) || device_view.vnis().contains(&vni)
            })
            .await
            .map_err(|e| podvisor_state::report(&e))
        };
        ctx.spawn(sweep.into_actor(self).map(|swept, _, _| match swept {
            Ok(rules) => {
                for rule in rules {
                    tracing::info!(vni = rule.vni, pod_vm_ip = %rule.pod_vm_ip, "removed a tunnel's NOTRACK rule no record owns");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sweep tunnels' NOTRACK rules; next pass retries"),
        }));
        ctx.spawn(devices.into_actor(self).map(|swept, _, _| match swept {
            Ok(vnis) => {
                for vni in vnis {
                    tracing::info!(vni, "removed a tunnel device left in the node's namespace that no record owns");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sweep tunnel devices left in the node's namespace; next pass retries"),
        }));
    }

    /// Removes the pod directories that podvisor made and no record owns
    /// ([`crate::pod_dirs`]). They are looked for off the actor's thread;
    /// each owner is checked, and each removal made, here, so that no
    /// CreateVM is handled in between. Never with a journal in doubt: a
    /// record it lost may yet be adopted.
    fn sweep_pod_dirs(&self, ctx: &mut Context<Self>) {
        if !self.deps.journal.verdict().is_trusted() {
            return;
        }
        let pods_dir = self.deps.pods_dir.clone();
        let scan =
            tokio::task::spawn_blocking(move || crate::pod_dirs::made_by_podvisor(&pods_dir));
        ctx.spawn(scan.into_actor(self).map(|scanned, act, _| {
            let names = match scanned {
                Ok(Ok(names)) => names,
                Ok(Err(e)) => {
                    tracing::warn!(dir = %act.deps.pods_dir.display(), error = %e, "cannot list the pods dir for stale pod directories");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the pods dir scan did not finish");
                    return;
                }
            };
            for name in names.iter().filter(|name| !act.owns(name)) {
                let dir = act.deps.pods_dir.join(name);
                match crate::pod_dirs::remove(&act.deps.pods_dir, name) {
                    Ok(true) => tracing::info!(sandbox = %name, dir = %dir.display(), "removed a pod directory no record owns"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(sandbox = %name, dir = %dir.display(), error = %e, "cannot remove a pod directory no record owns; next pass retries"),
                }
            }
        }));
    }
}

/// Runs one orphan GC pass.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RunGc;

impl Handler<RunGc> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: RunGc, ctx: &mut Context<Self>) -> Self::Result {
        if self.gc_running || !self.deps.view.is_ready() {
            return Box::pin(fut::ready(()));
        }
        self.sweep_pod_dirs(ctx);
        self.sweep_tunnel_rules(ctx);
        self.gc_running = true;
        let list = self.deps.provider.send(ListInstances {
            key: TAG_NODE.to_owned(),
            value: self.deps.node_name.clone(),
        });
        Box::pin(
            list.into_actor(self)
                .then(|listed, act, _| {
                    let orphans = match listed {
                        Ok(Ok(instances)) => {
                            failpoints::hit(failpoints::DURING_GC);
                            // Ownership is read after the listing, so a record
                            // made meanwhile protects its instance.
                            let records = act.deps.view.list();
                            let journal_id = act.deps.journal.identity().id;
                            let owners = Ownership {
                                records: &records,
                                quarantined: &act.quarantined,
                                journal_id: &journal_id,
                                journal_trusted: act.deps.journal.verdict().is_trusted(),
                                journal_seq_at_open: act.journal_seq_at_open,
                                known_sandboxes: &act.known_sandboxes,
                            };
                            let decision = select_orphans(&instances, &owners, &mut act.first_seen, now_millis(), act.gc.grace);
                            if let Some((instance, seq)) = &decision.journal_older_than {
                                act.journal_older_than(instance, *seq);
                            }
                            act.report_spared(&decision.spared);
                            decision.orphans
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "orphan GC cannot list instances");
                            metrics::counter!(metrics::GC_RUNS, "outcome" => "list_failed").increment(1);
                            Vec::new()
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "orphan GC: provider actor unavailable");
                            Vec::new()
                        }
                    };
                    let provider = act.deps.provider.clone();
                    async move {
                        let mut deleted = 0u64;
                        for orphan in orphans {
                            tracing::warn!(instance = %orphan.id, name = %orphan.name, "deleting an orphan instance no record owns");
                            match provider.send(DeleteInstance(orphan.id.clone())).await {
                                Ok(Ok(())) => deleted += 1,
                                Ok(Err(e)) => tracing::warn!(instance = %orphan.id, error = %e, "orphan delete failed; next pass retries"),
                                Err(e) => tracing::warn!(instance = %orphan.id, error = %e, "orphan delete not sent"),
                            }
                        }
                        deleted
                    }
                    .into_actor(act)
                })
                .map(|deleted, act, _| {
                    act.gc_running = false;
                    metrics::counter!(metrics::ORPHANS_DELETED).increment(deleted);
                    metrics::counter!(metrics::GC_RUNS, "outcome" => "done").increment(1);
                }),
        )
    }
}
