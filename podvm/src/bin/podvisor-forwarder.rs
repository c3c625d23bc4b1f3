//! `podvisor-forwarder`: runs in the pod VM, relays the forwarder port to the
//! kata agent.

use clap::Parser;
use podvisor_podvm::forwarder::{ForwarderConfig, serve, tls_from_settings};
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
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("podvisor-forwarder: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %args.listen, agent = %args.agent_socket.display(),
            instance = args.instance_id.as_deref().unwrap_or("-"), "forwarder listening");
        let tls = match std::fs::read_to_string(&args.config) {
            Ok(json) => match tls_from_settings(&json) {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("podvisor-forwarder: {e}");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                eprintln!("podvisor-forwarder: {}: {e}", args.config.display());
                return ExitCode::FAILURE;
            }
        };
        if tls.is_none() {
            tracing::warn!(config = %args.config.display(), "no TLS certificate in the settings: serving the agent WITHOUT TLS");
        }
        let config = ForwarderConfig {
            agent_socket: args.agent_socket,
            agent_wait: Duration::from_secs(args.agent_wait_secs),
            tls,
        };
        tokio::select! {
            r = serve(listener, config) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => { eprintln!("podvisor-forwarder: {e}"); ExitCode::FAILURE }
            },
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}
