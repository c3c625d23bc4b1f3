//! Start-up, serving and shutdown of the daemon.
//!
//! Order matters: the journal is loaded and every record has its actor
//! before the Kata socket opens; `/readyz` turns ready once each record's
//! recovery is decided; then the orphan GC runs.

use crate::actors::pod_vm::PodVmDeps;
use crate::actors::provider::{CallPolicy, ProviderActor, ProviderCalls};
use crate::actors::supervisor::{Drain, GcPolicy, Recover, Supervisor};
use crate::admin::{self, AdminState};
use crate::api::HypervisorApi;
use crate::api::grpc::{BearerToken, GrpcAdmin, GrpcHypervisor, RequireBearer};
use crate::cli::GlobalArgs;
use crate::connections::{self, Gate, Gated};
use crate::metered::Metered;
use crate::metrics;
use crate::protocols::grpc::admin::admin_server::AdminServer;
use crate::protocols::grpc::hypervisor::hypervisor_server::HypervisorServer;
use crate::view::InstanceView;
use actix::Actor;
use podvisor_providers::{CloudManager, ProviderConfig, ProviderContext};
use podvisor_state::{Backoff, Journal, MachineConfig, SledJournal};
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Runs the daemon until SIGTERM or SIGINT; returns the process exit code.
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
        eprintln!("podvisor: {e}");
        return ExitCode::from(2);
    }
    // Before any socket opens: under systemd the soft limit is 1024, which
    // a few idle connections would use up for every endpoint at once.
    crate::connections::raise_nofile_limit(global.max_connections_per_endpoint);
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
                tracing::error!(error = %e, "podvisor cannot run");
                eprintln!("podvisor: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `podvisor journal status|accept-loss`: prints the journal's identity and
/// integrity as JSON (after accepting, what it was before). Exit 0, or 1
/// with the reason (a running daemon holds the journal's lock).
pub fn journal_command(action: crate::cli::JournalAction, state_dir: &std::path::Path) -> ExitCode {
    // As the daemon: nothing it writes is readable beyond its owner.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let dir = state_dir.join("journal");
    if !dir.is_dir() {
        eprintln!("podvisor: there is no journal at {}", dir.display());
        return ExitCode::FAILURE;
    }
    let result = match action {
        crate::cli::JournalAction::Status => SledJournal::open(&dir)
            .map(|j| serde_json::json!({ "journal": j.identity().id, "integrity": j.verdict() })),
        crate::cli::JournalAction::AcceptLoss => SledJournal::accept_loss(&dir)
            .map(|before| serde_json::json!({ "accepted": true, "integrity_before": before })),
        crate::cli::JournalAction::Adopt {
            sandbox,
            token,
            pod,
        } => match adoption_record(&sandbox, &token, &pod) {
            Err(why) => {
                eprintln!("podvisor: {why}");
                return ExitCode::from(2);
            }
            Ok(record) => SledJournal::open(&dir).and_then(|j| {
                if j.get(&record.sandbox_id)?.is_some() {
                    return Ok(serde_json::json!({
                        "adopted": false,
                        "why": format!("sandbox {} has a record already", record.sandbox_id),
                    }));
                }
                j.put(&record)?;
                j.flush()?;
                Ok(serde_json::json!({
                    "adopted": true,
                    "sandbox": record.sandbox_id,
                    "instance_name": record.instance_name,
                }))
            }),
        },
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The record that adopts a lost instance: `Creating` with the instance's
/// token, which start-up recovery looks up at the provider, adopts, probes
/// and brings to `Running` — exactly what it does for a create that was cut
/// off by a crash. The token must be the sandbox's own (it is derived from
/// the sandbox id), so a mistyped id or token is refused.
fn adoption_record(
    sandbox: &str,
    token: &str,
    pod: &str,
) -> Result<podvisor_state::InstanceRecord, String> {
    crate::api::validate_sandbox_id(sandbox).map_err(|e| format!("--sandbox: {e}"))?;
    let (namespace, name) = pod
        .split_once('/')
        .filter(|(ns, name)| crate::api::annotations::is_pod_identity(name, ns))
        .ok_or_else(|| {
            format!(
                "--pod {} is not <namespace>/<name> of a Kubernetes pod",
                crate::api::annotations::shown(pod)
            )
        })?;
    let generation = token
        .rsplit_once("-g")
        .and_then(|(_, g)| g.parse::<u64>().ok())
        .filter(|g| podvisor_state::idempotency_token(sandbox, *g) == token)
        .ok_or_else(|| {
            format!(
                "--token {} is not an idempotency token of sandbox {sandbox} (pv-<hash of the sandbox id>-g<generation>)",
                crate::api::annotations::shown(token)
            )
        })?;
    let now = crate::actors::pod_vm::now_millis();
    let mut record = podvisor_state::InstanceRecord::pending(
        sandbox,
        name,
        namespace,
        podvisor_state::InstanceSpec::default(),
        now,
    );
    record.state = podvisor_state::State::Creating;
    record.generation = generation;
    record.token = Some(token.to_owned());
    Ok(record)
}

/// Logging as `--log-level` and `--log-format` ask, under the caps of
/// [`crate::logging::CAPS`]: no level prints a credential.
fn init_logging(global: &GlobalArgs) -> Result<(), String> {
    crate::logging::init(&global.log_level, global.log_format)
}

/// Creates `dir` and its missing parents, readable by the owner only (an
/// existing directory keeps its mode).
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// This node's name: the flag, else the host name.
fn node_name(global: &GlobalArgs) -> Result<String, String> {
    match &global.node_name {
        Some(n) => Ok(n.trim().to_owned()),
        None => nix::unistd::gethostname()
            .map_err(|e| {
                format!("--node-name (NODE_NAME) is not set and the host name is unreadable: {e}")
            })?
            .into_string()
            .map_err(|_| {
                "--node-name (NODE_NAME) is not set and the host name is not UTF-8".to_owned()
            }),
    }
}

/// Serves with the provider `provider_config` builds, until `shutdown`
/// completes; then stops accepting, flushes the journal and tears the
/// provider down. Pod VMs stay as they are. Must run inside an actix
/// `System` on a multi-threaded Tokio runtime; [`run`] sets that up, and
/// benchmarks call this directly with their own provider.
pub async fn serve(
    global: GlobalArgs,
    provider_name: &'static str,
    provider_config: Box<dyn ProviderConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let metrics_handle = metrics::install()?;
    let upkeep = metrics_handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let node = node_name(&global)?;
    // Read before anything slow starts, so a bad token file stops start-up
    // at once.
    let grpc_token = global
        .grpc_token_file
        .as_deref()
        .map(BearerToken::from_file)
        .transpose()
        .map_err(|why| format!("--grpc-token-file (PODVISOR_GRPC_TOKEN_FILE) {why}"))?;
    for (flag, dir) in [
        ("state-dir", &global.state_dir),
        ("pods-dir", &global.pods_dir),
    ] {
        create_private_dir(dir).map_err(|e| format!("--{flag} {}: {e}", dir.display()))?;
    }

    // 1. The journal, before anything else: it is the truth. It holds pods'
    // initdata, so only root may read it.
    let journal_dir = global.state_dir.join("journal");
    create_private_dir(&journal_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&journal_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| format!("--state-dir {}: {e}", journal_dir.display()))?;
    let journal_health = crate::journal_health::JournalHealth::new();
    let journal: Arc<dyn Journal> = {
        let dir = journal_dir.clone();
        let sled: Arc<dyn Journal> = Arc::new(
            tokio::task::spawn_blocking(move || SledJournal::open(&dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
        // Every write reports to the health /livez reads.
        Arc::new(crate::journal_health::HealthJournal::new(
            sled,
            journal_health.clone(),
        ))
    };
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
        tokio::task::spawn_blocking(move || j.load())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    for q in &loaded.quarantined {
        metrics::counter!(metrics::JOURNAL_QUARANTINED).increment(1);
        tracing::error!(key = %q.key, reason = %q.reason, "journal record quarantined: it could not be read and was moved aside");
    }
    // Every record ever quarantined (this start's included), not only this
    // start's: the GC keeps sparing their instances across restarts until an
    // operator decides.
    let quarantine = {
        let j = journal.clone();
        tokio::task::spawn_blocking(move || j.quarantined())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    if !quarantine.is_empty() {
        tracing::warn!(
            records = quarantine.len(),
            "the journal's quarantine holds records; their instances are never garbage-collected"
        );
    }
    tracing::info!(
        records = loaded.records.len(),
        quarantined = loaded.quarantined.len(),
        journal = %journal_dir.display(),
        "journal loaded"
    );

    // 2. The provider.
    let context = ProviderContext {
        node_name: node.clone(),
        forwarder_port: global.forwarder_port,
        state_dir: global.state_dir.clone(),
    };
    let provider = Metered::wrap(
        provider_config
            .build(&context)
            .await
            .map_err(|e| format!("provider {provider_name}: {e}"))?,
    );
    let provider_default = provider_config.default_call_limits();
    let limits = global.call_limits(provider_default);
    tracing::info!(
        provider = provider_name,
        rate_per_second = limits.rate,
        burst = limits.burst,
        default_rate_per_second = provider_default.rate,
        default_burst = provider_default.burst,
        "mutating provider calls limited (--provider-rate, --provider-burst; else the provider's default)"
    );
    let policy = CallPolicy {
        max_inflight: global.provider_max_inflight,
        rate: limits.rate,
        burst: limits.burst,
        attempts: global.provider_call_attempts,
        timeout: global.provider_call_timeout,
        backoff: Backoff {
            base: global.retry_base,
            cap: global.retry_cap,
        },
    };
    let calls = Arc::new(ProviderCalls::new(provider, policy));
    // Without --cloud-config-verify a failed check is a warning, kept for
    // /v1/status so an operator sees it after the start-up log has scrolled.
    let config_problem = match calls.verify().await {
        Ok(()) => {
            tracing::info!(provider = provider_name, "provider configuration verified");
            None
        }
        Err(e) if global.cloud_config_verify => {
            return Err(format!(
                "provider {} configuration does not verify (--cloud-config-verify): {e}",
                provider_name
            ));
        }
        Err(e) => {
            tracing::warn!(provider = provider_name, error = %e, "provider configuration does not verify");
            Some(e.to_string())
        }
    };

    // TLS to the pod VMs: the keys are kept in the state dir, so a restarted
    // daemon still reaches the pod VMs it made.
    let tls_policy = crate::tls::ClientPolicy {
        tls: podvisor_podvm::tls::TlsPolicy::new(
            global.tls_min_version.as_deref(),
            global.tls_cipher_suites.as_deref(),
        )
        .map_err(|e| format!("--tls-min-version/--tls-cipher-suites: {e}"))?,
        skip_verify: global.tls_skip_verify,
    };
    let pki = if global.disable_tls {
        tracing::warn!(
            "--disable-tls: the agent protocol to the pod VMs travels WITHOUT TLS, unauthenticated"
        );
        None
    } else {
        let pki = match (&global.ca_cert_file, &global.cert_file, &global.cert_key) {
            (Some(ca), Some(cert), Some(key)) => {
                crate::tls::Pki::from_files(ca, cert, key, &tls_policy)
                    .map_err(|e| format!("--ca-cert-file/--cert-file/--cert-key: {e}"))?
            }
            _ => {
                let dir = global.state_dir.join("tls");
                tokio::task::spawn_blocking(move || {
                    crate::tls::Pki::load_or_create(&dir, &tls_policy)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("--state-dir: TLS keys: {e}"))?
            }
        };
        if global.tls_skip_verify {
            tracing::warn!(
                "--tls-skip-verify (TLS_SKIP_VERIFY): the pod VMs' certificates are NOT verified; anyone who can reach a pod VM's address can pose as its agent"
            );
        }
        // Sets the expiry gauges and warns about an operator's certificate
        // near expiry; podvisor's own was renewed by the load if it was due.
        pki.check()
            .map_err(|e| format!("TLS client certificate: {e}"))?;
        Some(Arc::new(pki))
    };
    // The client certificate is renewed while the daemon runs, without a
    // restart: a daemon up for a year would otherwise reach no pod VM.
    let tls_renewal = pki
        .clone()
        .map(|pki| pki.spawn_renewal(crate::tls::RENEWAL_CHECK_INTERVAL));

    // The pods' image pull secrets, from the Kubernetes API when there is one.
    let pull_secrets = match crate::pull_secrets::KubeApiConfig::resolve(
        global.kube_api_server.as_deref(),
        std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
        std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
        &global.kube_token_file,
        &global.kube_ca_file,
    ) {
        Some(config) => {
            let secrets = crate::pull_secrets::PullSecrets::new(config)
                .map_err(|e| format!("--kube-api-server/--kube-ca-file: {e}"))?;
            tracing::info!(
                api = secrets.server(),
                "image pull secrets are read from the Kubernetes API"
            );
            Some(Arc::new(secrets))
        }
        None => {
            tracing::info!(
                "no Kubernetes API (--kube-api-server, KUBERNETES_SERVICE_HOST): pod VMs get no registry credentials"
            );
            None
        }
    };

    // 3. The actors, and recovery.
    let view = InstanceView::new();
    let provider_actor = ProviderActor::new(calls.clone()).start();
    let deps = Arc::new(PodVmDeps {
        journal: journal.clone(),
        provider: provider_actor,
        view: view.clone(),
        machine: MachineConfig {
            max_create_attempts: global.create_attempts,
            backoff: Backoff {
                base: global.retry_base,
                cap: global.retry_cap,
            },
            pending_ttl: global.pending_ttl,
            failed_ttl: global.failed_ttl,
        },
        node_name: node.clone(),
        forwarder_port: global.forwarder_port,
        proxy_timeout: global.proxy_timeout,
        pods_dir: global.pods_dir.clone(),
        // Validated by the CLI; here only put into the pod VMs' form.
        default_initdata: global
            .initdata
            .as_deref()
            .map(crate::api::annotations::initdata_setting)
            .transpose()
            .map_err(|why| format!("--initdata (INITDATA): {why}"))?,
        scratch_space: global.enable_scratch_space,
        pki,
        tls_min_version: global.tls_min_version.clone(),
        tls_cipher_suites: global.tls_cipher_suites.clone(),
        proxy_hook: Arc::new(crate::proxy::hook::Hook {
            direct_volumes_dir: global.kata_direct_volumes_dir.clone(),
        }),
        pull_secrets,
        proxy_max_connections: global.max_connections_per_endpoint,
    });
    let limit = usize::try_from(global.peerpods_limit_per_node)
        .ok()
        .filter(|n| *n > 0);
    let supervisor = Supervisor::new(
        deps,
        limit,
        GcPolicy {
            interval: global.gc_interval,
            grace: global.gc_grace_period,
        },
    )
    .start();
    let quarantined = quarantine.iter().map(|q| q.key.clone()).collect();
    supervisor
        .send(Recover {
            records: loaded.records,
            quarantined,
        })
        .await
        .map_err(|e| format!("recovery could not start: {e}"))?;

    // 4. The endpoints: admin, gRPC over TCP, the Kata socket, then the gRPC
    // socket (after the Kata socket, whose check tells this daemon from a
    // second one pointed at the same directory).
    warn_if_exposed(&global, grpc_token.is_some());
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": node,
        "provider": provider_name,
        "provider_config": provider_config.summary(),
        "provider_config_problem": config_problem,
        "journal": {
            "id": journal.identity().id,
            "integrity": journal.verdict(),
        },
        "socket": global.socket,
        "pods_dir": global.pods_dir,
        "state_dir": global.state_dir,
        "peerpods_limit_per_node": limit,
        "max_connections_per_endpoint": global.max_connections_per_endpoint,
        "provider_call_limits": {
            "rate_per_second": limits.rate,
            "burst": limits.burst,
            "max_inflight": global.provider_max_inflight,
            "provider_default": {
                "rate_per_second": provider_default.rate,
                "burst": provider_default.burst,
            },
        },
    });
    let admin_listener = tokio::net::TcpListener::bind(global.admin_addr)
        .await
        .map_err(|e| {
            format!(
                "--admin-addr (PODVISOR_ADMIN_ADDR) {}: {e}",
                global.admin_addr
            )
        })?;
    let router = admin::router(AdminState {
        view: view.clone(),
        metrics: metrics_handle,
        status: Arc::new(status),
        journal_health: journal_health.clone(),
        journal: journal.clone(),
    });
    let journal_probe = tokio::spawn(crate::journal_health::probe_while_failing(
        journal.clone(),
        journal_health.clone(),
        stop_rx.clone(),
    ));
    let admin_listener = Gated::new(
        Gate::new(
            connections::ADMIN,
            global.admin_addr.to_string(),
            global.max_connections_per_endpoint,
        ),
        admin_listener,
    );
    let mut admin_stop = stop_rx.clone();
    // Time limits on every connection: a client that sends nothing, or
    // dribbles, must not hold a connection (and a slot under the cap).
    let admin_timeouts = admin::server::ConnectionTimeouts {
        header: global.admin_header_timeout,
        idle: global.admin_idle_timeout,
    };
    let admin_task = tokio::spawn(admin::server::serve(
        admin_listener,
        router,
        admin_timeouts,
        async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        },
    ));

    let api = HypervisorApi::new(
        supervisor.clone(),
        view.clone(),
        global.pods_dir.clone(),
        global.proxy_timeout,
    );
    let socket_group = global
        .socket_group
        .as_deref()
        .map(crate::api::ttrpc::resolve_group)
        .transpose()
        .map_err(|why| format!("--socket-group (PODVISOR_SOCKET_GROUP): {why}"))?;
    let grpc_listener = tokio::net::TcpListener::bind(global.grpc_addr)
        .await
        .map_err(|e| format!("--grpc-addr (PODVISOR_GRPC_ADDR) {}: {e}", global.grpc_addr))?;
    let grpc_listener = Gated::new(
        Gate::new(
            connections::GRPC_TCP,
            global.grpc_addr.to_string(),
            global.max_connections_per_endpoint,
        ),
        grpc_listener,
    );
    let mut grpc_stop = stop_rx.clone();
    // Over TCP, the mutating service only behind the token: a loopback port
    // is open to every local user and hostNetwork pod.
    let grpc_tcp_hypervisor = grpc_token.is_some();
    let grpc = tonic::transport::Server::builder()
        .add_service(AdminServer::new(GrpcAdmin { view: view.clone() }))
        .add_optional_service(grpc_token.map(|token| {
            HypervisorServer::with_interceptor(
                GrpcHypervisor { api: api.clone() },
                RequireBearer::new(token),
            )
        }));
    let grpc_task = tokio::spawn(async move {
        grpc.serve_with_incoming_shutdown(grpc_listener, async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        })
        .await
    });

    let mut ttrpc_server = crate::api::ttrpc::serve(
        &global.socket,
        socket_group,
        api.clone(),
        global.max_connections_per_endpoint,
    )
    .await?;
    let grpc_socket = global.grpc_socket_path();
    let grpc_unix_listener = match crate::api::grpc::bind_unix(&grpc_socket, socket_group) {
        Ok(listener) => listener,
        Err(e) => {
            // The Kata socket is this daemon's now: leave no live socket
            // behind for a daemon that is not running.
            let _ = ttrpc_server.shutdown().await;
            let _ = std::fs::remove_file(&global.socket);
            return Err(e);
        }
    };
    let mut grpc_unix_stop = stop_rx.clone();
    let grpc_unix = tonic::transport::Server::builder()
        .add_service(HypervisorServer::new(GrpcHypervisor { api }))
        .add_service(AdminServer::new(GrpcAdmin { view: view.clone() }));
    let grpc_unix_listener = Gated::new(
        Gate::new(
            connections::GRPC_UNIX,
            grpc_socket.display().to_string(),
            global.max_connections_per_endpoint,
        ),
        grpc_unix_listener,
    );
    let grpc_unix_task = tokio::spawn(async move {
        grpc_unix
            .serve_with_incoming_shutdown(grpc_unix_listener, async move {
                let _ = grpc_unix_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(
        socket = %global.socket.display(),
        admin = %global.admin_addr,
        grpc = %global.grpc_addr,
        grpc_tcp_hypervisor,
        grpc_socket = %grpc_socket.display(),
        provider = provider_name,
        node = %context.node_name,
        "podvisor serving"
    );

    // 5. Until asked to stop.
    shutdown.await;
    tracing::info!("shutting down: no new requests; pod VMs stay as they are");
    if let Some(task) = &tls_renewal {
        task.abort();
    }
    ttrpc_server
        .shutdown()
        .await
        .map_err(|e| format!("ttrpc shutdown: {e}"))?;
    let _ = stop_tx.send(true);
    // Operations under way finish their step and journal it, so a restart
    // resumes from there instead of re-finding what they did.
    let started = std::time::Instant::now();
    let settled = supervisor
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
    let _ = std::fs::remove_file(&global.socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_unix_task).await;
    let _ = std::fs::remove_file(&grpc_socket);
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    journal_probe.abort();
    let j = journal.clone();
    tokio::task::spawn_blocking(move || j.flush())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tracing::info!("journal flushed");
    if let Err(e) = calls.teardown().await {
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
    if !is_loopback(&global.admin_addr) {
        tracing::warn!(
            addr = %global.admin_addr,
            "--admin-addr (PODVISOR_ADMIN_ADDR) is not a loopback address: anyone who can reach it reads, without authentication, every pod VM's pod name, namespace, IP addresses, instance id and last error (/v1/instances), the provider's configuration (/v1/status) and the metrics"
        );
    }
    if !is_loopback(&global.grpc_addr) {
        tracing::warn!(
            addr = %global.grpc_addr,
            "--grpc-addr (PODVISOR_GRPC_ADDR) is not a loopback address: anyone who can reach it reads, without authentication, every pod VM's pod name, namespace, IP addresses, instance id, idempotency token and last error (podvisor.admin.v1.Admin)"
        );
        if grpc_tcp_hypervisor {
            tracing::warn!(
                addr = %global.grpc_addr,
                "--grpc-addr (PODVISOR_GRPC_ADDR) is not a loopback address and serves hypervisor.Hypervisor behind the --grpc-token-file token, in plain text (no TLS): anyone who can see the traffic can take the token and create or stop pod VMs"
            );
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adoption_takes_only_the_sandbox_s_own_token_and_a_real_pod_name() {
        let sandbox = "3f2a9c1b".repeat(8);
        let token = podvisor_state::idempotency_token(&sandbox, 2);
        let record = adoption_record(&sandbox, &token, "shop/web-1").unwrap();
        assert_eq!(record.state, podvisor_state::State::Creating);
        assert_eq!(record.generation, 2);
        assert_eq!(record.token.as_deref(), Some(token.as_str()));
        assert_eq!(record.instance_name, "podvm-web-1-3f2a9c1b");
        assert_eq!(
            (record.pod_namespace.as_str(), record.pod_name.as_str()),
            ("shop", "web-1")
        );

        let other = podvisor_state::idempotency_token(&"0".repeat(64), 2);
        for (token, pod, why) in [
            (other.as_str(), "shop/web-1", "--token"),
            ("pv-x-g1", "shop/web-1", "--token"),
            (token.as_str(), "web-1", "--pod"),
            (token.as_str(), "shop/Web", "--pod"),
        ] {
            let e = adoption_record(&sandbox, token, pod).unwrap_err();
            assert!(e.starts_with(why), "{e}");
        }
        assert!(
            adoption_record("a/b", &token, "shop/web-1")
                .unwrap_err()
                .starts_with("--sandbox")
        );
    }
}
