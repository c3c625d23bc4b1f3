//! Lifecycle overhead: CreateVM → StartVM (Running) → StopVM acknowledged,
//! through the real Kata-facing ttrpc socket, the actors, the flushed sled
//! journal and the readiness probe — for 1 sandbox at a time and for 200
//! concurrent ones.
//!
//! Two providers:
//! - `memory`: the in-process fake provider (`podvisor_providers::fake`),
//!   with zero latency, so the figures are podvisor's own overhead;
//! - `local`: the local provider, where every pod VM is a real forwarder
//!   process on its own loopback address.
//!
//! `cargo bench --bench lifecycle` runs all four cases; `-- --quick` runs a
//! smaller sample. The daemon is served in this process (`daemon::serve`)
//! with the provider rate limit and the per-node limit lifted, so the figures
//! are overhead, not throttling.

use async_trait::async_trait;
use podvisor::protocols::ttrpc::{hypervisor, hypervisor_ttrpc::HypervisorClient};
use podvisor_podvm::testing::free_port;
use podvisor_providers::fake::FakeProvider;
use podvisor_providers::{Provider, ProviderConfig, ProviderContext, ProviderError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hands the daemon the shared in-memory provider.
#[derive(Debug)]
struct MemoryConfig(Arc<FakeProvider>);

#[async_trait]
impl ProviderConfig for MemoryConfig {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    async fn build(&self, _: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        Ok(self.0.clone())
    }
}

fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(secs))
}

/// One sandbox's life; returns (create, start, stop, total) durations.
async fn one_lifecycle(client: &HypervisorClient) -> [Duration; 4] {
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let annotations = HashMap::from([
        (
            "io.kubernetes.cri.sandbox-name".to_owned(),
            "bench".to_owned(),
        ),
        (
            "io.kubernetes.cri.sandbox-namespace".to_owned(),
            "default".to_owned(),
        ),
    ]);
    let t0 = Instant::now();
    let create = hypervisor::CreateVMRequest {
        id: id.clone(),
        annotations,
        ..Default::default()
    };
    client.create_vm(ctx(30), &create).await.expect("CreateVM");
    let t1 = Instant::now();
    let start = hypervisor::StartVMRequest {
        id: id.clone(),
        ..Default::default()
    };
    client.start_vm(ctx(120), &start).await.expect("StartVM");
    let t2 = Instant::now();
    let stop = hypervisor::StopVMRequest {
        id,
        ..Default::default()
    };
    client.stop_vm(ctx(5), &stop).await.expect("StopVM");
    let t3 = Instant::now();
    [t1 - t0, t2 - t1, t3 - t2, t3 - t0]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Runs `rounds` rounds of `concurrency` lifecycles and prints a table row per
/// phase.
async fn measure(
    label: &str,
    socket: &Path,
    concurrency: usize,
    rounds: usize,
    settled: impl Fn() -> bool,
) {
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let started = Instant::now();
    for _ in 0..rounds {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let address = format!("unix://{}", socket.display());
            tasks.push(tokio::spawn(async move {
                let c = ttrpc::r#async::Client::connect(&address)
                    .await
                    .expect("connect");
                one_lifecycle(&HypervisorClient::new(c)).await
            }));
        }
        for t in tasks {
            let phases = t.await.expect("a lifecycle task");
            for (i, d) in phases.into_iter().enumerate() {
                samples[i].push(d);
            }
        }
        // Let the background deletes finish before the next round.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !settled() {
            assert!(Instant::now() < deadline, "deletes did not finish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let wall = started.elapsed();
    let n = samples[3].len();
    for (phase, s) in ["CreateVM", "StartVM→Running", "StopVM ack", "total"]
        .iter()
        .zip(samples.iter_mut())
    {
        s.sort();
        println!(
            "| {label} | {concurrency} | {phase} | {n} | {} | {} | {} |",
            ms(percentile(s, 50.0)),
            ms(percentile(s, 99.0)),
            ms(s[n - 1]),
        );
    }
    println!(
        "| {label} | {concurrency} | throughput | {n} | {:.1} lifecycles/s (incl. waiting for deletes) | | |",
        n as f64 / wall.as_secs_f64()
    );
}

/// The daemon's command line. `tls`: whether the agent path uses TLS —
/// not for the memory provider, whose "VMs" are a bare TCP listener that
/// cannot complete the readiness probe's handshake.
fn global_args(
    root: &Path,
    forwarder_port: u16,
    tls: bool,
    provider_args: &[&str],
) -> podvisor::cli::Invocation {
    let root = root.display().to_string();
    let mut args: Vec<String> = [
        "podvisor",
        "--socket",
        &format!("{root}/hv.sock"),
        "--pods-dir",
        &format!("{root}/pods"),
        "--state-dir",
        &format!("{root}/state"),
        "--admin-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--grpc-addr",
        &format!("127.0.0.1:{}", free_port()),
        "--forwarder-port",
        &forwarder_port.to_string(),
        "--node-name",
        "bench-node",
        "--peerpods-limit-per-node",
        "0",
        "--provider-rate",
        "1000000",
        "--provider-burst",
        "1000000",
        "--provider-max-inflight",
        "1024",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    if !tls {
        args.push("--disable-tls".to_owned());
    }
    args.push("local".to_owned());
    args.extend(provider_args.iter().map(std::string::ToString::to_string));
    match podvisor::cli::parse(args) {
        Ok(i) => i,
        Err(e) => panic!("bench command line: {e}"),
    }
}

async fn bench_provider(name: &'static str, quick: bool) {
    let root = tempfile::tempdir().expect("tempdir");
    let forwarder_port = free_port();
    let memory = Arc::new(FakeProvider::new());
    let local_dir = root.path().join("local");
    let forwarder = podvisor_podvm::testing::forwarder_binary().expect("the forwarder binary");
    let local_args = [
        "--local-dir",
        local_dir.to_str().expect("utf-8 path"),
        "--forwarder-bin",
        forwarder.to_str().expect("utf-8 path"),
    ];
    let invocation = global_args(
        root.path(),
        forwarder_port,
        name == "local",
        if name == "local" { &local_args } else { &[] },
    );
    let podvisor::cli::Invocation::Run {
        global, provider, ..
    } = invocation
    else {
        unreachable!("a run invocation")
    };
    let socket = global.kata.socket.clone();
    let config: Box<dyn ProviderConfig> = if name == "memory" {
        Box::new(MemoryConfig(memory.clone()))
    } else {
        provider
    };

    // The memory provider's "VMs" answer on 127.0.0.1:<forwarder port>.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", forwarder_port))
        .await
        .expect("the forwarder port");
    let accept = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = actix_rt::spawn(podvisor::daemon::serve(*global, name, config, async {
        let _ = stop_rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let instances = local_dir.join("instances");
    let settled = || match name {
        "memory" => memory.is_empty(),
        _ => std::fs::read_dir(&instances).map_or(true, |d| d.count() == 0),
    };
    let (single, concurrent_rounds) = if quick { (20, 1) } else { (200, 3) };
    measure(name, &socket, 1, single, settled).await;
    measure(name, &socket, 200, concurrent_rounds, settled).await;

    let _ = stop_tx.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the daemon failed: {e}"),
        Err(e) => panic!("the daemon task failed: {e}"),
    }
    accept.abort();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    system.block_on(async move {
        println!("| provider | concurrent | phase | samples | p50 ms | p99 ms | max ms |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        bench_provider("memory", quick).await;
        bench_provider("local", quick).await;
    });
}
