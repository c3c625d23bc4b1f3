//! `podvisor-forwarder`: runs in the pod VM, relays the forwarder port to the
//! kata agent. When `apf.json` holds a `pod-network`, it first builds the
//! pod's network namespace (the tunnel to the worker) and removes it again
//! when it stops; if that fails it exits non-zero without listening, so the
//! pod VM never looks ready with half a network.

use clap::Parser;
use podvisor_podvm::forwarder::{ForwarderConfig, serve, tls_from_settings};
use podvisor_podvm::network::config::{PodNetwork, from_apf_json};
use podvisor_podvm::network::podnode::{DEFAULT_POD_NETNS, PodNode};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Relays connections on the forwarder port to the kata agent's socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on
    #[arg(long, env = "FORWARDER_LISTEN", default_value = "0.0.0.0:15150")]
    listen: SocketAddr,

    /// The kata agent's socket
    #[arg(
        long,
        env = "AGENT_SOCKET",
        default_value = "/run/kata-containers/agent.sock"
    )]
    agent_socket: PathBuf,

    /// Seconds one connection waits for the agent socket to appear
    #[arg(long, default_value_t = 30)]
    agent_wait_secs: u64,

    /// The instance this forwarder belongs to (a label for logs and process lists)
    #[arg(long)]
    instance_id: Option<String>,

    /// The forwarder's settings from user data; with a TLS server
    /// certificate there, it serves mutual TLS only
    #[arg(
        long,
        env = "FORWARDER_CONFIG",
        default_value = "/run/peerpod/apf.json"
    )]
    config: PathBuf,

    /// Where to create the pod's network namespace when the settings hold a
    /// `pod-network` (one path per pod VM sharing a network namespace)
    #[arg(long, env = "POD_NETNS", default_value = DEFAULT_POD_NETNS)]
    pod_netns: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log file (the local provider's
        // forwarder.log, a VM's journal) gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podvisor-forwarder: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (tls, pod_network) = match std::fs::read_to_string(&args.config) {
            Ok(json) => match (tls_from_settings(&json), from_apf_json(&json)) {
                (Ok(tls), Ok(pod_network)) => (tls, pod_network),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("podvisor-forwarder: {e}");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => {
                eprintln!("podvisor-forwarder: {}: {e}", args.config.display());
                return ExitCode::FAILURE;
            }
        };
        // The pod network before the listener: a forwarder that answers is
        // one whose pod network is complete.
        let pod_node = match pod_network {
            Some(pn) => match build_pod_network(&args.pod_netns, pn).await {
                Ok(node) => Some(node),
                Err(e) => {
                    let e = e.report();
                    tracing::error!(netns = %args.pod_netns.display(), error = %e, "cannot build the pod network");
                    eprintln!("podvisor-forwarder: pod network: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let code = serve_until_stopped(&args, tls, pod_node.is_some()).await;
        if let Some((node, pn)) = pod_node {
            match node.teardown(&pn).await {
                Ok(()) => tracing::info!(netns = %node.pod_netns().display(), "pod network removed"),
                Err(e) => {
                    tracing::error!(netns = %node.pod_netns().display(), error = %e.report(), "cannot remove the pod network");
                    return ExitCode::FAILURE;
                }
            }
        }
        code
    })
}

/// Builds the pod network in a namespace at `path`; the VM's namespace is
/// this process's.
async fn build_pod_network(
    path: &std::path::Path,
    pn: PodNetwork,
) -> Result<(PodNode, PodNetwork), podvisor_podvm::network::podnode::PodNetworkError> {
    let node = PodNode::new(path)?;
    let started = std::time::Instant::now();
    node.setup(&pn).await?;
    tracing::info!(netns = %path.display(), interface = %pn.interface,
        pod_ip = %pn.pod_ip.map(|p| p.to_string()).unwrap_or_default(),
        vni = pn.vxlan_id, elapsed = ?started.elapsed(), "pod network ready");
    Ok((node, pn))
}

/// Listens and serves until SIGINT (then `SUCCESS`), or a listener
/// failure. With `on_sigterm`, SIGTERM also ends it with `SUCCESS` (so the
/// caller can remove the pod network); without, SIGTERM keeps its default
/// (the process ends at once), as before pod networks.
async fn serve_until_stopped(
    args: &Args,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    on_sigterm: bool,
) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("podvisor-forwarder: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %args.listen, agent = %args.agent_socket.display(),
        instance = args.instance_id.as_deref().unwrap_or("-"), "forwarder listening");
    if tls.is_none() {
        tracing::warn!(config = %args.config.display(), "no TLS certificate in the settings: serving the agent WITHOUT TLS");
    }
    let config = ForwarderConfig {
        agent_socket: args.agent_socket.clone(),
        agent_wait: Duration::from_secs(args.agent_wait_secs),
        tls,
    };
    let mut terminate = match on_sigterm
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("podvisor-forwarder: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let terminated = async {
        match &mut terminate {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = serve(listener, config) => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => { eprintln!("podvisor-forwarder: {e}"); ExitCode::FAILURE }
        },
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = terminated => ExitCode::SUCCESS,
    }
}
