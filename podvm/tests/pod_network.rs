//! The pod VM's end of the pod network, with real packets.
//!
//! Each test makes its own namespaces (unique names, removed by a guard
//! even when it fails): a "worker" and a "VM" joined by a veth (the cloud
//! network, 192.168.77.1/24 and .2/24). In the worker, the test builds the
//! worker's end with `ip`: a VXLAN device towards the VM with a client
//! address in the pod's subnet. The library (or the forwarder binary)
//! builds the pod namespace inside the VM namespace, as it would in a pod
//! VM. Nothing here leaves namespaces the test made.
//!
//! Needs root (network namespaces). Under `CI=true` a test that cannot make
//! namespaces fails with the reason; elsewhere it says why and passes.

use podvisor_podvm::network::config::{PodNetwork, from_apf_json};
use podvisor_podvm::network::netns::Netns;
use podvisor_podvm::network::podnode::PodNode;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const WORKER_IP: &str = "192.168.77.1";
const VM_IP: &str = "192.168.77.2";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const VNI: u32 = 555_001;
const PORT: u16 = 4789;
/// The MAC the worker end's VXLAN device has: the pod's gateway
/// neighbour points at it, so the pod's replies through its gateway
/// reach the worker.
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure (a test fixture).
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip ARGS`'s standard output.
fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this host lets the test make network namespaces; under
/// `CI=true` a refusal fails the test.
fn namespaces_available() -> bool {
    let probe = format!(
        "pvt{}probe{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("ip").args(["netns", "add", &probe]).output();
    let why = match out {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            let ipt = Command::new("iptables").arg("--version").output();
            match ipt {
                Ok(o) if o.status.success() => return true,
                _ => "iptables is not installed".to_owned(),
            }
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        Err(e) => format!("cannot run ip: {e}"),
    };
    let reason = format!("cannot make network namespaces (needs root, ip and iptables): {why}");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
    eprintln!("skipped: {reason}");
    false
}

/// A worker and a VM namespace joined by a veth, the worker's end of the
/// tunnel built, and the path the pod namespace will get. Dropping it
/// removes all three.
struct Lab {
    worker: String,
    vm: String,
    pod: String,
}

impl Lab {
    fn new() -> Self {
        let base = format!(
            "pvt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Self {
            worker: format!("{base}w"),
            vm: format!("{base}v"),
            pod: format!("{base}p"),
        };
        let (w, v) = (lab.worker.as_str(), lab.vm.as_str());
        ip(&["netns", "add", w]);
        ip(&["netns", "add", v]);
        ip(&["-n", w, "link", "set", "lo", "up"]);
        ip(&["-n", v, "link", "set", "lo", "up"]);
        ip(&[
            "-n", w, "link", "add", "cw", "type", "veth", "peer", "name", "cv", "netns", v,
        ]);
        ip(&[
            "-n",
            w,
            "addr",
            "add",
            &format!("{WORKER_IP}/24"),
            "dev",
            "cw",
        ]);
        ip(&["-n", v, "addr", "add", &format!("{VM_IP}/24"), "dev", "cv"]);
        ip(&["-n", w, "link", "set", "cw", "up"]);
        ip(&["-n", v, "link", "set", "cv", "up"]);
        let (vni, port) = (VNI.to_string(), PORT.to_string());
        ip(&[
            "-n",
            w,
            "link",
            "add",
            "vx",
            "address",
            GATEWAY_MAC,
            "type",
            "vxlan",
            "id",
            &vni,
            "remote",
            VM_IP,
            "dstport",
            &port,
            "dev",
            "cw",
        ]);
        ip(&[
            "-n",
            w,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "vx",
        ]);
        ip(&["-n", w, "link", "set", "vx", "up"]);
        lab
    }

    fn pod_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.pod)
    }

    fn netns(name: &str) -> Netns {
        Netns::open(Path::new("/run/netns").join(name)).unwrap()
    }

    /// The pod VM's end, built in the VM namespace.
    fn node(&self) -> PodNode {
        PodNode::with_vm_netns(Self::netns(&self.vm), self.pod_path())
    }

    /// Asserts nothing of a pod network is left: no pod namespace file, no
    /// device in the VM namespace but lo, the cloud link and `extra`, no
    /// iptables chain or rule of CAA's.
    fn assert_nothing_left(&self, extra: &[&str]) {
        let path = self.pod_path();
        assert!(!path.exists(), "{} is left", path.display());
        let links = ip_out(&["-n", &self.vm, "-o", "link", "show"]);
        let mut names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .collect();
        names.sort_unstable();
        let mut want = vec!["cv", "lo"];
        want.extend(extra);
        want.sort_unstable();
        assert_eq!(names, want, "devices in the VM namespace");
        let rules = self.vm_iptables();
        assert!(!rules.contains("peerpod"), "iptables rules left: {rules}");
    }

    fn vm_iptables(&self) -> String {
        ip_out(&[
            "netns", "exec", &self.vm, "iptables", "-w", "-t", "raw", "-S",
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let path = self.pod_path();
        if path.exists() {
            let _ = Command::new("umount").arg("-l").arg(&path).status();
            let _ = std::fs::remove_file(&path);
        }
        for ns in [&self.worker, &self.vm] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `pod-network` as CAA's worker writes it for a Flannel-like pod: a /24
/// address, the default route through the gateway listed before the
/// subnet route it needs.
fn flannel_like(mtu: u32) -> PodNetwork {
    let json = format!(
        r#"{{"pod-network": {{
        "podip": "{POD_IP}/24", "pod-hw-addr": "32:b9:59:6b:f0:d5", "interface": "eth0",
        "worker-node-ip": "{WORKER_IP}/24", "tunnel-type": "vxlan",
        "routes": [
            {{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot"}},
            {{"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"}}
        ],
        "neighbors": [{{"ip": "10.244.1.1", "hw-addr": "{GATEWAY_MAC}", "dev": "eth0", "state": "permanent"}}],
        "mtu": {mtu}, "index": 1, "vxlan-port": {PORT}, "vxlan-id": {VNI},
        "dedicated": false, "external-net-via-pod-vm": false}}}}"#
    );
    from_apf_json(&json).unwrap().unwrap()
}

/// Calico's pattern: a /32 address, a default route through 169.254.1.1,
/// reachable only through the gateway-less route listed after it.
fn calico_like(mtu: u32) -> PodNetwork {
    let mut pn = flannel_like(mtu);
    pn.pod_ip = Some(format!("{POD_IP}/32").parse().unwrap());
    let json = r#"[{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "dev": "eth0"},
            {"dst": "169.254.1.1/32", "gw": "", "dev": "eth0", "scope": "link"}]"#;
    pn.routes = serde_json::from_str(json).unwrap();
    pn.neighbors[0].ip = Some("169.254.1.1".parse().unwrap());
    pn
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends ICMP echo requests from `from` to `to` inside namespace `ns`
/// until one is answered (within 5 s).
fn ping(ns: &str, from: Ipv4Addr, to: Ipv4Addr) -> Result<Duration, String> {
    Lab::netns(ns)
        .run(move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
                .map_err(|e| format!("raw socket: {e}"))?;
            sock.bind(&SocketAddr::from((from, 0)).into())
                .map_err(|e| format!("bind {from}: {e}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            let id = (std::process::id() & 0xffff) as u16;
            let deadline = Instant::now() + Duration::from_secs(5);
            for seq in 0u16.. {
                if Instant::now() > deadline {
                    return Err(format!("no echo reply from {to} within 5 s"));
                }
                let mut req = vec![8, 0, 0, 0];
                req.extend(id.to_be_bytes());
                req.extend(seq.to_be_bytes());
                req.extend(b"podvisor pod network");
                let sum = checksum(&req);
                req[2..4].copy_from_slice(&sum.to_be_bytes());
                let sent = Instant::now();
                sock.send_to(&req, &SocketAddr::from((to, 0)).into())
                    .map_err(|e| format!("send to {to}: {e}"))?;
                let mut buf = [0u8; 1500];
                while sent.elapsed() < Duration::from_millis(500) {
                    let Ok(n) = (&sock).read(&mut buf) else { break };
                    let ihl = usize::from(buf[0] & 0x0f) * 4;
                    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                    let icmp = &buf[ihl..n];
                    if src == to
                        && icmp.len() >= 8
                        && icmp[0] == 0
                        && icmp[4..6] == id.to_be_bytes()
                    {
                        return Ok(sent.elapsed());
                    }
                }
            }
            Err("unreachable".into())
        })
        .map_err(|e| e.to_string())?
}

/// Ping from the worker's client address to the pod.
fn assert_pod_answers_ping(lab: &Lab) {
    if let Err(e) = ping(&lab.worker, CLIENT_IP, POD_IP) {
        let routes = ip_out(&["-n", &lab.pod, "route", "show"]);
        panic!("{e}; pod routes:\n{routes}");
    }
}

#[tokio::test]
async fn a_worker_reaches_the_pod_through_the_tunnel_ping_and_16_mib_of_tcp() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let node = lab.node();
    let pn = flannel_like(1500);
    node.setup(&pn).await.unwrap();

    assert_pod_answers_ping(&lab);

    // TCP: a server bound to the pod IP inside the pod namespace counts
    // and hashes what arrives; a worker client sends 16 MiB.
    let listener = Lab::netns(&lab.pod)
        .run(|| TcpListener::bind((POD_IP, 5000)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        conn.write_all(&hasher.finalize()).unwrap();
        conn.write_all(&total.to_be_bytes()).unwrap();
        peer
    });
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut client = Lab::netns(&lab.worker)
        .run(|| {
            TcpStream::connect_timeout(&SocketAddr::from((POD_IP, 5000)), Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client.write_all(&data).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = [0u8; 40];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(
        &answer[..32],
        Sha256::digest(&data).as_slice(),
        "the bytes arrived intact"
    );
    assert_eq!(
        u64::from_be_bytes(answer[32..].try_into().unwrap()),
        16 << 20
    );
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(CLIENT_IP));

    // As configured: MTU capped, MAC, routes (the kernel's subnet route
    // replaced by the configured one, without its source), the permanent
    // neighbour, lo up; the NOTRACK rules in the VM namespace.
    let link = ip_out(&["-n", &lab.pod, "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450 "), "{link}");
    assert!(link.contains("link/ether 32:b9:59:6b:f0:d5"), "{link}");
    let details = ip_out(&["-n", &lab.pod, "-d", "link", "show", "eth0"]);
    assert!(
        details.contains(&format!("vxlan id {VNI} remote {WORKER_IP} "))
            && details.contains(&format!("dstport {PORT} ")),
        "{details}"
    );
    let routes = ip_out(&["-n", &lab.pod, "route", "show"]);
    // `ip route` shows no `proto boot` (its default).
    assert!(
        routes
            .lines()
            .any(|l| l.trim() == "default via 10.244.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.trim() == "10.244.1.0/24 dev eth0 proto kernel scope link"),
        "{routes}"
    );
    let neigh = ip_out(&["-n", &lab.pod, "neigh", "show"]);
    assert!(
        neigh.contains(&format!(
            "10.244.1.1 dev eth0 lladdr {GATEWAY_MAC} PERMANENT"
        )),
        "{neigh}"
    );
    assert!(ip_out(&["-n", &lab.pod, "link", "show", "lo"]).contains(",UP"));
    let rules = lab.vm_iptables();
    assert!(rules.contains("-A OUTPUT -j peerpod-OUTPUT"), "{rules}");
    assert!(
        rules.contains(&format!(
            "-A peerpod-PREROUTING -s {WORKER_IP}/32 -p udp -m comment --comment \"peerpod [vni:{VNI}]\" -m udp --dport {PORT} -j NOTRACK"
        )),
        "{rules}"
    );

    node.teardown(&pn).await.unwrap();
    lab.assert_nothing_left(&[]);
    node.teardown(&pn).await.unwrap(); // idempotent
    lab.assert_nothing_left(&[]);
}

#[tokio::test]
async fn calicos_pattern_a_slash_32_pod_and_a_gateway_behind_a_link_route() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let node = lab.node();
    let pn = calico_like(1400);
    node.setup(&pn).await.unwrap();
    // The pod answers through its default route: the gateway neighbour's
    // MAC is the worker end's.
    assert_pod_answers_ping(&lab);
    let link = ip_out(&["-n", &lab.pod, "link", "show", "eth0"]);
    assert!(
        link.contains("mtu 1400 "),
        "the pod's MTU when under 1450: {link}"
    );
    let routes = ip_out(&["-n", &lab.pod, "route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.trim() == "169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    node.teardown(&pn).await.unwrap();
    lab.assert_nothing_left(&[]);
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_leaves_nothing() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let node = lab.node();
    type Change = fn(&mut PodNetwork);
    let cases: Vec<(Change, &str)> = vec![
        (|c| c.pod_ip = None, "pod-network podip is not set"),
        (|c| c.mtu = 40, "pod-network mtu is 40: below 68"),
        (
            |c| c.tunnel_type = "geneve".into(),
            "The tunnel type \"geneve\" is not known",
        ),
        (
            |c| c.external_net_via_pod_vm = true,
            "external-net-via-pod-vm is set",
        ),
        // Caught by the kernel, after the namespace and rules were made.
        (
            |c| c.routes[0].gw = Some("10.9.9.9".parse().unwrap()),
            "add routes[0] 0.0.0.0/0 via 10.9.9.9 dev eth0 in the pod namespace: Network is unreachable",
        ),
        (
            |c| c.neighbors[0].dev = "eth1".into(),
            "find the interface eth1",
        ),
    ];
    for (change, want) in cases {
        let mut pn = flannel_like(1500);
        change(&mut pn);
        let err = node.setup(&pn).await.unwrap_err().report();
        assert!(err.contains(want), "want {want:?} in {err:?}");
        lab.assert_nothing_left(&[]);
    }

    // A device with the VNI and port already in the VM namespace.
    let (vni, port) = (VNI.to_string(), PORT.to_string());
    ip(&[
        "-n", &lab.vm, "link", "add", "taken", "type", "vxlan", "id", &vni, "dstport", &port,
        "remote", WORKER_IP,
    ]);
    let err = node.setup(&flannel_like(1500)).await.unwrap_err().report();
    assert!(
        err.contains("create the VXLAN device") && err.contains("exists"),
        "{err}"
    );
    lab.assert_nothing_left(&["taken"]);
    ip(&["-n", &lab.vm, "link", "del", "taken"]);

    // Something already at the namespace's path is not ours to remove.
    std::fs::write(lab.pod_path(), b"").unwrap();
    let err = node.setup(&flannel_like(1500)).await.unwrap_err().report();
    assert!(
        err.contains("already exists and is not a network namespace"),
        "{err}"
    );
    assert!(lab.pod_path().exists());
    std::fs::remove_file(lab.pod_path()).unwrap();
    lab.assert_nothing_left(&[]);

    // And a good one still works afterwards.
    node.setup(&flannel_like(1500)).await.unwrap();
    assert_pod_answers_ping(&lab);
    node.teardown(&flannel_like(1500)).await.unwrap();
    lab.assert_nothing_left(&[]);
}

#[tokio::test]
async fn an_empty_namespace_made_beforehand_is_used_and_left_in_place() {
    if !namespaces_available() {
        return;
    }
    // As CAA's image does (netns@podns.service: `ip netns add podns`).
    let lab = Lab::new();
    ip(&["netns", "add", &lab.pod]);
    let node = lab.node();
    let pn = flannel_like(1500);
    node.setup(&pn).await.unwrap();
    assert_pod_answers_ping(&lab);
    node.teardown(&pn).await.unwrap();
    assert!(
        lab.pod_path().exists(),
        "a namespace made beforehand is left"
    );
    let links = ip_out(&["-n", &lab.pod, "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "only lo is left in it: {links}");
    ip(&["netns", "del", &lab.pod]);
    lab.assert_nothing_left(&[]);

    // One that holds an interface already is refused and left as it was.
    ip(&["netns", "add", &lab.pod]);
    ip(&[
        "-n", &lab.pod, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    let err = node.setup(&pn).await.unwrap_err().report();
    assert!(
        err.contains("already exists and holds 3 interfaces, not only lo"),
        "{err}"
    );
    assert!(ip_out(&["-n", &lab.pod, "link", "show", "d0"]).contains("d0"));
    ip(&["netns", "del", &lab.pod]);
    lab.assert_nothing_left(&[]);
}

/// A forwarder killed before its teardown (SIGKILL, an OOM kill) leaves
/// the pod namespace with the tunnel in it; the restarted forwarder's
/// setup replaces that device instead of refusing the namespace for good,
/// and the pod answers again. Anything else in the namespace is still
/// refused (`an_empty_namespace_made_beforehand_is_used_and_left_in_place`).
#[tokio::test]
async fn a_restarted_forwarder_replaces_the_tunnel_its_killed_predecessor_left() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let pn = flannel_like(1500);
    let killed = lab.node();
    killed.setup(&pn).await.unwrap();
    assert_pod_answers_ping(&lab);
    // Killed: no teardown runs.
    drop(killed);
    assert!(ip_out(&["-n", &lab.pod, "-o", "link", "show"]).contains("eth0"));

    let restarted = lab.node();
    restarted
        .setup(&pn)
        .await
        .unwrap_or_else(|e| panic!("setup over the leftovers: {}", e.report()));
    assert_pod_answers_ping(&lab);
    let links = ip_out(&["-n", &lab.pod, "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 2, "lo and one eth0: {links}");
    let rules = lab.vm_iptables();
    assert_eq!(
        rules.matches("-j NOTRACK").count(),
        2,
        "the NOTRACK rules not doubled: {rules}"
    );
    restarted.teardown(&pn).await.unwrap();

    // Killed between making the device in the VM's namespace and moving
    // it: it is left there under its transient name, holding the VNI's
    // port; the next forwarder replaces it too.
    let (vni, port) = (VNI.to_string(), PORT.to_string());
    ip(&[
        "-n",
        &lab.vm,
        "link",
        "add",
        &format!("pvx{VNI}"),
        "type",
        "vxlan",
        "id",
        &vni,
        "dstport",
        &port,
        "remote",
        WORKER_IP,
    ]);
    let again = lab.node();
    again
        .setup(&pn)
        .await
        .unwrap_or_else(|e| panic!("setup over the VM's leftover: {}", e.report()));
    assert_pod_answers_ping(&lab);
    again.teardown(&pn).await.unwrap();
    // The namespace was found made, so it is left (empty) as one made
    // beforehand is.
    ip(&["netns", "del", &lab.pod]);
    lab.assert_nothing_left(&[]);
}

#[tokio::test]
async fn teardown_without_a_setup_is_a_no_op() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    lab.node().teardown(&flannel_like(1500)).await.unwrap();
    lab.assert_nothing_left(&[]);
}

#[test]
fn the_forwarder_builds_the_pod_network_before_it_listens_and_removes_it_on_sigterm() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let dir = tempfile::tempdir().unwrap();
    let spawn = |apf: &serde_json::Value| {
        let config = dir.path().join("apf.json");
        std::fs::write(&config, apf.to_string()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor-forwarder"));
        cmd.args(["--listen", "127.0.0.1:15150", "--agent-socket"])
            .arg(dir.path().join("agent.sock"))
            .arg("--config")
            .arg(&config)
            .arg("--pod-netns")
            .arg(lab.pod_path())
            .stderr(std::process::Stdio::piped());
        // Started from a thread inside the VM namespace: the forwarder's
        // own namespace is the VM's.
        Lab::netns(&lab.vm)
            .run(move || cmd.spawn())
            .unwrap()
            .unwrap()
    };

    // A bad pod network: a clear error, a failed exit, nothing left.
    let mut bad = serde_json::to_value(flannel_like(1500)).unwrap();
    bad["tunnel-type"] = "geneve".into();
    let out = spawn(&serde_json::json!({ "pod-network": bad }))
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pod network: The tunnel type \"geneve\" is not known"),
        "{stderr}"
    );
    lab.assert_nothing_left(&[]);

    // A good one: listening means the pod network is complete.
    let mut child = spawn(&serde_json::json!({ "pod-network": flannel_like(1500) }));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Lab::netns(&lab.vm)
        .run(|| TcpStream::connect(("127.0.0.1", 15150)))
        .unwrap()
        .is_err()
    {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the forwarder exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the forwarder never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_pod_answers_ping(&lab);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pod network ready") && stderr.contains("pod network removed"),
        "{stderr}"
    );
    lab.assert_nothing_left(&[]);
}

/// Setup time of the pod VM's end, p50/p99 over 30 setups (each followed
/// by a teardown). `cargo test -p podvisor-podvm --test pod_network -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement: run by hand"]
async fn measure_setup_time() {
    if !namespaces_available() {
        return;
    }
    let lab = Lab::new();
    let node = lab.node();
    let pn = flannel_like(1500);
    let mut setups = Vec::new();
    let mut teardowns = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        node.setup(&pn).await.unwrap();
        setups.push(started.elapsed());
        let started = Instant::now();
        node.teardown(&pn).await.unwrap();
        teardowns.push(started.elapsed());
    }
    setups.sort_unstable();
    teardowns.sort_unstable();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    println!(
        "pod VM side setup over {} runs: p50 {:?}, p99 {:?}, max {:?}; teardown p50 {:?}, p99 {:?}",
        setups.len(),
        pct(&setups, 50),
        pct(&setups, 99),
        setups[setups.len() - 1],
        pct(&teardowns, 50),
        pct(&teardowns, 99)
    );
    lab.assert_nothing_left(&[]);
}
