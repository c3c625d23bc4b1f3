//! Agent readiness: a pod VM is Running once its forwarder port answers.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Connects to `addr` until it answers or `limit` passes.
pub async fn wait_for_agent(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(
            left.min(Duration::from_secs(2)),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        let last = match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_owned(),
        };
        if Instant::now() + delay >= deadline {
            return Err(format!(
                "The agent endpoint {addr} did not answer within {:?} (last: {last})",
                limit
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_once_something_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        wait_for_agent(addr, Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn gives_up_with_the_address_and_the_cause() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = wait_for_agent(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            err.contains(&addr.to_string()) && err.contains("did not answer"),
            "{err}"
        );
    }
}
