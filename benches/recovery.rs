//! Recovery time after kill -9 with 1,000 journaled sandboxes.
//!
//! The daemon runs as a child process on the local provider. The benchmark
//! makes `--running` sandboxes Running (each a real forwarder process) and
//! `--pending` more Pending, kills the daemon with SIGKILL, restarts it and
//! times how long until `/readyz` says every record's recovery is decided
//! (Running ones verified against the provider, Pending ones kept) — three
//! times. Then it stops everything and checks that nothing is left.
//!
//! Then promise 3 of `SPECIFICATION.md`: the median start-up to `/readyz`
//! against its floor measured in the same run — a bare sled open of the
//! same journal directory and a full scan of its records (median of three),
//! once the daemon is gone, timed as the daemon is: from spawning a fresh
//! process (this bench, `--floor-scan <dir>`) to its exit — with the ratio,
//! the bound (3×) and PASS or FAIL; exits 1 on a FAIL. The same open and
//! scan inside this (warm) process is printed beside it. The pods dir is on
//! tmpfs (`/dev/shm`) when there is one, as a node's `/run/peerpod/pods` is.
//!
//! `cargo bench --bench recovery` (defaults: 200 Running + 9,800 Pending,
//! the 10,000 records of promise 3); `-- --running N --pending M` for other
//! sizes.

mod common;

use common::{arg, verdict};
use podvisor::protocols::ttrpc::{hypervisor, hypervisor_ttrpc::HypervisorClient};
use podvisor_podvm::testing::free_port;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    root: PathBuf,
    /// The pods dir (agent sockets): on tmpfs where there is one, as on a
    /// node (`/run/peerpod/pods`).
    pods: PathBuf,
    admin: String,
    admin_port: u16,
    grpc_port: u16,
    forwarder_port: u16,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.root.join("hv.sock")
    }

    fn spawn(&self) -> Child {
        let forwarder = podvisor_podvm::testing::forwarder_binary().expect("the forwarder");
        Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--pods-dir")
            .arg(&self.pods)
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .args(["--admin-addr", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--grpc-addr", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--forwarder-port", &self.forwarder_port.to_string()])
            .args(["--node-name", "bench-node", "--log-level", "warn"])
            .args(["--peerpods-limit-per-node", "0"])
            .args(["--provider-rate", "100000", "--provider-burst", "100000"])
            .args(["--provider-read-rate", "100000"])
            .args(["--provider-read-burst", "100000"])
            .args(["--provider-max-inflight", "64"])
            .arg("local")
            .arg("--local-dir")
            .arg(self.root.join("local"))
            .arg("--forwarder-bin")
            .arg(forwarder)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("podvisor starts")
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut resp = agent.get(&format!("{}{path}", self.admin)).call().ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.body_mut().read_to_string().ok()?))
    }

    /// Time from now until `/readyz` answers 200.
    fn time_to_ready(&self, child: &mut Child) -> Duration {
        let t = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("podvisor exited: {status}");
            }
            if let Some((200, _)) = self.get("/readyz") {
                return t.elapsed();
            }
            assert!(t.elapsed() < Duration::from_secs(600), "not ready");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn count(&self, state: &str) -> usize {
        let (_, body) = self.get("/v1/instances").expect("admin answers");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["instances"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|r| r["state"] == state).count())
    }
}

fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(secs))
}

async fn client(socket: &Path) -> HypervisorClient {
    HypervisorClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .expect("connect"),
    )
}

/// Makes `n` sandboxes, started if `start`; returns their ids.
async fn make(socket: &Path, n: usize, start: bool) -> Vec<String> {
    let mut tasks = Vec::new();
    for chunk in 0..n.div_ceil(50) {
        let socket = socket.to_owned();
        let count = 50.min(n - chunk * 50);
        tasks.push(tokio::spawn(async move {
            let c = client(&socket).await;
            let mut ids = Vec::new();
            for _ in 0..count {
                let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                let req = hypervisor::CreateVMRequest {
                    id: id.clone(),
                    annotations: HashMap::from([
                        ("io.kubernetes.cri.sandbox-name".into(), "bench".into()),
                        ("io.kubernetes.cri.sandbox-namespace".into(), "rec".into()),
                    ]),
                    ..Default::default()
                };
                c.create_vm(ctx(30), &req).await.expect("CreateVM");
                if start {
                    let req = hypervisor::StartVMRequest {
                        id: id.clone(),
                        ..Default::default()
                    };
                    c.start_vm(ctx(120), &req).await.expect("StartVM");
                }
                ids.push(id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("a task"));
    }
    ids
}

/// What any start-up must do at least: open the journal in bare sled and
/// read every record. Returns the bytes read.
fn bare_open_and_scan(journal: &Path) -> usize {
    let db = sled::Config::new()
        .path(journal)
        .open()
        .expect("the journal opens in bare sled");
    let records = db.open_tree("records").expect("the records tree");
    let mut bytes = 0;
    for entry in &records {
        let (_, value) = entry.expect("a record");
        bytes += value.len();
    }
    std::hint::black_box(bytes)
}

/// The floor as the daemon is timed — from spawn to done, in a fresh
/// process: this bench run again with `--floor-scan <journal dir>`.
fn bare_open_and_scan_in_a_process(journal: &Path) -> Duration {
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().expect("the bench's path"))
        .arg("--floor-scan")
        .arg(journal)
        .stdout(Stdio::null())
        .status()
        .expect("the floor's process runs");
    let took = t.elapsed();
    assert!(status.success(), "the floor's process: {status}");
    took
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--floor-scan") {
        bare_open_and_scan(Path::new(args.get(i + 1).expect("a journal dir")));
        return;
    }
    let running = arg("--running", 200);
    let pending = arg("--pending", 9_800);
    let dir = tempfile::tempdir().expect("tempdir");
    // Re-binding a restarted daemon's agent sockets on ext4 costs an inode
    // search past the sockets it just deleted (see `common::pods_dir`).
    let (_tmpfs, pods) = common::pods_dir(dir.path().join("pods"));
    let admin_port = free_port();
    let node = Node {
        root: dir.path().to_owned(),
        pods,
        admin: format!("http://127.0.0.1:{admin_port}"),
        admin_port,
        grpc_port: free_port(),
        forwarder_port: free_port(),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let mut child = node.spawn();
    node.time_to_ready(&mut child);
    let t = Instant::now();
    let ids = rt.block_on(async {
        let mut ids = make(&node.socket(), running, true).await;
        ids.extend(make(&node.socket(), pending, false).await);
        ids
    });
    println!(
        "made {running} Running + {pending} Pending sandboxes in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut samples = Vec::new();
    for round in 1..=3 {
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        child = node.spawn();
        let took = node.time_to_ready(&mut child);
        let (r, p) = (node.count("running"), node.count("pending"));
        assert_eq!((r, p), (running, pending), "every sandbox recovered");
        println!(
            "kill -9 #{round}: ready after {:.0} ms with {r} running and {p} pending recovered",
            took.as_secs_f64() * 1e3
        );
        samples.push(took);
    }
    samples.sort();
    // The floor, on the same directory once the daemon is gone: what any
    // start-up must do at least — open the database and read every record.
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let journal = dir.path().join("state/journal");
    let mut floor = Vec::new();
    let mut floor_process = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        bare_open_and_scan(&journal);
        floor.push(t.elapsed());
        floor_process.push(bare_open_and_scan_in_a_process(&journal));
    }
    floor.sort();
    floor_process.sort();
    println!(
        "floor: bare sled open + scan {:.1} ms in this process (median), {:.1} ms from spawn to exit of a fresh process (median)",
        floor[1].as_secs_f64() * 1e3,
        floor_process[1].as_secs_f64() * 1e3
    );
    child = node.spawn();
    node.time_to_ready(&mut child);
    println!(
        "| sandboxes journaled | recovery (restart → ready) min | median | max |\n| --- | --- | --- | --- |\n| {} ({running} Running, {pending} Pending) | {:.0} ms | {:.0} ms | {:.0} ms |",
        running + pending,
        samples[0].as_secs_f64() * 1e3,
        samples[1].as_secs_f64() * 1e3,
        samples[2].as_secs_f64() * 1e3
    );

    // Both timed from spawn: the daemon to ready, the floor to its exit.
    let ratio = samples[1].as_secs_f64() / floor_process[1].as_secs_f64().max(1e-9);
    let held = verdict(
        &format!("promise 3 (recovery of {} records)", running + pending),
        &format!(
            "restart → ready {:.0} ms (median), a fresh process's bare sled open + scan {:.1} ms (median; {:.2}× the same open + scan in this warm process)",
            samples[1].as_secs_f64() * 1e3,
            floor_process[1].as_secs_f64() * 1e3,
            samples[1].as_secs_f64() / floor[1].as_secs_f64().max(1e-9)
        ),
        ratio,
        "<= 3.0",
        ratio <= 3.0,
    );

    // Clean up through the API, and check that nothing is left.
    rt.block_on(async {
        let c = client(&node.socket()).await;
        for id in &ids {
            let req = hypervisor::StopVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            c.stop_vm(ctx(5), &req).await.expect("StopVM");
        }
    });
    let t = Instant::now();
    while node
        .get("/v1/instances")
        .map(|(_, b)| b.contains("sandbox_id"))
        != Some(false)
    {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "deletes did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left =
        std::fs::read_dir(dir.path().join("local/instances")).map_or(0, std::iter::Iterator::count);
    assert_eq!(left, 0, "instances left behind");
    let _ = child.kill();
    let _ = child.wait();
    if !held {
        std::process::exit(1);
    }
}
