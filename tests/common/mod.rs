//! The daemon as a child process, driven by the real ttrpc client that Kata's
//! shims use, watched through its admin endpoint and metrics.

#![allow(dead_code)]

use podvisor::protocols::ttrpc::{
    hypervisor, hypervisor_ttrpc::HypervisorClient, podvminfo, podvminfo_ttrpc::PodVmInfoClient,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use podvisor_podvm::testing::free_port;

/// Polls `f` until it returns `Some`, or panics after `limit` naming `what`.
pub async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Annotations of a pod as containerd sends them.
pub fn pod_annotations(pod: &str, namespace: &str) -> HashMap<String, String> {
    HashMap::from([
        ("io.kubernetes.cri.sandbox-name".to_owned(), pod.to_owned()),
        (
            "io.kubernetes.cri.sandbox-namespace".to_owned(),
            namespace.to_owned(),
        ),
    ])
}

/// A 64-hex sandbox id, as containerd makes them.
pub fn sandbox_id() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// The directories and ports of one daemon, kept across restarts.
pub struct Setup {
    pub root: tempfile::TempDir,
    pub admin_port: u16,
    pub grpc_port: u16,
    pub forwarder_port: u16,
    /// Where the admin and gRPC TCP endpoints listen; tests connect to
    /// them on 127.0.0.1 whatever this is.
    pub listen_ip: std::net::IpAddr,
    pub node: String,
    /// Extra global flags (before the provider).
    pub global: Vec<String>,
    /// Extra local-provider flags.
    pub local: Vec<String>,
    /// The provider and its flags, instead of the local provider's
    /// (`["aws", "--aws-endpoint", …]`).
    pub provider: Option<Vec<String>>,
    /// Environment of the daemon process, beyond the inherited one.
    pub env: Vec<(String, String)>,
    /// Another daemon's state directory, to share it.
    pub shared_state: Option<PathBuf>,
    /// Another daemon's Kata socket, to try to take it over.
    pub shared_socket: Option<PathBuf>,
    /// Another pods directory than `<root>/pods`.
    pub pods_dir_override: Option<PathBuf>,
    /// Another daemon's local provider directory, to share its instances.
    pub shared_local: Option<PathBuf>,
    /// What the local provider runs as each pod VM's forwarder, instead of
    /// `podvisor-forwarder`.
    pub forwarder_bin: Option<PathBuf>,
    /// The daemon's open-file limit (soft, hard), instead of the test's.
    pub nofile: Option<(u64, u64)>,
    /// The daemon's working directory, instead of the test's: where
    /// relative paths among its flags lead.
    pub current_dir: Option<PathBuf>,
    /// The network namespace (a name under `/run/netns`, made by the test)
    /// the daemon runs in, instead of the test's: a daemon that builds
    /// tunnels, bridges and NOTRACK rules must never touch the machine's
    /// own network. Its admin endpoint is then reached from inside it.
    pub netns: Option<String>,
}

impl Setup {
    pub fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("podvisor-test")
                .tempdir()
                .unwrap(),
            admin_port: free_port(),
            grpc_port: free_port(),
            forwarder_port: free_port(),
            listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            node: format!("node-{:08x}", fastrand::u32(..)),
            global: Vec::new(),
            local: Vec::new(),
            provider: None,
            env: Vec::new(),
            shared_state: None,
            shared_socket: None,
            forwarder_bin: None,
            shared_local: None,
            nofile: None,
            pods_dir_override: None,
            current_dir: None,
            netns: None,
        }
    }
    pub fn socket(&self) -> PathBuf {
        self.shared_socket
            .clone()
            .unwrap_or_else(|| self.root.path().join("hypervisor.sock"))
    }
    pub fn pods_dir(&self) -> PathBuf {
        self.pods_dir_override
            .clone()
            .unwrap_or_else(|| self.root.path().join("pods"))
    }
    /// The gRPC unix socket where the daemon puts it by default: next to
    /// the Kata socket.
    pub fn grpc_socket(&self) -> PathBuf {
        self.socket().with_file_name("podvisor-grpc.sock")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.shared_state
            .clone()
            .unwrap_or_else(|| self.root.path().join("state"))
    }

    /// The journal of this setup, opened in this process (no daemon
    /// running), waiting up to 10 s for a journal this process just dropped
    /// to let go of its lock: sled's background threads hold the database a
    /// moment after the last handle is gone (a process that exits lets go
    /// at once). As `state/src/journal.rs`'s tests reopen it.
    pub fn open_journal(&self) -> podvisor_state::SledJournal {
        let dir = self.state_dir().join("journal");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match podvisor_state::SledJournal::open(&dir) {
                Ok(journal) => return journal,
                Err(e) if e.to_string().contains("locked") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("open the journal in {}: {e}", dir.display()),
            }
        }
    }

    /// Makes the executable script `script` (a `#!` line first) under the
    /// test's directory as `name`, and has the local provider run it as
    /// every pod VM's forwarder.
    pub fn forwarder_script(&mut self, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.root.path().join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.forwarder_bin = Some(path);
    }

    /// The path of [`Setup::netns`], as `ip netns add` made it.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns
            .as_ref()
            .map(|name| PathBuf::from(format!("/run/netns/{name}")))
    }

    pub fn local_dir(&self) -> PathBuf {
        self.shared_local
            .clone()
            .unwrap_or_else(|| self.root.path().join("local"))
    }

    /// The command line of the daemon.
    pub fn command(&self) -> Command {
        // A file-descriptor limit of the test's own is set by util-linux's
        // prlimit, which execs the daemon (same process): no `unsafe`
        // pre_exec hook in the test.
        let mut cmd = match self.nofile {
            Some((soft, hard)) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_podvisor"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_podvisor")),
        };
        // Tests reach nothing outside loopback: never the in-cluster
        // Kubernetes API of a CI pod.
        cmd.env_remove("KUBERNETES_SERVICE_HOST");
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        cmd.arg("--socket").arg(self.socket());
        cmd.arg("--pods-dir").arg(self.pods_dir());
        cmd.arg("--state-dir").arg(self.state_dir());
        let ip = self.listen_ip;
        cmd.args(["--admin-addr", &format!("{ip}:{}", self.admin_port)]);
        cmd.args(["--grpc-addr", &format!("{ip}:{}", self.grpc_port)]);
        cmd.args(["--forwarder-port", &self.forwarder_port.to_string()]);
        cmd.args(["--node-name", &self.node]);
        // A test that sets its own --log-level (clap refuses two) keeps it.
        if !self.global.iter().any(|a| a == "--log-level") {
            cmd.args(["--log-level", "info,podvisor=debug"]);
        }
        cmd.args(&self.global);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(provider) = &self.provider {
            cmd.args(provider);
            return cmd;
        }
        cmd.arg("local");
        cmd.arg("--local-dir").arg(self.local_dir());
        cmd.arg("--forwarder-bin").arg(
            self.forwarder_bin
                .clone()
                .unwrap_or_else(|| podvisor_podvm::testing::forwarder_binary().unwrap()),
        );
        cmd.args(&self.local);
        cmd
    }

    /// Starts the daemon: ready, or `Err` with its log if it exited first.
    pub async fn try_start(&self) -> Result<Daemon, String> {
        let mut d = self.spawn();
        d.ready_or_exit().await.map(|()| d)
    }

    /// Starts the daemon and returns at once, before it is ready.
    pub fn spawn(&self) -> Daemon {
        let log = self
            .root
            .path()
            .join(format!("daemon-{}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = self.command();
        command.stdout(Stdio::null()).stderr(file);
        let netns = self.netns_path();
        let child = match &netns {
            None => command.spawn().unwrap(),
            // Spawned from a thread inside the namespace, the daemon runs
            // there (a child inherits its creator thread's network
            // namespace) and shares the test's mount namespace, unlike
            // `ip netns exec`: the pod namespaces its pod VMs bind-mount
            // stay visible to the test.
            Some(path) => podvisor_podvm::network::netns::Netns::open(path)
                .expect("the daemon's network namespace opens")
                .run(|| command.spawn())
                .expect("a thread enters the daemon's network namespace")
                .expect("podvisor starts in its network namespace"),
        };
        Daemon {
            child: Some(child),
            log,
            admin: format!("http://127.0.0.1:{}", self.admin_port),
            socket: self.socket(),
            netns,
        }
    }

    /// Starts the daemon and waits until it is ready.
    pub async fn start(&self) -> Daemon {
        self.try_start().await.unwrap_or_else(|why| panic!("{why}"))
    }
}

/// GET `url`: status and JSON (or text as a JSON string).
pub async fn http_get(url: String) -> Result<(u16, serde_json::Value), String> {
    http_get_in(url, None).await
}

/// GET `url` from inside the network namespace at `netns` (the test's own
/// when `None`): a daemon in a namespace of its own listens on that
/// namespace's loopback.
pub async fn http_get_in(
    url: String,
    netns: Option<PathBuf>,
) -> Result<(u16, serde_json::Value), String> {
    let get = move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut resp = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, json))
    };
    tokio::task::spawn_blocking(move || match netns {
        None => get(),
        Some(path) => podvisor_podvm::network::netns::Netns::open(&path)
            .map_err(|e| e.to_string())?
            .run(get)
            .map_err(|e| e.to_string())?,
    })
    .await
    .unwrap()
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub admin: String,
    pub socket: PathBuf,
    /// The network namespace the daemon runs in ([`Setup::netns`]).
    pub netns: Option<PathBuf>,
}

impl Daemon {
    /// Waits until the daemon is ready; `Err` with its log if it exits first.
    async fn ready_or_exit(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "podvisor exited ({status}) before ready:\n{}",
                    self.log_text()
                ));
            }
            if self.socket.exists()
                && let Ok((200, _)) = self.get("/readyz").await
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "podvisor not ready in 30s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET on the admin endpoint: status and JSON (or text as a JSON string).
    pub async fn get(&self, path: &str) -> Result<(u16, serde_json::Value), String> {
        http_get_in(format!("{}{path}", self.admin), self.netns.clone()).await
    }

    /// The record of a sandbox from `/v1/instances/{id}`, or `None` on 404.
    pub async fn instance(&self, id: &str) -> Option<serde_json::Value> {
        match self.get(&format!("/v1/instances/{id}")).await.unwrap() {
            (200, v) => Some(v),
            (404, v) => {
                assert!(v["error"].as_str().unwrap().contains(id), "{v}");
                None
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// `/metrics` as served.
    pub async fn metrics_text(&self) -> String {
        let (status, body) = self.get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        body.as_str().unwrap().to_owned()
    }

    /// `/metrics`, parsed by a Prometheus text-format parser.
    pub async fn metrics(&self) -> prometheus_parse::Scrape {
        let text = self.metrics_text().await;
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    /// The value of one sample (with these labels), or 0 if absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let scrape = self.metrics().await;
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// CreateVM of a new sandbox, then StartVM in the background; returns
    /// once the record is Creating (the cloud create under way), with the
    /// sandbox id and the StartVM still waiting for its answer.
    pub async fn start_until_creating(
        &self,
        pod: &str,
    ) -> (String, tokio::task::JoinHandle<ttrpc::Result<()>>) {
        let id = sandbox_id();
        self.client()
            .await
            .create(&id, pod_annotations(pod, "ns"))
            .await
            .unwrap();
        let starting = {
            let client = self.client().await;
            let id = id.clone();
            tokio::spawn(async move { client.start(&id).await })
        };
        eventually(
            "the create to be under way",
            Duration::from_secs(10),
            async || (self.instance(&id).await?["state"] == "creating").then_some(()),
        )
        .await;
        (id, starting)
    }

    /// CreateVM for the pod `namespace/pod` as sandbox `id`, then StartVM,
    /// over `client`; a refused call panics with the daemon's log.
    pub async fn create_and_start(&self, client: &Client, id: &str, pod: &str, namespace: &str) {
        client
            .create(id, pod_annotations(pod, namespace))
            .await
            .unwrap_or_else(|e| panic!("CreateVM: {e:?}\n{}", self.log_text()));
        client
            .start(id)
            .await
            .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", self.log_text()));
    }

    pub async fn client(&self) -> Client {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .unwrap();
        Client {
            hv: HypervisorClient::new(c.clone()),
            info: PodVmInfoClient::new(c),
        }
    }

    /// Waits up to `limit` for the daemon to exit by itself (a crash
    /// point): its exit status, or `None` if it still runs.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `podvisor_recovered_instances_total{action}`: sandboxes the last
    /// start-up recovery handled that way.
    pub async fn recovered(&self, action: &str) -> f64 {
        self.metric("podvisor_recovered_instances_total", &[("action", action)])
            .await
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit 20 s after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Kata-facing clients.
pub struct Client {
    pub hv: HypervisorClient,
    pub info: PodVmInfoClient,
}

pub fn ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(secs))
}

impl Client {
    pub async fn create(
        &self,
        id: &str,
        annotations: HashMap<String, String>,
    ) -> ttrpc::Result<String> {
        let req = hypervisor::CreateVMRequest {
            id: id.to_owned(),
            annotations,
            ..Default::default()
        };
        self.hv
            .create_vm(ctx(10), &req)
            .await
            .map(|r| r.agentSocketPath)
    }
    pub async fn start(&self, id: &str) -> ttrpc::Result<()> {
        let req = hypervisor::StartVMRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        self.hv.start_vm(ctx(120), &req).await.map(drop)
    }
    /// StopVM with the Rust shim's fixed 1 s deadline.
    pub async fn stop(&self, id: &str) -> ttrpc::Result<()> {
        let req = hypervisor::StopVMRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        self.hv.stop_vm(ctx(1), &req).await.map(drop)
    }
    pub async fn info(&self, pod: &str, ns: &str, wait: bool, secs: u64) -> ttrpc::Result<String> {
        let req = podvminfo::GetInfoRequest {
            PodName: pod.into(),
            PodNamespace: ns.into(),
            Wait: wait,
            ..Default::default()
        };
        self.info.get_info(ctx(secs), &req).await.map(|r| r.VMID)
    }
}

/// Runs Prometheus' own linter, `promtool check metrics`, on a scrape;
/// returns its complaints, if any. Fails when promtool is not installed
/// (`apt-get install prometheus`; `./scripts/test.sh` does).
pub fn promtool_check_metrics(text: &str) -> Result<(), String> {
    use std::io::Write;
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {promtool} ({e}): install the Debian package `prometheus`")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The status code and message of a ttrpc error.
pub fn rpc_error(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("not an RPC status: {other:?}"),
    }
}

/// What the local provider stores of an instance (its `instance.json`:
/// pid, ip, port, tags, ...), `None` when it has no readable one.
pub fn instance_json(local_dir: &Path, instance_id: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(
        local_dir
            .join("instances")
            .join(instance_id)
            .join("instance.json"),
    )
    .ok()?;
    serde_json::from_str(&text).ok()
}

/// The forwarder process of a local instance, from its instance.json.
pub fn instance_pid(local_dir: &Path, instance_id: &str) -> Option<u32> {
    instance_json(local_dir, instance_id)?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// True if the process runs (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// Kills every forwarder a test left under its local dir.
pub fn kill_instances(local_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(local_dir.join("instances")) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = instance_pid(local_dir, &id) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).any(|a| a == id.as_bytes()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        kill_instances(&self.local_dir());
    }
}

/// A new CA, and a certificate from it for `name` (a DNS name or an IP
/// address) with `usage`: (CA PEM, certificate PEM, key PEM).
pub fn identity_from_new_ca(
    name: &str,
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    leaf.extended_key_usages = vec![usage];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// How the disk under the journal is damaged.
#[derive(Debug, Clone, Copy)]
pub enum Damage {
    /// 64 random bytes of `journal/db` flipped (seeded, printed).
    FlipBytes(u64),
    /// `journal/db` cut to half its length.
    Truncate,
    /// `journal/db` deleted.
    DeleteDb,
}

pub fn damage(state_dir: &Path, how: Damage) {
    let db = state_dir.join("journal/db");
    match how {
        Damage::FlipBytes(seed) => {
            let mut bytes = std::fs::read(&db).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..64 {
                let at = rng.usize(..bytes.len());
                bytes[at] ^= rng.u8(1..);
            }
            std::fs::write(&db, bytes).unwrap();
        }
        Damage::Truncate => {
            let len = std::fs::metadata(&db).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.set_len(len / 2).unwrap();
        }
        Damage::DeleteDb => std::fs::remove_file(&db).unwrap(),
    }
}

/// GC settings that delete any orphan within about two seconds: a test that
/// must prove nothing is deleted gives the GC every chance.
pub fn eager_gc(setup: &mut Setup) {
    setup.global.extend(
        ["--gc-interval", "1s", "--gc-grace-period", "1s"]
            .map(String::from)
            .to_vec(),
    );
}

/// A group the node has besides root's (and an unprivileged test user's),
/// so that a socket's group shows whether it was set.
pub fn another_group() -> nix::unistd::Group {
    nix::unistd::Group::from_name("daemon")
        .ok()
        .flatten()
        .or_else(|| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(1))
                .ok()
                .flatten()
        })
        .expect("a group besides root's")
}

/// Starts `n` Running sandboxes of pods `shop/web-<i>`; their (sandbox id,
/// instance id) pairs.
pub async fn run_pods(daemon: &Daemon, n: usize) -> Vec<(String, String)> {
    let client = daemon.client().await;
    let mut started = Vec::new();
    for i in 0..n {
        let id = sandbox_id();
        client
            .create(&id, pod_annotations(&format!("web-{i}"), "shop"))
            .await
            .unwrap();
        client
            .start(&id)
            .await
            .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
        let view = daemon.instance(&id).await.unwrap();
        started.push((id, view["instance_id"].as_str().unwrap().to_owned()));
    }
    started
}

/// The p50, p99 and maximum of `samples`, in milliseconds (sorts them).
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    (at(0.50), at(0.99), at(1.0))
}
