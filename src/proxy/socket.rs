//! One sandbox's agent socket following its journal record: open while the
//! durable record is `Running` (a recovered one too, so the shim's next call
//! works after a restart), closed as soon as the record leaves `Running`.

use super::hook::Hook;
use super::{AgentProxy, ClientTls};
use crate::tls::Pki;
use podvisor_state::{InstanceRecord, State};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The file name of a sandbox's agent socket in its pod directory
/// (`<pods-dir>/<sandbox id>/agent.ttrpc`, the path CreateVM returns).
pub const AGENT_SOCKET: &str = "agent.ttrpc";

/// How every sandbox's agent socket relays to its pod VM.
#[derive(Clone, Copy)]
pub struct Relay<'a> {
    /// `<pods-dir>`: each sandbox's socket is `<pods-dir>/<id>/agent.ttrpc`.
    pub pods_dir: &'a Path,
    /// The forwarder's port in the pod VM.
    pub forwarder_port: u16,
    /// How long each dial of the forwarder may take (`--proxy-timeout`).
    pub dial_limit: Duration,
    /// TLS to the forwarders (`None`: `--disable-tls`).
    pub pki: Option<&'a Pki>,
    /// What the proxy does to `CreateContainer`.
    pub hook: &'a Arc<Hook>,
    /// Most connections open at once on the socket
    /// (`--max-connections-per-endpoint`).
    pub max_connections: u32,
}

impl std::fmt::Debug for Relay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("pods_dir", &self.pods_dir)
            .field("forwarder_port", &self.forwarder_port)
            .field("dial_limit", &self.dial_limit)
            .field("tls", &self.pki.is_some())
            .field("hook", &self.hook)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// How the proxy and the readiness probe talk TLS to the pod VM named
/// `instance_name`: `None` without a PKI (`--disable-tls`).
///
/// # Errors
///
/// The name the pod VM's certificate carries is not a valid TLS server
/// name; the message says why. Only reported.
pub fn client_tls(pki: Option<&Pki>, instance_name: &str) -> Result<Option<ClientTls>, String> {
    let Some(pki) = pki else {
        return Ok(None);
    };
    Ok(Some(ClientTls {
        config: pki.client_config(),
        server_name: pki.server_name(instance_name)?,
    }))
}

/// One sandbox's agent socket: open or closed to match its durable record.
#[derive(Debug, Default)]
pub struct AgentSocket {
    /// The relay, while the durable record is `Running`; dropping it closes
    /// the socket and removes its file.
    open: Option<AgentProxy>,
}

impl AgentSocket {
    /// A closed socket.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the socket is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Opens the socket of sandbox `sandbox_id` when `durable` (its record
    /// as the journal last confirmed it) is `Running` with an address, and
    /// closes it when the record is not. A socket that cannot be opened is
    /// logged and tried again at the next call.
    pub fn follow(&mut self, sandbox_id: &str, durable: Option<&InstanceRecord>, relay: Relay<'_>) {
        let upstream = durable.filter(|r| r.state == State::Running).and_then(|r| {
            let ip = r.instance.as_ref()?.ips.first()?;
            let addr = SocketAddr::new(*ip, relay.forwarder_port);
            Some((addr, r.instance_name.as_str()))
        });
        match (upstream, &self.open) {
            (Some((upstream, instance_name)), None) => {
                self.open = open(sandbox_id, instance_name, upstream, relay);
            }
            (None, Some(_)) => self.open = None,
            _ => {}
        }
    }
}

/// Binds the socket of sandbox `sandbox_id`, relaying to `upstream`, the pod
/// VM named `instance_name`; `None` (logged) if it cannot.
fn open(
    sandbox_id: &str,
    instance_name: &str,
    upstream: SocketAddr,
    relay: Relay<'_>,
) -> Option<AgentProxy> {
    let path = relay.pods_dir.join(sandbox_id).join(AGENT_SOCKET);
    let tls = match client_tls(relay.pki, instance_name) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(sandbox = %sandbox_id, error = %e, "cannot open the agent socket");
            return None;
        }
    };
    match AgentProxy::open(
        &path,
        upstream,
        relay.dial_limit,
        tls,
        relay.hook.clone(),
        relay.max_connections,
    ) {
        Ok(proxy) => {
            tracing::debug!(sandbox = %sandbox_id, socket = %path.display(), %upstream, "agent proxy open");
            Some(proxy)
        }
        Err(e) => {
            tracing::warn!(
                sandbox = %sandbox_id,
                socket = %path.display(),
                error = %e,
                "cannot open the agent socket; retried at the next step"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::{InstanceRef, InstanceSpec};

    fn record(state: State) -> InstanceRecord {
        let mut r = InstanceRecord::pending("sb1", "web", "default", InstanceSpec::default(), 1);
        r.state = state;
        r.instance = Some(InstanceRef {
            id: "i-1".into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
        });
        r
    }

    #[tokio::test]
    async fn the_socket_is_open_exactly_while_the_durable_record_is_running() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sb1")).unwrap();
        let hook = Arc::new(Hook::default());
        let relay = Relay {
            pods_dir: dir.path(),
            forwarder_port: 1,
            dial_limit: Duration::from_millis(10),
            pki: None,
            hook: &hook,
            max_connections: 4,
        };
        let path = dir.path().join("sb1").join(AGENT_SOCKET);
        let mut socket = AgentSocket::new();
        for (durable, open) in [
            (None, false),
            (Some(record(State::Creating)), false),
            (Some(record(State::Running)), true),
            (Some(record(State::Running)), true),
            (Some(record(State::Deleting)), false),
        ] {
            socket.follow("sb1", durable.as_ref(), relay);
            assert_eq!(socket.is_open(), open, "{durable:?}");
            assert_eq!(path.exists(), open, "{durable:?}");
        }
        // Running without an address: nothing to relay to.
        let mut unaddressed = record(State::Running);
        unaddressed.instance = None;
        socket.follow("sb1", Some(&unaddressed), relay);
        assert!(!socket.is_open());
    }
}
