//! What the agent path costs: ttrpc round trips to a stand-in agent
//! directly on its unix socket, and through the daemon's agent proxy
//! (`podvisor::proxy`) and the pod-side forwarder (`podvisor_podvm`) over
//! loopback TCP — the same code the daemon and the pod VM run, in one
//! process. Sequential (latency) and 16 concurrent callers (throughput).
//! TLS is not on this path yet.
//!
//! `cargo bench --bench agent_path` (`-- --quick` for a smaller sample).

use async_trait::async_trait;
use podvisor::protocols::ttrpc::hypervisor::{VersionRequest, VersionResponse};
use podvisor::protocols::ttrpc::hypervisor_ttrpc::{self, HypervisorClient};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Agent;

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for Agent {
    async fn version(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            version: req.version,
            ..Default::default()
        })
    }
}

async fn client(socket: &Path) -> HypervisorClient {
    HypervisorClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("connect"),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// (p50, p99, calls per second) of `n` sequential calls, and calls per
/// second of `n` calls from 16 concurrent callers.
async fn measure(socket: &Path, n: usize) -> (Duration, Duration, f64, f64) {
    let c = client(socket).await;
    let req = VersionRequest {
        version: "x".repeat(64),
        ..Default::default()
    };
    for _ in 0..200 {
        c.version(ttrpc::context::with_timeout(0), &req)
            .await
            .expect("warm-up");
    }
    let mut samples = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        c.version(ttrpc::context::with_timeout(0), &req)
            .await
            .expect("Version");
        samples.push(s.elapsed());
    }
    let sequential = n as f64 / t.elapsed().as_secs_f64();
    samples.sort();

    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 16 {
                c.version(ttrpc::context::with_timeout(0), &req)
                    .await
                    .expect("Version");
            }
        }));
    }
    for t in tasks {
        t.await.expect("a caller");
    }
    let concurrent = (n / 16 * 16) as f64 / t.elapsed().as_secs_f64();
    (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        sequential,
        concurrent,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 20_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_socket = dir.path().join("agent.sock");
        let mut agent = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", agent_socket.display()))
            .expect("bind")
            .register_service(hypervisor_ttrpc::create_hypervisor(Arc::new(Agent)));
        agent.start().await.expect("agent");

        // The path twice: plain TCP, and mutual TLS as the daemon sets it up.
        let pki = podvisor::tls::Pki::load_or_create(&dir.path().join("tls"), false).expect("pki");
        let identity = pki
            .server_identity("podvm-bench")
            .expect("issue")
            .expect("ours");
        let settings = serde_json::json!({
            "tls-server-cert": identity.cert_pem,
            "tls-server-key": identity.key_pem,
            "tls-client-ca": identity.client_ca_pem,
        })
        .to_string();
        let mut paths = Vec::new();
        for with_tls in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("forwarder port");
            let forwarder = listener.local_addr().expect("address");
            let server_tls = if with_tls {
                podvisor_podvm::forwarder::tls_from_settings(&settings).expect("server TLS")
            } else {
                None
            };
            tokio::spawn(podvisor_podvm::forwarder::serve(
                listener,
                podvisor_podvm::forwarder::ForwarderConfig {
                    agent_socket: agent_socket.clone(),
                    agent_wait: Duration::from_secs(5),
                    tls: server_tls,
                },
            ));
            let client_tls = with_tls.then(|| podvisor::proxy::ClientTls {
                config: pki.client_config(),
                server_name: pki.server_name("podvm-bench").expect("name"),
            });
            let path = dir.path().join(format!("agent-{with_tls}.ttrpc"));
            let proxy = podvisor::proxy::AgentProxy::open(
                &path,
                forwarder,
                Duration::from_secs(5),
                client_tls,
            )
            .expect("proxy");
            paths.push((path, proxy));
        }

        let direct = measure(&agent_socket, n).await;
        let relayed = measure(&paths[0].0, n).await;
        let over_tls = measure(&paths[1].0, n).await;
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        println!("| path | p50 µs | p99 µs | sequential calls/s | 16 callers calls/s |");
        println!("| --- | --- | --- | --- | --- |");
        for (name, (p50, p99, seq, conc)) in [
            ("direct", direct),
            ("proxy + forwarder", relayed),
            ("proxy + forwarder, mutual TLS", over_tls),
        ] {
            println!(
                "| {name} | {} | {} | {seq:.0} | {conc:.0} |",
                us(p50),
                us(p99)
            );
        }
        println!(
            "relay overhead at p50: {:+.0} % (plain), {:+.0} % (TLS)",
            (relayed.0.as_secs_f64() / direct.0.as_secs_f64() - 1.0) * 100.0,
            (over_tls.0.as_secs_f64() / direct.0.as_secs_f64() - 1.0) * 100.0
        );
    });
}
