//! The crash harness: the daemon as a child process on the local provider
//! (whose instances live outside the daemon, like cloud VMs), a steady mix
//! of CreateVM / StartVM / StopVM from several concurrent clients, and
//! SIGKILL — at random moments and at every crash point in
//! `src/failpoints.rs` — then a restart, again and again. Checked all along
//! and at the end:
//!
//! - no instance exists that no record owns;
//! - never more than one live instance per sandbox;
//! - every acknowledged StopVM ends with the instance gone;
//! - every StartVM that succeeded and was not stopped is Running after each
//!   restart, with the same instance id;
//! - no record's state moves backwards;
//! - the admin endpoint and the `podvisor_instances` gauge agree with each
//!   other and with the provider.
//!
//! Sizes come from the environment: `PODVISOR_CRASH_KILLS_PER_POINT`
//! (default 2), `PODVISOR_CRASH_RANDOM_KILLS` (default 6),
//! `PODVISOR_CRASH_CLIENTS` (default 4). The long run:
//!
//! ```sh
//! PODVISOR_CRASH_KILLS_PER_POINT=100 PODVISOR_CRASH_RANDOM_KILLS=300 \
//!   cargo test --release --no-default-features --features local,failpoints \
//!     --test crash -- --nocapture
//! ```

#![cfg(feature = "failpoints")]

mod common;

use common::*;
use podvisor::failpoints;
use podvisor::protocols::ttrpc::{hypervisor, hypervisor_ttrpc::HypervisorClient};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a count")),
        Err(_) => default,
    }
}

/// What the clients know about one sandbox.
#[derive(Debug, Clone, Default)]
struct Sandbox {
    /// StartVM succeeded; the instance id the admin endpoint showed then.
    started: Option<String>,
    /// StopVM was sent (maybe not yet acknowledged).
    stop_sent: bool,
    /// StopVM was acknowledged.
    stop_acked: bool,
}

#[derive(Default)]
struct Model {
    sandboxes: Mutex<BTreeMap<String, Sandbox>>,
    /// Highest state rank seen per sandbox, for "never backwards".
    ranks: Mutex<HashMap<String, (u8, String)>>,
    /// Violations found by any task.
    violations: Mutex<Vec<String>>,
    /// Lifecycles completed (StopVM acknowledged).
    completed: Mutex<usize>,
}

impl Model {
    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }
}

/// The order states move in; every legal transition goes up.
fn rank(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "creating" => 1,
        "running" => 2,
        "failed" => 3,
        "deleting" => 4,
        other => panic!("unknown state {other}"),
    }
}

/// One local instance, from its `instance.json`.
#[derive(Debug)]
struct LocalInstance {
    id: String,
    sandbox: String,
    token: String,
}

fn local_instances(local_dir: &Path) -> Vec<LocalInstance> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(local_dir.join("instances")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("instance.json")) else {
            continue; // a create torn half-way, or a delete in progress
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        out.push(LocalInstance {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            sandbox: v["tags"]["podvisor.io/sandbox"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            token: v["token"].as_str().unwrap_or_default().to_owned(),
        });
    }
    out
}

/// The daemon process of one incarnation.
struct Incarnation {
    child: Child,
    log: PathBuf,
}

impl Incarnation {
    fn spawn(setup: &Setup, crash_point: Option<&str>, n: usize) -> Self {
        let log = setup.root.path().join(format!("daemon-{n}.log"));
        let mut cmd = setup.command();
        cmd.env_remove("FAILPOINTS");
        if let Some(point) = crash_point {
            cmd.env("FAILPOINTS", format!("{point}=return"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until ready (true) or until the process exits (false).
    async fn ready(&mut self, admin: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok((200, _)) = http_get(format!("{admin}/readyz")).await {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 60 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `limit` for the process to exit; true if it did.
    async fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the Kata socket, retrying while the daemon is down.
async fn connect(socket: &Path, stop: &AtomicBool) -> Option<HypervisorClient> {
    loop {
        if let Ok(c) =
            ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await
        {
            return Some(HypervisorClient::new(c));
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `f` until it succeeds, reconnecting across daemon restarts: a
/// lost connection or our own deadline is retried; any status the daemon
/// answers with is returned.
async fn until_ok<T, F, Fut>(socket: &Path, stop: &AtomicBool, f: F) -> Result<T, ttrpc::Error>
where
    F: Fn(HypervisorClient) -> Fut,
    Fut: std::future::Future<Output = ttrpc::Result<T>>,
{
    loop {
        let Some(client) = connect(socket, stop).await else {
            return Err(ttrpc::Error::Others("stopping".into()));
        };
        match f(client).await {
            Ok(v) => return Ok(v),
            Err(ttrpc::Error::RpcStatus(s)) if s.code() != ttrpc::Code::DEADLINE_EXCEEDED => {
                return Err(ttrpc::Error::RpcStatus(s));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The instance id the admin endpoint shows for a sandbox, retrying across
/// restarts.
async fn instance_id_of(admin: &str, id: &str) -> String {
    loop {
        if let Ok((200, v)) = http_get(format!("{admin}/v1/instances/{id}")).await
            && let Some(i) = v["instance_id"].as_str()
        {
            return i.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client: sandbox after sandbox, each created, started, stopped.
async fn client(socket: PathBuf, admin: String, model: Arc<Model>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let id = sandbox_id();
        model
            .sandboxes
            .lock()
            .unwrap()
            .insert(id.clone(), Sandbox::default());
        let annotations = pod_annotations("crash", "harness");
        let create = until_ok(&socket, &AtomicBool::new(false), |c| {
            let req = hypervisor::CreateVMRequest {
                id: id.clone(),
                annotations: annotations.clone(),
                ..Default::default()
            };
            async move { c.create_vm(ctx(10), &req).await }
        })
        .await;
        if let Err(e) = create {
            model.violation(format!("CreateVM {id}: {e:?}"));
            return;
        }
        let start = until_ok(&socket, &AtomicBool::new(false), |c| {
            let req = hypervisor::StartVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            async move { c.start_vm(ctx(30), &req).await }
        })
        .await;
        match start {
            Ok(_) => {
                let instance = instance_id_of(&admin, &id).await;
                if let Some(s) = model.sandboxes.lock().unwrap().get_mut(&id) {
                    s.started = Some(instance);
                }
            }
            Err(e) => model.violation(format!("StartVM {id}: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        if let Some(s) = model.sandboxes.lock().unwrap().get_mut(&id) {
            s.stop_sent = true;
        }
        let stopped = until_ok(&socket, &AtomicBool::new(false), |c| {
            let req = hypervisor::StopVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            async move { c.stop_vm(ctx(1), &req).await }
        })
        .await;
        match stopped {
            Ok(_) => {
                if let Some(s) = model.sandboxes.lock().unwrap().get_mut(&id) {
                    s.stop_acked = true;
                }
                *model.completed.lock().unwrap() += 1;
            }
            Err(e) => model.violation(format!("StopVM {id}: {e:?}")),
        }
    }
}

/// Watches the admin endpoint and the provider's directory while the daemon
/// runs: states only move forward; at most one live instance per sandbox.
async fn watcher(admin: String, local_dir: PathBuf, model: Arc<Model>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut per_sandbox: HashMap<String, HashSet<String>> = HashMap::new();
        for i in local_instances(&local_dir) {
            per_sandbox.entry(i.sandbox).or_default().insert(i.id);
        }
        for (sandbox, ids) in per_sandbox {
            if ids.len() > 1 {
                model.violation(format!(
                    "sandbox {sandbox} has {} live instances: {ids:?}",
                    ids.len()
                ));
            }
        }
        if let Ok((200, v)) = http_get(format!("{admin}/v1/instances")).await {
            let mut ranks = model.ranks.lock().unwrap();
            for r in v["instances"].as_array().cloned().unwrap_or_default() {
                let id = r["sandbox_id"].as_str().unwrap_or_default().to_owned();
                let state = r["state"].as_str().unwrap_or_default().to_owned();
                let now = rank(&state);
                let entry = ranks.entry(id.clone()).or_insert((now, state.clone()));
                if now < entry.0 {
                    model.violation(format!(
                        "sandbox {id} moved back from {} to {state}",
                        entry.1
                    ));
                }
                if now > entry.0 {
                    *entry = (now, state);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Checks after a restart, while the daemon is up: started and not stopped
/// sandboxes are Running with their instance; every instance has an owner;
/// the admin list agrees with the gauge.
async fn check_after_restart(admin: &str, local_dir: &Path, model: &Model) {
    let snapshot: Vec<(String, Sandbox)> = model
        .sandboxes
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (id, sb) in snapshot {
        let (Some(instance), false) = (sb.started.clone(), sb.stop_sent) else {
            continue;
        };
        let Ok((status, v)) = http_get(format!("{admin}/v1/instances/{id}")).await else {
            return; // killed meanwhile
        };
        // A StopVM sent meanwhile makes any later state legitimate.
        if model.sandboxes.lock().unwrap()[&id].stop_sent {
            continue;
        }
        if status != 200 || v["state"] != "running" || v["instance_id"] != instance.as_str() {
            model.violation(format!(
                "sandbox {id} started on {instance} and not stopped is {status} {v} after a restart"
            ));
        }
    }

    // Ownership: read the provider first, then the records; an instance
    // still there after the records were read had an owner all along or is
    // a leak.
    let before = local_instances(local_dir);
    let Ok((200, v)) = http_get(format!("{admin}/v1/instances")).await else {
        return;
    };
    let records = v["instances"].as_array().cloned().unwrap_or_default();
    let tokens: HashSet<&str> = records
        .iter()
        .filter_map(|r| r["idempotency_token"].as_str())
        .collect();
    let ids: HashSet<&str> = records
        .iter()
        .filter_map(|r| r["instance_id"].as_str())
        .collect();
    for i in before {
        if tokens.contains(i.token.as_str()) || ids.contains(i.id.as_str()) {
            continue;
        }
        if local_dir
            .join("instances")
            .join(&i.id)
            .join("instance.json")
            .exists()
        {
            model.violation(format!(
                "instance {} of sandbox {} has no record",
                i.id, i.sandbox
            ));
        }
    }
}

/// The gauge by state, from `/metrics`.
async fn gauge(admin: &str) -> BTreeMap<String, f64> {
    let (_, body) = http_get(format!("{admin}/metrics")).await.unwrap();
    let text = body.as_str().unwrap().to_owned();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "podvisor_instances")
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => {
                Some((s.labels.get("state").unwrap_or_default().to_owned(), v))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_at_random_moments_and_at_every_crash_point_loses_and_duplicates_nothing() {
    let kills_per_point = env_usize("PODVISOR_CRASH_KILLS_PER_POINT", 2);
    let random_kills = env_usize("PODVISOR_CRASH_RANDOM_KILLS", 6);
    let clients = env_usize("PODVISOR_CRASH_CLIENTS", 4);

    let mut setup = Setup::new();
    setup.global.extend(
        [
            "--gc-interval",
            "1s",
            "--gc-grace-period",
            "2s",
            "--retry-base",
            "50ms",
            "--retry-cap",
            "500ms",
        ]
        .map(String::from),
    );
    setup
        .local
        .extend(["--create-delay", "30ms", "--delete-delay", "30ms"].map(String::from));
    let admin = format!("http://127.0.0.1:{}", setup.admin_port);
    let local_dir = setup.local_dir();

    // The schedule: every crash point `kills_per_point` times, and random
    // kills, shuffled.
    let mut schedule: Vec<Option<&'static str>> = Vec::new();
    for point in failpoints::ALL {
        schedule.extend(std::iter::repeat_n(Some(*point), kills_per_point));
    }
    schedule.extend(std::iter::repeat_n(None, random_kills));
    fastrand::shuffle(&mut schedule);

    let model = Arc::new(Model::default());
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let mut n = 0;
    let mut daemon = Incarnation::spawn(&setup, None, n);
    assert!(daemon.ready(&admin).await, "{}", daemon.log_text());

    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(client(
            setup.socket(),
            admin.clone(),
            model.clone(),
            stop_clients.clone(),
        )));
    }
    let watch = tokio::spawn(watcher(
        admin.clone(),
        local_dir.clone(),
        model.clone(),
        stop_watch.clone(),
    ));

    let mut hits: BTreeMap<&str, usize> = BTreeMap::new();
    let mut misses: BTreeMap<&str, usize> = BTreeMap::new();
    let mut random = 0;
    let started = Instant::now();
    for entry in schedule {
        // Let the clients get going on this incarnation.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..600))).await;
        daemon.kill9();
        n += 1;
        daemon = Incarnation::spawn(&setup, entry, n);
        let ready = daemon.ready(&admin).await;
        if ready {
            check_after_restart(&admin, &local_dir, &model).await;
        }
        match entry {
            Some(point) => {
                let died = !ready || daemon.exited_within(Duration::from_secs(15)).await;
                if died && daemon.log_text().contains(&format!("crash point {point}")) {
                    *hits.entry(point).or_default() += 1;
                } else {
                    *misses.entry(point).or_default() += 1;
                }
                // Back to a daemon without crash points.
                daemon.kill9();
                n += 1;
                daemon = Incarnation::spawn(&setup, None, n);
                assert!(daemon.ready(&admin).await, "{}", daemon.log_text());
                check_after_restart(&admin, &local_dir, &model).await;
            }
            None => random += 1,
        }
    }

    // Wind down: no new sandboxes; the last ones are stopped.
    stop_clients.store(true, Ordering::Relaxed);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .is_err()
        {
            let records = http_get(format!("{admin}/v1/instances")).await;
            panic!(
                "a client did not finish its last sandbox in 120 s; violations {:#?}; records {records:?}",
                model.violations.lock().unwrap()
            );
        }
    }
    eventually(
        "every record to go",
        Duration::from_secs(60),
        async || match http_get(format!("{admin}/v1/instances")).await {
            Ok((200, v))
                if v["instances"]
                    .as_array()
                    .is_some_and(std::vec::Vec::is_empty) =>
            {
                Some(())
            }
            _ => None,
        },
    )
    .await;
    // Past the GC's grace period, twice over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop_watch.store(true, Ordering::Relaxed);
    watch.await.unwrap();

    let left = local_instances(&local_dir);
    assert!(left.is_empty(), "leaked instances: {left:?}");
    let dirs = std::fs::read_dir(local_dir.join("instances"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "instance directories left behind");
    // And no "VM" still running: a forwarder on this run's port.
    let port = format!(":{}", setup.forwarder_port);
    let running: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (!zombie && cmd.contains("podvisor-forwarder") && cmd.contains(&port)).then_some(cmd)
        })
        .collect();
    assert!(
        running.is_empty(),
        "forwarder processes leaked: {running:#?}"
    );
    let sandboxes = model.sandboxes.lock().unwrap().clone();
    let unacked: Vec<_> = sandboxes.iter().filter(|(_, s)| !s.stop_acked).collect();
    assert!(unacked.is_empty(), "StopVM never acknowledged: {unacked:?}");
    let gauges = gauge(&admin).await;
    assert!(
        gauges.values().all(|v| *v == 0.0),
        "the gauge disagrees with the empty admin list: {gauges:?}"
    );
    let violations = model.violations.lock().unwrap().clone();
    let completed = *model.completed.lock().unwrap();
    eprintln!(
        "crash harness: {} s, {completed} lifecycles, {} sandboxes, {random} random kills, \
         crash points hit {hits:?}, not reached {misses:?}, violations {}",
        started.elapsed().as_secs(),
        sandboxes.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    for point in failpoints::ALL {
        assert!(
            hits.get(point).copied().unwrap_or(0) > 0 || kills_per_point == 0,
            "crash point {point} was never reached: {misses:?}"
        );
    }
    daemon.kill9();
    kill_instances(&local_dir);
}
