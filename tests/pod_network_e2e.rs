//! The pod network end to end, with real packets: the daemon (a child
//! process on the local provider with `--netns-per-vm`) joins a peer pod's
//! network namespace to its pod VM's pod namespace by a VXLAN tunnel, and
//! a client pod on the same node reaches the pod VM at the pod's IP.
//!
//! Each test builds its own network namespaces (unique names, deleted by a
//! guard even when it fails), never touching the machine's:
//!
//! ```text
//!  client pod ns                 worker ns (the daemon runs here)
//!  eth0 10.244.7.6 ── vethclient ┐
//!                                cni0 10.244.7.1/24
//!  peer pod ns                   │
//!  eth0 10.244.7.5 ── vethpeer ──┘   <cloud bridge> 192.168.60.1/24 ── pv… ══ pod VM ns
//!  vxlan1 (+ tc redirects,           (made by the daemon; the tunnel's       eth0 192.168.60.N
//!  made by StartVM)                   host interface)                        forwarder; its pod
//!                                                                            namespace (podns) holds
//!                                                                            10.244.7.5 on a VXLAN
//! ```
//!
//! The daemon's admin endpoint listens on the worker namespace's loopback;
//! the harness reaches it from there (`Setup::netns`). Nothing connects
//! outside 127.0.0.0/8 except inside namespaces the test made.
//!
//! Needs root (namespaces, iptables): under `CI=true` a test that cannot
//! make namespaces fails with the reason; elsewhere it says why and passes.

mod common;
#[path = "common/netns.rs"]
mod netns;

use common::*;
use netns::*;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 5);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 6);
const POD2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 7);
const CLOUD_SUBNET: &str = "192.168.60.0/24";
/// The cloud bridge's address, with its prefix: the worker's end of every
/// tunnel.
const CLOUD_GATEWAY: &str = "192.168.60.1/24";
/// The first VNI (`--vxlan-min-id`'s default).
const FIRST_VNI: u64 = 555_000;
/// How long teardown may take after StopVM answers (it may answer before
/// the pod VM is gone: the shim's StopVM deadline is 1 s).
const CLEAN_WITHIN: Duration = Duration::from_secs(30);

/// A pod on the worker's `cni0`: its namespace's name and IP.
#[derive(Debug, Clone)]
struct Pod {
    netns: String,
    ip: Ipv4Addr,
}

impl Pod {
    fn path(&self) -> PathBuf {
        netns_path(&self.netns)
    }
}

/// The worker namespace with its `cni0` and the pods on it, and the daemon
/// (once started) running in it. Dropping it stops the daemon, kills the
/// pod VMs' forwarders, detaches their pod namespaces' mounts and deletes
/// the namespaces, in that order.
struct World {
    daemon: Option<Daemon>,
    setup: Setup,
    /// The `--cloud-bridge`, unique per test.
    cloud_bridge: String,
    worker: String,
    client: Pod,
    namespaces: Namespaces,
}

impl World {
    /// The worker with `cni0` (10.244.7.1/24) and a client pod; the daemon
    /// is configured (not started) to run in the worker namespace.
    fn new() -> Self {
        let mut namespaces = Namespaces::default();
        let worker = namespaces.add("worker");
        ip(&["-n", &worker, "link", "add", "cni0", "type", "bridge"]);
        ip(&[
            "-n",
            &worker,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            "cni0",
        ]);
        ip(&["-n", &worker, "link", "set", "cni0", "up"]);
        let cloud_bridge = format!("pvc{:x}", fastrand::u32(..));
        let mut setup = Setup::new();
        setup.netns = Some(worker.clone());
        let agent = setup.root.path().join("agent.sock");
        setup.global.extend([
            // The tunnels' host interface is the cloud bridge: the worker
            // IP the pod VMs send to is its address.
            "--host-interface".to_owned(),
            cloud_bridge.clone(),
        ]);
        setup.local.extend([
            "--netns-per-vm".to_owned(),
            "--cloud-bridge".to_owned(),
            cloud_bridge.clone(),
            "--cloud-subnet".to_owned(),
            CLOUD_SUBNET.to_owned(),
            // No pod here runs containers: the forwarders never dial it,
            // but they must not point at the machine's own agent either.
            "--agent-socket".to_owned(),
            agent.to_string_lossy().into_owned(),
        ]);
        let mut world = Self {
            daemon: None,
            setup,
            cloud_bridge,
            worker,
            client: Pod {
                netns: String::new(),
                ip: CLIENT_IP,
            },
            namespaces,
        };
        world.client = world.add_pod("client", CLIENT_IP);
        world
    }

    /// A pod namespace plugged into `cni0` by a veth, with `ip`/24 on its
    /// `eth0` and a default route via the bridge.
    fn add_pod(&mut self, role: &str, address: Ipv4Addr) -> Pod {
        let netns = self.namespaces.add(role);
        let veth = format!("veth{}", address.octets()[3]);
        let worker = self.worker.as_str();
        ip(&[
            "-n", worker, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ]);
        ip(&["-n", worker, "link", "set", &veth, "master", "cni0", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
            "dev",
            "eth0",
        ]);
        Pod { netns, ip: address }
    }

    /// Starts the daemon in the worker namespace and waits until it is
    /// ready.
    async fn start_daemon(&mut self) {
        self.daemon = Some(self.setup.start().await);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon was started")
    }

    /// The local provider's instances (their directories' names).
    fn instances(&self) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(self.setup.local_dir().join("instances"))
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    }

    /// The daemon's log and every forwarder's, for failure messages.
    fn logs(&self) -> String {
        let mut text = self
            .daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.setup.local_dir().join("instances")) {
            for entry in entries.flatten() {
                let log =
                    std::fs::read_to_string(entry.path().join("forwarder.log")).unwrap_or_default();
                text.push_str(&format!(
                    "\n--- forwarder of {} ---\n{log}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        text
    }

    /// CreateVM for `pod` (its namespace as `networkNamespacePath`), then
    /// StartVM; returns the sandbox id and the StartVM outcome.
    async fn create_and_start(&self, name: &str, netns: &Path) -> (String, ttrpc::Result<()>) {
        let client = self.daemon().client().await;
        let id = sandbox_id();
        let req = podvisor::protocols::ttrpc::hypervisor::CreateVMRequest {
            id: id.clone(),
            annotations: pod_annotations(name, "net"),
            networkNamespacePath: netns.to_string_lossy().into_owned(),
            ..Default::default()
        };
        client
            .hv
            .create_vm(ctx(10), &req)
            .await
            .unwrap_or_else(|e| panic!("CreateVM: {e:?}\n{}", self.logs()));
        let started = client.start(&id).await;
        (id, started)
    }

    /// [`World::run_sandbox`] with an owned name (for many at once).
    async fn run_sandbox_named(&self, name: String, pod: &Pod) -> Sandbox {
        self.run_sandbox(&name, pod).await
    }

    /// A Running sandbox for `pod`: its id, pod VM and VNI.
    async fn run_sandbox(&self, name: &str, pod: &Pod) -> Sandbox {
        let (id, started) = self.create_and_start(name, &pod.path()).await;
        if let Err(e) = started {
            panic!("StartVM: {e:?}\n{}", self.logs());
        }
        let view = self
            .daemon()
            .instance(&id)
            .await
            .expect("a started sandbox is listed");
        assert_eq!(view["state"], "running", "{view}");
        // `instance_id` in the view; `instance.id` if it nests the record.
        let instance = view["instance_id"]
            .as_str()
            .or_else(|| view["instance"]["id"].as_str())
            .unwrap_or_else(|| panic!("no instance id in {view}"))
            .to_owned();
        let vni = view["vni"]
            .as_u64()
            .unwrap_or_else(|| panic!("no VNI in {view}"));
        let podns = self
            .setup
            .local_dir()
            .join("instances")
            .join(&instance)
            .join("podns");
        Sandbox {
            id,
            instance,
            vni,
            podns,
            pod: pod.clone(),
        }
    }

    /// StopVM of `sandbox`; the shim's 1 s deadline may pass while the pod
    /// VM is still being deleted, so only a refusal other than that fails.
    async fn stop(&self, sandbox: &Sandbox) {
        let client = self.daemon().client().await;
        if let Err(e) = client.stop(&sandbox.id).await {
            let text = format!("{e:?}");
            let lower = text.to_lowercase();
            assert!(
                lower.contains("deadline") || lower.contains("timeout"),
                "StopVM of {}: {text}\n{}",
                sandbox.id,
                self.logs()
            );
        }
    }

    /// The worker namespace's raw table, as `iptables-save` prints it.
    fn raw_table(&self) -> String {
        run(
            "ip",
            &["netns", "exec", &self.worker, "iptables-save", "-t", "raw"],
        )
    }

    /// Why the tunnel state of `sandboxes` is not all gone; `None` when
    /// nothing of theirs is left: no VXLAN device, ingress qdisc or tc
    /// filter in their pods, no NOTRACK rule of their VNIs in the worker.
    /// With `everything`, the worker must also hold no `peerpod` chain or
    /// rule and no VXLAN device at all (no sandbox runs).
    fn leftovers(&self, sandboxes: &[&Sandbox], everything: bool) -> Option<String> {
        let mut left = Vec::new();
        let raw = self.raw_table();
        if everything && raw.contains("peerpod") {
            left.push(format!("NOTRACK state in the worker:\n{raw}"));
        }
        for sandbox in sandboxes {
            // The rules' comment, as `notrack` writes it.
            let tag = format!("[vni:{}]", sandbox.vni);
            if raw.contains(&tag) {
                left.push(format!("NOTRACK rules of {tag} in the worker:\n{raw}"));
            }
        }
        let links = ip(&["-n", &self.worker, "-o", "link", "show"]);
        if everything && links.contains("vxlan") {
            left.push(format!("a VXLAN device in the worker:\n{links}"));
        }
        for pod in sandboxes.iter().map(|s| &s.pod) {
            let links = ip(&["-n", &pod.netns, "-o", "link", "show"]);
            if links.contains("vxlan") {
                left.push(format!("a VXLAN device in {}:\n{links}", pod.netns));
            }
            let qdiscs = run("tc", &["-n", &pod.netns, "qdisc", "show", "dev", "eth0"]);
            if qdiscs.contains("ingress") {
                left.push(format!("an ingress qdisc in {}:\n{qdiscs}", pod.netns));
            }
            let filters = run(
                "tc",
                &["-n", &pod.netns, "filter", "show", "dev", "eth0", "ingress"],
            );
            if !filters.trim().is_empty() {
                left.push(format!("a tc filter in {}:\n{filters}", pod.netns));
            }
        }
        (!left.is_empty()).then(|| left.join("\n"))
    }

    /// Why `sandbox`'s pod VM is not all gone: its forwarder, its veth on
    /// the cloud bridge, its pod namespace's mount.
    fn pod_vm_leftovers(&self, sandbox: &Sandbox) -> Option<String> {
        let mut left = Vec::new();
        if let Some(pid) = instance_pid(&self.setup.local_dir(), &sandbox.instance)
            && alive(pid)
        {
            left.push(format!("the forwarder {pid} of {} runs", sandbox.instance));
        }
        let ports = ip(&[
            "-n",
            &self.worker,
            "-o",
            "link",
            "show",
            "master",
            &self.cloud_bridge,
        ]);
        let veth: String = sandbox
            .instance
            .trim_start_matches("lvm-")
            .chars()
            .take(12)
            .collect();
        if ports.contains(&format!("pv{veth}")) {
            left.push(format!("its veth on {}:\n{ports}", self.cloud_bridge));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mounts.contains(&sandbox.podns.to_string_lossy().into_owned()) {
            left.push(format!("{} is still mounted", sandbox.podns.display()));
        }
        (!left.is_empty()).then(|| left.join("\n"))
    }

    /// Waits until nothing of the stopped `sandboxes` is left (their
    /// tunnels, their pod VMs), and with `everything` nothing of any
    /// tunnel in the worker; panics with what is left.
    async fn assert_gone(&self, sandboxes: &[&Sandbox], everything: bool) {
        let deadline = Instant::now() + CLEAN_WITHIN;
        loop {
            let left: Vec<String> = self
                .leftovers(sandboxes, everything)
                .into_iter()
                .chain(sandboxes.iter().filter_map(|s| self.pod_vm_leftovers(s)))
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left {CLEAN_WITHIN:?} after StopVM:\n{}\n{}",
                left.join("\n"),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`World::assert_gone`] once no sandbox runs: nothing of any tunnel
    /// anywhere.
    async fn assert_clean(&self, sandboxes: &[&Sandbox]) {
        self.assert_gone(sandboxes, true).await;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.daemon.take());
        let local = self.setup.local_dir();
        kill_instances(&local);
        // A forwarder killed before it removed its pod namespace leaves the
        // bind mount: detached here, or the namespace (and the temporary
        // directory) would outlive the test.
        if let Ok(entries) = std::fs::read_dir(local.join("instances")) {
            for entry in entries.flatten() {
                let podns = entry.path().join("podns");
                if podns.exists() {
                    let _ = Command::new("umount").arg("-l").arg(&podns).output();
                }
            }
        }
    }
}

/// A Running sandbox.
#[derive(Debug)]
struct Sandbox {
    id: String,
    instance: String,
    vni: u64,
    /// The pod VM's pod namespace (the forwarder's bind mount).
    podns: PathBuf,
    /// The peer pod it stands for.
    pod: Pod,
}

/// Runs `work` on a blocking thread (sockets, namespaces), so the test's
/// runtime keeps serving.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("the blocking work panicked")
}

/// Sends `bytes` from `client` to a server in `server` on `address` (see
/// [`transfer`]); asserts they arrived intact from that client; returns
/// the time taken.
fn transfer_checked(server: &Path, client: &Path, address: SocketAddr, bytes: usize) -> Duration {
    let sent = transfer(server, client, address, bytes);
    assert!(sent.intact, "{bytes} bytes to {address} arrived damaged");
    assert_eq!(sent.peer_seen, sent.local, "the server saw another client");
    sent.elapsed
}

/// A TCP stream from the namespace at `client` to a server in `server`,
/// sent in 64 KiB chunks every 10 ms until [`PacedTransfer::finish`], so it
/// can span a daemon's death and restart.
struct PacedTransfer {
    stop: Arc<AtomicBool>,
    /// Bytes written so far.
    sent: Arc<AtomicU64>,
    sender: std::thread::JoinHandle<([u8; 32], [u8; 32], u64)>,
}

impl PacedTransfer {
    fn start(server: &Path, client: &Path, address: SocketAddr) -> Self {
        let receiver = serve_digest(listen(server, address));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut stream = connect(client, address);
        let (stop_flag, sent_count) = (stop.clone(), sent.clone());
        let sender = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(0x5eed);
            let mut hasher = Sha256::new();
            let mut chunk = vec![0u8; 1 << 16];
            while !stop_flag.load(Ordering::SeqCst) {
                rng.fill(&mut chunk);
                stream.write_all(&chunk).expect("send a chunk");
                hasher.update(&chunk);
                sent_count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
            stream.shutdown(Shutdown::Write).expect("shutdown");
            let mut digest = [0u8; 32];
            stream.read_exact(&mut digest).expect("the server's digest");
            receiver.join().expect("receiver");
            let expected: [u8; 32] = hasher.finalize().into();
            (expected, digest, sent_count.load(Ordering::SeqCst))
        });
        Self { stop, sent, sender }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Ends the stream; asserts every byte arrived intact; returns how
    /// many.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let sender = self.sender;
        let (expected, received, bytes) = blocking(move || sender.join().expect("sender")).await;
        assert_eq!(
            received, expected,
            "the {bytes} bytes of the stream arrived damaged"
        );
        bytes
    }
}

/// Asserts that the pod VM of `sandbox` holds its pod's IP: TCP from the
/// client pod reaches a server in the pod VM's pod namespace, and pings go
/// both ways, answered by the pod VM (not by the peer pod's own
/// namespace, which still holds the IP).
async fn assert_reachable(world: &World, sandbox: &Sandbox, port: u16, bytes: usize) -> Duration {
    let podns = sandbox.podns.clone();
    let client = world.client.path();
    let peer = sandbox.pod.path();
    let pod_ip = sandbox.pod.ip;
    let client_ip = world.client.ip;
    assert!(
        podns.exists(),
        "no pod namespace at {}\n{}",
        podns.display(),
        world.logs()
    );
    blocking(move || {
        let (vm_before, peer_before) = (echo_replies_sent(&podns), echo_replies_sent(&peer));
        ping(&client, pod_ip, 3);
        assert!(
            echo_replies_sent(&podns) >= vm_before + 3,
            "the pod VM's pod namespace did not answer the pings"
        );
        assert_eq!(
            echo_replies_sent(&peer),
            peer_before,
            "the peer pod's own namespace answered: the tunnel was bypassed"
        );
        ping(&podns, client_ip, 3);
        transfer_checked(&podns, &client, SocketAddr::from((pod_ip, port)), bytes)
    })
    .await
}

/// The tests' shape: skip (or fail under CI) without namespaces.
macro_rules! network_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if !namespaces_available() {
                return;
            }
            $body.await;
        }
    };
}

network_test!(
    a_client_pod_reaches_the_pod_vm_at_the_pod_ip_and_stop_leaves_nothing,
    async {
        let mut world = World::new();
        let peer = world.add_pod("peer", POD_IP);
        world.start_daemon().await;
        let started = Instant::now();
        let sandbox = world.run_sandbox("web", &peer).await;
        eprintln!("CreateVM + StartVM: {:?}", started.elapsed());
        assert_eq!(sandbox.vni, FIRST_VNI, "the first sandbox's VNI");

        let elapsed = assert_reachable(&world, &sandbox, 7001, 16 << 20).await;
        eprintln!("16 MiB through the tunnel: {elapsed:?}");
        // The admin endpoint shows the tunnel up, and the gauge counts it.
        let view = world.daemon().instance(&sandbox.id).await.expect("listed");
        assert_eq!(view["tunnel"]["state"], "up", "{view}");
        assert_eq!(world.daemon().metric("podvisor_tunnels_up", &[]).await, 1.0);
        // The worker's side as StartVM left it: vxlan1 in the peer pod, a
        // NOTRACK rule for the VNI in the worker.
        let links = ip(&["-n", &peer.netns, "-o", "link", "show"]);
        assert!(
            links.contains("vxlan1"),
            "no vxlan1 in the peer pod:\n{links}"
        );
        let raw = world.raw_table();
        assert!(
            raw.contains(&format!("[vni:{FIRST_VNI}]")),
            "no NOTRACK rule of the VNI:\n{raw}"
        );
        // What the pod VM was told (apf.json's `pod-network`): the peer
        // pod's address and MAC, the VNI, the worker's end on the cloud
        // bridge.
        let apf = world
            .setup
            .local_dir()
            .join("instances")
            .join(&sandbox.instance)
            .join("run/peerpod/apf.json");
        let apf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&apf).expect("the pod VM's apf.json"))
                .expect("apf.json is JSON");
        let network = &apf["pod-network"];
        let mac = ip(&["-n", &peer.netns, "-o", "link", "show", "dev", "eth0"]);
        assert!(
            network["pod-hw-addr"]
                .as_str()
                .is_some_and(|m| mac.contains(&format!("link/ether {m} "))),
            "{network} against {mac}"
        );
        assert_eq!(network["podip"], format!("{POD_IP}/24"), "{network}");
        assert_eq!(network["vxlan-id"], FIRST_VNI, "{network}");
        assert_eq!(network["vxlan-port"], 4789, "{network}");
        assert_eq!(network["worker-node-ip"], CLOUD_GATEWAY, "{network}");

        world.stop(&sandbox).await;
        world.assert_clean(&[&sandbox]).await;
        // The record's end (and its second teardown) follows StopVM's reply.
        let daemon = world.daemon();
        eventually(
            "the sandbox's record to go",
            Duration::from_secs(30),
            async || daemon.instance(&sandbox.id).await.is_none().then_some(()),
        )
        .await;
        assert_eq!(world.daemon().metric("podvisor_tunnels_up", &[]).await, 0.0);
        assert_eq!(
            world
                .daemon()
                .metric(
                    "podvisor_tunnel_operations_total",
                    &[("op", "teardown"), ("outcome", "ok")]
                )
                .await,
            // StopVM's, before the cloud delete, and the record's end's.
            2.0
        );
    }
);

network_test!(two_sandboxes_get_distinct_vnis_and_both_answer, async {
    let mut world = World::new();
    let first = world.add_pod("peer", POD_IP);
    let second = world.add_pod("peer2", POD2_IP);
    world.start_daemon().await;
    let a = world.run_sandbox("web-a", &first).await;
    let b = world.run_sandbox("web-b", &second).await;
    assert_eq!(
        (a.vni, b.vni),
        (FIRST_VNI, FIRST_VNI + 1),
        "VNIs in order of creation"
    );
    assert_reachable(&world, &a, 7002, 1 << 20).await;
    assert_reachable(&world, &b, 7003, 1 << 20).await;

    // Stopping one leaves the other working.
    world.stop(&a).await;
    world.assert_gone(&[&a], false).await;
    assert_reachable(&world, &b, 7004, 1 << 20).await;
    world.stop(&b).await;
    world.assert_clean(&[&a, &b]).await;
});

network_test!(
    a_pod_netns_that_does_not_exist_fails_start_vm_and_leaves_nothing,
    async {
        let mut world = World::new();
        world.start_daemon().await;
        let missing = netns_path(&format!("pve{}-{}-missing", std::process::id(), unique()));
        let (id, started) = world.create_and_start("ghost", &missing).await;
        let (code, message) = rpc_error(started.expect_err("StartVM with a missing netns"));
        assert!(
            message.contains(&missing.to_string_lossy().into_owned()),
            "the error does not name {} ({code:?}): {message}\n{}",
            missing.display(),
            world.logs()
        );
        // No pod VM was made for it, no rule added.
        let instances = world.instances();
        assert!(
            instances.is_empty(),
            "instances made for a sandbox that failed: {instances:?}\n{}",
            world.logs()
        );
        world.assert_clean(&[]).await;
        // Kata stops a sandbox whose start failed: that must succeed.
        let client = world.daemon().client().await;
        let _ = client.stop(&id).await;
        world.assert_clean(&[]).await;
    }
);

network_test!(
    a_sandbox_keeps_its_tunnel_and_vni_across_a_daemon_kill,
    async {
        let mut world = World::new();
        let first = world.add_pod("peer", POD_IP);
        let second = world.add_pod("peer2", POD2_IP);
        world.start_daemon().await;
        let a = world.run_sandbox("web-a", &first).await;
        assert_reachable(&world, &a, 7005, 1 << 20).await;

        // A stream from the client pod to the pod VM runs through the kill
        // and the restart.
        let (podns, client) = (a.podns.clone(), world.client.path());
        let address = SocketAddr::from((a.pod.ip, 7009));
        let stream = blocking(move || PacedTransfer::start(&podns, &client, address)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        world
            .daemon
            .as_mut()
            .expect("the daemon was started")
            .kill9();
        let at_kill = stream.sent();
        // The tunnel is kernel state: the pod answers while no daemon runs.
        assert_reachable(&world, &a, 7008, 1 << 20).await;
        world.start_daemon().await;
        let view = world
            .daemon()
            .instance(&a.id)
            .await
            .expect("the sandbox survives the restart");
        assert_eq!(view["vni"].as_u64(), Some(a.vni), "{view}");
        // Recovery finds the tunnel in place and says so.
        let daemon = world.daemon();
        eventually(
            "the restarted daemon to find the tunnel up",
            Duration::from_secs(30),
            async || {
                let view = daemon.instance(&a.id).await?;
                (view["tunnel"]["state"] == "up").then_some(())
            },
        )
        .await;
        let at_restart = stream.sent();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bytes = stream.finish().await;
        assert!(
            at_kill > 0 && at_restart > at_kill && bytes > at_restart,
            "the stream did not span the kill and the restart: {at_kill} bytes at the kill, {at_restart} at the restart, {bytes} in all"
        );
        eprintln!(
            "one TCP stream through kill -9 and restart: {bytes} bytes intact ({at_kill} before the kill)"
        );
        assert_reachable(&world, &a, 7006, 1 << 20).await;

        let b = world.run_sandbox("web-b", &second).await;
        assert_ne!(b.vni, a.vni, "a VNI handed out twice");
        assert_reachable(&world, &b, 7007, 1 << 20).await;

        world.stop(&a).await;
        world.stop(&b).await;
        world.assert_clean(&[&a, &b]).await;
    }
);

network_test!(
    thirty_sandboxes_at_once_get_thirty_vnis_all_answer_and_all_go,
    async {
        const N: u8 = 30;
        let mut world = World::new();
        // The default limit is 10 pod VMs per node.
        world
            .setup
            .global
            .extend(["--peerpods-limit-per-node".to_owned(), "0".to_owned()]);
        let pods: Vec<Pod> = (0..N)
            .map(|i| world.add_pod(&format!("p{i}"), Ipv4Addr::new(10, 244, 7, 100 + i)))
            .collect();
        world.start_daemon().await;
        let started = Instant::now();
        let sandboxes: Vec<Sandbox> = futures_util::future::join_all(
            pods.iter()
                .enumerate()
                .map(|(i, pod)| world.run_sandbox_named(format!("web-{i}"), pod)),
        )
        .await;
        eprintln!(
            "{N} sandboxes CreateVM + StartVM at once: {:?}",
            started.elapsed()
        );
        let vnis: std::collections::BTreeSet<u64> = sandboxes.iter().map(|s| s.vni).collect();
        let expected: std::collections::BTreeSet<u64> =
            (FIRST_VNI..FIRST_VNI + u64::from(N)).collect();
        assert_eq!(vnis, expected, "{N} distinct VNIs, the lowest free each");
        // Every pod VM answers at its pod's IP, from its own pod namespace.
        for sandbox in &sandboxes {
            let podns = sandbox.podns.clone();
            let client = world.client.path();
            let pod_ip = sandbox.pod.ip;
            let before = echo_replies_sent(&podns);
            blocking(move || ping(&client, pod_ip, 1)).await;
            assert!(
                echo_replies_sent(&sandbox.podns) > before,
                "{} (VNI {}) did not answer\n{}",
                sandbox.pod.ip,
                sandbox.vni,
                world.logs()
            );
        }
        futures_util::future::join_all(sandboxes.iter().map(|s| world.stop(s))).await;
        let all: Vec<&Sandbox> = sandboxes.iter().collect();
        world.assert_clean(&all).await;
    }
);

/// A pod whose network the tunnel cannot serve gets a clear StartVM error
/// naming the cause, no pod VM, nothing left behind, and a StopVM that
/// succeeds (Kata stops a sandbox whose start failed).
async fn start_vm_refuses(break_pod: impl FnOnce(&Pod), expected: &[&str], cause: &str) {
    let mut world = World::new();
    let peer = world.add_pod("peer", POD_IP);
    break_pod(&peer);
    world.start_daemon().await;
    let (id, started) = world.create_and_start("bad", &peer.path()).await;
    let (code, message) = rpc_error(started.expect_err("StartVM of a pod the tunnel cannot serve"));
    for part in expected {
        assert!(
            message.contains(part),
            "the error does not say {part:?} ({code:?}): {message}\n{}",
            world.logs()
        );
    }
    let instances = world.instances();
    assert!(
        instances.is_empty(),
        "a pod VM was made for a pod it cannot serve: {instances:?}\n{}",
        world.logs()
    );
    assert_eq!(
        world
            .daemon()
            .metric(
                "podvisor_tunnel_failures_total",
                &[("op", "describe"), ("cause", cause)]
            )
            .await,
        1.0,
        "counted by its cause"
    );
    let view = world
        .daemon()
        .instance(&id)
        .await
        .expect("the failed sandbox is listed");
    assert_eq!(view["tunnel"]["state"], "failed", "{view}");
    assert!(
        view["tunnel"]["error"]
            .as_str()
            .is_some_and(|e| expected.iter().all(|part| e.contains(part))),
        "{view}"
    );
    let gone = Sandbox {
        id,
        instance: String::new(),
        vni: FIRST_VNI,
        podns: PathBuf::new(),
        pod: peer,
    };
    world.stop(&gone).await;
    let daemon = world.daemon();
    eventually(
        "the failed sandbox to go after StopVM",
        Duration::from_secs(30),
        async || daemon.instance(&gone.id).await.is_none().then_some(()),
    )
    .await;
    // No pod VM was made, so only the tunnel's traces could be left: no
    // device, qdisc or filter in the pod, no rule or device in the worker.
    if let Some(left) = world.leftovers(&[&gone], true) {
        panic!("left after a refused StartVM:\n{left}\n{}", world.logs());
    }
}

network_test!(
    a_pod_without_an_ipv4_address_fails_start_vm_and_leaves_nothing,
    async {
        start_vm_refuses(
            |pod| {
                ip(&["-n", &pod.netns, "addr", "flush", "dev", "eth0"]);
                // Still a primary interface: the default route goes out eth0.
                ip(&[
                    "-n", &pod.netns, "route", "replace", "default", "dev", "eth0",
                ]);
            },
            &["eth0", "has no IPv4 address"],
            "pod_interface",
        )
        .await;
    }
);

network_test!(
    a_pod_with_two_ipv4_addresses_fails_start_vm_and_leaves_nothing,
    async {
        start_vm_refuses(
            |pod| {
                ip(&[
                    "-n",
                    &pod.netns,
                    "addr",
                    "add",
                    "10.244.7.50/24",
                    "dev",
                    "eth0",
                ]);
            },
            &["eth0", "has 2 IPv4 addresses; a pod needs exactly one"],
            "pod_interface",
        )
        .await;
    }
);

network_test!(
    a_pod_mtu_below_the_vxlan_overhead_fails_start_vm_and_leaves_nothing,
    async {
        start_vm_refuses(
            |pod| {
                ip(&["-n", &pod.netns, "link", "set", "eth0", "mtu", "100"]);
            },
            &["eth0", "has MTU 100, below 118"],
            "mtu",
        )
        .await;
    }
);

/// The daemon dies between making the tunnel's VXLAN device in the node's
/// namespace and moving it into the pod's: after the restart the device
/// does not leak — the retried StartVM replaces it and the pod answers
/// with the same VNI; after StopVM nothing is left.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_vxlan_device_and_its_move_leaks_no_device() {
    if !namespaces_available() {
        return;
    }
    let mut world = World::new();
    let peer = world.add_pod("peer", POD_IP);
    world.setup.env.push((
        "FAILPOINTS".into(),
        format!(
            "{}=return",
            podvisor::failpoints::TUNNEL_CREATED_BEFORE_MOVE
        ),
    ));
    world.start_daemon().await;
    world.setup.env.clear();
    let (id, started) = world.create_and_start("cut", &peer.path()).await;
    assert!(started.is_err(), "the daemon died during StartVM");
    let status = world
        .daemon
        .as_mut()
        .expect("started")
        .exited_within(Duration::from_secs(30))
        .await;
    assert!(
        status.is_some(),
        "the daemon died at the crash point\n{}",
        world.logs()
    );
    // Where the crash point is: the device made, in the node's namespace.
    let host_device = format!("ppvxlan{FIRST_VNI}");
    let links = ip(&["-n", &world.worker, "-o", "link", "show"]);
    assert!(links.contains(&host_device), "{links}\n{}", world.logs());
    let pod_links = ip(&["-n", &peer.netns, "-o", "link", "show"]);
    assert!(!pod_links.contains("vxlan1"), "{pod_links}");

    world.start_daemon().await;
    let client = world.daemon().client().await;
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM after the crash: {e:?}\n{}", world.logs()));
    let view = world.daemon().instance(&id).await.expect("listed");
    assert_eq!(view["state"], "running", "{view}");
    assert_eq!(
        view["vni"].as_u64(),
        Some(FIRST_VNI),
        "the journaled VNI kept: {view}"
    );
    let links = ip(&["-n", &world.worker, "-o", "link", "show"]);
    assert!(
        !links.contains(&host_device),
        "the crash's device is left in the node's namespace:\n{links}"
    );
    let instance = view["instance_id"]
        .as_str()
        .expect("an instance")
        .to_owned();
    let sandbox = Sandbox {
        podns: world
            .setup
            .local_dir()
            .join("instances")
            .join(&instance)
            .join("podns"),
        id,
        instance,
        vni: FIRST_VNI,
        pod: peer,
    };
    assert_reachable(&world, &sandbox, 7010, 1 << 20).await;
    world.stop(&sandbox).await;
    world.assert_clean(&[&sandbox]).await;
}

network_test!(
    the_gc_removes_tunnel_rules_and_devices_no_record_owns_and_keeps_a_live_sandboxs,
    async {
        const LOST: u32 = 555_777;
        let mut world = World::new();
        world
            .setup
            .global
            .extend(["--gc-interval".to_owned(), "1s".to_owned()]);
        let peer = world.add_pod("peer", POD_IP);
        world.start_daemon().await;
        let live = world.run_sandbox("web", &peer).await;
        // What a record lost with its tunnel half-built leaves on the node
        // (made after the start: rules found at start-up are kept on
        // purpose, as a lost record may hold them).
        ip(&[
            "-n",
            &world.worker,
            "link",
            "add",
            &format!("ppvxlan{LOST}"),
            "type",
            "vxlan",
            "id",
            &LOST.to_string(),
            "dstport",
            "4789",
            "remote",
            "192.168.60.250",
        ]);
        let rules = format!(
            "*raw\n\
             -A peerpod-OUTPUT -d 192.168.60.250/32 -p udp -m comment --comment \"peerpod [vni:{LOST}]\" -m udp --dport 4789 -j NOTRACK\n\
             -A peerpod-PREROUTING -s 192.168.60.250/32 -p udp -m comment --comment \"peerpod [vni:{LOST}]\" -m udp --dport 4789 -j NOTRACK\n\
             COMMIT\n"
        );
        let mut restore = Command::new("ip")
            .args([
                "netns",
                "exec",
                &world.worker,
                "iptables-restore",
                "--noflush",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        {
            use std::io::Write;
            restore
                .stdin
                .take()
                .expect("stdin")
                .write_all(rules.as_bytes())
                .expect("write the rules");
        }
        assert!(restore.wait().expect("iptables-restore").success());
        assert!(world.raw_table().contains(&format!("[vni:{LOST}]")));

        let tag = format!("[vni:{LOST}]");
        let device = format!("ppvxlan{LOST}");
        eventually(
            "the GC to remove the lost tunnel's rules and device",
            Duration::from_secs(20),
            async || {
                let links = ip(&["-n", &world.worker, "-o", "link", "show"]);
                (!world.raw_table().contains(&tag) && !links.contains(&device)).then_some(())
            },
        )
        .await;
        // Each said, once its sweep has returned.
        eventually(
            "the GC to say what it removed",
            Duration::from_secs(10),
            async || {
                let log = world.daemon().log_text();
                (log.contains("removed a tunnel's NOTRACK rule no record owns")
                    && log.contains(
                        "removed a tunnel device left in the node's namespace that no record owns",
                    ))
                .then_some(())
            },
        )
        .await;
        // The live sandbox's tunnel is untouched and answers.
        assert!(
            world.raw_table().contains(&format!("[vni:{}]", live.vni)),
            "{}",
            world.raw_table()
        );
        assert_reachable(&world, &live, 7011, 1 << 20).await;
        world.stop(&live).await;
        world.assert_clean(&[&live]).await;
    }
);

network_test!(
    stop_vm_after_the_cni_removed_the_pods_namespace_succeeds_and_leaves_nothing,
    async {
        let mut world = World::new();
        let peer = world.add_pod("peer", POD_IP);
        world.start_daemon().await;
        let sandbox = world.run_sandbox("web", &peer).await;
        // The CNI's DEL came first: the pod's namespace, and the tunnel
        // device in it, are gone; the node's NOTRACK rules are not.
        world.namespaces.delete(&peer.netns);
        world.stop(&sandbox).await;
        let daemon = world.daemon();
        eventually(
            "the sandbox to be gone",
            Duration::from_secs(30),
            async || daemon.instance(&sandbox.id).await.is_none().then_some(()),
        )
        .await;
        let raw = world.raw_table();
        assert!(
            !raw.contains(&format!("[vni:{}]", sandbox.vni)),
            "the rules of a pod whose namespace went first are left:\n{raw}"
        );
        assert!(
            world.pod_vm_leftovers(&sandbox).is_none(),
            "{:?}",
            world.pod_vm_leftovers(&sandbox)
        );
        assert_eq!(
            world
                .daemon()
                .metric("podvisor_tunnel_failures_total", &[("op", "teardown")])
                .await,
            0.0,
            "a namespace already gone is no teardown failure\n{}",
            world.logs()
        );
    }
);
