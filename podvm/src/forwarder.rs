//! The forwarder: TCP on the forwarder port, relayed to the agent socket.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixStream};

/// Settings of one forwarder.
#[derive(Clone)]
pub struct ForwarderConfig {
    /// The kata agent's unix socket.
    pub agent_socket: PathBuf,
    /// How long one connection waits for the agent socket to appear.
    pub agent_wait: Duration,
    /// TLS: the server certificate, and the CA its clients must present a
    /// certificate from. `None`: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for ForwarderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwarderConfig")
            .field("agent_socket", &self.agent_socket)
            .field("agent_wait", &self.agent_wait)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// `apf.json`, the fields the forwarder reads (the reference's names).
#[derive(serde::Deserialize, Default)]
struct Settings {
    #[serde(rename = "tls-server-cert")]
    tls_server_cert: Option<String>,
    #[serde(rename = "tls-server-key")]
    tls_server_key: Option<String>,
    #[serde(rename = "tls-client-ca")]
    tls_client_ca: Option<String>,
    #[serde(rename = "tls-min-version")]
    tls_min_version: Option<String>,
    #[serde(rename = "tls-cipher-suites")]
    tls_cipher_suites: Option<String>,
}

/// The TLS server configuration `apf.json` asks for: `None` when it holds
/// no server certificate. A certificate without a client CA is refused:
/// the forwarder never serves the agent to unauthenticated clients.
///
/// # Errors
/// A message starting `apf.json` and naming the setting when the JSON does
/// not parse, only some of `tls-server-cert`, `tls-server-key` and
/// `tls-client-ca` are set, a PEM does not parse, the client CA is not a
/// usable root, or `tls-min-version`/`tls-cipher-suites` is not supported.
pub fn tls_from_settings(json: &str) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let s: Settings = serde_json::from_str(json).map_err(|e| format!("apf.json: {e}"))?;
    let (cert, key, ca) = match (s.tls_server_cert, s.tls_server_key, s.tls_client_ca) {
        (None, None, None) => return Ok(None),
        (Some(c), Some(k), Some(ca)) => (c, k, ca),
        _ => {
            return Err(
                "apf.json: tls-server-cert, tls-server-key and tls-client-ca go together".into(),
            );
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("apf.json tls-server-cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| format!("apf.json tls-server-key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots
            .add(c.map_err(|e| format!("apf.json tls-client-ca: {e}"))?)
            .map_err(|e| format!("apf.json tls-client-ca: {e}"))?;
    }
    let policy =
        crate::tls::TlsPolicy::new(s.tls_min_version.as_deref(), s.tls_cipher_suites.as_deref())
            .map_err(|e| format!("apf.json tls-min-version/tls-cipher-suites: {e}"))?;
    let provider = policy.provider.clone();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("apf.json tls-client-ca: {e}"))?;
    let versions = policy.versions;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("apf.json server certificate and key: {e}"))?;
    Ok(Some(Arc::new(config)))
}

/// Accepts connections forever, relaying each to the agent.
///
/// # Errors
/// The listener's I/O error when accepting fails; a failed handshake or
/// relay ends only its own connection.
pub async fn serve(listener: TcpListener, config: ForwarderConfig) -> io::Result<()> {
    let acceptor = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = listener.accept().await?;
        // Agent answers are often written in pieces (a frame header, then
        // its payload): without this, Nagle holds each last piece back for
        // the peer's delayed ACK — tens of milliseconds per call.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let config = config.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => relay(tls, &config).await,
                    // A connection closed before its first byte is a port
                    // check, not an attack: not worth a warning each time.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, error = %e, "connection closed before a TLS handshake");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                },
                None => relay(stream, &config).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn relay(
    mut client: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    config: &ForwarderConfig,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The agent is dialled once the client's first bytes are here: a
    // connection that ends before any (the daemon's readiness probe, which
    // completes the TLS handshake and closes) never reaches the agent; and
    // when the agent cannot be reached, the daemon's proxy has counted the
    // calls those bytes carry as waiting, and fails them when this side
    // closes (closed before, they would meet a connection already gone).
    let mut first = vec![0u8; 16 << 10];
    let n = client.read(&mut first).await?;
    if n == 0 {
        tracing::debug!("connection closed before its first request");
        return Ok(());
    }
    let mut agent = match connect_agent(&config.agent_socket, config.agent_wait).await {
        Ok(agent) => agent,
        Err(e) => {
            tracing::warn!(error = %e, "no kata agent to relay to: closing the connection");
            let _ = client.shutdown().await;
            return Err(e);
        }
    };
    agent.write_all(&first[..n]).await?;
    drop(first);
    // 64 KiB buffers: a pipe's worth of stdout per read.
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut agent, 64 << 10, 64 << 10).await?;
    Ok(())
}

/// Connects to the agent socket, waiting up to `wait` for it to appear (the
/// agent may start after the forwarder).
///
/// # Errors
/// The last connect error, its kind kept and its message naming the socket
/// and the wait ("agent socket … not reachable within 30s: it is absent"
/// when there is no such file), when `wait` passes without a connection.
pub async fn connect_agent(path: &Path, wait: Duration) -> io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                let why = if e.kind() == io::ErrorKind::NotFound {
                    "it is absent".to_owned()
                } else {
                    e.to_string()
                };
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "agent socket {} not reachable within {wait:?}: {why}",
                        path.display()
                    ),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A stand-in agent that echoes what it reads, upper-cased.
    async fn echo_agent(path: PathBuf) {
        let listener = UnixListener::bind(&path).unwrap();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf[..n].make_ascii_uppercase();
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn relays_bytes_both_ways_to_an_agent_that_starts_late() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            ForwarderConfig {
                agent_socket: sock.clone(),
                agent_wait: Duration::from_secs(5),
                tls: None,
            },
        ));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(b"hello agent").await.unwrap();
        // The agent comes up after the client connected.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::spawn(echo_agent(sock));
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HELLO AGENT");
    }

    #[tokio::test]
    async fn a_missing_agent_closes_the_connection_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_agent(&dir.path().join("none.sock"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not reachable"), "{err}");
        assert!(
            err.to_string().contains("within 100ms: it is absent"),
            "{err}"
        );
    }
}
