//! What the agent path costs: Kata agent calls to the fake kata agent
//! (`tests/common/kata_agent.rs`: Kata's `agent.proto`, real processes)
//! directly on its unix socket, and through the daemon's agent proxy
//! (`podvisor::proxy`) and the pod-side forwarder (`podvisor_podvm`) over
//! loopback TCP, plain and with mutual TLS — the same code the daemon and
//! the pod VM run, in one process.
//!
//! - `Health.Check` round trips: sequential (p50, p99, calls/s) and from 16
//!   concurrent callers (calls/s) — the relay's cost on a call that costs
//!   the agent nothing.
//! - `ExecProcess` + `WaitProcess` of `true`: a call that does work.
//! - stdout streaming: `ReadStdout` of a process writing N MiB.
//!
//! `cargo bench --bench agent_path` (`-- --quick` for a smaller sample).

#[path = "../tests/common/kata_agent.rs"]
mod kata_agent;

use kata_agent::{FakeAgent, Shim};
use std::path::Path;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// (p50, p99, calls per second) of `n` sequential Checks, and calls per
/// second of `n` Checks from 16 concurrent callers.
async fn measure(socket: &Path, n: usize) -> (Duration, Duration, f64, f64) {
    let c = Shim::connect(socket).await.expect("connect");
    for _ in 0..200 {
        c.check().await.expect("warm-up");
    }
    let mut samples = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        c.check().await.expect("Check");
        samples.push(s.elapsed());
    }
    let sequential = n as f64 / t.elapsed().as_secs_f64();
    samples.sort();

    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 16 {
                c.check().await.expect("Check");
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

/// (p50, p99) of `n` ExecProcess + WaitProcess of `true` in container `c`.
async fn measure_exec(socket: &Path, n: usize, tag: &str) -> (Duration, Duration) {
    let c = Shim::connect(socket).await.expect("connect");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let exec = format!("{tag}-{i}");
        let s = Instant::now();
        c.exec("c", &exec, &["true"]).await.expect("ExecProcess");
        c.wait("c", &exec).await.expect("WaitProcess");
        samples.push(s.elapsed());
    }
    samples.sort();
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

/// MiB/s of reading `mib` MiB of a process's stdout.
async fn measure_stdout(socket: &Path, mib: usize, tag: &str) -> f64 {
    let c = Shim::connect(socket).await.expect("connect");
    let bytes = (mib << 20).to_string();
    let t = Instant::now();
    c.exec("c", tag, &["head", "-c", &bytes, "/dev/zero"])
        .await
        .expect("ExecProcess");
    let out = c.read_all_stdout("c", tag).await.expect("ReadStdout");
    assert_eq!(out.len(), mib << 20);
    c.wait("c", tag).await.expect("WaitProcess");
    mib as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 20_000 };
    let execs = if quick { 100 } else { 500 };
    let mib = if quick { 64 } else { 512 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_socket = dir.path().join("agent.sock");
        let agent = FakeAgent::default();
        let _server = agent.serve(&agent_socket).await;
        let shim = Shim::connect(&agent_socket).await.expect("connect");
        shim.create_sandbox("bench").await.expect("CreateSandbox");
        shim.create_container("c", &["sleep", "3600"], &[], &[])
            .await
            .expect("CreateContainer");

        // The path twice: plain TCP, and mutual TLS as the daemon sets it up.
        let policy = podvisor::tls::ClientPolicy {
            tls: podvisor_podvm::tls::TlsPolicy::new(None, None).expect("policy"),
            skip_verify: false,
        };
        let pki = podvisor::tls::Pki::load_or_create(&dir.path().join("tls"), &policy)
            .expect("pki");
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
                Default::default(),
            )
            .expect("proxy");
            paths.push((path, proxy));
        }

        let sockets = [
            ("direct", agent_socket.clone()),
            ("proxy + forwarder", paths[0].0.clone()),
            ("proxy + forwarder, mutual TLS", paths[1].0.clone()),
        ];
        let mut checks = Vec::new();
        let mut execs_ = Vec::new();
        let mut streams = Vec::new();
        for (i, (_, socket)) in sockets.iter().enumerate() {
            checks.push(measure(socket, n).await);
            execs_.push(measure_exec(socket, execs, &format!("e{i}")).await);
            streams.push(measure_stdout(socket, mib, &format!("s{i}")).await);
        }
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        println!(
            "| path | Check p50 µs | p99 µs | sequential calls/s | 16 callers calls/s | exec+wait p50 µs | p99 µs | stdout MiB/s |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        for (i, (name, _)) in sockets.iter().enumerate() {
            let (p50, p99, seq, conc) = checks[i];
            let (e50, e99) = execs_[i];
            println!(
                "| {name} | {} | {} | {seq:.0} | {conc:.0} | {} | {} | {:.0} |",
                us(p50),
                us(p99),
                us(e50),
                us(e99),
                streams[i]
            );
        }
        let ratio = |a: Duration, b: Duration| (a.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
        println!(
            "relay overhead at p50, Check: {:+.0} % (plain), {:+.0} % (TLS); exec+wait: {:+.0} % (plain), {:+.0} % (TLS)",
            ratio(checks[1].0, checks[0].0),
            ratio(checks[2].0, checks[0].0),
            ratio(execs_[1].0, execs_[0].0),
            ratio(execs_[2].0, execs_[0].0),
        );
        println!(
            "stdout through the path: {:.0} % (plain), {:.0} % (TLS) of direct ({mib} MiB)",
            streams[1] / streams[0] * 100.0,
            streams[2] / streams[0] * 100.0
        );
    });
}
