//! What the agent path costs: Kata agent calls to the fake kata agent
//! (`tests/common/kata_agent.rs`: Kata's `agent.proto`, real processes)
//! directly on its unix socket, and through the daemon's agent proxy
//! (`podvisor::proxy`) and the pod-side forwarder (`podvisor_podvm`) over
//! loopback TCP, plain and with mutual TLS — the same code the daemon and
//! the pod VM run, in one process.
//!
//! - `Health.Check` round trips: sequential (p50, p99, calls/s; the paths
//!   interleaved in rounds) and from 16 concurrent callers on one
//!   connection (calls/s) — the relay's cost on a call that costs the agent
//!   nothing.
//! - `ExecProcess` + `WaitProcess` of `true` (the paths interleaved call by
//!   call): calls that do work.
//! - stdout streaming: `ReadStdout` of a process writing N MiB (median of
//!   three alternating runs).
//!
//! `cargo bench --bench agent_path` (`-- --quick` for a smaller sample).

#[path = "../tests/common/kata_agent.rs"]
mod kata_agent;

use kata_agent::{FakeAgent, Shim};
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `n` sequential Checks on each path, interleaved in rounds so that the
/// machine's drift falls on all paths alike: each path's sorted latencies.
async fn check_latencies(shims: &[Shim], n: usize) -> Vec<Vec<Duration>> {
    for c in shims {
        for _ in 0..200 {
            c.check().await.expect("warm-up");
        }
    }
    let mut samples = vec![Vec::with_capacity(n); shims.len()];
    let rounds = 20;
    for _ in 0..rounds {
        for (i, c) in shims.iter().enumerate() {
            for _ in 0..n / rounds {
                let s = Instant::now();
                c.check().await.expect("Check");
                samples[i].push(s.elapsed());
            }
        }
    }
    for s in &mut samples {
        s.sort();
    }
    samples
}

/// Checks per second from 16 concurrent callers on one connection.
async fn concurrent_checks(c: &Shim, n: usize) -> f64 {
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
    (n / 16 * 16) as f64 / t.elapsed().as_secs_f64()
}

/// `n` ExecProcess + WaitProcess of `true` in container `c` on each path,
/// interleaved: each path's sorted latencies.
async fn exec_latencies(shims: &[Shim], n: usize) -> Vec<Vec<Duration>> {
    let mut samples = vec![Vec::with_capacity(n); shims.len()];
    for k in 0..n {
        for (i, c) in shims.iter().enumerate() {
            let exec = format!("e{i}-{k}");
            let s = Instant::now();
            c.exec("c", &exec, &["true"]).await.expect("ExecProcess");
            c.wait("c", &exec).await.expect("WaitProcess");
            samples[i].push(s.elapsed());
        }
    }
    for s in &mut samples {
        s.sort();
    }
    samples
}

/// MiB/s of reading `mib` MiB of a process's stdout (counted, not kept).
async fn stdout_rate(c: &Shim, mib: usize, tag: &str) -> f64 {
    let bytes = (mib << 20).to_string();
    let t = Instant::now();
    c.exec("c", tag, &["head", "-c", &bytes, "/dev/zero"])
        .await
        .expect("ExecProcess");
    let mut total = 0;
    loop {
        let chunk = c.read_stdout("c", tag, 1 << 20).await.expect("ReadStdout");
        if chunk.is_empty() {
            break;
        }
        total += chunk.len();
    }
    assert_eq!(total, mib << 20);
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
        let mut shims = Vec::new();
        for (_, socket) in &sockets {
            shims.push(Shim::connect(socket).await.expect("connect"));
        }
        let check_samples = check_latencies(&shims, n).await;
        let mut checks = Vec::new();
        for (i, c) in shims.iter().enumerate() {
            let s = &check_samples[i];
            let total: Duration = s.iter().sum();
            checks.push((
                percentile(s, 50.0),
                percentile(s, 99.0),
                s.len() as f64 / total.as_secs_f64(),
                concurrent_checks(c, n).await,
            ));
        }
        let execs_: Vec<(Duration, Duration)> = exec_latencies(&shims, execs)
            .await
            .iter()
            .map(|s| (percentile(s, 50.0), percentile(s, 99.0)))
            .collect();
        // Three alternating runs per path; the median.
        let mut rates = vec![Vec::new(); shims.len()];
        for run in 0..3 {
            for (i, c) in shims.iter().enumerate() {
                rates[i].push(stdout_rate(c, mib, &format!("s{i}-{run}")).await);
            }
        }
        let streams: Vec<f64> = rates
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                r[1]
            })
            .collect();
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
