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
//! smaller sample, `-- --provider memory` (or `local`) one provider's cases,
//! `-- --scale N` another count for promise 2 (default 5,000; 1,000 quick).
//! The daemon is served in this process (`daemon::serve`) with the provider
//! rate limit and the per-node limit lifted, so the figures are overhead,
//! not throttling. Its pods dir (agent sockets) is on tmpfs (`/dev/shm`)
//! where there is one, as a node's `/run/peerpod/pods` is; its journal is
//! on disk, beside the floor's.
//!
//! Then promise 1 of `SPECIFICATION.md`, against the floor measured in the
//! same run: the journal alone (a `SledJournal` in a directory beside the
//! daemon's, same disk), doing per lifecycle the durable writes the daemon
//! did — as many durable puts (`put_durable`, as the pod VM actors write)
//! as the daemon's flush count says, and the final unflushed `remove` — one
//! at a time and 200 tasks at a time, with the same group commit; beside
//! it, for comparison, the Kata wire alone (the same clients against a
//! ttrpc server that answers at once) and the least work of the job
//! ([`LeastWork`]: what any implementation must do per lifecycle, with and
//! without a journal), each with its CPU split by thread and, where it
//! writes, the mean wait of a durable write. Then promise 2: 5,000 sandboxes in
//! flight at once on the memory provider (over 64 shim connections), the process's
//! memory and descriptors read with all of them Running, against the
//! journal alone doing the same writes for 5,000 tasks at once as the pod VM
//! actors do (each an awaited `put_durable`). Prints each
//! promise's figures, ratio, bound and PASS or FAIL; exits 1 if any fails.

mod common;

use async_trait::async_trait;
use common::verdict;
use podvisor::protocols::ttrpc::{
    hypervisor,
    hypervisor_ttrpc::{self, HypervisorClient},
};
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

/// What [`measure`] found.
struct Measured {
    /// p99 of a whole lifecycle.
    p99: Duration,
    /// Lifecycles per second, over the whole run.
    throughput: f64,
    /// Lifecycles run.
    lifecycles: usize,
}

/// Runs `rounds` rounds of `concurrency` lifecycles and prints a table row per
/// phase.
async fn measure(
    label: &str,
    socket: &Path,
    concurrency: usize,
    rounds: usize,
    settled: impl Fn() -> bool,
) -> Measured {
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let threads0 = cpu_by_thread();
    let cpu0 = cpu_seconds();
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
        until_settled(&settled, Duration::from_secs(120)).await;
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
    let throughput = n as f64 / wall.as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "| {label} | {concurrency} | CPU | {n} | {:.2} ms per lifecycle, {:.2} cores busy (the whole process: daemon and clients) | | |",
        cpu * 1e3 / n as f64,
        cpu / wall.as_secs_f64()
    );
    println!(
        "| {label} | {concurrency} | CPU by thread | {n} | ms per lifecycle: {} | | |",
        cpu_split(&threads0, cpu0, n)
    );
    println!(
        "| {label} | {concurrency} | throughput | {n} | {throughput:.1} lifecycles/s (incl. waiting for deletes) | | |",
    );
    Measured {
        p99: percentile(&samples[3], 99.0),
        throughput,
        lifecycles: n,
    }
}

/// The record of sandbox `id` at its `write`-th write: a new value each
/// time, as each of a lifecycle's writes is (sled writes nothing for a
/// value that did not change, which would make the floor too cheap).
fn floor_record(id: &str, write: usize) -> podvisor_state::InstanceRecord {
    podvisor_state::InstanceRecord::pending(
        id,
        "bench",
        "default",
        podvisor_state::InstanceSpec::default(),
        write as u64 + 1,
    )
}

/// Waits until `settled` says the deletes of a run have finished, at most
/// `limit`.
async fn until_settled(settled: &impl Fn() -> bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !settled() {
        assert!(Instant::now() < deadline, "deletes did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The journal alone, as the daemon's pod VM actors use it: `lifecycles`
/// runs of `writes` durable puts of one sandbox's record (each an awaited
/// [`Journal::put_durable`], the writes handed to the flusher thread and
/// group-committed) and its unflushed remove, `concurrency` tasks at a
/// time, on a fresh `SledJournal` in `dir`.
///
/// [`Journal::put_durable`]: podvisor_state::Journal::put_durable
async fn journal_floor(
    dir: &Path,
    writes: usize,
    concurrency: usize,
    lifecycles: usize,
) -> Measured {
    use podvisor_state::{Journal, SledJournal};
    let _ = std::fs::remove_dir_all(dir);
    let journal: Arc<dyn Journal> = Arc::new(SledJournal::open(dir).expect("the floor's journal"));
    let per_task = lifecycles.div_ceil(concurrency);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let journal = journal.clone();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_task);
                for n in 0..per_task {
                    let id = format!("{t:032x}{n:032x}");
                    let t0 = Instant::now();
                    for w in 0..writes {
                        journal
                            .put_durable(&floor_record(&id, w))
                            .await
                            .expect("a durable put");
                    }
                    journal.remove(&id).expect("remove");
                    times.push(t0.elapsed());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a floor task"));
    }
    let wall = started.elapsed();
    all.sort();
    let n = all.len();
    Measured {
        p99: percentile(&all, 99.0),
        throughput: n as f64 / wall.as_secs_f64(),
        lifecycles: n,
    }
}

/// The floor of earlier runs, printed for comparison only: the same
/// writes as blocking `put` + `flush` calls, `concurrency` threads at a
/// time. Returns lifecycles per second.
fn journal_floor_on_threads(
    dir: &Path,
    writes: usize,
    concurrency: usize,
    lifecycles: usize,
) -> f64 {
    use podvisor_state::{Journal, SledJournal};
    let _ = std::fs::remove_dir_all(dir);
    let journal = Arc::new(SledJournal::open(dir).expect("the floor's journal"));
    let per_thread = lifecycles.div_ceil(concurrency);
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|t| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                for n in 0..per_thread {
                    let id = format!("{t:032x}{n:032x}");
                    for w in 0..writes {
                        journal.put(&floor_record(&id, w)).expect("put");
                        journal.flush().expect("flush");
                    }
                    journal.remove(&id).expect("remove");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a floor thread");
    }
    (per_thread * concurrency) as f64 / started.elapsed().as_secs_f64()
}

/// The Kata-facing wire alone: a `Hypervisor` ttrpc service whose every
/// call answers at once.
struct AnswersAtOnce;

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for AnswersAtOnce {
    async fn create_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        _: hypervisor::CreateVMRequest,
    ) -> ttrpc::Result<hypervisor::CreateVMResponse> {
        Ok(hypervisor::CreateVMResponse::default())
    }
    async fn start_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        _: hypervisor::StartVMRequest,
    ) -> ttrpc::Result<hypervisor::StartVMResponse> {
        Ok(hypervisor::StartVMResponse::default())
    }
    async fn stop_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        _: hypervisor::StopVMRequest,
    ) -> ttrpc::Result<hypervisor::StopVMResponse> {
        Ok(hypervisor::StopVMResponse::default())
    }
}

/// A ttrpc server in this process serving `service` as Kata's
/// `Hypervisor` on the unix socket `socket`, started; the caller shuts it
/// down.
async fn serve_hypervisor(
    socket: &Path,
    service: Arc<dyn hypervisor_ttrpc::Hypervisor + Send + Sync>,
) -> ttrpc::r#async::Server {
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()))
        .register_service(hypervisor_ttrpc::create_hypervisor(service));
    server
        .start()
        .await
        .unwrap_or_else(|e| panic!("serve {}: {e}", socket.display()));
    server
}

/// The wire's own cost, for comparison (not a promise's floor): [`measure`]
/// — the same clients, a connection per lifecycle, the same requests —
/// against a ttrpc server in this process that answers each call at once,
/// `concurrency` at a time for `rounds` rounds.
async fn wire_floor(dir: &Path, concurrency: usize, rounds: usize) -> Measured {
    let socket = dir.join("wire.sock");
    let mut server = serve_hypervisor(&socket, Arc::new(AnswersAtOnce)).await;
    let measured = measure("wire alone", &socket, concurrency, rounds, || true).await;
    let _ = server.shutdown().await;
    measured
}

/// At most what any implementation of this job must do per lifecycle, in
/// this process, with none of podvisor's own machinery (no actors, view,
/// metrics, logs, annotations read, requests rendered or tags beyond the
/// token): the Kata wire (the ttrpc crate's server); the sandbox id
/// checked as the daemon checks it; the durable writes the daemon made,
/// each an awaited `put_durable` on a `SledJournal`, in the daemon's order
/// (`Pending` at CreateVM; `Creating` before the provider's create, the
/// instance after it, `Running` after readiness at StartVM; `Deleting` at
/// StopVM) and the final remove; the same zero-latency provider's create
/// and delete; the sandbox's pod directory (`0700`) and, once Running is
/// durable, its agent socket's listener (bound, made `0660` as the
/// daemon's, closed and removed when StopVM's write is durable); one TCP
/// connect to the pod VM's forwarder port for readiness. As in the
/// daemon, StopVM is answered once its write is durable; the delete, the
/// record's removal and the directory's follow (waited for between rounds).
/// Left out, as no cheaper than the daemon's: serving connections on the
/// agent socket, removing a stale socket file. Informational, not a
/// promise's floor: a bound on what this bench can show of any
/// implementation of the job on the machine it runs on.
struct LeastWork {
    /// `None`: the journal left out, for the bound on any journal.
    journal: Option<Arc<dyn podvisor_state::Journal>>,
    /// The zero-latency provider: its live instances, until deleted.
    provider: Arc<FakeProvider>,
    /// Where each sandbox's directory goes (`<pods>/<id>/agent.ttrpc`).
    pods: std::path::PathBuf,
    /// The stand-in pod VMs' forwarder port, connected to for readiness.
    forwarder: std::net::SocketAddr,
    /// Durable writes per lifecycle, at least 4 (one per state).
    writes: usize,
    /// Each Running sandbox's instance id and agent socket listener.
    running: std::sync::Mutex<HashMap<String, (String, tokio::net::UnixListener)>>,
    /// Durable writes asked for, answered or failed.
    written: std::sync::atomic::AtomicU64,
    /// The time their callers waited, summed, in ns.
    waited_ns: std::sync::atomic::AtomicU64,
    /// Teardowns after StopVM not yet finished, and those that failed
    /// (checked after the run).
    teardowns_pending: Arc<std::sync::atomic::AtomicU64>,
    teardowns_failed: Arc<std::sync::atomic::AtomicU64>,
}

impl LeastWork {
    /// Durable write `n` of sandbox `id`'s lifecycle (none without a
    /// journal).
    async fn write(&self, id: &str, n: usize) -> ttrpc::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let t = Instant::now();
        let written = journal.put_durable(&floor_record(id, n)).await;
        let waited = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns
            .fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
        self.written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        written.map_err(others)
    }

    /// The sandbox directory of a checked sandbox id.
    fn pod_dir(&self, id: &str) -> ttrpc::Result<std::path::PathBuf> {
        podvisor::api::validate_sandbox_id(id).map_err(others)?;
        Ok(self.pods.join(id))
    }
}

/// A ttrpc error with `e`'s text.
fn others(e: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::Others(e.to_string())
}

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for LeastWork {
    async fn create_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::CreateVMRequest,
    ) -> ttrpc::Result<hypervisor::CreateVMResponse> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.pod_dir(&req.id)?;
        self.write(&req.id, 0).await?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(others)?;
        Ok(hypervisor::CreateVMResponse::default())
    }
    async fn start_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::StartVMRequest,
    ) -> ttrpc::Result<hypervisor::StartVMResponse> {
        use std::os::unix::fs::PermissionsExt;
        let id = req.id;
        let dir = self.pod_dir(&id)?;
        self.write(&id, 1).await?;
        let request = podvisor_providers::CreateRequest {
            sandbox_id: id.clone(),
            pod_name: "bench".to_owned(),
            pod_namespace: "default".to_owned(),
            instance_name: format!("podvm-{id}"),
            token: id.clone(),
            earlier_attempt: false,
            spec: podvisor_state::InstanceSpec::default(),
            user_data: String::new(),
            tags: [(podvisor_providers::TAG_TOKEN.to_owned(), id.clone())].into(),
        };
        let instance = self
            .provider
            .create_instance(&request)
            .await
            .map_err(others)?;
        // The instance (and any writes beyond one per state) before the
        // readiness check; `Running` after it.
        let running = self.writes - 2;
        for n in 2..running {
            self.write(&id, n).await?;
        }
        drop(
            tokio::net::TcpStream::connect(self.forwarder)
                .await
                .map_err(others)?,
        );
        self.write(&id, running).await?;
        let path = dir.join("agent.ttrpc");
        let listener = tokio::net::UnixListener::bind(&path).map_err(others)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(others)?;
        self.running
            .lock()
            .map_err(others)?
            .insert(id, (instance.id, listener));
        Ok(hypervisor::StartVMResponse::default())
    }
    async fn stop_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        req: hypervisor::StopVMRequest,
    ) -> ttrpc::Result<hypervisor::StopVMResponse> {
        let id = req.id;
        let dir = self.pod_dir(&id)?;
        self.write(&id, self.writes - 1).await?;
        let running = self.running.lock().map_err(others)?.remove(&id);
        let (instance, listener) = running.ok_or_else(|| others("not running"))?;
        drop(listener);
        std::fs::remove_file(dir.join("agent.ttrpc")).map_err(others)?;
        // As the daemon does: StopVM is answered once `Deleting` is
        // durable (and the agent socket closed); the rest follows.
        let (provider, journal) = (self.provider.clone(), self.journal.clone());
        let failed = Arc::clone(&self.teardowns_failed);
        let pending = Arc::clone(&self.teardowns_pending);
        pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let deleted = provider.delete_instance(&instance).await.map_err(others);
            let removed = match journal {
                Some(journal) => journal.remove(&id).map_err(others),
                None => Ok(()),
            };
            let dir_gone = std::fs::remove_dir(&dir).map_err(others);
            if deleted.and(removed).and(dir_gone).is_err() {
                failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(hypervisor::StopVMResponse::default())
    }
}

/// How a comparison runs: rounds of `concurrency` lifecycles, as
/// [`measure`] runs them (promise 1b), or `n` sandboxes in flight at once
/// over 64 connections, as [`measure_scale`] runs them (promise 2).
#[derive(Clone, Copy)]
enum Shape {
    Rounds { concurrency: usize, rounds: usize },
    InFlight(usize),
}

/// [`LeastWork`]'s lifecycles per second, run in `shape` by the daemon's
/// own clients and requests, with `writes` durable writes per lifecycle
/// (at least 4), its journal in `dir`, its pod directories on tmpfs (or
/// under `dir`) and its "pod VMs" answering on `forwarder` — or with no
/// journal at all when `journaled` is false.
async fn least_work_floor(
    journaled: bool,
    dir: &Path,
    forwarder: std::net::SocketAddr,
    writes: usize,
    shape: Shape,
) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    assert!(
        writes >= 4,
        "the daemon made {writes} durable writes per lifecycle, fewer than one per state"
    );
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("the least work's directory");
    let journal: Option<Arc<dyn podvisor_state::Journal>> = journaled.then(|| {
        Arc::new(
            podvisor_state::SledJournal::open(&dir.join("journal"))
                .expect("the least work's journal"),
        ) as Arc<dyn podvisor_state::Journal>
    });
    // Its own pods dir, on tmpfs where there is one, as the daemon's is:
    // nothing of the daemon's (its pod directory GC) walks it.
    let (_tmpfs, pods) = common::tmpfs_pods_dir(dir.join("pods"));
    std::fs::create_dir_all(&pods).expect("the least work's pods dir");
    let socket = dir.join("least-work.sock");
    let provider = Arc::new(FakeProvider::new());
    let service = Arc::new(LeastWork {
        journal,
        provider: provider.clone(),
        pods,
        forwarder,
        writes,
        running: std::sync::Mutex::default(),
        written: AtomicU64::new(0),
        waited_ns: AtomicU64::new(0),
        teardowns_pending: Arc::default(),
        teardowns_failed: Arc::default(),
    });
    let mut server = serve_hypervisor(&socket, service.clone()).await;
    let label = if journaled {
        "least work"
    } else {
        "least work, no journal"
    };
    let settled = || provider.is_empty() && service.teardowns_pending.load(Ordering::SeqCst) == 0;
    let (concurrency, throughput) = match shape {
        Shape::Rounds {
            concurrency,
            rounds,
        } => (
            concurrency,
            measure(label, &socket, concurrency, rounds, settled)
                .await
                .throughput,
        ),
        Shape::InFlight(n) => {
            let throughput = measure_scale(&socket, n, 64, settled).await.throughput;
            println!(
                "| {label} | {n} in flight | throughput | {n} | {throughput:.1} lifecycles/s (incl. waiting for deletes) | | |"
            );
            (n, throughput)
        }
    };
    let _ = server.shutdown().await;
    assert_eq!(
        service.teardowns_failed.load(Ordering::SeqCst),
        0,
        "{label}: teardowns after StopVM failed"
    );
    if journaled {
        let written = service.written.load(Ordering::Relaxed);
        let waited = service.waited_ns.load(Ordering::Relaxed);
        println!(
            "| {label} | {concurrency} | durable write | {written} | {:.2} ms on average from hand-over to the handler's answer (on a runtime worker) | | |",
            waited as f64 / 1e6 / written.max(1) as f64
        );
    }
    throughput
}

/// What [`measure_scale`] found.
struct Scale {
    /// Lifecycles per second, the pause at the peak left out.
    throughput: f64,
    /// Time until all were Running.
    to_running: Duration,
    /// The process's resident memory before and with all Running, MiB.
    rss_before: f64,
    rss_peak: f64,
    /// The process's open descriptors before and with all Running.
    fds_before: usize,
    fds_peak: usize,
}

/// Promise 2: `n` sandboxes in flight at once, over `connections` shim
/// connections (the ttrpc client multiplexes; a real node has one shim,
/// and one connection, per sandbox). Every sandbox is created and started;
/// once all are Running the process's memory and descriptors are read;
/// then all are stopped and their deletes awaited.
async fn measure_scale(
    socket: &Path,
    n: usize,
    connections: usize,
    settled: impl Fn() -> bool,
) -> Scale {
    let address = format!("unix://{}", socket.display());
    let mut clients = Vec::new();
    for _ in 0..connections {
        let c = ttrpc::r#async::Client::connect(&address)
            .await
            .expect("connect");
        clients.push(HypervisorClient::new(c));
    }
    let (rss_before, fds_before) = (rss_mib(), open_fds());
    let running = Arc::new(tokio::sync::Barrier::new(n + 1));
    let stopping = Arc::new(tokio::sync::Barrier::new(n + 1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = clients[i % connections].clone();
            let (running, stopping) = (running.clone(), stopping.clone());
            tokio::spawn(async move {
                let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                let annotations = HashMap::from([
                    (
                        "io.kubernetes.cri.sandbox-name".to_owned(),
                        format!("scale-{i}"),
                    ),
                    (
                        "io.kubernetes.cri.sandbox-namespace".to_owned(),
                        "default".to_owned(),
                    ),
                ]);
                let create = hypervisor::CreateVMRequest {
                    id: id.clone(),
                    annotations,
                    ..Default::default()
                };
                client.create_vm(ctx(300), &create).await.expect("CreateVM");
                let start = hypervisor::StartVMRequest {
                    id: id.clone(),
                    ..Default::default()
                };
                client.start_vm(ctx(600), &start).await.expect("StartVM");
                running.wait().await;
                stopping.wait().await;
                let stop = hypervisor::StopVMRequest {
                    id,
                    ..Default::default()
                };
                client.stop_vm(ctx(300), &stop).await.expect("StopVM");
            })
        })
        .collect();
    running.wait().await;
    let to_running = started.elapsed();
    let (rss_peak, fds_peak) = (rss_mib(), open_fds());
    let resumed = Instant::now();
    stopping.wait().await;
    for t in tasks {
        t.await.expect("a sandbox task");
    }
    until_settled(&settled, Duration::from_secs(600)).await;
    let wall = to_running + resumed.elapsed();
    Scale {
        throughput: n as f64 / wall.as_secs_f64(),
        to_running,
        rss_before,
        rss_peak,
        fds_before,
        fds_peak,
    }
}

/// This process's resident memory (`VmRSS`), MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS in kB")
        / 1024.0
}

/// This process's open file descriptors.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// `podvisor_journal_flush_duration_seconds_count` from the daemon's
/// `/metrics`: flushes the daemon has asked for.
fn flushes_asked(admin: std::net::SocketAddr) -> f64 {
    metric_sum(admin, "podvisor_journal_flush_duration_seconds_count")
}

/// The sum of the daemon's samples named `metric` on its `/metrics`.
fn metric_sum(admin: std::net::SocketAddr, metric: &str) -> f64 {
    let text = ureq::get(format!("http://{admin}/metrics"))
        .call()
        .expect("/metrics")
        .body_mut()
        .read_to_string()
        .expect("/metrics text");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The daemon's command line. `tls`: whether the agent path uses TLS —
/// not for the memory provider, whose "VMs" are a bare TCP listener that
/// cannot complete the readiness probe's handshake.
fn global_args(
    root: &Path,
    pods: &Path,
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
        &pods.display().to_string(),
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
        "--provider-read-rate",
        "1000000",
        "--provider-read-burst",
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

/// Runs one provider's cases; for the memory provider, checks promises 1
/// and 2 (`scale` sandboxes in flight) and returns whether they held.
async fn bench_provider(name: &'static str, quick: bool, scale: usize) -> bool {
    // The floor's journal goes beside the daemon's state directory: the
    // same disk.
    let root = tempfile::tempdir().expect("tempdir");
    let (_tmpfs, pods) = common::pods_dir(root.path().join("pods"));
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
        &pods,
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
    let admin = global.endpoints.admin_addr;
    let config: Box<dyn ProviderConfig> = if name == "memory" {
        Box::new(MemoryConfig(memory.clone()))
    } else {
        provider
    };

    // The memory provider's "VMs" answer on 127.0.0.1:<forwarder port>:
    // one listener for all of them, so its backlog is the kernel's most
    // (`net.core.somaxconn`), not tokio's 128, which 200 readiness
    // connects at once overflow (each dropped SYN then costs a 1 s
    // retransmission — a real pod VM's forwarder listens alone).
    let listener = {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], forwarder_port)))
            .expect("the forwarder port");
        socket
            .listen(FORWARDER_BACKLOG)
            .expect("listen on the forwarder port")
    };
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
    let before = flushes_asked(admin);
    let one = measure(name, &socket, 1, single, settled).await;
    let writes = (flushes_asked(admin) - before) / one.lifecycles as f64;
    let write_time = |admin| {
        (
            metric_sum(admin, "podvisor_journal_flush_duration_seconds_sum"),
            flushes_asked(admin),
        )
    };
    let (waited0, asked0) = write_time(admin);
    let many = measure(name, &socket, 200, concurrent_rounds, settled).await;
    let (waited1, asked1) = write_time(admin);
    println!(
        "| {name} | 200 | durable write | {:.0} | {:.2} ms on average from hand-over to the pod VM actor's answer (on the actors' one thread) | | |",
        asked1 - asked0,
        (waited1 - waited0) * 1e3 / (asked1 - asked0).max(1.0)
    );
    let forwarder = std::net::SocketAddr::from(([127, 0, 0, 1], forwarder_port));
    let writes_per_lifecycle = writes.round().max(1.0) as usize;
    // The least work, with and without a journal, in `shape`.
    let least_work = |shape: Shape| {
        let root = root.path().to_owned();
        async move {
            let mut both = [0.0; 2];
            for (i, journaled) in [true, false].into_iter().enumerate() {
                let dir = root.join(format!("least-work-{i}"));
                both[i] =
                    least_work_floor(journaled, &dir, forwarder, writes_per_lifecycle, shape).await;
            }
            both
        }
    };
    let (wire, least) = if name == "memory" {
        let wire = wire_floor(root.path(), 200, concurrent_rounds).await;
        let least = least_work(Shape::Rounds {
            concurrency: 200,
            rounds: concurrent_rounds,
        })
        .await;
        (Some(wire), Some(least))
    } else {
        (None, None)
    };
    let (at_scale, least_at_scale) = if name == "memory" {
        let at_scale = measure_scale(&socket, scale, 64, settled).await;
        (
            Some(at_scale),
            Some(least_work(Shape::InFlight(scale)).await),
        )
    } else {
        (None, None)
    };

    let _ = stop_tx.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the daemon failed: {e}"),
        Err(e) => panic!("the daemon task failed: {e}"),
    }
    accept.abort();
    if name != "memory" {
        return true;
    }

    // Promise 1, against the journal alone doing the same durable writes.
    println!(
        "\nthe daemon flushed the journal {writes:.2} times per lifecycle; the floor does {writes_per_lifecycle} durable puts and a remove"
    );
    let floor_dir = root.path().join("floor");
    let floor_one = journal_floor(&floor_dir, writes_per_lifecycle, 1, one.lifecycles).await;
    let floor_many = journal_floor(&floor_dir, writes_per_lifecycle, 200, many.lifecycles).await;
    let on_threads =
        journal_floor_on_threads(&floor_dir, writes_per_lifecycle, 200, many.lifecycles);
    println!(
        "the journal alone, 200 at a time: {:.0} lifecycles/s with durable puts handed to the flusher (the floor); {on_threads:.0}/s as blocking put + flush on 200 threads (for comparison)",
        floor_many.throughput
    );
    if let Some(wire) = wire {
        println!(
            "the Kata wire alone, 200 at a time (the same clients, a ttrpc server answering at once, no journal): {:.0} lifecycles/s; podvisor reached {:.2} of it",
            wire.throughput,
            many.throughput / wire.throughput.max(1e-9)
        );
    }
    if let Some([least, unjournaled]) = least {
        println!(
            "the least work of the job, 200 at a time (the wire, the same durable writes, the provider's create and delete, the pod directory, the agent socket, the readiness connect; nothing else): {:.0} lifecycles/s, {:.2} of the journal alone; podvisor reached {:.2} of it",
            least,
            least / floor_many.throughput.max(1e-9),
            many.throughput / least.max(1e-9)
        );
        println!(
            "the least work with no journal at all (what this bench can show of any implementation here, whatever its journal): {:.0} lifecycles/s, {:.2} of the journal alone",
            unjournaled,
            unjournaled / floor_many.throughput.max(1e-9),
        );
    }
    let p99_ratio = one.p99.as_secs_f64() / floor_one.p99.as_secs_f64().max(1e-9);
    let a = verdict(
        "promise 1a (1 sandbox, p99)",
        &format!(
            "lifecycle {} ms, journal alone {} ms",
            ms(one.p99),
            ms(floor_one.p99)
        ),
        p99_ratio,
        "<= 1.5",
        p99_ratio <= 1.5,
    );
    let throughput_ratio = many.throughput / floor_many.throughput.max(1e-9);
    let b = verdict(
        "promise 1b (200 concurrent, throughput)",
        &format!(
            "{:.0} lifecycles/s, journal alone {:.0}/s",
            many.throughput, floor_many.throughput
        ),
        throughput_ratio,
        ">= 0.50",
        throughput_ratio >= 0.5,
    );
    let Some(at_scale) = at_scale else {
        return a && b;
    };
    let floor_scale = journal_floor(
        &root.path().join("floor-scale"),
        writes_per_lifecycle,
        scale,
        scale,
    )
    .await
    .throughput;
    println!(
        "\n{scale} sandboxes in flight: all Running after {:.2} s; process RSS {:.1} MiB before, {:.1} MiB with all Running ({:.1} KiB per sandbox); {} descriptors before, {} with all Running ({:.2} per sandbox: its agent socket's listener)",
        at_scale.to_running.as_secs_f64(),
        at_scale.rss_before,
        at_scale.rss_peak,
        (at_scale.rss_peak - at_scale.rss_before) * 1024.0 / scale as f64,
        at_scale.fds_before,
        at_scale.fds_peak,
        (at_scale.fds_peak as f64 - at_scale.fds_before as f64) / scale as f64,
    );
    if let Some([least, unjournaled]) = least_at_scale {
        println!(
            "the least work of the job, {scale} in flight: {least:.0} lifecycles/s, {:.2} of the journal alone; podvisor reached {:.2} of it; with no journal at all {unjournaled:.0}/s, {:.2} of the journal alone",
            least / floor_scale.max(1e-9),
            at_scale.throughput / least.max(1e-9),
            unjournaled / floor_scale.max(1e-9),
        );
    }
    let c = verdict(
        &format!("promise 2 (memory at {scale} in flight)"),
        &format!(
            "process RSS {:.1} MiB (daemon and clients)",
            at_scale.rss_peak
        ),
        at_scale.rss_peak / SCALE_RSS_BOUND_MIB,
        "< 1.0 of 200 MiB",
        at_scale.rss_peak < SCALE_RSS_BOUND_MIB,
    );
    let scale_ratio = at_scale.throughput / floor_scale.max(1e-9);
    let d = verdict(
        &format!("promise 2 (throughput at {scale} in flight)"),
        &format!(
            "{:.0} lifecycles/s, journal alone {floor_scale:.0}/s",
            at_scale.throughput
        ),
        scale_ratio,
        ">= 0.50",
        scale_ratio >= 0.5,
    );
    a && b && c && d
}

/// The stand-in forwarder listener's backlog: as many as the kernel allows
/// (it caps `listen`'s backlog at `net.core.somaxconn`: 4,096 since Linux
/// 5.4, 128 before, where this does not help).
const FORWARDER_BACKLOG: u32 = i32::MAX as u32;

/// Promise 2's bound on the daemon's memory with every sandbox in flight.
const SCALE_RSS_BOUND_MIB: f64 = 200.0;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--provider")
        .and_then(|i| args.get(i + 1).cloned());
    let scale = common::arg("--scale", if quick { 1_000 } else { 5_000 });
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    let held = system.block_on(async move {
        println!("| provider | concurrent | phase | samples | p50 ms | p99 ms | max ms |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let runs = |provider: &str| only.as_deref().is_none_or(|p| p == provider);
        // A promise not measured is not broken.
        let mut held = true;
        if runs("memory") {
            held = bench_provider("memory", quick, scale).await;
        }
        if runs("local") {
            bench_provider("local", quick, scale).await;
        }
        held
    });
    if !held {
        std::process::exit(1);
    }
}

/// CPU seconds used so far by each live thread of this process, by thread
/// id, with its name (digits left out, so `sled-io-3` and `sled-io-5` share
/// `sled-io-`; the runtime's workers and blocking threads are
/// `tokio-rt-worker`; the main thread, where the daemon's actors run, is the
/// bench binary's name, `lifecycle-` and its hash's letters). Each thread's time comes from its CPU-time clock: the clock id
/// Linux derives from a thread id, `MAKE_THREAD_CPUCLOCK(tid,
/// CPUCLOCK_SCHED)` = `(!tid << 3) | 2 | 4`
/// (include/linux/posix-timers_types.h), which `clock_gettime` accepts for
/// a thread of the calling process.
fn cpu_by_thread() -> HashMap<i32, (String, f64)> {
    let mut threads = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return threads;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let clock = nix::time::ClockId::from_raw((!tid << 3) | 2 | 4);
        let Ok(t) = nix::time::clock_gettime(clock) else {
            continue;
        };
        let name: String = comm
            .trim_end()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        threads.insert(tid, (name, t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9));
    }
    threads
}

/// The CPU each thread name took since `before` (from [`cpu_by_thread`])
/// and `cpu0` (from [`cpu_seconds`]), per lifecycle of `n`, in ms, largest
/// first: "tokio-rt-worker 0.233, lifecycle-… 0.183, …". Threads that ended
/// meanwhile are one more entry, "ended threads": the process's CPU time
/// not found in a live thread.
fn cpu_split(before: &HashMap<i32, (String, f64)>, cpu0: f64, n: usize) -> String {
    let total = cpu_seconds() - cpu0;
    let mut by_name: HashMap<String, f64> = HashMap::new();
    for (tid, (name, t)) in cpu_by_thread() {
        let t0 = before.get(&tid).map_or(0.0, |(_, t0)| *t0);
        *by_name.entry(name).or_insert(0.0) += t - t0;
    }
    let ended = total - by_name.values().sum::<f64>();
    by_name.insert("ended threads".to_owned(), ended);
    let per = |seconds: f64| seconds * 1e3 / n.max(1) as f64;
    let mut used: Vec<(String, f64)> = by_name
        .into_iter()
        .map(|(name, t)| (name, per(t)))
        .filter(|(_, ms)| ms.abs() >= 0.005)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used.iter()
        .map(|(name, ms)| format!("{name} {ms:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds (user + system) this process has used, its ended threads
/// included.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage of this process");
    let seconds = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}
