//! Start-up, serving and shutdown of the daemon.
//!
//! [`serve`] runs six steps, each a function below, in this order:
//!
//! 1. `open_journal`: the journal, loaded, before anything else: it is the
//!    truth.
//! 2. `build_provider`: the provider, its call limits, its configuration
//!    checked against the cloud.
//! 3. `load_pki`: the TLS keys the agent proxy shows the pod VMs (then
//!    `kubernetes`: the Kubernetes API client, when there is an API).
//! 4. `start_actors`: the supervisor, which recovers every record: an
//!    actor for each with work to do, the others (kept `Pending` and
//!    cleaned-up `Failed` records) dormant until a request or their expiry.
//! 5. `serve_endpoints`: the admin endpoint, gRPC over TCP, the Kata socket,
//!    then the gRPC socket.
//! 6. `shut_down`: at SIGTERM or SIGINT, no new requests, operations under
//!    way drained, the journal flushed.
//!
//! Order matters: the journal is loaded and every record recovered (an
//! actor, or dormant) before the Kata socket opens; `/readyz` turns ready once each record's
//! recovery is decided; then the orphan GC runs. `/startup` passes once
//! every sandbox `Creating` or `Running` at start-up is `Running` again.
//! With a Kubernetes API, once serving: the node's peer pod capacity is
//! advertised (withdrawn at shutdown), stale sandboxes are stopped, the
//! sandboxes' PeerPod objects are written, and the daemon takes part in
//! collecting the pod VMs of deleted nodes under a Lease (given up at
//! shutdown).
//!
//! A step that fails stops start-up with a [`StartupError`] naming the step
//! and the flag to fix.

mod error;
mod journal_command;

pub use error::{StartupError, report};
pub use journal_command::journal_command;

use crate::actors::pod_vm::PodVmDeps;
use crate::actors::provider::{CallPolicy, ProviderActor, ProviderCalls};
use crate::actors::supervisor::{Drain, GcPolicy, Recover, Supervisor};
use crate::admin::{self, AdminState};
use crate::api::HypervisorApi;
use crate::api::grpc::{AdminAccess, BearerToken, GrpcAdmin, GrpcHypervisor, RequireBearer};
use crate::cli::GlobalArgs;
use crate::connections::{self, Gate, Gated};
use crate::journal_health::{HealthJournal, JournalHealth};
use crate::metered::Metered;
use crate::metrics;
use crate::protocols::grpc::admin::admin_server::AdminServer;
use crate::protocols::grpc::hypervisor::hypervisor_server::HypervisorServer;
use crate::view::InstanceView;
use actix::{Actor, Addr};
use metrics_exporter_prometheus::PrometheusHandle;
use podvisor_providers::pacing::Pacer;
use podvisor_providers::{CallLimits, CloudManager, ProviderConfig, ProviderContext};
use podvisor_state::{
    Backoff, InstanceRecord, Journal, MachineConfig, QuarantinedRecord, SledJournal,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Runs the daemon until SIGTERM or SIGINT; returns the process exit code:
/// 0 after a clean shutdown, 1 if a step failed (said on stderr and in the
/// log), 2 if logging cannot start.
pub fn run(
    global: GlobalArgs,
    manager: &'static dyn CloudManager,
    provider: Box<dyn ProviderConfig>,
) -> ExitCode {
    crate::failpoints::arm();
    // Nothing the daemon makes may be readable or writable beyond its
    // owner unless it says so (sockets, below): a umask of 000 and a
    // hostPath /run/peerpod of 0755 would otherwise leave the Kata socket
    // and every agent socket open to any local user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if let Err(e) = init_logging(&global) {
        eprintln!("podvisor: {}", report(&e));
        return ExitCode::from(2);
    }
    // Before any socket opens: under systemd the soft limit is 1024, which
    // a few idle connections would use up for every endpoint at once.
    crate::connections::raise_nofile_limit(
        global.max_connections_per_endpoint,
        global.endpoints.probe_port.is_some(),
    );
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("podvisor")
            .build()
            .expect("the tokio runtime starts")
    });
    system.block_on(async move {
        let served = serve(global, manager.name(), provider, wait_for_signal()).await;
        actix_rt::System::current().stop();
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let line = report(&e);
                tracing::error!(error = %line, "podvisor cannot run");
                eprintln!("podvisor: {line}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}

/// Logging as `--log-level` and `--log-format` ask, under the caps of
/// [`crate::logging::CAPS`]: no level prints a credential.
fn init_logging(global: &GlobalArgs) -> Result<(), StartupError> {
    crate::logging::init(&global.logging.log_level, global.logging.log_format)
        .map_err(|reason| StartupError::Logging { reason })
}

/// Serves with the provider `provider_config` builds, until `shutdown`
/// completes; then stops accepting, flushes the journal and tears the
/// provider down. Pod VMs stay as they are. Must run inside an actix
/// `System` on a multi-threaded Tokio runtime; [`run`] sets that up, and
/// benchmarks call this directly with their own provider.
///
/// # Errors
///
/// The first step that fails, as a [`StartupError`] naming the step and
/// the flag to fix; or a shutdown that could not stop the Kata socket or
/// flush the journal.
pub async fn serve(
    global: GlobalArgs,
    provider_name: &'static str,
    provider_config: Box<dyn ProviderConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let global = with_absolute_pods_dir(global)?;
    // A daemon already serving this node's sockets: stop before making a
    // journal, keys or directories of our own.
    for (path, flag) in [
        (global.kata.socket.clone(), crate::api::ttrpc::SOCKET_FLAG),
        (global.grpc_socket_path(), crate::api::grpc::SOCKET_FLAG),
    ] {
        crate::api::refuse_if_served(&path, flag)
            .map_err(|reason| StartupError::ControlSocket { reason })?;
    }
    let Inputs {
        metrics: metrics_handle,
        node,
        grpc_token,
    } = prepare(&global)?;
    let (journal, records) = open_journal(&global.state_dir).await?;
    let provider = build_provider(&global, provider_name, &*provider_config, &node).await?;
    let pki = load_pki(&global).await?;
    let kube = kubernetes(&global, &node).await?;
    // Known in milliseconds with an API that answers: before the first
    // CreateVM, whose pod VM is tagged with it.
    let cluster_id = crate::kubernetes::cluster::ClusterId::default();
    if let Some(k) = &kube {
        tokio::spawn(crate::kubernetes::cluster::learn(
            k.clone(),
            cluster_id.clone(),
        ));
    }
    let pull_secrets = kube
        .clone()
        .map(|k| Arc::new(crate::pull_secrets::PullSecrets::new(k)));
    let startup = Arc::new(crate::startup::StartupGate::new(&records));
    let actors = start_actors(
        &global,
        &node,
        &journal,
        records,
        &provider.calls,
        pki.pki.clone(),
        FromKube {
            pull_secrets,
            cluster_id: cluster_id.clone(),
        },
    )
    .await?;
    let status = status_document(
        &global,
        &node,
        provider_name,
        &provider,
        &journal,
        &actors,
        kube.as_ref(),
    );
    let endpoints = serve_endpoints(
        &global,
        metrics_handle,
        grpc_token,
        &journal,
        &actors,
        status,
        startup.clone(),
    )
    .await?;
    // `podvisor_started` turns 1 without anyone asking `/startup`.
    tokio::spawn(crate::startup::watch(startup, actors.view.clone()));
    let integration = kube.as_ref().map(|k| {
        node_integration(
            &global,
            k,
            &actors,
            &endpoints,
            NodeGoneInputs {
                calls: provider.calls.clone(),
                provider_name,
                cluster: cluster_id,
            },
        )
    });
    tracing::info!(
        socket = %global.kata.socket.display(),
        admin = %global.endpoints.admin_addr,
        grpc = %global.endpoints.grpc_addr,
        grpc_tcp_hypervisor = endpoints.grpc_tcp_hypervisor,
        grpc_socket = %endpoints.grpc_socket.display(),
        provider = provider_name,
        node = %node,
        "podvisor serving"
    );

    shutdown.await;
    if let Some(integration) = integration {
        integration.shut_down().await;
    }
    shut_down(&global, endpoints, actors, journal, provider, pki).await
}

/// What is read and made before the first step: checks that need nothing
/// slow, so a bad flag stops start-up at once.
struct Inputs {
    /// Renders `/metrics`.
    metrics: PrometheusHandle,
    /// This node's name.
    node: String,
    /// `--grpc-token-file`'s token, if given.
    grpc_token: Option<BearerToken>,
}

/// Before step 1: installs the metrics recorder (and its upkeep), reads
/// the node's name and the gRPC token file, and creates `--state-dir` and
/// `--pods-dir`.
fn prepare(global: &GlobalArgs) -> Result<Inputs, StartupError> {
    let metrics = metrics::install().map_err(|reason| StartupError::Metrics { reason })?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let node = node_name(global)?;
    let grpc_token = global
        .endpoints
        .grpc_token_file
        .as_deref()
        .map(BearerToken::from_file)
        .transpose()
        .map_err(|reason| StartupError::GrpcToken { reason })?;
    for (flag, dir) in [
        ("--state-dir", &global.state_dir),
        ("--pods-dir", &global.kata.pods_dir),
    ] {
        create_private_dir(dir).map_err(|source| StartupError::Directory {
            flag,
            path: dir.clone(),
            source,
        })?;
    }
    Ok(Inputs {
        metrics,
        node,
        grpc_token,
    })
}

/// `global` with `--pods-dir` made absolute: CreateVM hands the agent
/// socket's path to a shim that runs in another directory.
fn with_absolute_pods_dir(mut global: GlobalArgs) -> Result<GlobalArgs, StartupError> {
    let pods_dir = &mut global.kata.pods_dir;
    *pods_dir =
        std::path::absolute(&*pods_dir).map_err(|source| StartupError::RelativeDirectory {
            flag: "--pods-dir",
            path: pods_dir.clone(),
            source,
        })?;
    Ok(global)
}

/// This node's name: the flag, else the host name.
fn node_name(global: &GlobalArgs) -> Result<String, StartupError> {
    match &global.node_name {
        Some(n) => Ok(n.trim().to_owned()),
        None => nix::unistd::gethostname()
            .map_err(|source| StartupError::HostName { source })?
            .into_string()
            .map_err(|_| StartupError::HostNameNotUtf8),
    }
}

/// Creates `dir` and its missing parents, readable by the owner only (an
/// existing directory keeps its mode).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Runs `job` on the blocking pool; a task that does not finish is
/// [`StartupError::Interrupted`] while doing `task`.
async fn blocking<T: Send + 'static>(
    task: &'static str,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StartupError> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|source| StartupError::Interrupted { task, source })
}

/// Step 1's result: the journal, open.
struct OpenedJournal {
    /// The journal, reporting every write to `health`.
    journal: Arc<dyn Journal>,
    /// Whether journal writes work, for `/livez`.
    health: Arc<JournalHealth>,
    /// Every record ever quarantined (this start's included): the GC spares
    /// their instances across restarts until an operator decides.
    quarantine: Vec<QuarantinedRecord>,
}

/// Step 1: opens the journal in `<state_dir>/journal` (only root may read
/// it: it holds pods' initdata), says whether it may have lost records, and
/// loads the quarantine and every record, which it returns for recovery.
async fn open_journal(
    state_dir: &Path,
) -> Result<(OpenedJournal, Vec<InstanceRecord>), StartupError> {
    let journal_error = |action, source| StartupError::Journal {
        action,
        state_dir: state_dir.to_path_buf(),
        source,
    };
    let journal_dir = state_dir.join("journal");
    create_private_dir(&journal_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&journal_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| StartupError::Directory {
            flag: "--state-dir",
            path: journal_dir.clone(),
            source,
        })?;
    let health = JournalHealth::new();
    let sled = {
        let dir = journal_dir.clone();
        blocking("opening the journal", move || SledJournal::open(&dir))
            .await?
            .map_err(|e| journal_error("open", e))?
    };
    // Every write reports to the health /livez reads.
    let journal: Arc<dyn Journal> = Arc::new(HealthJournal::new(Arc::new(sled), health.clone()));
    let identity = journal.identity();
    match journal.verdict() {
        podvisor_state::Verdict::InDoubt { reason } => {
            metrics::gauge!(metrics::JOURNAL_IN_DOUBT).set(1.0);
            tracing::error!(
                journal = %identity.id,
                %reason,
                "the journal may have lost records: the orphan GC deletes nothing until an operator decides (podvisor journal accept-loss --state-dir …, see docs/operations.md)"
            );
        }
        verdict => tracing::info!(journal = %identity.id, ?verdict, "journal opened"),
    }
    let loaded = {
        let j = journal.clone();
        blocking("loading the journal", move || j.load())
            .await?
            .map_err(|e| journal_error("load", e))?
    };
    for q in &loaded.quarantined {
        metrics::counter!(metrics::JOURNAL_QUARANTINED).increment(1);
        tracing::error!(key = %q.key, reason = %q.reason, "journal record quarantined: it could not be read and was moved aside");
    }
    // Every record ever quarantined, not only this start's.
    let quarantine = {
        let j = journal.clone();
        blocking("reading the journal's quarantine", move || j.quarantined())
            .await?
            .map_err(|e| journal_error("read the quarantine of", e))?
    };
    if !quarantine.is_empty() {
        tracing::warn!(
            records = quarantine.len(),
            "the journal's quarantine holds records; the GC never deletes their sandboxes' instances until an operator drops them (ListQuarantined and DropQuarantined of the admin gRPC API, on --grpc-socket)"
        );
    }
    tracing::info!(
        records = loaded.records.len(),
        quarantined = loaded.quarantined.len(),
        journal = %journal_dir.display(),
        "journal loaded"
    );
    let opened = OpenedJournal {
        journal,
        health,
        quarantine,
    };
    Ok((opened, loaded.records))
}

/// Step 2's result: the provider behind its call policy.
struct BuiltProvider {
    /// Every call to the provider goes through these limits.
    calls: Arc<ProviderCalls>,
    /// The token bucket of mutating calls in force.
    limits: CallLimits,
    /// The provider's own default, for `/v1/status`.
    provider_default: CallLimits,
    /// Why the configuration did not verify, without
    /// `--cloud-config-verify` (kept for `/v1/status`).
    config_problem: Option<String>,
    /// The configuration the provider was built with, defaults filled in
    /// and secrets redacted, for `/v1/status`.
    summary: serde_json::Value,
}

/// Step 2: builds the provider, puts it behind the call limits
/// (`--provider-*`, else the provider's defaults) and checks its
/// configuration against the cloud: a failure stops start-up with
/// `--cloud-config-verify`, and is a warning without.
async fn build_provider(
    global: &GlobalArgs,
    provider_name: &'static str,
    provider_config: &dyn ProviderConfig,
    node: &str,
) -> Result<BuiltProvider, StartupError> {
    let calls_args = &global.provider_calls;
    let provider_default = provider_config.default_call_limits();
    let limits = calls_args.call_limits(provider_default);
    let pacer = Arc::new(Pacer::new(limits));
    let context = ProviderContext {
        node_name: node.to_owned(),
        forwarder_port: global.kata.forwarder_port,
        state_dir: global.state_dir.clone(),
        pacer: pacer.clone(),
    };
    let provider = Metered::wrap(provider_config.build(&context).await.map_err(|source| {
        StartupError::BuildProvider {
            provider: provider_name,
            source,
        }
    })?);
    tracing::info!(
        provider = provider_name,
        rate_per_second = limits.rate,
        burst = limits.burst,
        default_rate_per_second = provider_default.rate,
        default_burst = provider_default.burst,
        "mutating provider calls limited (--provider-rate, --provider-burst; else the provider's default)"
    );
    tracing::info!(
        provider = provider_name,
        rate_per_second = limits.read_rate,
        burst = limits.read_burst,
        default_rate_per_second = provider_default.read_rate,
        default_burst = provider_default.read_burst,
        "provider reads limited (--provider-read-rate, --provider-read-burst; else the provider's default)"
    );
    let policy = CallPolicy {
        max_inflight: calls_args.provider_max_inflight,
        attempts: calls_args.provider_call_attempts,
        timeout: calls_args.provider_call_timeout,
        backoff: Backoff {
            base: global.lifecycle.retry_base,
            cap: global.lifecycle.retry_cap,
        },
    };
    let calls = Arc::new(ProviderCalls::new(provider, policy, pacer));
    // Without --cloud-config-verify a failed check is a warning, kept for
    // /v1/status so an operator sees it after the start-up log has scrolled.
    let config_problem = match calls.verify().await {
        Ok(()) => {
            tracing::info!(provider = provider_name, "provider configuration verified");
            None
        }
        Err(source) if global.pod_vms.cloud_config_verify => {
            return Err(StartupError::ProviderUnverified {
                provider: provider_name,
                source,
            });
        }
        Err(e) => {
            tracing::warn!(provider = provider_name, error = %e, "provider configuration does not verify");
            Some(e.to_string())
        }
    };
    Ok(BuiltProvider {
        calls,
        limits,
        provider_default,
        config_problem,
        summary: provider_config.effective_summary(&context),
    })
}

/// Step 3's result: the agent proxy's TLS.
struct LoadedPki {
    /// The keys and certificates; `None` with `--disable-tls`.
    pki: Option<Arc<crate::tls::Pki>>,
    /// Renews the client certificate while the daemon runs.
    renewal: Option<JoinHandle<()>>,
}

/// Step 3: the TLS the agent proxy speaks to the pod VMs' forwarders: the
/// operator's files (`--ca-cert-file`, `--cert-file`, `--cert-key`), else
/// the daemon's own keys in `<state-dir>/tls` (kept, so a restarted daemon
/// still reaches the pod VMs it made), checked once and then renewed while
/// the daemon runs. Nothing with `--disable-tls`.
async fn load_pki(global: &GlobalArgs) -> Result<LoadedPki, StartupError> {
    let tls = &global.tls;
    let tls_policy = crate::tls::ClientPolicy {
        tls: podvisor_podvm::tls::TlsPolicy::new(
            tls.tls_min_version.as_deref(),
            tls.tls_cipher_suites.as_deref(),
        )
        .map_err(|reason| StartupError::TlsPolicy { reason })?,
        skip_verify: tls.tls_skip_verify,
    };
    if tls.disable_tls {
        tracing::warn!(
            "--disable-tls: the agent protocol to the pod VMs travels WITHOUT TLS, unauthenticated"
        );
        return Ok(LoadedPki {
            pki: None,
            renewal: None,
        });
    }
    let pki = match (&tls.ca_cert_file, &tls.cert_file, &tls.cert_key) {
        (Some(ca), Some(cert), Some(key)) => {
            crate::tls::Pki::from_files(ca, cert, key, &tls_policy)
                .map_err(|reason| StartupError::TlsFiles { reason })?
        }
        _ => {
            let dir = own_tls_dir(global);
            let keys_dir = dir.clone();
            blocking("loading the TLS keys", move || {
                crate::tls::Pki::load_or_create(&keys_dir, &tls_policy)
            })
            .await?
            .map_err(|reason| StartupError::TlsKeys { dir, reason })?
        }
    };
    if tls.tls_skip_verify {
        tracing::warn!(
            "--tls-skip-verify (TLS_SKIP_VERIFY): the pod VMs' certificates are NOT verified; anyone who can reach a pod VM's address can pose as its agent"
        );
    }
    // Sets the expiry gauges and warns about an operator's certificate
    // near expiry; podvisor's own was renewed by the load if it was due.
    pki.check()
        .map_err(|reason| StartupError::TlsCheck { reason })?;
    let pki = Arc::new(pki);
    // Renewed while the daemon runs, without a restart: a daemon up for a
    // year would otherwise reach no pod VM.
    let renewal = pki
        .clone()
        .spawn_renewal(crate::tls::RENEWAL_CHECK_INTERVAL);
    Ok(LoadedPki {
        pki: Some(pki),
        renewal: Some(renewal),
    })
}

/// After step 3: the Kubernetes API client, when there is an API
/// (`--kubeconfig`, `--kube-api-server`, else in-cluster); `None` without
/// one: pod VMs then get no registry credentials, and neither the node's
/// capacity, stale sandboxes nor PeerPod objects are looked after.
async fn kubernetes(
    global: &GlobalArgs,
    node: &str,
) -> Result<Option<crate::kubernetes::Kube>, StartupError> {
    let args = &global.pod_inputs;
    let source = crate::kubernetes::KubeSource::resolve(
        args.kubeconfig.as_deref(),
        args.kube_api_server.as_deref(),
        std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
        std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
        &args.kube_token_file,
        &args.kube_ca_file,
    );
    let Some(source) = source else {
        tracing::info!(
            "no Kubernetes API (--kubeconfig, --kube-api-server, KUBERNETES_SERVICE_HOST): pod VMs get no registry credentials, the node's peer pod capacity is not advertised, stale sandboxes are not stopped, no PeerPod objects are written and the pod VMs of deleted nodes are not collected"
        );
        return Ok(None);
    };
    let kube = crate::kubernetes::Kube::connect(source, node)
        .await
        .map_err(|reason| StartupError::KubeApi { reason })?;
    tracing::info!(
        api = kube.server(),
        node,
        "the Kubernetes API: image pull secrets, the node's peer pod capacity, stale sandboxes, PeerPod objects, the pod VMs of deleted nodes"
    );
    Ok(Some(kube))
}

/// What the node-gone collector needs besides the Kubernetes API.
struct NodeGoneInputs {
    /// The provider, under the call policy.
    calls: Arc<ProviderCalls>,
    /// The provider's name, in the Lease's name.
    provider_name: &'static str,
    /// The cluster's identity, once known.
    cluster: crate::kubernetes::cluster::ClusterId,
}

/// The tasks that talk to the Kubernetes API for the node, to stop at
/// shutdown.
struct NodeIntegration {
    /// The capacity to withdraw and the task that keeps it set.
    capacity: Option<(crate::kubernetes::node::NodeCapacity, JoinHandle<()>)>,
    /// Stops the node-gone collector and the Lease's task, which then
    /// gives the Lease up.
    node_gone: Option<NodeGoneTasks>,
}

/// The node-gone collector's two tasks and their stop switch.
struct NodeGoneTasks {
    stop: watch::Sender<bool>,
    lease: JoinHandle<()>,
    collector: JoinHandle<()>,
}

impl NodeIntegration {
    /// Stops collecting, and gives the node-gone Lease up while the node's
    /// capacity is withdrawn: both within 5 s (each bounds its own
    /// requests), so the drain's budget (`terminationGracePeriodSeconds`
    /// above the drain + 5 s) holds. A delete the collector had in flight
    /// is cut off: deletes are idempotent, and the next holder repeats it.
    async fn shut_down(self) {
        let (stop_lease, lease) = match self.node_gone {
            Some(NodeGoneTasks {
                stop,
                lease,
                collector,
            }) => {
                stop.send_replace(true);
                collector.abort();
                let _ = collector.await;
                (Some(stop), Some(lease))
            }
            None => (None, None),
        };
        let capacity = async {
            if let Some((capacity, task)) = self.capacity {
                // Its own checks stopped first, or one could set the
                // capacity again between the withdrawal's two patches.
                task.abort();
                let _ = task.await;
                withdraw_capacity(&capacity).await;
            }
        };
        let lease = async {
            if let Some(mut task) = lease {
                // The task gives the Lease up within 5 s of its own.
                if tokio::time::timeout(Duration::from_secs(6), &mut task)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "shutdown: the node-gone Lease's task did not stop within 6 s; stopped"
                    );
                    task.abort();
                }
            }
        };
        tokio::join!(capacity, lease);
        drop(stop_lease);
    }
}

/// After step 5, with a Kubernetes API: advertises the node's peer pod
/// capacity (unless there is no limit), stops stale sandboxes (unless
/// `--stale-sandbox-grace 0s`), writes the sandboxes' PeerPod objects
/// with the provider's name as their cloud provider (unless
/// `--disable-peerpods`) and takes part in collecting the pod VMs of
/// deleted nodes (unless `--node-gone-grace 0s`), until the endpoints stop
/// or [`NodeIntegration::shut_down`].
fn node_integration(
    global: &GlobalArgs,
    kube: &crate::kubernetes::Kube,
    actors: &Actors,
    endpoints: &Endpoints,
    node_gone: NodeGoneInputs,
) -> NodeIntegration {
    if global.pod_inputs.disable_peerpods {
        tracing::info!("--disable-peerpods: no PeerPod objects are written");
    } else {
        let peerpods = crate::kubernetes::peerpods::PeerPods::new(
            kube.clone(),
            actors.view.clone(),
            node_gone.provider_name,
        );
        tokio::spawn(peerpods.run(endpoints.stop.subscribe()));
    }
    let grace = global.pod_inputs.stale_sandbox_grace;
    if grace.is_zero() {
        tracing::info!("--stale-sandbox-grace is 0s: sandboxes whose pod is gone are not stopped");
    } else {
        let stale = crate::kubernetes::stale::StaleSandboxes::new(
            kube.clone(),
            actors.view.clone(),
            actors.supervisor.clone(),
            grace,
        );
        tokio::spawn(stale.run(endpoints.stop.subscribe()));
    }
    let pod_uid = global
        .pod_inputs
        .pod_uid
        .clone()
        .filter(|u| !u.trim().is_empty());
    // The collector releases deleted nodes' PeerPods with a reader of its
    // own (it writes none).
    let released = (!global.pod_inputs.disable_peerpods).then(|| {
        crate::kubernetes::peerpods::PeerPods::new(
            kube.clone(),
            actors.view.clone(),
            node_gone.provider_name,
        )
    });
    let node_gone = start_node_gone(global, kube, node_gone, released, pod_uid.as_deref());
    let Some(limit) = actors.limit else {
        tracing::info!(
            resource = crate::kubernetes::node::RESOURCE,
            "no --peerpods-limit-per-node: the node's peer pod capacity is not advertised"
        );
        return NodeIntegration {
            capacity: None,
            node_gone,
        };
    };
    let owner = pod_uid.unwrap_or_else(|| format!("podvisor-{}", kube.node()));
    let capacity = crate::kubernetes::node::NodeCapacity::new(kube.clone(), limit as u64, owner);
    let task = tokio::spawn(capacity.clone().run(endpoints.stop.subscribe()));
    NodeIntegration {
        capacity: Some((capacity, task)),
        node_gone,
    }
}

/// The node-gone Lease's holder task and the collector beside it (unless
/// `--node-gone-grace 0s`): the Lease's stop switch and task.
fn start_node_gone(
    global: &GlobalArgs,
    kube: &crate::kubernetes::Kube,
    inputs: NodeGoneInputs,
    peerpods: Option<crate::kubernetes::peerpods::PeerPods>,
    pod_uid: Option<&str>,
) -> Option<NodeGoneTasks> {
    use crate::kubernetes::{lease::Lease, node_gone};
    let args = &global.pod_inputs;
    if args.node_gone_grace.is_zero() {
        tracing::info!("--node-gone-grace is 0s: the pod VMs of deleted nodes are not collected");
        return None;
    }
    let namespace = lease_namespace(args.lease_namespace.as_deref());
    let identity = match pod_uid {
        Some(uid) => format!("{}/{uid}", kube.node()),
        None => kube.node().to_owned(),
    };
    let name = node_gone::lease_name(inputs.provider_name);
    tracing::info!(lease = %format!("{namespace}/{name}"), holder = %identity, grace = ?args.node_gone_grace, "the pod VMs of deleted nodes are collected by the holder of the node-gone Lease");
    let lease = Lease::new(kube, &namespace, &name, identity, args.lease_duration);
    let (term_tx, term_rx) = watch::channel(None);
    let (stop, stop_rx) = watch::channel(false);
    let collector = node_gone::NodeGone::new(
        kube.clone(),
        inputs.calls,
        inputs.cluster,
        args.node_gone_grace,
        peerpods,
    );
    let collector = tokio::spawn(collector.run(term_rx, stop_rx.clone()));
    let lease = tokio::spawn(node_gone::hold(lease, term_tx, stop_rx));
    Some(NodeGoneTasks {
        stop,
        lease,
        collector,
    })
}

/// `--lease-namespace`, else the ServiceAccount's namespace in a pod, else
/// `default`.
fn lease_namespace(flag: Option<&str>) -> String {
    if let Some(ns) = flag.map(str::trim).filter(|n| !n.is_empty()) {
        return ns.to_owned();
    }
    std::fs::read_to_string(crate::kubernetes::IN_CLUSTER_NAMESPACE)
        .ok()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// At shutdown: the node's peer pod capacity is withdrawn if this daemon
/// still owns it (no peer pod can be placed on a node whose daemon is
/// gone), within 5 s; a failure is logged.
async fn withdraw_capacity(capacity: &crate::kubernetes::node::NodeCapacity) {
    match tokio::time::timeout(Duration::from_secs(5), capacity.withdraw()).await {
        Ok(Ok(true)) => tracing::info!(
            resource = crate::kubernetes::node::RESOURCE,
            "shutdown: the node's peer pod capacity is withdrawn"
        ),
        Ok(Ok(false)) => tracing::info!(
            resource = crate::kubernetes::node::RESOURCE,
            "shutdown: the node's peer pod capacity belongs to another daemon; left as it is"
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "shutdown: cannot withdraw the node's peer pod capacity");
        }
        Err(_) => {
            tracing::warn!(
                "shutdown: withdrawing the node's peer pod capacity took over 5 s; left"
            );
        }
    }
}

/// Step 4's result: the actors that own the pod VMs.
struct Actors {
    /// Routes each sandbox to its pod-VM actor; drains them at shutdown.
    supervisor: Addr<Supervisor>,
    /// What every pod VM looks like, for the admin endpoint and gRPC.
    view: Arc<InstanceView>,
    /// Each sandbox's tunnel as this run left it, for the admin endpoint.
    tunnels: Arc<crate::network::status::TunnelStates>,
    /// `--peerpods-limit-per-node`, `None` for no limit.
    limit: Option<usize>,
    /// `/v1/status`'s `pod_network`, from the settings in force.
    pod_network_status: serde_json::Value,
}

/// What the pod VMs take from the Kubernetes API.
struct FromKube {
    /// Where the pods' image pull secrets are read (`None`: no API).
    pull_secrets: Option<Arc<crate::pull_secrets::PullSecrets>>,
    /// The cluster's identity, for the cluster tag, once the API told it.
    cluster_id: crate::kubernetes::cluster::ClusterId,
}

/// Step 4: starts the provider's actor and the supervisor, and hands the
/// supervisor the journal's `records` for recovery (and the quarantined
/// ones by key, so the GC spares their instances).
async fn start_actors(
    global: &GlobalArgs,
    node: &str,
    journal: &OpenedJournal,
    records: Vec<InstanceRecord>,
    calls: &Arc<ProviderCalls>,
    pki: Option<Arc<crate::tls::Pki>>,
    from_kube: FromKube,
) -> Result<Actors, StartupError> {
    let FromKube {
        pull_secrets,
        cluster_id,
    } = from_kube;
    let view = InstanceView::new();
    let settings = pod_network_settings(global, calls);
    let pod_network_status = pod_network_status(global, &settings);
    let pod_network = match settings {
        Ok(settings) => {
            tracing::info!(
                vxlan_port = settings.vxlan_port,
                vxlan_min_id = settings.vnis.min,
                host_interface = settings
                    .host_interface
                    .as_deref()
                    .unwrap_or("the default route's"),
                "pods get a VXLAN tunnel to their pod VM"
            );
            Some(Arc::new(settings))
        }
        // Expected of a provider without networks; a node that lacks
        // what a cloud's tunnels need is worth a warning.
        Err(why) if !calls.pod_network() => {
            tracing::info!(why = %why, "pods get no network: no VXLAN tunnel is built");
            None
        }
        Err(why) => {
            tracing::warn!(why = %why, "pods get no network: no VXLAN tunnel is built");
            None
        }
    };
    let tunnels = Arc::new(crate::network::status::TunnelStates::new(
        pod_network.is_some(),
    ));
    let provider_actor = ProviderActor::new(calls.clone()).start();
    let lifecycle = &global.lifecycle;
    let deps = Arc::new(PodVmDeps {
        journal: journal.journal.clone(),
        provider: provider_actor,
        view: view.clone(),
        machine: MachineConfig {
            max_create_attempts: lifecycle.create_attempts,
            backoff: Backoff {
                base: lifecycle.retry_base,
                cap: lifecycle.retry_cap,
            },
            pending_ttl: lifecycle.pending_ttl,
            failed_ttl: lifecycle.failed_ttl,
        },
        node_name: node.to_owned(),
        cluster_id,
        forwarder_port: global.kata.forwarder_port,
        proxy_timeout: global.kata.proxy_timeout,
        pods_dir: global.kata.pods_dir.clone(),
        // Validated by the CLI; here only put into the pod VMs' form.
        default_initdata: global
            .pod_vms
            .initdata
            .as_deref()
            .map(crate::api::annotations::initdata_setting)
            .transpose()
            .map_err(|reason| StartupError::Initdata { reason })?,
        scratch_space: global.pod_vms.enable_scratch_space,
        pki,
        tls_min_version: global.tls.tls_min_version.clone(),
        tls_cipher_suites: global.tls.tls_cipher_suites.clone(),
        proxy_hook: Arc::new(crate::proxy::hook::Hook {
            direct_volumes_dir: global.pod_inputs.kata_direct_volumes_dir.clone(),
        }),
        pull_secrets,
        proxy_max_connections: global.max_connections_per_endpoint,
        tunnels: tunnels.clone(),
        pod_network,
    });
    let limit = usize::try_from(global.pod_vms.peerpods_limit_per_node)
        .ok()
        .filter(|n| *n > 0);
    // VNIs in use on the node that no run of this journal may be able to
    // tell: never handed out again by this run (see the supervisor).
    let vnis_found_at_start = match &deps.pod_network {
        None => Default::default(),
        Some(settings) => match crate::network::tunnel::list_notrack(&settings.host_netns).await {
            Ok(rules) => {
                let vnis: std::collections::BTreeSet<u32> =
                    rules.into_iter().map(|r| r.vni).collect();
                if !vnis.is_empty() {
                    tracing::info!(vnis = ?vnis, "tunnels' NOTRACK rules found on the node at start-up; this run hands none of their VNIs out");
                }
                vnis
            }
            Err(e) => {
                tracing::warn!(error = %podvisor_state::report(&e), "cannot read the tunnels' NOTRACK rules at start-up; VNIs are handed out by the journal alone");
                Default::default()
            }
        },
    };
    let supervisor = Supervisor::new(
        deps,
        limit,
        GcPolicy {
            interval: global.gc.gc_interval,
            grace: global.gc.gc_grace_period,
        },
    )
    .with_vnis_found_at_start(vnis_found_at_start)
    .start();
    let quarantined = journal.quarantine.iter().map(|q| q.key.clone()).collect();
    supervisor
        .send(Recover {
            records,
            quarantined,
        })
        .await
        .map_err(|source| StartupError::Recovery { source })?;
    Ok(Actors {
        supervisor,
        view,
        tunnels,
        limit,
        pod_network_status,
    })
}

/// How this daemon joins pods' networks to their pod VMs, or why it
/// builds no tunnels: the provider's instances have no network of their
/// own, or the node lacks the programs the tunnels' NOTRACK rules need (a
/// pod VM is then still made, without a network, as before tunnels were
/// built — rather than every StartVM failing).
fn pod_network_settings(
    global: &GlobalArgs,
    calls: &ProviderCalls,
) -> Result<crate::network::settings::PodNetworkSettings, String> {
    if !calls.pod_network() {
        let provider = calls.provider_name();
        return Err(format!(
            "the {provider} provider's instances have no network of their own{}",
            if provider == "local" {
                " (run it with --netns-per-vm for one)"
            } else {
                ""
            }
        ));
    }
    for program in crate::network::notrack::PROGRAMS {
        if find_program(program).is_none() {
            return Err(format!(
                "{program} is not on PATH (the tunnels' NOTRACK rules need iptables-save and iptables-restore)"
            ));
        }
    }
    Ok(crate::network::settings::PodNetworkSettings::new(
        global.tunnel.host_interface.clone(),
        global.tunnel.vxlan_port,
        crate::network::vni::VniRange {
            min: global.tunnel.vxlan_min_id,
        },
        // Checked by the CLI.
        global.pod_vms.pod_subnets().unwrap_or_default(),
    ))
}

/// The first executable file `name` in a directory of `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The pod network in `/v1/status`: the tunnel's settings, or why pods
/// get none.
fn pod_network_status(
    global: &GlobalArgs,
    settings: &Result<crate::network::settings::PodNetworkSettings, String>,
) -> serde_json::Value {
    match settings {
        Ok(settings) => serde_json::json!({
            "tunnel_type": global.tunnel.tunnel_type,
            "vxlan_port": settings.vxlan_port,
            "vxlan_min_id": settings.vnis.min,
            "host_interface": settings.host_interface,
            "pod_subnet_cidrs": settings.pod_subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
        Err(why) => serde_json::json!({
            "tunnel_type": null,
            "why_none": why,
        }),
    }
}

/// Where the daemon keeps its own CA and client certificate, when the
/// operator gives none.
fn own_tls_dir(global: &GlobalArgs) -> PathBuf {
    global.state_dir.join("tls")
}

/// The agent proxy's TLS in `/v1/status`: which keys [`load_pki`] uses,
/// and where they are.
fn tls_status(global: &GlobalArgs) -> serde_json::Value {
    let tls = &global.tls;
    if tls.disable_tls {
        return serde_json::json!({ "keys": "none: --disable-tls" });
    }
    let mut status = match (&tls.ca_cert_file, &tls.cert_file, &tls.cert_key) {
        (Some(ca), Some(cert), Some(key)) => serde_json::json!({
            "keys": "operator's files",
            "ca_cert_file": ca,
            "cert_file": cert,
            "cert_key": key,
        }),
        _ => serde_json::json!({ "keys": "podvisor's own", "dir": own_tls_dir(global) }),
    };
    status["skip_verify"] = serde_json::json!(tls.tls_skip_verify);
    status
}

/// `/v1/status`: what this daemon runs with, the paths it uses (defaults
/// filled in), secrets left out (the provider's summary redacts its own).
fn status_document(
    global: &GlobalArgs,
    node: &str,
    provider_name: &str,
    provider: &BuiltProvider,
    journal: &OpenedJournal,
    actors: &Actors,
    kube: Option<&crate::kubernetes::Kube>,
) -> serde_json::Value {
    let limit = actors.limit;
    let kubernetes = kube.map(|k| {
        serde_json::json!({
            "api": k.server(),
            "peer_pod_capacity": limit.map(|_| crate::kubernetes::node::RESOURCE),
            "stale_sandbox_grace_seconds": global.pod_inputs.stale_sandbox_grace.as_secs_f64(),
            "node_gone_grace_seconds": global.pod_inputs.node_gone_grace.as_secs_f64(),
            "node_gone_lease": (!global.pod_inputs.node_gone_grace.is_zero()).then(|| format!(
                "{}/{}",
                lease_namespace(global.pod_inputs.lease_namespace.as_deref()),
                crate::kubernetes::node_gone::lease_name(provider_name)
            )),
            "peerpods": !global.pod_inputs.disable_peerpods,
        })
    });
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": node,
        "provider": provider_name,
        "provider_config": provider.summary,
        "provider_config_problem": provider.config_problem,
        "journal": {
            "id": journal.journal.identity().id,
            "integrity": journal.journal.verdict(),
        },
        "socket": global.kata.socket,
        "grpc_socket": global.grpc_socket_path(),
        "pods_dir": global.kata.pods_dir,
        "tls": tls_status(global),
        "state_dir": global.state_dir,
        "peerpods_limit_per_node": limit,
        "kubernetes": kubernetes,
        "pod_network": actors.pod_network_status,
        "probe_port": global.endpoints.probe_port,
        "max_connections_per_endpoint": global.max_connections_per_endpoint,
        "provider_call_limits": {
            "rate_per_second": provider.limits.rate,
            "burst": provider.limits.burst,
            "read_rate_per_second": provider.limits.read_rate,
            "read_burst": provider.limits.read_burst,
            "max_inflight": global.provider_calls.provider_max_inflight,
            "provider_default": {
                "rate_per_second": provider.provider_default.rate,
                "burst": provider.provider_default.burst,
                "read_rate_per_second": provider.provider_default.read_rate,
                "read_burst": provider.provider_default.read_burst,
            },
        },
    })
}

/// A gRPC server's task; it ends once its `stop` turns `true`.
type GrpcTask = JoinHandle<Result<(), tonic::transport::Error>>;

/// Step 5's result: what shutdown stops.
struct Endpoints {
    /// Set to `true` to stop every endpoint's accept loop.
    stop: watch::Sender<bool>,
    /// Probes a failing journal until `stop`.
    journal_probe: JoinHandle<()>,
    /// The admin endpoint.
    admin: JoinHandle<()>,
    /// gRPC over TCP.
    grpc_tcp: GrpcTask,
    /// Whether gRPC over TCP serves `hypervisor.Hypervisor` (with a token).
    grpc_tcp_hypervisor: bool,
    /// The Kata socket's server.
    kata: ttrpc::r#async::Server,
    /// gRPC on the unix socket.
    grpc_unix: GrpcTask,
    /// The gRPC unix socket's path.
    grpc_socket: PathBuf,
}

/// Step 5: serves the admin endpoint, gRPC over TCP, the Kata socket, then
/// the gRPC socket (after the Kata socket, whose check tells this daemon
/// from a second one pointed at the same directory). Warns about each
/// endpoint bound beyond loopback.
async fn serve_endpoints(
    global: &GlobalArgs,
    metrics_handle: PrometheusHandle,
    grpc_token: Option<BearerToken>,
    journal: &OpenedJournal,
    actors: &Actors,
    status: serde_json::Value,
    startup: Arc<crate::startup::StartupGate>,
) -> Result<Endpoints, StartupError> {
    warn_if_exposed(global, grpc_token.is_some());
    let (stop, stop_rx) = watch::channel(false);
    let admin_state = AdminState {
        view: actors.view.clone(),
        tunnels: actors.tunnels.clone(),
        metrics: metrics_handle,
        status: Arc::new(status),
        journal_health: journal.health.clone(),
        journal: journal.journal.clone(),
        startup,
    };
    let admin = serve_admin(global, admin_state, stop_rx.clone()).await?;
    let journal_probe = tokio::spawn(crate::journal_health::probe_while_failing(
        journal.journal.clone(),
        journal.health.clone(),
        stop_rx.clone(),
    ));
    let api = HypervisorApi::new(
        actors.supervisor.clone(),
        actors.view.clone(),
        global.kata.pods_dir.clone(),
        global.kata.proxy_timeout,
    );
    let socket_group = global
        .socket_group
        .as_deref()
        .map(crate::api::ttrpc::resolve_group)
        .transpose()
        .map_err(|reason| StartupError::SocketGroup { reason })?;
    let grpc_tcp_hypervisor = grpc_token.is_some();
    let admin_deps = AdminDeps {
        view: actors.view.clone(),
        journal: journal.journal.clone(),
        supervisor: actors.supervisor.clone(),
    };
    let grpc_tcp = serve_grpc_tcp(global, &api, &admin_deps, grpc_token, stop_rx.clone()).await?;
    let (kata, grpc_unix, grpc_socket) =
        serve_control_sockets(global, socket_group, api, &admin_deps, stop_rx).await?;
    Ok(Endpoints {
        stop,
        journal_probe,
        admin,
        grpc_tcp,
        grpc_tcp_hypervisor,
        kata,
        grpc_unix,
        grpc_socket,
    })
}

/// The admin endpoint (`--admin-addr`), until `stop`: at most
/// `--max-connections-per-endpoint` connections, each under the header
/// and idle time limits.
async fn serve_admin(
    global: &GlobalArgs,
    state: AdminState,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartupError> {
    let endpoints = &global.endpoints;
    let listener = tokio::net::TcpListener::bind(endpoints.admin_addr)
        .await
        .map_err(|source| StartupError::Listen {
            flag: "--admin-addr (PODVISOR_ADMIN_ADDR)",
            addr: endpoints.admin_addr,
            source,
        })?;
    let router = admin::router(state.clone());
    let listener = Gated::new(
        Gate::new(
            connections::ADMIN,
            endpoints.admin_addr.to_string(),
            global.max_connections_per_endpoint,
        ),
        listener,
    );
    // Time limits on every connection: a client that sends nothing, or
    // dribbles, must not hold a connection (and a slot under the cap).
    let timeouts = admin::server::ConnectionTimeouts {
        header: endpoints.admin_header_timeout,
        idle: endpoints.admin_idle_timeout,
    };
    let admin = tokio::spawn(admin::server::serve(
        listener,
        router,
        timeouts,
        stopped(stop.clone()),
    ));
    let Some(port) = endpoints.probe_port else {
        return Ok(admin);
    };
    // The reference's probe port: every address, as its DaemonSet's probe
    // reaches it on the pod IP (the node's, with hostNetwork).
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let addr = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        // A host without IPv6.
        Err(_) => tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await,
    };
    let listener = addr.map_err(|source| StartupError::Listen {
        flag: "--probe-port (PROBE_PORT)",
        addr: std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        source,
    })?;
    let listener = Gated::new(
        Gate::new(
            connections::PROBE,
            format!("probe port {port}"),
            global.max_connections_per_endpoint,
        ),
        listener,
    );
    let probe = tokio::spawn(admin::server::serve(
        listener,
        admin::probe_router(state),
        timeouts,
        stopped(stop),
    ));
    Ok(tokio::spawn(async move {
        let _ = tokio::join!(admin, probe);
    }))
}

/// What `podvisor.admin.v1.Admin` serves from, on either gRPC endpoint.
struct AdminDeps {
    /// The durable view.
    view: Arc<InstanceView>,
    /// The journal, for its quarantine.
    journal: Arc<dyn Journal>,
    /// Told of dropped quarantine entries.
    supervisor: Addr<Supervisor>,
}

impl AdminDeps {
    /// The Admin service with `access`, its watch streams ending at `stop`.
    fn service(&self, access: AdminAccess, stop: &watch::Receiver<bool>) -> AdminServer<GrpcAdmin> {
        AdminServer::new(GrpcAdmin {
            view: self.view.clone(),
            stop: stop.clone(),
            journal: self.journal.clone(),
            supervisor: self.supervisor.clone(),
            access,
        })
    }
}

/// gRPC over TCP (`--grpc-addr`), until `stop`: the read-only admin
/// service (the operator RPCs refused), and `hypervisor.Hypervisor` only
/// behind `token`.
async fn serve_grpc_tcp(
    global: &GlobalArgs,
    api: &HypervisorApi,
    admin: &AdminDeps,
    token: Option<BearerToken>,
    stop: watch::Receiver<bool>,
) -> Result<GrpcTask, StartupError> {
    let addr = global.endpoints.grpc_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Listen {
            flag: "--grpc-addr (PODVISOR_GRPC_ADDR)",
            addr,
            source,
        })?;
    let listener = Gated::new(
        Gate::new(
            connections::GRPC_TCP,
            addr.to_string(),
            global.max_connections_per_endpoint,
        ),
        listener,
    );
    // Over TCP, the mutating service only behind the token: a loopback port
    // is open to every local user and hostNetwork pod.
    let server = tonic::transport::Server::builder()
        .add_service(admin.service(
            AdminAccess::ReadOnly {
                grpc_socket: global.grpc_socket_path(),
            },
            &stop,
        ))
        .add_optional_service(token.map(|token| {
            HypervisorServer::with_interceptor(
                GrpcHypervisor { api: api.clone() },
                RequireBearer::new(token),
            )
        }));
    Ok(tokio::spawn(
        server.serve_with_incoming_shutdown(listener, stopped(stop)),
    ))
}

/// The Kata socket (`--socket`), then the gRPC socket (`--grpc-socket`,
/// with the Admin's operator RPCs) until `stop`, both mode 0660 with
/// `group`. If the gRPC socket cannot be bound, the Kata socket is closed
/// and removed again: no live socket is left behind for a daemon that is
/// not running.
async fn serve_control_sockets(
    global: &GlobalArgs,
    group: Option<nix::unistd::Gid>,
    api: HypervisorApi,
    admin: &AdminDeps,
    stop: watch::Receiver<bool>,
) -> Result<(ttrpc::r#async::Server, GrpcTask, PathBuf), StartupError> {
    let max_connections = global.max_connections_per_endpoint;
    let mut kata =
        crate::api::ttrpc::serve(&global.kata.socket, group, api.clone(), max_connections)
            .await
            .map_err(|reason| StartupError::ControlSocket { reason })?;
    let grpc_socket = global.grpc_socket_path();
    let listener = match crate::api::grpc::bind_unix(&grpc_socket, group) {
        Ok(listener) => listener,
        Err(reason) => {
            let _ = kata.shutdown().await;
            let _ = std::fs::remove_file(&global.kata.socket);
            return Err(StartupError::ControlSocket { reason });
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(HypervisorServer::new(GrpcHypervisor { api }))
        .add_service(admin.service(AdminAccess::Operator, &stop));
    let listener = Gated::new(
        Gate::new(
            connections::GRPC_UNIX,
            grpc_socket.display().to_string(),
            max_connections,
        ),
        listener,
    );
    let grpc_unix = tokio::spawn(server.serve_with_incoming_shutdown(listener, stopped(stop)));
    Ok((kata, grpc_unix, grpc_socket))
}

/// Completes once `stop` turns `true` (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Step 6: stops accepting (the Kata socket first, then every other
/// endpoint), lets operations under way finish their step and journal it
/// (at most `--shutdown-grace`), removes the sockets, flushes the journal
/// and tears the provider down. Pod VMs stay as they are.
async fn shut_down(
    global: &GlobalArgs,
    mut endpoints: Endpoints,
    actors: Actors,
    journal: OpenedJournal,
    provider: BuiltProvider,
    pki: LoadedPki,
) -> Result<(), StartupError> {
    tracing::info!("shutting down: no new requests; pod VMs stay as they are");
    if let Some(task) = &pki.renewal {
        task.abort();
    }
    endpoints
        .kata
        .shutdown()
        .await
        .map_err(|source| StartupError::KataShutdown { source })?;
    let _ = endpoints.stop.send(true);
    // Operations under way finish their step and journal it, so a restart
    // resumes from there instead of re-finding what they did.
    let started = std::time::Instant::now();
    let settled = actors
        .supervisor
        .send(Drain {
            limit: global.shutdown_grace,
        })
        .await
        .unwrap_or(false);
    tracing::info!(
        settled,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "shutdown: in-flight operations drained"
    );
    let _ = std::fs::remove_file(&global.kata.socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoints.grpc_tcp).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoints.grpc_unix).await;
    let _ = std::fs::remove_file(&endpoints.grpc_socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoints.admin).await;
    endpoints.journal_probe.abort();
    let j = journal.journal.clone();
    blocking("flushing the journal", move || j.flush())
        .await?
        .map_err(|source| StartupError::Journal {
            action: "flush",
            state_dir: global.state_dir.clone(),
            source,
        })?;
    tracing::info!("journal flushed");
    if let Err(e) = provider.calls.teardown().await {
        tracing::warn!(error = %e, "provider teardown failed");
    }
    Ok(())
}

/// Warns, at every start, about each endpoint bound beyond loopback: they
/// have no TLS and, but for the token of `hypervisor.Hypervisor` over
/// TCP, no authentication, so whoever can reach the address reads what
/// they reveal.
fn warn_if_exposed(global: &GlobalArgs, grpc_tcp_hypervisor: bool) {
    use crate::api::grpc::is_loopback;
    let endpoints = &global.endpoints;
    if !is_loopback(&endpoints.admin_addr) {
        tracing::warn!(
            addr = %endpoints.admin_addr,
            "--admin-addr (PODVISOR_ADMIN_ADDR) is not a loopback address: anyone who can reach it reads, without authentication, every pod VM's pod name, namespace, IP addresses, instance id and last error (/v1/instances), the provider's configuration (/v1/status) and the metrics"
        );
    }
    if !is_loopback(&endpoints.grpc_addr) {
        tracing::warn!(
            addr = %endpoints.grpc_addr,
            "--grpc-addr (PODVISOR_GRPC_ADDR) is not a loopback address: anyone who can reach it reads, without authentication, every pod VM's pod name, namespace, IP addresses, instance id, idempotency token and last error (podvisor.admin.v1.Admin)"
        );
        if grpc_tcp_hypervisor {
            tracing::warn!(
                addr = %endpoints.grpc_addr,
                "--grpc-addr (PODVISOR_GRPC_ADDR) is not a loopback address and serves hypervisor.Hypervisor behind the --grpc-token-file token, in plain text (no TLS): anyone who can see the traffic can take the token and create or stop pod VMs"
            );
        }
    }
}

/// Completes at the first SIGTERM or SIGINT; never, if the handlers cannot
/// be installed (the daemon can then only be killed).
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can only be killed; keep serving.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
