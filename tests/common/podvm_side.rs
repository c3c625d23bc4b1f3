//! The pod VMs' side of a cloud test server, for the daemon's end-to-end
//! tests (`tests/aws_e2e.rs`, `tests/azure_e2e.rs`, `tests/ibmcloud_e2e.rs`):
//! a real `podvisor-forwarder` on every live instance's loopback address,
//! with the `apf.json` of its user data, as the pod VM image would start
//! it, killed when its instance goes; and the measurement of concurrent
//! pod VM lifecycles those tests share.
//!
//! A test file takes it beside `mod common;` (whose items it uses):
//! `#[path = "common/podvm_side.rs"] mod podvm_side;`.

#![allow(dead_code)]

use crate::common::{Client, Daemon, Setup, eventually, http_get, pod_annotations, sandbox_id};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A live instance of the cloud, as its pod VM side sees it.
pub struct LiveVm {
    /// What tells this instance from any other, and from a later one of
    /// the same name: its forwarder lives as long as the key is listed.
    pub key: String,
    /// The forwarder's `--instance-id`.
    pub name: String,
    /// Its (loopback) address, where its forwarder listens.
    pub ip: IpAddr,
    /// Its user data as text (decoded, where the cloud holds it base64).
    pub user_data: Option<String>,
}

/// The `apf.json` of a pod VM's user data (as text).
pub fn apf_json(user_data: &str) -> Option<String> {
    let files = podvisor_podvm::userdata::parse(user_data).ok()?;
    files
        .into_iter()
        .find(|f| f.name == "apf.json")
        .map(|f| f.content)
}

/// The forwarders of a daemon's pod VMs, by the key of their instance:
/// each listens on its instance's address at the daemon's forwarder port
/// and relays to an agent socket in the daemon's root.
#[derive(Clone)]
pub struct Forwarders {
    children: Arc<Mutex<HashMap<String, Child>>>,
    binary: PathBuf,
    port: u16,
    agent_socket: PathBuf,
    /// `apf.json` files written, so that each has a name of its own.
    written: Arc<AtomicU32>,
}

impl Forwarders {
    pub fn for_setup(setup: &Setup) -> Self {
        Self {
            children: Arc::default(),
            binary: podvisor_podvm::testing::forwarder_binary().unwrap(),
            port: setup.forwarder_port,
            agent_socket: setup.root.path().join("agent.sock"),
            written: Arc::default(),
        }
    }

    /// Kills the forwarders whose key `live` does not hold; returns the
    /// keys `live` holds that have no forwarder.
    pub fn keep_only<T>(&self, live: &HashMap<String, T>) -> Vec<String> {
        let mut children = self.children.lock().unwrap();
        children.retain(|key, child: &mut Child| {
            let keep = live.contains_key(key);
            if !keep {
                let _ = child.kill();
                let _ = child.wait();
            }
            keep
        });
        live.keys()
            .filter(|key| !children.contains_key(*key))
            .cloned()
            .collect()
    }

    /// Starts the forwarder of instance `key` (`--instance-id name`) on
    /// `ip`, with `apf` (an `apf.json`) as its settings if there is one.
    pub fn spawn(&self, key: String, name: &str, ip: IpAddr, apf: Option<String>) {
        assert!(ip.is_loopback(), "pod VM {name} got {ip}");
        let mut command = Command::new(&self.binary);
        command
            .args(["--listen", &format!("{ip}:{}", self.port)])
            .arg("--agent-socket")
            .arg(&self.agent_socket)
            .args(["--instance-id", name]);
        if let Some(apf) = apf {
            let written = self.written.fetch_add(1, Ordering::Relaxed) + 1;
            let path = self
                .agent_socket
                .with_file_name(format!("apf-{name}-{written}.json"));
            std::fs::write(&path, apf).unwrap();
            command.arg("--config").arg(path);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.lock().unwrap().insert(key, child);
    }

    /// The keys of the instances with a forwarder now.
    pub fn keys(&self) -> Vec<String> {
        self.children.lock().unwrap().keys().cloned().collect()
    }

    /// Kills every forwarder.
    pub fn kill_all(&self) {
        for (_, mut child) in self.children.lock().unwrap().drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The pod VMs' side of the daemon `setup`: a thread that starts a
/// forwarder for every instance `live` lists (every 50 ms), and stops it
/// when its instance is no longer listed.
pub struct PodVmSide {
    forwarders: Forwarders,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodVmSide {
    pub fn start(live: impl Fn() -> Vec<LiveVm> + Send + 'static, setup: &Setup) -> Self {
        let forwarders = Forwarders::for_setup(setup);
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopped) = (forwarders.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let mut live: HashMap<String, LiveVm> =
                    live().into_iter().map(|vm| (vm.key.clone(), vm)).collect();
                for key in shared.keep_only(&live) {
                    let vm = live.remove(&key).unwrap();
                    let apf = vm.user_data.as_deref().and_then(apf_json);
                    shared.spawn(key, &vm.name, vm.ip, apf);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            forwarders,
            stop,
            thread: Some(thread),
        }
    }

    /// The keys ([`LiveVm::key`]) of the instances with a forwarder now.
    pub fn keys(&self) -> Vec<String> {
        self.forwarders.keys()
    }
}

impl Drop for PodVmSide {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.forwarders.kill_all();
    }
}

/// Waits (up to 60 s) until the daemon has no record of sandbox `id`.
pub async fn wait_gone(daemon: &Daemon, id: &str) {
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(60),
        async || daemon.instance(id).await.is_none().then_some(()),
    )
    .await;
}

/// The number in the variable `var`, else `default`.
pub fn bench_n(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lifts the daemon's pacing of provider calls: rates and bursts of
/// 10000, 256 calls in flight.
pub fn lift_pacing(setup: &mut Setup) {
    for flag in [
        "--provider-rate",
        "--provider-burst",
        "--provider-read-rate",
        "--provider-read-burst",
    ] {
        setup.global.extend([flag.into(), "10000".into()]);
    }
    setup
        .global
        .extend(["--provider-max-inflight".into(), "256".into()]);
}

/// CreateVM of every sandbox of `ids` at once (pods `ns/bench-<k>`), each
/// followed by its StartVM: how long each StartVM took.
pub async fn start_all(client: &Arc<Client>, ids: &[String]) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let (client, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            client
                .create(&id, pod_annotations(&format!("bench-{k}"), "ns"))
                .await
                .unwrap();
            let t = Instant::now();
            client.start(&id).await.unwrap();
            t.elapsed()
        }));
    }
    let mut running = Vec::new();
    for t in tasks {
        running.push(t.await.unwrap());
    }
    running
}

/// StopVM of every sandbox of `ids` at once: how long each took until the
/// daemon (admin endpoint on `admin_port`) had no record of it.
pub async fn stop_all_until_gone(
    client: &Arc<Client>,
    admin_port: u16,
    ids: &[String],
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for id in ids {
        let (client, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            client.stop(&id).await.unwrap();
            let url = format!("http://127.0.0.1:{admin_port}/v1/instances/{id}");
            while http_get(url.clone()).await.is_ok_and(|(s, _)| s == 200) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            t.elapsed()
        }));
    }
    let mut deleted = Vec::new();
    for t in tasks {
        deleted.push(t.await.unwrap());
    }
    deleted
}

/// What [`measure_lifecycles`] measured; the daemon and its pod VM side
/// still run until it is dropped.
pub struct Lifecycles<T> {
    /// How many sandboxes at once.
    pub n: usize,
    /// Whether the daemon's pacing was lifted.
    pub unpaced: bool,
    /// What the `settled` hook returned.
    pub settled: T,
    /// Each sandbox's StartVM, from CreateVM's answer to Running.
    pub running: Vec<Duration>,
    /// Each sandbox's StopVM until its record was gone.
    pub deleted: Vec<Duration>,
    daemon: Daemon,
    side: PodVmSide,
    setup: Setup,
}

impl<T> Lifecycles<T> {
    /// `"pacing lifted"` or `"default provider pacing"`.
    pub fn pacing(&self) -> &'static str {
        if self.unpaced {
            "pacing lifted"
        } else {
            "default provider pacing"
        }
    }
}

/// Runs the lifecycles of `<var>_N` sandboxes (default 50) at once through
/// the daemon of `setup` (no per-node pod VM limit; its pacing lifted when
/// `<var>_UNPACED` is `1`), with the pod VM side `side` makes for it: once
/// the daemon has run a second, `settled` (resetting the server's counts,
/// say), then every CreateVM+StartVM at once, then every StopVM at once.
pub async fn measure_lifecycles<T>(
    var: &str,
    mut setup: Setup,
    side: impl FnOnce(&Setup) -> PodVmSide,
    settled: impl FnOnce() -> T,
) -> Lifecycles<T> {
    let n = bench_n(&format!("{var}_N"), 50);
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "0".into()]);
    let unpaced = std::env::var(format!("{var}_UNPACED")).is_ok_and(|v| v == "1");
    if unpaced {
        lift_pacing(&mut setup);
    }
    let side = side(&setup);
    let daemon = setup.start().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = settled();
    let client = Arc::new(daemon.client().await);
    let ids: Vec<String> = (0..n).map(|_| sandbox_id()).collect();
    let running = start_all(&client, &ids).await;
    let deleted = stop_all_until_gone(&client, setup.admin_port, &ids).await;
    Lifecycles {
        n,
        unpaced,
        settled,
        running,
        deleted,
        daemon,
        side,
        setup,
    }
}
