//! The worker side of the pod network with real packets.
//!
//! Each test builds its own network namespaces (unique names, removed by a
//! guard even when the test fails), never touching the real host's:
//!
//! ```text
//!  client pod ns          node ns ("host")                 pod VM ns
//!  eth0 10.244.1.6 ── vethclient ┐                          cloud0 192.168.1.2
//!                                cni0 10.244.1.1            vxlan0 (VNI, remote
//!  peer pod ns                   │                            192.168.1.1) holds
//!  eth0 10.244.1.5 ── vethpeer ──┘   cloud0 192.168.1.1 ──    10.244.1.5 + the
//!  (+ vxlan1 once set up)                                      peer pod's MAC
//! ```
//!
//! `inspect` + `setup` run against the node ns as the host ns and the peer
//! pod ns as the sandbox; then packets from the client pod to the pod IP
//! must be answered by the pod VM ns. Needs root (namespaces, iptables);
//! under `CI=true` a test that cannot create namespaces fails, elsewhere
//! it says why and returns.

#[path = "common/netns.rs"]
mod netns;

use netns::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use podvisor::network::inspect::{InspectError, PodNeighbour, inspect_host, inspect_pod};
use podvisor::network::notrack::NotrackRule;
use podvisor::network::tunnel::{
    TunnelConfig, TunnelError, exists, list_notrack, setup, sweep_notrack, teardown,
};
use podvisor::network::{MIN_POD_MTU, VXLAN_PORT};
use podvisor_podvm::network::netns::NetnsError;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
const POD_MAC: &str = "0a:58:0a:f4:01:05";
const NODE_CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const VM_CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
/// The baseline: the client and pod VM namespaces joined by a plain veth.
const DIRECT_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const DIRECT_VM_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

/// The diagram's namespaces.
#[derive(Debug)]
struct Topology {
    /// Owns them all.
    namespaces: Namespaces,
    node: String,
    peer: String,
    client: String,
    vm: String,
}

impl Topology {
    /// Builds the node with its bridge, the two pods and the pod VM whose
    /// VXLAN device (VNI `vni`) holds the peer pod's IP and MAC.
    fn new(vni: u32) -> Self {
        let mut namespaces = Namespaces::default();
        let node = namespaces.add("node");
        let peer = namespaces.add("peer");
        let client = namespaces.add("client");
        let vm = namespaces.add("vm");

        ip(&["-n", &node, "link", "add", "cni0", "type", "bridge"]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            "cni0",
        ]);
        ip(&["-n", &node, "link", "set", "cni0", "up"]);
        for (pod, veth, address) in [
            (&peer, "vethpeer", POD_IP),
            (&client, "vethclient", CLIENT_IP),
        ] {
            ip(&[
                "-n", &node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
                pod,
            ]);
            ip(&["-n", &node, "link", "set", veth, "master", "cni0", "up"]);
            ip(&[
                "-n",
                pod,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", pod, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                &GATEWAY.to_string(),
                "dev",
                "eth0",
            ]);
        }
        ip(&["-n", &peer, "link", "set", "eth0", "address", POD_MAC]);

        ip(&[
            "-n", &node, "link", "add", "cloud0", "type", "veth", "peer", "name", "cloud0",
            "netns", &vm,
        ]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_CLOUD_IP}/24"),
            "dev",
            "cloud0",
        ]);
        ip(&["-n", &node, "link", "set", "cloud0", "up"]);
        // The node's default route makes cloud0 its primary interface.
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            "default",
            "via",
            &VM_CLOUD_IP.to_string(),
            "dev",
            "cloud0",
        ]);
        ip(&[
            "-n",
            &vm,
            "addr",
            "add",
            &format!("{VM_CLOUD_IP}/24"),
            "dev",
            "cloud0",
        ]);
        ip(&["-n", &vm, "link", "set", "cloud0", "up"]);

        // The pod VM's side, as the forwarder would build it (CAA podnode.go).
        let vni = vni.to_string();
        let port = VXLAN_PORT.to_string();
        let remote = NODE_CLOUD_IP.to_string();
        ip(&[
            "-n", &vm, "link", "add", "vxlan0", "type", "vxlan", "id", &vni, "remote", &remote,
            "dstport", &port,
        ]);
        ip(&[
            "-n", &vm, "link", "set", "vxlan0", "address", POD_MAC, "mtu", "1450",
        ]);
        ip(&[
            "-n",
            &vm,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            "vxlan0",
        ]);
        ip(&["-n", &vm, "link", "set", "vxlan0", "up"]);
        Self {
            namespaces,
            node,
            peer,
            client,
            vm,
        }
    }

    /// The tunnel of the peer pod, with the node as the host.
    fn config(&self, vni: u32) -> TunnelConfig {
        TunnelConfig {
            host_netns: netns_path(&self.node),
            pod_netns: netns_path(&self.peer),
            pod_interface: "eth0".to_owned(),
            pod_vm_ip: VM_CLOUD_IP,
            vni,
            port: VXLAN_PORT,
        }
    }

    /// Asserts that no tunnel state is left: no NOTRACK rule or chain and
    /// no VXLAN device in the node, and (when the peer pod's namespace
    /// still exists) no VXLAN device, qdisc or filter in it.
    fn assert_clean(&self) {
        let raw = run(
            "ip",
            &["netns", "exec", &self.node, "iptables-save", "-t", "raw"],
        );
        assert!(!raw.contains("peerpod"), "NOTRACK state left:\n{raw}");
        let links = ip(&["-n", &self.node, "-o", "link", "show"]);
        assert!(
            !links.contains("vxlan"),
            "a VXLAN device left in the node:\n{links}"
        );
        if self.namespaces.holds(&self.peer) {
            let links = ip(&["-n", &self.peer, "-o", "link", "show"]);
            assert!(
                !links.contains("vxlan"),
                "a VXLAN device left in the pod:\n{links}"
            );
            let qdiscs = run("tc", &["-n", &self.peer, "qdisc", "show", "dev", "eth0"]);
            assert!(
                !qdiscs.contains("ingress"),
                "an ingress qdisc left:\n{qdiscs}"
            );
            let filters = run(
                "tc",
                &["-n", &self.peer, "filter", "show", "dev", "eth0", "ingress"],
            );
            assert!(filters.trim().is_empty(), "a tc filter left:\n{filters}");
        }
    }
}

/// Asserts no tunnel state exists, inspects the peer pod, and sets its
/// tunnel up.
async fn inspect_and_setup(topology: &Topology, vni: u32) -> TunnelConfig {
    let pod = inspect_pod(&netns_path(&topology.peer))
        .await
        .expect("inspect the pod");
    let host = inspect_host(&netns_path(&topology.node), None)
        .await
        .expect("inspect the host");
    assert_eq!(host.worker_ip, NODE_CLOUD_IP);
    let mut config = topology.config(vni);
    config.pod_interface = pod.interface;
    setup(&config).await.expect("setup");
    config
}

/// The tests' runtime: setup's netlink connections run on it.
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
    pod_traffic_crosses_the_tunnel_to_the_pod_vm_and_teardown_leaves_nothing,
    async {
        let vni = 555_001;
        let topology = Topology::new(vni);

        ip(&[
            "-n",
            &topology.peer,
            "neigh",
            "add",
            "10.244.1.9",
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ip(&[
            "-n",
            &topology.peer,
            "neigh",
            "add",
            "10.244.1.10",
            "lladdr",
            "02:00:00:00:00:0a",
            "dev",
            "eth0",
            "nud",
            "stale",
        ]);
        let pod = inspect_pod(&netns_path(&topology.peer))
            .await
            .expect("inspect the pod");
        assert_eq!(pod.interface, "eth0");
        assert_eq!((pod.ip, pod.prefix_len), (POD_IP, 24));
        assert_eq!(pod.mac, [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]);
        assert_eq!(pod.mtu, 1500);
        assert_eq!(pod.gateway, Some(GATEWAY));
        // (destination, prefix, gateway, device, protocol, scope):
        // `ip route add` makes protocol boot (3); the kernel's subnet
        // route is protocol kernel (2), scope link (253).
        let routes: Vec<_> = pod
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination,
                    r.prefix_len,
                    r.gateway,
                    r.device.as_str(),
                    r.protocol,
                    r.scope,
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                (Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), "eth0", 3, 0),
                (Ipv4Addr::new(10, 244, 1, 0), 24, None, "eth0", 2, 253)
            ]
        );
        assert_eq!(
            pod.neighbours,
            [PodNeighbour {
                ip: Ipv4Addr::new(10, 244, 1, 9),
                mac: [2, 0, 0, 0, 0, 9],
                device: "eth0".to_owned()
            }],
            "only the permanent neighbour"
        );
        let host = inspect_host(&netns_path(&topology.node), None)
            .await
            .expect("inspect the host");
        assert_eq!(
            (host.interface.as_str(), host.worker_ip, host.dedicated),
            ("cloud0", NODE_CLOUD_IP, false)
        );
        let named = inspect_host(&netns_path(&topology.node), Some("cni0"))
            .await
            .expect("inspect the host");
        assert_eq!((named.worker_ip, named.dedicated), (GATEWAY, true));

        let config = inspect_and_setup(&topology, vni).await;
        assert!(exists(&config.pod_netns, vni).await.expect("exists"));
        assert!(!exists(&config.pod_netns, vni + 1).await.expect("exists"));
        let filters = run(
            "tc",
            &[
                "-n",
                &topology.peer,
                "filter",
                "show",
                "dev",
                "eth0",
                "ingress",
            ],
        );
        assert!(
            filters.contains("protocol all")
                && filters.contains("Egress Redirect to device vxlan1"),
            "{filters}"
        );
        let raw = run(
            "ip",
            &[
                "netns",
                "exec",
                &topology.node,
                "iptables-save",
                "-t",
                "raw",
            ],
        );
        assert!(
            raw.contains("peerpod [vni:555001]") && raw.contains("-d 192.168.1.2/32"),
            "{raw}"
        );

        // Ping: answered by the pod VM's namespace, not the peer pod's own
        // stack (the tc redirect takes every frame before it).
        let (vm_before, peer_before) = (
            echo_replies_sent(&topology.vm),
            echo_replies_sent(&topology.peer),
        );
        ping(&topology.client, POD_IP, 3);
        assert!(
            echo_replies_sent(&topology.vm) >= vm_before + 3,
            "the pod VM did not answer"
        );
        assert_eq!(
            echo_replies_sent(&topology.peer),
            peer_before,
            "the peer pod's own stack answered"
        );

        // 16 MiB over TCP, client pod → pod VM, checked by SHA-256.
        let Transfer {
            intact,
            elapsed: took,
            ..
        } = transfer(
            &topology.vm,
            &topology.client,
            SocketAddr::from((POD_IP, 5001)),
            16 << 20,
        );
        assert!(intact, "16 MiB arrived damaged");
        eprintln!("16 MiB through the tunnel in {took:?}");
        // And back: the pod VM reaches the client pod.
        ping(&topology.vm, CLIENT_IP, 2);

        teardown(&config).await.expect("teardown");
        assert!(!exists(&config.pod_netns, vni).await.expect("exists"));
        topology.assert_clean();
        teardown(&config).await.expect("a second teardown");
    }
);

network_test!(setup_twice_with_the_same_vni_is_idempotent, async {
    let vni = 555_002;
    let topology = Topology::new(vni);
    let config = inspect_and_setup(&topology, vni).await;
    setup(&config).await.expect("the second setup");
    let links = ip(&["-n", &topology.peer, "-o", "link", "show", "type", "vxlan"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    let raw = run(
        "ip",
        &[
            "netns",
            "exec",
            &topology.node,
            "iptables-save",
            "-t",
            "raw",
        ],
    );
    assert_eq!(
        raw.matches("peerpod [vni:555002]").count(),
        2,
        "one rule per chain:\n{raw}"
    );
    ping(&topology.client, POD_IP, 2);
    teardown(&config).await.expect("teardown");
    topology.assert_clean();
});

network_test!(teardown_after_the_pod_netns_is_gone_is_ok, async {
    let vni = 555_003;
    let mut topology = Topology::new(vni);
    let config = inspect_and_setup(&topology, vni).await;
    let peer = topology.peer.clone();
    topology.namespaces.delete(&peer);
    teardown(&config)
        .await
        .expect("teardown without the pod netns");
    assert!(!exists(&config.pod_netns, vni).await.expect("exists"));
    topology.assert_clean();
});

network_test!(a_setup_failing_half_way_undoes_what_it_did, async {
    let vni = 555_004;
    let topology = Topology::new(vni);
    // Someone else's ingress qdisc on the pod's interface: the tc step,
    // the last one, fails.
    run(
        "tc",
        &[
            "-n",
            &topology.peer,
            "qdisc",
            "add",
            "dev",
            "eth0",
            "ingress",
        ],
    );
    let err = setup(&topology.config(vni))
        .await
        .expect_err("setup must fail");
    assert!(matches!(err, TunnelError::Netlink { .. }), "{err:?}");
    assert!(err.to_string().contains("ingress qdisc to eth0"), "{err}");
    let raw = run(
        "ip",
        &[
            "netns",
            "exec",
            &topology.node,
            "iptables-save",
            "-t",
            "raw",
        ],
    );
    assert!(!raw.contains("peerpod"), "NOTRACK state left:\n{raw}");
    for ns in [&topology.node, &topology.peer] {
        let links = ip(&["-n", ns, "-o", "link", "show"]);
        assert!(!links.contains("vxlan"), "a VXLAN device left:\n{links}");
    }
    // The qdisc that was there before stays.
    let qdiscs = run(
        "tc",
        &["-n", &topology.peer, "qdisc", "show", "dev", "eth0"],
    );
    assert!(qdiscs.contains("ingress"), "{qdiscs}");
});

network_test!(
    bad_pod_namespaces_are_clear_errors_and_leave_nothing,
    async {
        let vni = 555_005;
        let mut topology = Topology::new(vni);

        let missing = PathBuf::from("/var/run/netns/podvisor-test-no-such-netns");
        let err = inspect_pod(&missing).await.expect_err("missing netns");
        assert!(
            matches!(err, InspectError::Netns(NetnsError::NotFound { .. })),
            "{err:?}"
        );
        let mut config = topology.config(vni);
        config.pod_netns = missing;
        let err = setup(&config).await.expect_err("missing netns");
        assert!(
            matches!(err, TunnelError::Netns(NetnsError::NotFound { .. })),
            "{err:?}"
        );

        // A pod netns whose eth0 (default route, link up) has `addresses`.
        let mut pod_with = |addresses: &[&str], mtu: &str| {
            let name = topology.namespaces.add("bad");
            ip(&[
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "other",
            ]);
            ip(&["-n", &name, "link", "set", "eth0", "mtu", mtu, "up"]);
            for address in addresses {
                ip(&["-n", &name, "addr", "add", address, "dev", "eth0"]);
            }
            ip(&["-n", &name, "route", "add", "default", "dev", "eth0"]);
            netns_path(&name)
        };
        let none = pod_with(&[], "1500");
        let two = pod_with(&["10.244.1.5/24", "10.244.1.7/24"], "1500");
        let small = pod_with(&["10.244.1.5/24"], &(MIN_POD_MTU - 1).to_string());
        let no_route = topology.namespaces.add("bad");

        let err = inspect_pod(&none).await.expect_err("no IPv4");
        assert!(matches!(err, InspectError::NoIpv4 { .. }), "{err:?}");
        assert!(err.to_string().contains("has no IPv4 address"), "{err}");
        let err = inspect_pod(&two).await.expect_err("two IPv4");
        assert!(
            matches!(err, InspectError::SeveralIpv4 { count: 2, .. }),
            "{err:?}"
        );
        let err = inspect_pod(&small).await.expect_err("MTU");
        assert!(
            matches!(
                err,
                InspectError::MtuTooSmall {
                    mtu: 117,
                    min: 118,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("VXLAN overhead (50 bytes) plus the minimum IPv4 MTU (68 bytes)"),
            "{err}"
        );
        let err = inspect_pod(&netns_path(&no_route))
            .await
            .expect_err("no default route");
        assert!(
            matches!(err, InspectError::NoPrimaryInterface { .. }),
            "{err:?}"
        );
        let err = inspect_host(&netns_path(&topology.node), Some("eth9"))
            .await
            .expect_err("no such host interface");
        assert!(
            matches!(err, InspectError::InterfaceMissing { .. }),
            "{err:?}"
        );

        let mut config = topology.config(vni);
        config.pod_interface = "eth9".to_owned();
        let err = setup(&config).await.expect_err("no such pod interface");
        assert!(
            matches!(err, TunnelError::PodInterfaceMissing { .. }),
            "{err:?}"
        );
        let mut config = topology.config(0);
        config.vni = 1 << 24;
        let err = setup(&config).await.expect_err("VNI");
        assert!(matches!(err, TunnelError::InvalidVni { .. }), "{err:?}");
        topology.assert_clean();
    }
);

network_test!(notrack_rules_of_unowned_vnis_are_swept, async {
    let vni = 555_006;
    let topology = Topology::new(vni);
    let config = inspect_and_setup(&topology, vni).await;
    let host = netns_path(&topology.node);
    let rule = NotrackRule {
        vni,
        pod_vm_ip: VM_CLOUD_IP,
        port: VXLAN_PORT,
    };
    assert_eq!(list_notrack(&host).await.expect("list"), [rule]);
    let kept = sweep_notrack(&host, BTreeSet::from([vni]))
        .await
        .expect("sweep");
    assert!(kept.is_empty(), "{kept:?}");
    let swept = sweep_notrack(&host, BTreeSet::new()).await.expect("sweep");
    assert_eq!(swept, [rule, rule]);
    assert!(list_notrack(&host).await.expect("list").is_empty());
    let raw = run(
        "ip",
        &[
            "netns",
            "exec",
            &topology.node,
            "iptables-save",
            "-t",
            "raw",
        ],
    );
    assert!(!raw.contains("peerpod"), "chains left:\n{raw}");
    teardown(&config).await.expect("teardown");
    topology.assert_clean();
});

network_test!(
    setup_removes_a_device_a_crash_left_in_the_host_netns,
    async {
        let vni = 555_007;
        let topology = Topology::new(vni);
        // A crash between creating the device and moving it into the pod netns.
        let name = format!("ppvxlan{vni}");
        ip(&[
            "-n",
            &topology.node,
            "link",
            "add",
            &name,
            "type",
            "vxlan",
            "id",
            &vni.to_string(),
            "remote",
            &VM_CLOUD_IP.to_string(),
            "dstport",
            &VXLAN_PORT.to_string(),
        ]);
        let config = inspect_and_setup(&topology, vni).await;
        ping(&topology.client, POD_IP, 2);
        let links = ip(&["-n", &topology.node, "-o", "link", "show"]);
        assert!(!links.contains(&name), "{links}");
        teardown(&config).await.expect("teardown");
        topology.assert_clean();
    }
);

network_test!(
    two_tunnels_set_up_at_once_share_the_host_and_tear_down_apart,
    async {
        let vni = 555_008;
        let other_vni = 555_009;
        let mut topology = Topology::new(vni);
        // A second pod on the bridge, whose pod VM (192.168.1.3) is never
        // reached: only the host-side state matters here.
        let second = topology.namespaces.add("peer2");
        ip(&[
            "-n",
            &topology.node,
            "link",
            "add",
            "vethpeer2",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &second,
        ]);
        ip(&[
            "-n",
            &topology.node,
            "link",
            "set",
            "vethpeer2",
            "master",
            "cni0",
            "up",
        ]);
        ip(&["-n", &second, "addr", "add", "10.244.1.7/24", "dev", "eth0"]);
        ip(&["-n", &second, "link", "set", "eth0", "up"]);
        let first = topology.config(vni);
        let mut other = topology.config(other_vni);
        other.pod_netns = netns_path(&second);
        other.pod_vm_ip = Ipv4Addr::new(192, 168, 1, 3);

        let (a, b) = tokio::join!(setup(&first), setup(&other));
        a.expect("first setup");
        b.expect("second setup");
        let vnis: Vec<_> = list_notrack(&netns_path(&topology.node))
            .await
            .expect("list")
            .iter()
            .map(|r| r.vni)
            .collect();
        assert_eq!(vnis, [vni, other_vni]);
        ping(&topology.client, POD_IP, 2);

        teardown(&other).await.expect("second teardown");
        assert!(
            exists(&first.pod_netns, vni).await.expect("exists"),
            "the first tunnel went too"
        );
        let vnis: Vec<_> = list_notrack(&netns_path(&topology.node))
            .await
            .expect("list")
            .iter()
            .map(|r| r.vni)
            .collect();
        assert_eq!(vnis, [vni]);
        ping(&topology.client, POD_IP, 1);
        teardown(&first).await.expect("first teardown");
        topology.assert_clean();
        let links = ip(&["-n", &second, "-o", "link", "show"]);
        assert!(!links.contains("vxlan"), "{links}");
    }
);

network_test!(the_primary_interface_is_the_one_caa_picks, async {
    let mut namespaces = Namespaces::default();
    // A pod netns with default routes through `devices`, each (name,
    // metric, subnet octet).
    let mut pod_with = |devices: &[(&str, &str, u8)]| {
        let name = namespaces.add("primary");
        for (device, metric, octet) in devices {
            ip(&[
                "-n",
                &name,
                "link",
                "add",
                device,
                "type",
                "veth",
                "peer",
                "name",
                &format!("p{device}"),
            ]);
            ip(&["-n", &name, "link", "set", device, "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.{octet}.0.2/24"),
                "dev",
                device,
            ]);
            ip(&[
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{octet}.0.1"),
                "dev",
                device,
                "metric",
                metric,
            ]);
        }
        netns_path(&name)
    };
    // Lowest metric first, but a lower number of the same stem wins
    // (CAA common.go, findPrimaryInterface).
    let same_stem = pod_with(&[("eth1", "10", 1), ("eth0", "100", 2)]);
    let other_stem = pod_with(&[("ens5", "5", 3), ("eth0", "100", 4)]);
    let pod = inspect_pod(&same_stem).await.expect("inspect");
    assert_eq!(
        (pod.interface.as_str(), pod.gateway),
        ("eth0", Some(Ipv4Addr::new(10, 2, 0, 1)))
    );
    let pod = inspect_pod(&other_stem).await.expect("inspect");
    assert_eq!(
        (pod.interface.as_str(), pod.ip),
        ("ens5", Ipv4Addr::new(10, 3, 0, 2))
    );
});

/// Percentile `p` (0–100) of sorted `samples`.
fn percentile(samples: &[Duration], p: usize) -> Duration {
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

/// Bytes per second sent from `client` to a counting server in `server`
/// on `address` (`bytes` sent).
fn throughput(server: &str, client: &str, address: SocketAddr, bytes: usize) -> f64 {
    let listener = listen(server, address);
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buffer = vec![0u8; 1 << 18];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buffer).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(&total.to_be_bytes()).expect("write count");
    });
    let data = vec![0x5au8; 1 << 18];
    let mut stream = connect(client, address);
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&data).expect("send");
        sent += data.len();
    }
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).expect("count");
    let elapsed = started.elapsed();
    receiver.join().expect("receiver");
    assert_eq!(u64::from_be_bytes(count), sent as u64);
    sent as f64 / elapsed.as_secs_f64()
}

/// Median round trip of 1-byte TCP ping-pongs from `client` to an echo
/// server in `server` on `address`.
fn tcp_rtt(server: &str, client: &str, address: SocketAddr, rounds: usize) -> Duration {
    let listener = listen(server, address);
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() {
            stream.write_all(&byte).expect("echo");
        }
    });
    let mut stream = connect(client, address);
    let mut samples = Vec::with_capacity(rounds);
    let mut byte = [7u8; 1];
    for _ in 0..rounds {
        let started = Instant::now();
        stream.write_all(&byte).expect("send");
        stream.read_exact(&mut byte).expect("receive");
        samples.push(started.elapsed());
    }
    drop(stream);
    echo.join().expect("echo");
    samples.sort();
    percentile(&samples, 50)
}

/// The numbers of the report: worker-side setup time over 30 setups, and
/// TCP throughput and RTT through the tunnel against a plain veth between
/// the same two namespaces, in the same run. `cargo test --release --test
/// network_worker -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run by hand"]
async fn measure_setup_time_and_tunnel_against_veth() {
    if !namespaces_available() {
        return;
    }
    let vni = 555_100;
    let topology = Topology::new(vni);
    let config = topology.config(vni);
    let mut setups = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        setup(&config).await.expect("setup");
        setups.push(started.elapsed());
        teardown(&config).await.expect("teardown");
    }
    setups.sort();
    println!(
        "setup (30): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&setups, 50),
        percentile(&setups, 99),
        setups[setups.len() - 1]
    );

    setup(&config).await.expect("setup");
    // The baseline link between the same client pod and pod VM namespaces.
    ip(&[
        "-n",
        &topology.client,
        "link",
        "add",
        "direct0",
        "type",
        "veth",
        "peer",
        "name",
        "direct0",
        "netns",
        &topology.vm,
    ]);
    ip(&[
        "-n",
        &topology.client,
        "addr",
        "add",
        &format!("{DIRECT_CLIENT_IP}/24"),
        "dev",
        "direct0",
    ]);
    ip(&["-n", &topology.client, "link", "set", "direct0", "up"]);
    ip(&[
        "-n",
        &topology.vm,
        "addr",
        "add",
        &format!("{DIRECT_VM_IP}/24"),
        "dev",
        "direct0",
    ]);
    ip(&["-n", &topology.vm, "link", "set", "direct0", "up"]);

    let bytes = 512 << 20;
    let mut port = 6000;
    let mut next_port = || {
        port += 1;
        port
    };
    for round in 0..2 {
        let tunnel = throughput(
            &topology.vm,
            &topology.client,
            SocketAddr::from((POD_IP, next_port())),
            bytes,
        );
        let veth = throughput(
            &topology.vm,
            &topology.client,
            SocketAddr::from((DIRECT_VM_IP, next_port())),
            bytes,
        );
        let tunnel_rtt = tcp_rtt(
            &topology.vm,
            &topology.client,
            SocketAddr::from((POD_IP, next_port())),
            2000,
        );
        let veth_rtt = tcp_rtt(
            &topology.vm,
            &topology.client,
            SocketAddr::from((DIRECT_VM_IP, next_port())),
            2000,
        );
        println!(
            "round {round}: throughput tunnel {:.0} MB/s, veth {:.0} MB/s (tunnel/veth {:.2}); TCP RTT p50 tunnel {tunnel_rtt:?}, veth {veth_rtt:?} (tunnel/veth {:.2})",
            tunnel / 1e6,
            veth / 1e6,
            tunnel / veth,
            tunnel_rtt.as_secs_f64() / veth_rtt.as_secs_f64()
        );
    }
    teardown(&config).await.expect("teardown");
    topology.assert_clean();
}
