//! The pod VM actor: a shell around [`PodVmMachine`]. It delivers events
//! (API calls, results of the commands it ran, timers) and performs the
//! commands the machine returns. It never holds a transition across an
//! `.await`: every result comes back as an event.

use super::provider::{DeleteInstance, EnsureInstance, FindInstance, ProviderActor};
use super::supervisor::{PodVmReport, Supervisor};
use crate::failpoints;
use crate::metrics;
use crate::network::settings::{PodNetworkError, PodNetworkSettings};
use crate::network::status::{self as tunnel_status, TunnelPhase, TunnelStates};
use crate::proxy::socket::{AgentSocket, Relay, client_tls};
use crate::userdata::{RequestInputs, create_request};
use crate::view::InstanceView;
use actix::prelude::*;
use podvisor_providers::ProviderError;
use podvisor_state::now_millis;
use podvisor_state::{
    Command, Event, IllegalTransition, InstanceRecord, Journal, MachineConfig, OpFailure,
    Operation, PodVmMachine, RecoveryAction, StartError, State, Waiter, report,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What every pod VM actor shares.
pub struct PodVmDeps {
    /// Where records are kept.
    pub journal: Arc<dyn Journal>,
    /// Where cloud calls go.
    pub provider: Addr<ProviderActor>,
    /// The durable view, updated after each write.
    pub view: Arc<InstanceView>,
    /// Lifecycle tunables.
    pub machine: MachineConfig,
    /// This node's name, for the node tag.
    pub node_name: String,
    /// The cluster's identity once the Kubernetes API has told it, for the
    /// cluster tag (see [`crate::kubernetes::cluster`]).
    pub cluster_id: Arc<std::sync::OnceLock<String>>,
    /// The forwarder port probed for readiness.
    pub forwarder_port: u16,
    /// How long the forwarder gets to answer.
    pub proxy_timeout: Duration,
    /// `<pods-dir>/<id>/` holds each sandbox's agent socket.
    pub pods_dir: PathBuf,
    /// `--initdata`, for pods without their own.
    pub default_initdata: Option<String>,
    /// `--enable-scratch-space`.
    pub scratch_space: bool,
    /// TLS to the forwarders (`None`: `--disable-tls`).
    pub pki: Option<Arc<crate::tls::Pki>>,
    /// `--tls-min-version`.
    pub tls_min_version: Option<String>,
    /// `--tls-cipher-suites`, passed on to the forwarders.
    pub tls_cipher_suites: Option<String>,
    /// What the agent proxy does to `CreateContainer`.
    pub proxy_hook: Arc<crate::proxy::hook::Hook>,
    /// Where the pods' image pull secrets are read (`None`: no Kubernetes
    /// API configured).
    pub pull_secrets: Option<Arc<crate::pull_secrets::PullSecrets>>,
    /// Most connections open at once on each agent socket
    /// (`--max-connections-per-endpoint`).
    pub proxy_max_connections: u32,
    /// How pods' networks are joined to their pod VMs (`None`: the
    /// provider's instances have no network of their own).
    pub pod_network: Option<Arc<PodNetworkSettings>>,
    /// Each sandbox's tunnel as this run left it (admin, gauge).
    pub tunnels: Arc<TunnelStates>,
}

// By hand: the PKI holds private keys, the pull secrets and initdata may
// hold credentials; none of them belongs in a debug print.
impl std::fmt::Debug for PodVmDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodVmDeps")
            .field("node_name", &self.node_name)
            .field("forwarder_port", &self.forwarder_port)
            .field("pods_dir", &self.pods_dir)
            .field("tls", &self.pki.is_some())
            .finish_non_exhaustive()
    }
}

/// A sandbox's tunnel: the daemon's settings, the pod's network namespace
/// and the sandbox's VNI; `None` when it has none (no pod network on this
/// provider, CreateVM sent no namespace, or no VNI was allocated).
fn tunnel_of(
    deps: &PodVmDeps,
    record: &InstanceRecord,
) -> Option<(Arc<PodNetworkSettings>, PathBuf, u32)> {
    let settings = deps.pod_network.clone()?;
    let vni = record.vni?;
    if record.network_namespace_path.is_empty() {
        return None;
    }
    Some((settings, PathBuf::from(&record.network_namespace_path), vni))
}

/// Tries of a pod tunnel's set-up whose failure may pass.
const TUNNEL_SETUP_TRIES: u32 = 3;

/// Tears the node's end of a sandbox's tunnel down (idempotent) and
/// counts the step; returns its outcome and how long it took.
async fn tear_down(
    settings: &PodNetworkSettings,
    netns: &std::path::Path,
    vni: u32,
) -> (Result<(), PodNetworkError>, Duration) {
    let t = Instant::now();
    let removed = settings.remove_tunnel(netns, vni).await;
    count_tunnel("teardown", &removed);
    (removed, t.elapsed())
}

/// Counts one pod network step by its outcome, and a failure by its
/// cause.
fn count_tunnel<T>(op: &'static str, result: &Result<T, PodNetworkError>) {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(metrics::TUNNEL_OPERATIONS, "op" => op, "outcome" => outcome).increment(1);
    if let Err(e) = result {
        metrics::counter!(metrics::TUNNEL_FAILURES, "op" => op, "cause" => e.cause()).increment(1);
    }
}

impl PodVmDeps {
    /// What every create request gets from the daemon.
    fn request_inputs(&self) -> RequestInputs<'_> {
        RequestInputs {
            node_name: &self.node_name,
            cluster_id: self.cluster_id.get().map(String::as_str),
            default_initdata: self.default_initdata.as_deref(),
            scratch_space: self.scratch_space,
            pki: self.pki.as_deref(),
            tls_min_version: self.tls_min_version.as_deref(),
            tls_cipher_suites: self.tls_cipher_suites.as_deref(),
            journal: self.journal.as_ref(),
        }
    }

    /// How every agent socket relays.
    fn relay(&self) -> Relay<'_> {
        Relay {
            pods_dir: &self.pods_dir,
            forwarder_port: self.forwarder_port,
            dial_limit: self.proxy_timeout,
            pki: self.pki.as_deref(),
            hook: &self.proxy_hook,
            max_connections: self.proxy_max_connections,
        }
    }
}

/// Start-up recovery's listing of this node's instances (by
/// [`podvisor_providers::TAG_NODE`]), by instance id, or why it failed;
/// `None` until the listing answers. One listing replaces a lookup per
/// recovered pod VM (promise 3 of `SPECIFICATION.md`).
pub type RecoveryListing = tokio::sync::watch::Receiver<
    Option<Arc<Result<HashMap<String, podvisor_providers::Instance>, String>>>,
>;

/// One sandbox's actor.
pub struct PodVm {
    /// The lifecycle logic.
    machine: PodVmMachine,
    /// Shared dependencies.
    deps: Arc<PodVmDeps>,
    /// Whom to tell about recovery and the end.
    supervisor: Addr<Supervisor>,
    /// Events to feed once started (the first write, or Recover).
    initial: Vec<Command>,
    /// Next waiter id.
    next_waiter: Waiter,
    /// CreateVM's answer channel; the error is the journal's, reported.
    create_reply: Option<oneshot::Sender<Result<(), String>>>,
    /// StartVM callers.
    start_replies: HashMap<Waiter, oneshot::Sender<Result<(), StartError>>>,
    /// StopVM callers; the error is the journal's, reported.
    stop_replies: HashMap<Waiter, oneshot::Sender<Result<(), String>>>,
    /// When the first StartVM of this sandbox arrived, for the start histogram.
    start_began: Option<Instant>,
    /// Whether the machine must be sent `Recover` when the actor starts.
    recover_on_start: bool,
    /// Whether this actor counts and reports its record's recovery: not
    /// when the supervisor counted it already (a dormant record woken).
    reports_recovery: bool,
    /// Start-up recovery's one listing of this node's instances: answers
    /// this pod VM's first lookup (its recovery check) when the instance is
    /// in it; see [`RecoveryListing`].
    recovery_listing: Option<RecoveryListing>,
    /// The agent socket, open while the durable record is Running.
    agent_socket: AgentSocket,
}

impl std::fmt::Debug for PodVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = self.machine.target();
        f.debug_struct("PodVm")
            .field("sandbox_id", &target.sandbox_id)
            .field("state", &target.state)
            .finish_non_exhaustive()
    }
}

impl PodVm {
    /// The actor for a sandbox CreateVM just made; answers on `reply` once
    /// its record is durable (or with the journal's error).
    pub fn create(
        record: InstanceRecord,
        deps: Arc<PodVmDeps>,
        supervisor: Addr<Supervisor>,
        reply: oneshot::Sender<Result<(), String>>,
    ) -> Self {
        let (machine, initial) =
            PodVmMachine::create(record, deps.machine.clone(), fastrand::u64(..));
        Self::new(machine, deps, supervisor, initial, Some(reply), false)
    }

    /// The actor for a record read back from the journal. `listing`, when
    /// given, answers the recovery check of a record that names an instance
    /// without a lookup of its own if the instance is listed.
    pub fn recover(
        record: InstanceRecord,
        deps: Arc<PodVmDeps>,
        supervisor: Addr<Supervisor>,
        listing: Option<RecoveryListing>,
    ) -> Self {
        let machine = PodVmMachine::recovered(record, deps.machine.clone(), fastrand::u64(..));
        let mut actor = Self::new(machine, deps, supervisor, Vec::new(), None, true);
        actor.recovery_listing = listing;
        actor
    }

    /// The actor for a record that start-up recovery kept without one
    /// ([`PodVmMachine::sleeps_until`]), at its first request or its expiry:
    /// recovered as then, but its recovery, counted then, is not counted
    /// or reported again.
    pub fn woken(
        record: InstanceRecord,
        deps: Arc<PodVmDeps>,
        supervisor: Addr<Supervisor>,
    ) -> Self {
        let mut actor = Self::recover(record, deps, supervisor, None);
        actor.reports_recovery = false;
        actor
    }

    fn new(
        machine: PodVmMachine,
        deps: Arc<PodVmDeps>,
        supervisor: Addr<Supervisor>,
        initial: Vec<Command>,
        create_reply: Option<oneshot::Sender<Result<(), String>>>,
        recover_on_start: bool,
    ) -> Self {
        Self {
            machine,
            deps,
            supervisor,
            initial,
            next_waiter: 0,
            create_reply,
            start_replies: HashMap::new(),
            stop_replies: HashMap::new(),
            start_began: None,
            recover_on_start,
            reports_recovery: true,
            recovery_listing: None,
            agent_socket: AgentSocket::new(),
        }
    }

    fn sandbox_id(&self) -> &str {
        &self.machine.target().sandbox_id
    }

    fn feed(&mut self, event: Event, ctx: &mut Context<Self>) {
        let commands = self.machine.on_event(event, now_millis());
        // Before the commands: StartVM's answer must find the socket open.
        self.follow_agent_socket();
        self.perform(commands, ctx);
    }

    /// Opens or closes the agent socket to match the durable record.
    fn follow_agent_socket(&mut self) {
        let target = self.machine.target();
        self.agent_socket.follow(
            &target.sandbox_id,
            self.machine.durable(),
            self.deps.relay(),
        );
    }

    fn perform(&mut self, commands: Vec<Command>, ctx: &mut Context<Self>) {
        for command in commands {
            self.perform_one(command, ctx);
        }
    }

    fn perform_one(&mut self, command: Command, ctx: &mut Context<Self>) {
        match command {
            Command::Persist(record) => self.persist(*record, ctx),
            Command::Ensure { first_attempt } => self.ensure(first_attempt, ctx),
            Command::Find => self.find(ctx),
            Command::Delete { instance_id } => self.delete(instance_id, ctx),
            Command::Probe { ip } => self.probe(ip, ctx),
            Command::ReplyCreate(result) => {
                if let Some(tx) = self.create_reply.take() {
                    let _ = tx.send(result);
                }
            }
            Command::ReplyStart(waiter, result) => self.reply_start(waiter, result),
            Command::ReplyStop(waiter, result) => {
                if let Some(tx) = self.stop_replies.remove(&waiter) {
                    let _ = tx.send(result);
                }
            }
            Command::Schedule { kind, epoch, after } => {
                ctx.run_later(after, move |act, ctx| {
                    act.feed(Event::Timer(kind, epoch), ctx);
                });
            }
            Command::RecoveryDone(action) => {
                self.recovery_done(action);
                if action == RecoveryAction::Verified {
                    self.restore_tunnel(ctx);
                }
            }
            Command::Retrying(op) => count_retry(op),
            Command::Refused(illegal) => report_refused(self.sandbox_id(), illegal),
            Command::Forget => self.forget(ctx),
        }
    }

    /// Hands `record` to the journal's flusher thread, which writes it and
    /// flushes — sharing the flush with the other pod VMs' writes of the
    /// moment (group commit) — while the actor holds no thread;
    /// answers [`Event::Persisted`] once the record is durable.
    fn persist(&mut self, record: InstanceRecord, ctx: &mut Context<Self>) {
        let t = Instant::now();
        let commit = self.deps.journal.put_durable(&record);
        let write = async move {
            commit.await.map_err(|e| report(&e))?;
            metrics::histogram!(metrics::JOURNAL_FLUSH_DURATION).record(t.elapsed().as_secs_f64());
            Ok::<_, String>(())
        };
        ctx.spawn(write.into_actor(self).map(move |result, act, ctx| {
            match &result {
                Ok(()) => act.persisted(record),
                Err(e) => {
                    metrics::counter!(metrics::JOURNAL_ERRORS).increment(1);
                    tracing::error!(sandbox = %act.sandbox_id(), error = %e, "journal write failed");
                }
            }
            act.feed(Event::Persisted(result), ctx);
        }));
    }

    /// `record` is durable: the view shows it, and a new failure is logged
    /// once.
    fn persisted(&self, record: InstanceRecord) {
        if record.state == State::Failed
            && self.deps.view.get(&record.sandbox_id).map(|r| r.state) != Some(State::Failed)
        {
            tracing::warn!(
                sandbox = %record.sandbox_id,
                pod = %record.pod_name,
                namespace = %record.pod_namespace,
                error = record.last_error.as_deref().unwrap_or("unknown"),
                "pod VM failed"
            );
        }
        self.deps.view.update(record);
    }

    /// Creates (or adopts) the instance of the durable record; answers
    /// [`Event::Ensured`].
    fn ensure(&mut self, first_attempt: bool, ctx: &mut Context<Self>) {
        failpoints::hit(failpoints::CREATING_BEFORE_CREATE);
        // Not the token's first create: an earlier one may have reached the
        // cloud, and the provider must look for what it made.
        let earlier_attempt = !first_attempt;
        let deps = self.deps.clone();
        let record = self.machine.target().clone();
        let permanent = |message: String| OpFailure {
            message,
            retryable: false,
            retry_after: None,
        };
        let call = async move {
            // The pod's network as the CNI made it, for the pod VM to
            // rebuild: read before the create, so a pod the tunnel cannot
            // serve (no namespace, no or two IPv4 addresses, an MTU below
            // the VXLAN overhead) gets no VM.
            let pod_network = match tunnel_of(&deps, &record) {
                None => None,
                Some((settings, netns, vni)) => {
                    // A new attempt: what an earlier one left is not this
                    // one's state.
                    deps.tunnels.remove(&record.sandbox_id);
                    let described = settings.describe(&netns, vni).await;
                    count_tunnel("describe", &described);
                    if let Err(e) = &described {
                        deps.tunnels
                            .set(&record.sandbox_id, TunnelPhase::Failed, Some(report(e)));
                    }
                    Some(described.map_err(|e| OpFailure {
                        message: report(&e),
                        retryable: e.retryable(),
                        retry_after: None,
                    })?)
                }
            };
            let mut request = create_request(
                &record,
                &deps.request_inputs(),
                earlier_attempt,
                pod_network.as_ref(),
            )
            .map_err(permanent)?;
            if let Some(secrets) = &deps.pull_secrets {
                secrets.add_auth_json(&mut request).await;
            }
            answered(deps.provider.send(EnsureInstance { request }).await)
        };
        ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
            if result.is_ok() {
                failpoints::hit(failpoints::CREATED_BEFORE_RUNNING);
            }
            act.feed(Event::Ensured(result), ctx);
        }));
    }

    /// Looks the instance up by the record's token and name; answers
    /// [`Event::Found`].
    fn find(&mut self, ctx: &mut Context<Self>) {
        // The first lookup of a recovered record that names an instance is
        // its recovery check: the node's listing answers it when the
        // instance is listed. Absent from the listing (or no listing) is no
        // proof that it is gone — the lookup below decides that.
        if let Some(mut listing) = self.recovery_listing.take() {
            let target = self.machine.target();
            let instance_id = target.instance.as_ref().map(|i| i.id.clone());
            let token = target.token.clone();
            let listed = async move {
                listing
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|listed| listed.clone())
            };
            ctx.spawn(listed.into_actor(self).map(move |listed, act, ctx| {
                let hit = listed.as_deref().and_then(|listed| match listed {
                    Ok(instances) => instance_id
                        .as_ref()
                        .and_then(|id| instances.get(id))
                        .filter(|i| {
                            i.tags
                                .get(podvisor_providers::TAG_TOKEN)
                                .is_none_or(|t| Some(t) == token.as_ref())
                        })
                        .map(podvisor_providers::Instance::to_ref),
                    Err(_) => None,
                });
                match hit {
                    Some(instance) => act.feed(Event::Found(Ok(Some(instance))), ctx),
                    None => act.find(ctx),
                }
            }));
            return;
        }
        let target = self.machine.target();
        let call = self.deps.provider.send(FindInstance {
            token: target.token.clone().unwrap_or_default(),
            name: target.instance_name.clone(),
        });
        ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
            let found = answered(result).map(|o| o.map(|i| i.to_ref()));
            act.feed(Event::Found(found), ctx);
        }));
    }

    /// Deletes the instance; answers [`Event::Deleted`].
    fn delete(&mut self, instance_id: String, ctx: &mut Context<Self>) {
        failpoints::hit(failpoints::DELETING_BEFORE_DELETE);
        let tunnel = tunnel_of(&self.deps, self.machine.target());
        let sandbox = self.sandbox_id().to_owned();
        let provider = self.deps.provider.clone();
        let tunnels = self.deps.tunnels.clone();
        let call = async move {
            // The worker's end first, while the record still holds the
            // VNI. A failure does not keep the VM: the device goes with the
            // pod's namespace, and the GC sweeps rules no record owns.
            if let Some((settings, netns, vni)) = tunnel {
                match tear_down(&settings, &netns, vni).await {
                    (Ok(()), took) => {
                        tunnel_status::record_teardown(took);
                        tunnels.set_down(&sandbox);
                    }
                    (Err(e), _) => {
                        tracing::warn!(sandbox = %sandbox, vni, error = %report(&e), "cannot remove the pod's tunnel; the VM is deleted anyway");
                        tunnels.set(&sandbox, TunnelPhase::Failed, Some(report(&e)));
                    }
                }
            }
            provider.send(DeleteInstance(instance_id)).await
        };
        ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
            let result = answered(result);
            if result.is_ok() {
                failpoints::hit(failpoints::DELETED_BEFORE_REMOVE);
            }
            act.feed(Event::Deleted(result), ctx);
        }));
    }

    /// Waits for the agent endpoint of the instance at `ip`; answers
    /// [`Event::AgentReady`] or [`Event::AgentUnreachable`].
    fn probe(&mut self, ip: IpAddr, ctx: &mut Context<Self>) {
        let addr = SocketAddr::new(ip, self.deps.forwarder_port);
        let limit = self.deps.proxy_timeout;
        let tls = client_tls(
            self.deps.pki.as_deref(),
            &self.machine.target().instance_name,
        );
        let tunnel = tunnel_of(&self.deps, self.machine.target());
        let ips = self
            .machine
            .target()
            .instance
            .as_ref()
            .map_or_else(|| vec![ip], |i| i.ips.clone());
        let tunnels = self.deps.tunnels.clone();
        let sandbox = self.sandbox_id().to_owned();
        let probe = async move {
            failpoints::hit(failpoints::DURING_READINESS);
            // The worker's end of the pod's tunnel, before the pod is
            // reported Running (kept if a restart finds it there).
            // Always set up in full (idempotent): a device a crash left
            // half-built before this pod was Running is replaced, not kept.
            // A step that may pass (the xtables lock held, the node's
            // interface not up yet) is tried again, up to three times.
            if let Some((settings, netns, vni)) = tunnel {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let t = Instant::now();
                    let built = settings.ensure_tunnel(&netns, &ips, vni, true).await;
                    count_tunnel("setup", &built);
                    match built {
                        Ok(_) => {
                            metrics::histogram!(metrics::TUNNEL_SETUP_DURATION)
                                .record(t.elapsed().as_secs_f64());
                            tunnels.set(&sandbox, TunnelPhase::Up, None);
                            break;
                        }
                        Err(e) if e.retryable() && tries < TUNNEL_SETUP_TRIES => {
                            tracing::warn!(vni, tries, error = %report(&e), "pod tunnel set-up failed; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => {
                            tunnels.set(&sandbox, TunnelPhase::Failed, Some(report(&e)));
                            return Err(format!("Cannot build the pod's network: {}", report(&e)));
                        }
                    }
                }
            }
            crate::probe::wait_for_agent(addr, limit, tls?.as_ref()).await
        };
        ctx.spawn(probe.into_actor(self).map(|result, act, ctx| {
            let event = match result {
                Ok(()) => Event::AgentReady,
                Err(why) => Event::AgentUnreachable(why),
            };
            act.feed(event, ctx);
        }));
    }

    /// Answers one StartVM; the first success is timed and logged.
    fn reply_start(&mut self, waiter: Waiter, result: Result<(), StartError>) {
        if result.is_ok()
            && let Some(t) = self.start_began.take()
        {
            metrics::histogram!(metrics::VM_START_DURATION).record(t.elapsed().as_secs_f64());
            let target = self.machine.target();
            tracing::info!(
                sandbox = %target.sandbox_id,
                instance = target.instance.as_ref().map_or("-", |i| i.id.as_str()),
                elapsed_ms = t.elapsed().as_millis() as u64,
                "pod VM running"
            );
        }
        if let Some(tx) = self.start_replies.remove(&waiter) {
            let _ = tx.send(result);
        }
    }

    /// Counts the recovery of this record and tells the supervisor.
    fn recovery_done(&self, action: RecoveryAction) {
        if !self.reports_recovery {
            return;
        }
        metrics::counter!(metrics::RECOVERED_INSTANCES, "action" => action.as_str()).increment(1);
        tracing::info!(sandbox = %self.sandbox_id(), action = action.as_str(), "recovered");
        self.supervisor
            .do_send(PodVmReport::Recovered(self.sandbox_id().to_owned()));
    }

    /// After a restart, a Running sandbox's tunnel is checked and, if its
    /// device is missing (the node rebooted, someone removed it), built
    /// again with the same VNI. A failure is logged and counted; the pod
    /// VM keeps running (its agent path does not use the tunnel). The
    /// actor handles nothing else meanwhile (tens of milliseconds): a
    /// StopVM's teardown can never run before a rebuild it would miss.
    fn restore_tunnel(&mut self, ctx: &mut Context<Self>) {
        let target = self.machine.target();
        if target.state != State::Running {
            return;
        }
        let Some((settings, netns, vni)) = tunnel_of(&self.deps, target) else {
            return;
        };
        let ips = target
            .instance
            .as_ref()
            .map(|i| i.ips.clone())
            .unwrap_or_default();
        let sandbox = self.sandbox_id().to_owned();
        let tunnels = self.deps.tunnels.clone();
        ctx.wait(
            async move {
                let restored = settings.ensure_tunnel(&netns, &ips, vni, false).await;
                count_tunnel("setup", &restored);
                match restored {
                    Ok(true) => tracing::info!(sandbox = %sandbox, vni, "pod tunnel was missing; built it again"),
                    Ok(false) => tracing::debug!(sandbox = %sandbox, vni, "pod tunnel found"),
                    Err(e) => {
                        tracing::warn!(sandbox = %sandbox, vni, error = %report(&e), "cannot restore the pod's tunnel");
                        tunnels.set(&sandbox, TunnelPhase::Failed, Some(report(&e)));
                        return;
                    }
                }
                tunnels.set(&sandbox, TunnelPhase::Up, None);
            }
            .into_actor(self),
        );
    }

    /// Deletes the record and the pods dir, then stops.
    fn forget(&mut self, ctx: &mut Context<Self>) {
        let id = self.sandbox_id().to_owned();
        let journal = self.deps.journal.clone();
        let pod_dir = self.deps.pods_dir.join(&id);
        let removed_id = id.clone();
        // The record holds the VNI until it goes: its tunnel goes first, on
        // every way to here (a delete tore it down already; a pod VM found
        // gone at recovery, or a failed create, did not). Idempotent.
        let tunnel = tunnel_of(&self.deps, self.machine.target());
        // Timed only where it is the teardown (a delete's was timed).
        let timed = !self.deps.tunnels.is_down(&id);
        let work = async move {
            if let Some((settings, netns, vni)) = tunnel {
                match tear_down(&settings, &netns, vni).await {
                    (Ok(()), took) if timed => tunnel_status::record_teardown(took),
                    (Ok(()), _) => {}
                    (Err(e), _) => {
                        tracing::warn!(sandbox = %removed_id, vni, error = %report(&e), "cannot remove the pod's tunnel before its record");
                    }
                }
            }
            tokio::task::spawn_blocking(move || {
                let r = journal.remove(&removed_id).map_err(|e| report(&e));
                match std::fs::remove_dir_all(&pod_dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(dir = %pod_dir.display(), error = %e, "cannot remove the pod directory"),
                }
                r
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        };
        ctx.wait(work.into_actor(self).map(move |result, act, ctx| {
            if let Err(e) = result {
                // The record comes back as Deleting at the next start, and
                // its delete finds nothing: harmless, but worth a line.
                tracing::warn!(sandbox = %id, error = %e, "cannot remove the journal record");
            }
            act.deps.view.remove(&id);
            act.deps.tunnels.remove(&id);
            tracing::info!(sandbox = %id, "pod VM removed");
            act.supervisor
                .do_send(PodVmReport::Forgotten(id.clone(), ctx.address()));
            ctx.stop();
        }));
    }

    fn waiter(&mut self) -> Waiter {
        self.next_waiter += 1;
        self.next_waiter
    }
}

/// A provider call's answer as the machine sees it: the provider's error
/// classified, or the provider actor's silence as a retryable failure.
fn answered<T>(result: Result<Result<T, ProviderError>, MailboxError>) -> Result<T, OpFailure> {
    match result {
        Ok(answer) => answer.map_err(OpFailure::from),
        Err(e) => Err(OpFailure {
            message: format!("The provider actor did not answer: {e}"),
            retryable: true,
            retry_after: None,
        }),
    }
}

/// Counts a lifecycle-level retry of `op`.
fn count_retry(op: Operation) {
    metrics::counter!(metrics::OPERATION_RETRIES, "operation" => op.as_str()).increment(1);
}

/// The machine refused a move the lifecycle table forbids (in any build):
/// an error in the log and in [`metrics::ILLEGAL_TRANSITIONS`]. The state did
/// not change.
fn report_refused(sandbox_id: &str, illegal: IllegalTransition) {
    metrics::counter!(
        metrics::ILLEGAL_TRANSITIONS,
        "from" => illegal.from.as_str(),
        "to" => illegal.to.as_str()
    )
    .increment(1);
    tracing::error!(
        sandbox = %sandbox_id,
        from = illegal.from.as_str(),
        to = illegal.to.as_str(),
        "illegal lifecycle transition refused: {illegal}"
    );
}

impl Actor for PodVm {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let initial = std::mem::take(&mut self.initial);
        self.perform(initial, ctx);
        if self.recover_on_start {
            self.feed(Event::Recover, ctx);
        }
        self.follow_agent_socket();
    }
}
/// StartVM for this sandbox.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), StartError>")]
pub struct Start;

impl Handler<Start> for PodVm {
    type Result = ResponseFuture<Result<(), StartError>>;
    fn handle(&mut self, _: Start, ctx: &mut Context<Self>) -> Self::Result {
        let w = self.waiter();
        let (tx, rx) = oneshot::channel();
        self.start_replies.insert(w, tx);
        if self.start_began.is_none() && self.machine.target().state == State::Pending {
            self.start_began = Some(Instant::now());
        }
        self.feed(Event::Start(w), ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StartError::Stopping)) })
    }
}

/// A create that could not even be sent (its request could not be made).
#[derive(Message)]
#[rtype(result = "()")]
struct Failed(OpFailure);

impl Handler<Failed> for PodVm {
    type Result = ();
    fn handle(&mut self, msg: Failed, ctx: &mut Context<Self>) {
        self.feed(Event::Ensured(Err(msg.0)), ctx);
    }
}

/// Whether this pod VM has nothing in flight (see
/// [`podvisor_state::PodVmMachine::is_settled`]).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct IsSettled;

impl Handler<IsSettled> for PodVm {
    type Result = bool;
    fn handle(&mut self, _: IsSettled, _: &mut Context<Self>) -> bool {
        self.machine.is_settled()
    }
}

/// StopVM for this sandbox. The error (the stop could not be journaled) is
/// only reported.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), String>")]
pub struct Stop;

impl Handler<Stop> for PodVm {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) -> Self::Result {
        let w = self.waiter();
        let (tx, rx) = oneshot::channel();
        self.stop_replies.insert(w, tx);
        self.feed(Event::Stop(w), ctx);
        // A stopped actor dropped the sender: the sandbox is gone, which is
        // what StopVM wanted.
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::capture::Buffer;

    /// The release-build path: no debug assertion is involved, so this runs
    /// the same in a debug and a release build.
    #[test]
    fn a_refused_transition_is_logged_as_an_error_and_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let log = Buffer::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let illegal = IllegalTransition {
            from: State::Running,
            to: State::Creating,
        };
        tracing::subscriber::with_default(subscriber, || {
            ::metrics::with_local_recorder(&recorder, || {
                report_refused("sb1", illegal);
                report_refused("sb1", illegal);
            });
        });
        let text = handle.render();
        let line = r#"podvisor_illegal_transitions_total{from="running",to="creating"} 2"#;
        assert!(text.contains(line), "missing {line} in\n{text}");
        let log = log.text();
        assert!(log.contains("ERROR"), "{log}");
        assert!(
            log.contains("A pod VM cannot move from running to creating"),
            "{log}"
        );
        assert!(log.contains("sandbox=sb1"), "{log}");
    }
}
