//! Agent readiness: a pod VM is Running once its forwarder answers — with
//! TLS on, once a mutual-TLS handshake completes with a forwarder that shows
//! that instance's certificate (as the reference's proxy is ready once its
//! TLS dial succeeds); with `--disable-tls`, once the port accepts a TCP
//! connection. An open port alone proves nothing: on a cloud, any host that
//! reuses the address answers it.

use crate::proxy::ClientTls;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

/// The longest one TCP connect may take before it is retried.
const CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// The longest one TLS handshake may take before it is retried.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// The longest pause between two attempts.
const PAUSE_CAP: Duration = Duration::from_secs(2);

/// Why the last attempt failed.
enum Failure {
    /// No TCP connection.
    Connect(String),
    /// A TCP connection, but no completed TLS handshake.
    Handshake(String),
}

/// Tries `addr` until it answers (with `tls`: completes the handshake) or
/// `limit` passes. The error names the address, the limit and the last
/// cause — "did not complete a TLS handshake" when the port answered but
/// nothing there proved to be the pod VM's forwarder.
///
/// # Errors
/// The message above once `limit` passes without a connection (and, with
/// `tls`, a completed handshake).
pub async fn wait_for_agent(
    addr: SocketAddr,
    limit: Duration,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(20);
    loop {
        let last = match attempt(addr, tls, deadline).await {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        if Instant::now() + pause >= deadline {
            return Err(match (last, tls) {
                (Failure::Handshake(why), Some(tls)) => format!(
                    "The agent endpoint {addr} answered but did not complete a TLS handshake as {:?} within {limit:?} (last: {why})",
                    tls.server_name
                ),
                (Failure::Handshake(why) | Failure::Connect(why), _) => format!(
                    "The agent endpoint {addr} did not answer within {limit:?} (last: {why})"
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PAUSE_CAP);
    }
}

/// One connection, and with `tls` one handshake, each bounded.
async fn attempt(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    deadline: Instant,
) -> Result<(), Failure> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let tcp = match tokio::time::timeout(
        left().min(CONNECT_LIMIT),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(Failure::Connect(e.to_string())),
        Err(_) => return Err(Failure::Connect("connect timed out".into())),
    };
    let Some(tls) = tls else {
        return Ok(());
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(
        left().min(HANDSHAKE_LIMIT),
        connector.connect(tls.server_name.clone(), tcp),
    )
    .await
    {
        Ok(Ok(mut stream)) => {
            // close_notify: the forwarder sees a clean end, not an error.
            let _ = stream.shutdown().await;
            Ok(())
        }
        Ok(Err(e)) => Err(Failure::Handshake(e.to_string())),
        Err(_) => Err(Failure::Handshake("the handshake timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_tls_answers_once_something_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        wait_for_agent(addr, Duration::from_secs(5), None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn gives_up_with_the_address_and_the_cause() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = wait_for_agent(addr, Duration::from_millis(300), None)
            .await
            .unwrap_err();
        assert!(
            err.contains(&addr.to_string()) && err.contains("did not answer"),
            "{err}"
        );
    }
}
