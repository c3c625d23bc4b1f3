//! The pod VM actor: a shell around [`PodVmMachine`]. It delivers events
//! (API calls, results of the commands it ran, timers) and performs the
//! commands the machine returns. It never holds a transition across an
//! `.await`: every result comes back as an event.

use super::provider::{DeleteInstance, EnsureInstance, FindInstance, ProviderActor};
use super::supervisor::{PodVmReport, Supervisor};
use crate::failpoints;
use crate::metrics;
use crate::proxy::{AgentProxy, ClientTls};
use crate::userdata::{UserDataInputs, render};
use crate::view::InstanceView;
use actix::prelude::*;
use podvisor_providers::{
    CreateRequest, TAG_JOURNAL, TAG_JOURNAL_SEQ, TAG_NODE, TAG_SANDBOX, TAG_TOKEN,
};
use podvisor_state::{
    Command, Event, InstanceRecord, Journal, MachineConfig, OpFailure, PodVmMachine, StartError,
    UnixMillis, Waiter,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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
}

/// Milliseconds since the epoch.
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
    /// CreateVM's answer channel.
    create_reply: Option<oneshot::Sender<Result<(), String>>>,
    /// StartVM callers.
    start_replies: HashMap<Waiter, oneshot::Sender<Result<(), StartError>>>,
    /// StopVM callers.
    stop_replies: HashMap<Waiter, oneshot::Sender<Result<(), String>>>,
    /// When the first StartVM of this sandbox arrived, for the start histogram.
    start_began: Option<Instant>,
    /// Whether the machine must be sent `Recover` when the actor starts.
    recover_on_start: bool,
    /// The agent socket, open while the durable record is Running.
    proxy: Option<AgentProxy>,
}

impl PodVm {
    /// The actor for a sandbox CreateVM just made; answers on `reply` once
    /// its record is durable.
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

    /// The actor for a record read back from the journal.
    pub fn recover(
        record: InstanceRecord,
        deps: Arc<PodVmDeps>,
        supervisor: Addr<Supervisor>,
    ) -> Self {
        let machine = PodVmMachine::recovered(record, deps.machine.clone(), fastrand::u64(..));
        Self::new(machine, deps, supervisor, Vec::new(), None, true)
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
            proxy: None,
        }
    }

    fn sandbox_id(&self) -> &str {
        &self.machine.target().sandbox_id
    }

    fn feed(&mut self, event: Event, ctx: &mut Context<Self>) {
        let commands = self.machine.on_event(event, now_millis());
        // Before the commands: StartVM's answer must find the socket open.
        self.sync_proxy();
        self.perform(commands, ctx);
    }

    /// Opens the agent socket once the durable record is Running (also a
    /// recovered one: the shim's next call works after a restart), and
    /// closes it when the record leaves Running.
    fn sync_proxy(&mut self) {
        let running = self
            .machine
            .durable()
            .filter(|r| r.state == podvisor_state::State::Running);
        let upstream = running
            .and_then(|r| r.instance.as_ref())
            .and_then(|i| i.ips.first())
            .map(|ip| SocketAddr::new(*ip, self.deps.forwarder_port));
        let instance_name = running.map(|r| r.instance_name.clone()).unwrap_or_default();
        match (upstream, &self.proxy) {
            (Some(upstream), None) => {
                let path = self
                    .deps
                    .pods_dir
                    .join(self.sandbox_id())
                    .join("agent.ttrpc");
                let tls = match self.client_tls(&instance_name) {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::error!(sandbox = %self.sandbox_id(), error = %e, "cannot open the agent socket");
                        return;
                    }
                };
                match AgentProxy::open(
                    &path,
                    upstream,
                    self.deps.proxy_timeout,
                    tls,
                    self.deps.proxy_hook.clone(),
                    self.deps.proxy_max_connections,
                ) {
                    Ok(proxy) => {
                        tracing::debug!(sandbox = %self.sandbox_id(), socket = %path.display(), %upstream, "agent proxy open");
                        self.proxy = Some(proxy);
                    }
                    Err(e) => tracing::warn!(
                        sandbox = %self.sandbox_id(),
                        socket = %path.display(),
                        error = %e,
                        "cannot open the agent socket; retried at the next step"
                    ),
                }
            }
            (None, Some(_)) => self.proxy = None,
            _ => {}
        }
    }

    /// How the proxy and the readiness probe talk TLS to this sandbox's
    /// pod VM named `instance_name` (`None`: `--disable-tls`).
    fn client_tls(&self, instance_name: &str) -> Result<Option<ClientTls>, String> {
        let Some(pki) = &self.deps.pki else {
            return Ok(None);
        };
        Ok(Some(ClientTls {
            config: pki.client_config(),
            server_name: pki.server_name(instance_name)?,
        }))
    }

    fn perform(&mut self, commands: Vec<Command>, ctx: &mut Context<Self>) {
        for command in commands {
            self.perform_one(command, ctx);
        }
    }

    fn perform_one(&mut self, command: Command, ctx: &mut Context<Self>) {
        match command {
            Command::Persist(record) => {
                let journal = self.deps.journal.clone();
                let written = record.clone();
                let write = async move {
                    tokio::task::spawn_blocking(move || {
                        journal.put(&written)?;
                        let t = Instant::now();
                        journal.flush()?;
                        metrics::histogram!(metrics::JOURNAL_FLUSH_DURATION)
                            .record(t.elapsed().as_secs_f64());
                        Ok::<_, podvisor_state::JournalError>(())
                    })
                    .await
                    .map_err(|e| format!("journal task failed: {e}"))
                    .and_then(|r| r.map_err(|e| e.to_string()))
                };
                ctx.spawn(write.into_actor(self).map(move |result, act, ctx| {
                    match &result {
                        Ok(()) => {
                            if record.state == podvisor_state::State::Failed
                                && act.deps.view.get(&record.sandbox_id).map(|r| r.state)
                                    != Some(podvisor_state::State::Failed)
                            {
                                tracing::warn!(
                                    sandbox = %record.sandbox_id,
                                    pod = %record.pod_name,
                                    namespace = %record.pod_namespace,
                                    error = record.last_error.as_deref().unwrap_or("unknown"),
                                    "pod VM failed"
                                );
                            }
                            act.deps.view.update(*record)
                        }
                        Err(e) => {
                            metrics::counter!(metrics::JOURNAL_ERRORS).increment(1);
                            tracing::error!(sandbox = %act.sandbox_id(), error = %e, "journal write failed");
                        }
                    }
                    act.feed(Event::Persisted(result), ctx);
                }));
            }
            Command::Ensure { first_attempt } => {
                failpoints::hit(failpoints::CREATING_BEFORE_CREATE);
                let request = match self.create_request() {
                    Ok(r) => r,
                    Err(message) => {
                        let failure = OpFailure {
                            message,
                            retryable: false,
                            retry_after: None,
                        };
                        // Answered as an event, after this step's commands.
                        ctx.notify(Failed(failure));
                        return;
                    }
                };
                let provider = self.deps.provider.clone();
                let pull_secrets = self.deps.pull_secrets.clone();
                let call = async move {
                    let mut request = request;
                    // Registry credentials, read now (they may have changed
                    // since CreateVM); a failed lookup is logged and the
                    // pod VM starts without them.
                    if let Some(secrets) = pull_secrets {
                        if let Some(auth) = secrets
                            .auth_json(&request.pod_name, &request.pod_namespace)
                            .await
                        {
                            crate::userdata::add_file(
                                &mut request.user_data,
                                crate::userdata::AUTH_JSON_PATH,
                                &auth,
                            );
                        }
                    }
                    provider
                        .send(EnsureInstance {
                            request,
                            first_attempt,
                        })
                        .await
                };
                ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
                    let event = match result {
                        Ok(r) => {
                            if r.is_ok() {
                                failpoints::hit(failpoints::CREATED_BEFORE_RUNNING);
                            }
                            Event::Ensured(r.map_err(OpFailure::from))
                        }
                        Err(e) => Event::Ensured(Err(mailbox_failure(e))),
                    };
                    act.feed(event, ctx);
                }));
            }
            Command::Find => {
                let target = self.machine.target();
                let call = self.deps.provider.send(FindInstance {
                    token: target.token.clone().unwrap_or_default(),
                    name: target.instance_name.clone(),
                });
                ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
                    let event = match result {
                        Ok(r) => {
                            Event::Found(r.map(|o| o.map(|i| i.to_ref())).map_err(OpFailure::from))
                        }
                        Err(e) => Event::Found(Err(mailbox_failure(e))),
                    };
                    act.feed(event, ctx);
                }));
            }
            Command::Delete { instance_id } => {
                failpoints::hit(failpoints::DELETING_BEFORE_DELETE);
                let call = self.deps.provider.send(DeleteInstance(instance_id));
                ctx.spawn(call.into_actor(self).map(|result, act, ctx| {
                    let event = match result {
                        Ok(r) => {
                            if r.is_ok() {
                                failpoints::hit(failpoints::DELETED_BEFORE_REMOVE);
                            }
                            Event::Deleted(r.map_err(OpFailure::from))
                        }
                        Err(e) => Event::Deleted(Err(mailbox_failure(e))),
                    };
                    act.feed(event, ctx);
                }));
            }
            Command::Probe { ip } => {
                let addr = SocketAddr::new(ip, self.deps.forwarder_port);
                let limit = self.deps.proxy_timeout;
                let tls = self.client_tls(&self.machine.target().instance_name);
                let probe = async move {
                    failpoints::hit(failpoints::DURING_READINESS);
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
            Command::ReplyCreate(result) => {
                if let Some(tx) = self.create_reply.take() {
                    let _ = tx.send(result);
                }
            }
            Command::ReplyStart(waiter, result) => {
                if result.is_ok() {
                    if let Some(t) = self.start_began.take() {
                        metrics::histogram!(metrics::VM_START_DURATION)
                            .record(t.elapsed().as_secs_f64());
                        let target = self.machine.target();
                        tracing::info!(
                            sandbox = %target.sandbox_id,
                            instance = target.instance.as_ref().map(|i| i.id.as_str()).unwrap_or("-"),
                            elapsed_ms = t.elapsed().as_millis() as u64,
                            "pod VM running"
                        );
                    }
                }
                if let Some(tx) = self.start_replies.remove(&waiter) {
                    let _ = tx.send(result);
                }
            }
            Command::ReplyStop(waiter, result) => {
                if let Some(tx) = self.stop_replies.remove(&waiter) {
                    let _ = tx.send(result);
                }
            }
            Command::Schedule { kind, epoch, after } => {
                ctx.run_later(after, move |act, ctx| {
                    act.feed(Event::Timer(kind, epoch), ctx)
                });
            }
            Command::RecoveryDone(action) => {
                metrics::counter!(metrics::RECOVERED_INSTANCES, "action" => action.as_str())
                    .increment(1);
                tracing::info!(sandbox = %self.sandbox_id(), action = action.as_str(), "recovered");
                self.supervisor
                    .do_send(PodVmReport::Recovered(self.sandbox_id().to_owned()));
            }
            Command::Retrying(op) => {
                metrics::counter!(metrics::OPERATION_RETRIES, "operation" => op.as_str())
                    .increment(1);
            }
            Command::Forget => self.forget(ctx),
        }
    }

    /// Deletes the record and the pods dir, then stops.
    fn forget(&mut self, ctx: &mut Context<Self>) {
        let id = self.sandbox_id().to_owned();
        let journal = self.deps.journal.clone();
        let pod_dir = self.deps.pods_dir.join(&id);
        let removed_id = id.clone();
        let work = async move {
            tokio::task::spawn_blocking(move || {
                let r = journal.remove(&removed_id).map_err(|e| e.to_string());
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
            tracing::info!(sandbox = %id, "pod VM removed");
            act.supervisor
                .do_send(PodVmReport::Forgotten(id.clone(), ctx.address()));
            ctx.stop();
        }));
    }

    fn create_request(&self) -> Result<CreateRequest, String> {
        let target = self.machine.target();
        let token = target.token.clone().unwrap_or_default();
        let initdata = target
            .initdata
            .as_deref()
            .or(self.deps.default_initdata.as_deref());
        let identity = match &self.deps.pki {
            Some(pki) => pki
                .server_identity(&target.instance_name)
                .map_err(|e| format!("Cannot issue the pod VM's TLS certificate: {e}"))?,
            None => None,
        };
        let user_data = render(&UserDataInputs {
            pod_name: &target.pod_name,
            pod_namespace: &target.pod_namespace,
            initdata,
            scratch_space: self.deps.scratch_space,
            tls: identity.as_ref(),
            tls_min_version: self.deps.tls_min_version.as_deref(),
            tls_cipher_suites: self.deps.tls_cipher_suites.as_deref(),
        });
        let tags = BTreeMap::from([
            (TAG_NODE.to_owned(), self.deps.node_name.clone()),
            (TAG_SANDBOX.to_owned(), target.sandbox_id.clone()),
            (TAG_TOKEN.to_owned(), token.clone()),
            (TAG_JOURNAL.to_owned(), self.deps.journal.identity().id),
            (
                TAG_JOURNAL_SEQ.to_owned(),
                self.deps.journal.durable_sequence().to_string(),
            ),
        ]);
        Ok(CreateRequest {
            sandbox_id: target.sandbox_id.clone(),
            pod_name: target.pod_name.clone(),
            pod_namespace: target.pod_namespace.clone(),
            instance_name: target.instance_name.clone(),
            token,
            spec: target.spec.clone(),
            user_data,
            tags,
        })
    }

    fn waiter(&mut self) -> Waiter {
        self.next_waiter += 1;
        self.next_waiter
    }
}

fn mailbox_failure(e: MailboxError) -> OpFailure {
    OpFailure {
        message: format!("The provider actor did not answer: {e}"),
        retryable: true,
        retry_after: None,
    }
}

impl Actor for PodVm {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let initial = std::mem::take(&mut self.initial);
        self.perform(initial, ctx);
        if self.recover_on_start {
            self.feed(Event::Recover, ctx);
        }
        self.sync_proxy();
    }
}

/// StartVM for this sandbox.
#[derive(Message)]
#[rtype(result = "Result<(), StartError>")]
pub struct Start;

impl Handler<Start> for PodVm {
    type Result = ResponseFuture<Result<(), StartError>>;
    fn handle(&mut self, _: Start, ctx: &mut Context<Self>) -> Self::Result {
        let w = self.waiter();
        let (tx, rx) = oneshot::channel();
        self.start_replies.insert(w, tx);
        if self.start_began.is_none()
            && self.machine.target().state == podvisor_state::State::Pending
        {
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
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsSettled;

impl Handler<IsSettled> for PodVm {
    type Result = bool;
    fn handle(&mut self, _: IsSettled, _: &mut Context<Self>) -> bool {
        self.machine.is_settled()
    }
}

/// StopVM for this sandbox.
#[derive(Message)]
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
