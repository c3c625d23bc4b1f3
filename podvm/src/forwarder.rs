//! The forwarder: TCP on the forwarder port, relayed to the agent socket.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// Settings of one forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The kata agent's unix socket.
    pub agent_socket: PathBuf,
    /// How long one connection waits for the agent socket to appear.
    pub agent_wait: Duration,
}

/// Accepts connections forever, relaying each to the agent.
pub async fn serve(listener: TcpListener, config: ForwarderConfig) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(stream, &config).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn relay(mut client: TcpStream, config: &ForwarderConfig) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut agent = connect_agent(&config.agent_socket, config.agent_wait).await?;
    tokio::io::copy_bidirectional(&mut client, &mut agent).await?;
    Ok(())
}

/// Connects to the agent socket, waiting up to `wait` for it to appear (the
/// agent may start after the forwarder).
pub async fn connect_agent(path: &Path, wait: Duration) -> io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("agent socket {} not reachable: {e}", path.display()),
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
            },
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
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
    }
}
