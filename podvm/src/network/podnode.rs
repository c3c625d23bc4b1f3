//! The pod VM's end of the pod network: a network namespace for the pod
//! whose interface is the VXLAN tunnel to the worker node.
//!
//! What [`PodNode::setup`] builds, in CAA's order (`pkg/podnetwork/podnode.go`
//! and `pkg/podnetwork/tunneler/vxlan/podnode.go`, run by CAA's forwarder):
//!
//! 1. the pod namespace, bind-mounted at its path, its `lo` up. CAA's image
//!    makes it before the forwarder starts (`netns@podns.service`: `ip netns
//!    add podns`, and the kata agent's unit enters it): a namespace already
//!    mounted there that holds nothing but `lo` is used as it is, and left
//!    in place by teardown; anything else at the path is refused;
//! 2. in the VM's own namespace, raw-table `NOTRACK` rules for the tunnel's
//!    UDP to and from the worker (chains `peerpod-OUTPUT`,
//!    `peerpod-PREROUTING`, comment `peerpod [vni:N]`, CAA's `iptables.go`);
//! 3. a VXLAN device (VNI, UDP port, remote = the worker's address, no
//!    learning) made in the VM's own namespace, so its UDP socket lives
//!    there and reaches the worker, then moved into the pod namespace;
//! 4. there renamed to the pod's interface name, given the pod's MAC,
//!    MTU min(pod MTU, 1450) (1500 less the 50 bytes of VXLAN over IPv4),
//!    the pod's address, brought up;
//! 5. the kernel's subnet route for that address removed when it is not a
//!    /32 (some CNI plugins' routes would collide with it; the pod's own
//!    routes put it back when they have it);
//! 6. the pod's routes, those without a gateway first (Calico's pattern: a
//!    gateway is reachable only once its link route exists), and its
//!    neighbours.
//!
//! A failure at any step undoes the steps before it (device, rules,
//! namespace), so no half-built pod namespace is ever left behind. Values
//! are checked before anything is made: most bad input fails with nothing
//! to undo.
//!
//! The VM's "own" namespace is the one of the thread that calls
//! [`PodNode::new`] (the process's, in a pod VM); tests give another with
//! [`PodNode::with_vm_netns`].

use super::config::{NeighborState, PodNetwork, Prefix};
use super::link;
use super::netns::{Netns, NetnsError};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::NeighbourState as NlNeighbourState;
use rtnetlink::packet_route::route::{RouteProtocol as NlProtocol, RouteScope as NlScope};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where CAA's pod VM keeps the pod's network namespace (and where the
/// kata agent's unit expects it).
pub const DEFAULT_POD_NETNS: &str = "/run/netns/podns";

/// The largest pod interface MTU (CAA's `maxMTU`): a 1500-byte underlay
/// less VXLAN over IPv4's 50 bytes (outer IPv4 20, UDP 8, VXLAN 8,
/// inner Ethernet 14).
pub const MAX_MTU: u32 = 1450;

/// The least pod MTU accepted: 68 bytes, IPv4's minimum (RFC 791; the
/// kernel's `ETH_MIN_MTU`). Any MTU at or below the VXLAN overhead (50) is
/// below it.
pub const MIN_MTU: u32 = 68;

/// The only tunnel type (CAA registers only `vxlan`).
pub const TUNNEL_VXLAN: &str = "vxlan";

/// The namespace a thread is in; the VM's own for [`PodNode::new`].
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// CAA's iptables chains in the raw table, and the built-in chains that
/// jump to them.
const CHAINS: [(&str, &str); 2] = [
    ("OUTPUT", "peerpod-OUTPUT"),
    ("PREROUTING", "peerpod-PREROUTING"),
];

/// Why the pod network could not be built or removed.
#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    /// `tunnel-type` names a tunnel that is not built.
    #[error("The tunnel type {0:?} is not known: only \"vxlan\" is")]
    UnknownTunnelType(String),
    /// `external-net-via-pod-vm` is set.
    #[error(
        "external-net-via-pod-vm is set: routing the pod's external traffic through the pod VM is not built"
    )]
    ExternalNetworkUnsupported,
    /// A value of `pod-network` cannot be used.
    #[error("pod-network {field} {why}")]
    Invalid {
        /// The JSON key (`podip`, `routes[1].gw`, …).
        field: String,
        /// What is wrong with it, as the end of a sentence.
        why: String,
    },
    /// Something other than an empty network namespace is already at the
    /// pod namespace's path.
    #[error(
        "The pod network namespace {path} already exists and {why} (a previous run's? its teardown removes it)"
    )]
    NamespaceExists {
        /// Its path.
        path: PathBuf,
        /// Why it cannot be used, as the end of a sentence.
        why: String,
    },
    /// The pod namespace could not be made or removed.
    #[error("Cannot {action} the pod network namespace {path}")]
    Namespace {
        /// `create`, `mount`, `remove`, …
        action: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Entering a namespace or opening a netlink socket failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The kernel refused a netlink request.
    #[error("Cannot {what}")]
    Netlink {
        /// The request, naming the device or route.
        what: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// An `iptables` run failed.
    #[error("iptables {args} failed: {why}")]
    Iptables {
        /// Its arguments.
        args: String,
        /// Its exit status and standard error.
        why: String,
    },
    /// The setup failed, and so did part of undoing it.
    #[error("{}; undoing the setup also failed: {}", error.report(), undo.report())]
    UndoFailed {
        /// Why the setup failed.
        error: Box<PodNetworkError>,
        /// Why the undo failed.
        undo: Box<PodNetworkError>,
    },
}

impl PodNetworkError {
    /// The error and its causes on one line, `error: cause: cause` (the
    /// messages themselves do not repeat their cause).
    #[must_use]
    pub fn report(&self) -> String {
        let mut line = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            line.push_str(": ");
            line.push_str(&e.to_string());
            cause = e.source();
        }
        line
    }
}

/// A netlink error with the request it answered.
fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetworkError {
    let what = what.into();
    move |e| PodNetworkError::Netlink {
        what,
        source: match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => io::Error::other(other.to_string()),
        },
    }
}

/// The errno of a kernel refusal, if that is what it is.
fn errno(e: &PodNetworkError) -> Option<i32> {
    match e {
        PodNetworkError::Netlink { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> PodNetworkError {
    PodNetworkError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// A route, checked and in kernel terms.
#[derive(Debug, Clone)]
struct PlannedRoute {
    /// Its place in `routes`, for messages.
    index: usize,
    /// Destination; `None` for the default route.
    dst: Option<(Ipv4Addr, u8)>,
    gw: Option<Ipv4Addr>,
    dev: Option<String>,
    protocol: NlProtocol,
    scope: NlScope,
}

/// A neighbour, checked.
#[derive(Debug, Clone)]
struct PlannedNeighbor {
    index: usize,
    ip: Ipv4Addr,
    mac: [u8; 6],
    dev: String,
    state: NeighborState,
}

/// `pod-network`, checked: everything a setup needs, in kernel terms.
#[derive(Debug, Clone)]
struct Plan {
    interface: String,
    pod_ip: Ipv4Addr,
    pod_len: u8,
    mac: [u8; 6],
    worker: Ipv4Addr,
    vni: u32,
    port: u16,
    mtu: u32,
    /// Gateway-less routes first, each group in the given order.
    routes: Vec<PlannedRoute>,
    neighbors: Vec<PlannedNeighbor>,
}

/// A MAC as Go's `net.ParseMAC` reads a 6-byte one: six hex pairs
/// separated by `:` or `-`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn ipv4(field: &str, addr: IpAddr) -> Result<Ipv4Addr, PodNetworkError> {
    match addr {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => Err(invalid(
            field,
            format!("is {a}, an IPv6 address: the pod network is IPv4 only (as CAA's)"),
        )),
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or white space, not
/// `.` or `..` (the kernel's `dev_valid_name`).
fn check_ifname(field: &str, name: &str) -> Result<(), PodNetworkError> {
    if name.is_empty() {
        return Err(invalid(field, "is not set"));
    }
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(invalid(
            field,
            format!("{name:?} is not an interface name (1 to 15 bytes, no '/', ':' or spaces)"),
        ));
    }
    Ok(())
}

impl Plan {
    fn new(config: &PodNetwork) -> Result<Self, PodNetworkError> {
        if config.tunnel_type != TUNNEL_VXLAN {
            return Err(PodNetworkError::UnknownTunnelType(
                config.tunnel_type.clone(),
            ));
        }
        if config.external_net_via_pod_vm {
            return Err(PodNetworkError::ExternalNetworkUnsupported);
        }
        check_ifname("interface", &config.interface)?;
        if config.interface == "lo" {
            return Err(invalid("interface", "is \"lo\", which the namespace has"));
        }
        let Some(pod) = config.pod_ip else {
            return Err(invalid("podip", "is not set"));
        };
        let pod_ip = ipv4("podip", pod.addr)?;
        if pod_ip.is_unspecified() || pod_ip.is_multicast() || pod_ip.is_broadcast() {
            return Err(invalid("podip", format!("{pod} is not a host address")));
        }
        let Some(worker) = config.worker_node_ip else {
            return Err(invalid("worker-node-ip", "is not set"));
        };
        let worker = ipv4("worker-node-ip", worker.addr)?;
        if worker.is_unspecified() || worker.is_multicast() || worker.is_broadcast() {
            return Err(invalid(
                "worker-node-ip",
                format!("{worker} is not a unicast address"),
            ));
        }
        let mac = parse_mac(&config.pod_hw_addr).ok_or_else(|| {
            invalid(
                "pod-hw-addr",
                format!(
                    "{:?} is not a MAC address (like \"0e:8f:62:f3:81:ad\")",
                    config.pod_hw_addr
                ),
            )
        })?;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(invalid(
                "pod-hw-addr",
                format!("{} is not a unicast MAC address", config.pod_hw_addr),
            ));
        }
        if config.mtu < MIN_MTU {
            return Err(invalid(
                "mtu",
                format!(
                    "is {}: below {MIN_MTU} bytes (IPv4's least), no pod packet fits the tunnel",
                    config.mtu
                ),
            ));
        }
        if config.vxlan_id == 0 || config.vxlan_id >= 1 << 24 {
            return Err(invalid(
                "vxlan-id",
                format!(
                    "is {}: a VNI is 1 to 16777215 (0 is absent)",
                    config.vxlan_id
                ),
            ));
        }
        if config.vxlan_port == 0 {
            return Err(invalid("vxlan-port", "is not set"));
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let dst = match r.dst {
                None => None,
                Some(p) => Some(check_route_dst(i, p)?),
            };
            let gw =
                r.gw.map(|g| ipv4(&format!("routes[{i}].gw"), g))
                    .transpose()?;
            let dev = if r.dev.is_empty() {
                None
            } else {
                check_ifname(&format!("routes[{i}].dev"), &r.dev)?;
                Some(r.dev.clone())
            };
            routes.push(PlannedRoute {
                index: i,
                dst,
                gw,
                dev,
                // No protocol: what Go's netlink writes then (and `ip route add`).
                protocol: r
                    .protocol
                    .map_or(NlProtocol::Boot, |p| NlProtocol::from(p.number())),
                // CAA's netops.RouteAdd: a route without a gateway is on the link.
                scope: if gw.is_none() {
                    NlScope::Link
                } else {
                    NlScope::from(r.scope.number())
                },
            });
        }
        // Gateway-less first (stable: each group keeps its order).
        routes.sort_by_key(|r| r.gw.is_some());
        let mut neighbors = Vec::with_capacity(config.neighbors.len());
        for (i, n) in config.neighbors.iter().enumerate() {
            let Some(ip) = n.ip else {
                return Err(invalid(format!("neighbors[{i}].ip"), "is not set"));
            };
            let ip = ipv4(&format!("neighbors[{i}].ip"), ip)?;
            let mac = parse_mac(&n.hw_addr).ok_or_else(|| {
                invalid(
                    format!("neighbors[{i}].hw-addr"),
                    format!("{:?} is not a MAC address", n.hw_addr),
                )
            })?;
            check_ifname(&format!("neighbors[{i}].dev"), &n.dev)?;
            if n.state == NeighborState::None {
                return Err(invalid(
                    format!("neighbors[{i}].state"),
                    "is not set (CAA refuses \"none\" too)",
                ));
            }
            neighbors.push(PlannedNeighbor {
                index: i,
                ip,
                mac,
                dev: n.dev.clone(),
                state: n.state,
            });
        }
        Ok(Self {
            interface: config.interface.clone(),
            pod_ip,
            pod_len: pod.len,
            mac,
            worker,
            vni: config.vxlan_id,
            port: config.vxlan_port,
            mtu: config.mtu.min(MAX_MTU),
            routes,
            neighbors,
        })
    }

    /// The name the VXLAN device has in the VM's namespace before its move
    /// (CAA's is always `vxlan0`; the VNI in the name lets two pod networks
    /// be built side by side in one namespace).
    fn transient_name(&self) -> String {
        format!("pvx{}", self.vni)
    }

    /// CAA's NOTRACK rule for one chain, as `iptables` arguments after the
    /// chain name.
    fn notrack_rule(&self, chain: &str) -> Vec<String> {
        let direction = if chain == "peerpod-OUTPUT" {
            "-d"
        } else {
            "-s"
        };
        [
            "-m",
            "comment",
            "--comment",
            &format!("peerpod [vni:{}]", self.vni),
            direction,
            &self.worker.to_string(),
            "-p",
            "udp",
            "-m",
            "udp",
            "--dport",
            &self.port.to_string(),
            "-j",
            "NOTRACK",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }
}

fn check_route_dst(i: usize, p: Prefix) -> Result<(Ipv4Addr, u8), PodNetworkError> {
    let field = format!("routes[{i}].dst");
    let addr = ipv4(&field, p.addr)?;
    let Some(network) = p.network_v4() else {
        return Err(invalid(field, "is not IPv4"));
    };
    if network != addr {
        return Err(invalid(
            field,
            format!("{p} has host bits set (the network is {network}/{})", p.len),
        ));
    }
    Ok((addr, p.len))
}

/// What a setup has made so far, undone in reverse on failure.
#[derive(Debug, Default)]
struct Made {
    /// The pod namespace's bind mount.
    namespace: bool,
    /// Chains this setup created (with their jump), as (base, chain).
    chains: Vec<(&'static str, &'static str)>,
    /// NOTRACK rules this setup appended, by chain.
    rules: Vec<&'static str>,
    /// The VXLAN device this setup made, while still in the VM's namespace
    /// (under its transient name).
    vm_device: bool,
    /// The VXLAN device once in the pod namespace (its index there): it is
    /// deleted before the namespace, since a namespace is destroyed
    /// asynchronously and the device's socket (holding the VNI and port in
    /// the VM's namespace) with it.
    pod_device: Option<u32>,
}

/// The pod VM's end of one pod network: the VM's own namespace and the
/// path of the pod's.
#[derive(Debug)]
pub struct PodNode {
    /// The VM's own namespace: where the tunnel's socket and the NOTRACK
    /// rules live.
    vm: Netns,
    /// Where the pod namespace is bind-mounted.
    pod_path: PathBuf,
    /// The last setup found the namespace already made (by the image, as
    /// CAA's `netns@podns` unit does) and used it: teardown leaves it.
    adopted: std::sync::atomic::AtomicBool,
}

impl PodNode {
    /// The pod network of this VM, the pod namespace at `pod_netns`
    /// (usually [`DEFAULT_POD_NETNS`]); the VM's own namespace is the
    /// calling thread's (the process's, unless the caller entered another).
    ///
    /// # Errors
    /// [`PodNetworkError::Netns`] when the calling thread's namespace
    /// cannot be opened (no `/proc`).
    pub fn new(pod_netns: impl Into<PathBuf>) -> Result<Self, PodNetworkError> {
        Ok(Self::with_vm_netns(Netns::open(THREAD_NETNS)?, pod_netns))
    }

    /// As [`PodNode::new`], with the VM's own namespace given (tests build
    /// the pod network inside a namespace they made).
    #[must_use]
    pub fn with_vm_netns(vm: Netns, pod_netns: impl Into<PathBuf>) -> Self {
        Self {
            vm,
            pod_path: pod_netns.into(),
            adopted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The pod namespace's path.
    #[must_use]
    pub fn pod_netns(&self) -> &Path {
        &self.pod_path
    }

    /// Builds the pod network `config` describes (see the module's
    /// documentation for the steps). Must run inside a tokio runtime (the
    /// netlink connections' tasks run on it); blocks its thread while each
    /// `iptables` runs (a few milliseconds).
    ///
    /// On failure nothing it made is left: not the namespace, the device
    /// nor the rules.
    ///
    /// # Errors
    /// Before anything is made: [`PodNetworkError::UnknownTunnelType`],
    /// [`PodNetworkError::ExternalNetworkUnsupported`],
    /// [`PodNetworkError::Invalid`] (no pod IP or worker IP, a bad MAC, an
    /// MTU below [`MIN_MTU`], no VNI or port, an IPv6 address, a route
    /// destination with host bits, a neighbour without IP, MAC, device or
    /// state). While building: [`PodNetworkError::NamespaceExists`] (the
    /// path holds a file that is not a namespace, or a namespace with
    /// interfaces besides `lo`),
    /// [`PodNetworkError::Namespace`], [`PodNetworkError::Iptables`],
    /// [`PodNetworkError::Netlink`] (e.g. a device with this VNI and port
    /// already exists, a route's gateway is unreachable or its device is
    /// not the pod's), [`PodNetworkError::Netns`]; and
    /// [`PodNetworkError::UndoFailed`] when undoing also failed.
    pub async fn setup(&self, config: &PodNetwork) -> Result<(), PodNetworkError> {
        let plan = Plan::new(config)?;
        let mut made = Made::default();
        match self.build(&plan, &mut made).await {
            Ok(()) => Ok(()),
            Err(error) => match self.undo(&plan, made).await {
                Ok(()) => Err(error),
                Err(undo) => Err(PodNetworkError::UndoFailed {
                    error: Box::new(error),
                    undo: Box::new(undo),
                }),
            },
        }
    }

    async fn build(&self, plan: &Plan, made: &mut Made) -> Result<(), PodNetworkError> {
        let pod_fd = match create_namespace(&self.pod_path) {
            Ok(fd) => {
                made.namespace = true;
                fd
            }
            Err(PodNetworkError::NamespaceExists { .. })
                if is_mounted_namespace(&self.pod_path) =>
            {
                self.adopt_namespace(plan).await?
            }
            Err(e) => return Err(e),
        };
        self.adopted
            .store(!made.namespace, std::sync::atomic::Ordering::Relaxed);
        let pod = Netns::open(&self.pod_path)?.netlink()?;
        link_up(&pod, "lo").await?;

        self.add_notrack_rules(plan, made)?;

        let vm = self.vm.netlink()?;
        let transient = plan.transient_name();
        // A forwarder killed between this device's creation and its move
        // left it here (its name is this VNI's): it would make the add
        // fail with EEXIST at every restart.
        if let Some(index) = find_link(&vm, &transient).await? {
            tracing::warn!(interface = %transient, vni = plan.vni, "replacing the tunnel device an earlier forwarder left in the VM's namespace");
            vm.link()
                .del(index)
                .execute()
                .await
                .map_err(netlink(format!("delete the leftover {transient}")))?;
        }
        vm.link()
            .add(
                LinkVxlan::new(&transient, plan.vni)
                    .remote(plan.worker)
                    .port(plan.port)
                    .learning(false)
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "create the VXLAN device {transient} (VNI {}, port {}, remote {}) in {}",
                plan.vni,
                plan.port,
                plan.worker,
                self.vm.path().display()
            )))?;
        made.vm_device = true;
        let index = link_index(&vm, &transient).await?;
        vm.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(pod_fd.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "move {transient} into the pod namespace {}",
                self.pod_path.display()
            )))?;
        made.vm_device = false;
        drop(vm);

        let index = link_index(&pod, &transient).await?;
        made.pod_device = Some(index);
        let name = &plan.interface;
        pod.link()
            .set(LinkUnspec::new_with_index(index).name(name.clone()).build())
            .execute()
            .await
            .map_err(netlink(format!("rename {transient} to {name}")))?;
        pod.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(plan.mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("set the pod's MAC on {name}")))?;
        pod.link()
            .set(LinkUnspec::new_with_index(index).mtu(plan.mtu).build())
            .execute()
            .await
            .map_err(netlink(format!("set MTU {} on {name}", plan.mtu)))?;
        pod.address()
            .add(index, IpAddr::V4(plan.pod_ip), plan.pod_len)
            .execute()
            .await
            .map_err(netlink(format!(
                "add the pod IP {}/{} to {name}",
                plan.pod_ip, plan.pod_len
            )))?;
        pod.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("bring {name} up")))?;

        if plan.pod_len < 32 {
            remove_subnet_route(&pod, plan, index).await?;
        }
        for route in &plan.routes {
            add_route(&pod, route).await?;
        }
        for n in &plan.neighbors {
            let dev = link_index(&pod, &n.dev).await?;
            pod.neighbours()
                .add(dev, IpAddr::V4(n.ip))
                .link_local_address(&n.mac)
                .state(NlNeighbourState::from(n.state.number()))
                .execute()
                .await
                .map_err(netlink(format!(
                    "add neighbors[{}] {} lladdr {} dev {}",
                    n.index,
                    n.ip,
                    mac_text(&n.mac),
                    n.dev
                )))?;
        }
        Ok(())
    }

    /// Opens a namespace already mounted at the path (CAA's image makes
    /// `/run/netns/podns` with `ip netns add` before the kata agent starts
    /// in it), if it holds nothing but `lo` — or besides `lo` only this
    /// tunnel's device (the pod's interface or its transient name, a VXLAN
    /// of this VNI), which an earlier forwarder killed before its teardown
    /// left: that device is deleted and the tunnel built again, so a
    /// restarted forwarder does not fail for good on its own leftovers.
    async fn adopt_namespace(&self, plan: &Plan) -> Result<File, PodNetworkError> {
        let file = File::open(&self.pod_path).map_err(|source| PodNetworkError::Namespace {
            action: "open",
            path: self.pod_path.clone(),
            source,
        })?;
        let handle = Netns::open(&self.pod_path)?.netlink()?;
        let links: Vec<_> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!(
                "list the interfaces of {}",
                self.pod_path.display()
            )))?;
        let transient = plan.transient_name();
        let others: Vec<_> = links
            .iter()
            .filter(|l| link::name(l) != Some("lo"))
            .collect();
        let ours = |l: &&rtnetlink::packet_route::link::LinkMessage| {
            let name = link::name(l);
            (name == Some(plan.interface.as_str()) || name == Some(transient.as_str()))
                && link::vxlan_id(l) == Some(plan.vni)
        };
        if !others.iter().all(ours) {
            return Err(PodNetworkError::NamespaceExists {
                path: self.pod_path.clone(),
                why: format!("holds {} interfaces, not only lo", links.len()),
            });
        }
        for leftover in others {
            let name = link::name(leftover).unwrap_or_default();
            tracing::warn!(netns = %self.pod_path.display(), interface = name, vni = plan.vni, "replacing the pod network an earlier forwarder left (it stopped without its teardown)");
            handle
                .link()
                .del(leftover.header.index)
                .execute()
                .await
                .map_err(netlink(format!("delete the leftover {name}")))?;
        }
        tracing::info!(netns = %self.pod_path.display(), "using the pod network namespace already made");
        Ok(file)
    }

    /// Undoes what a failed setup made, in reverse.
    async fn undo(&self, plan: &Plan, made: Made) -> Result<(), PodNetworkError> {
        let mut first_error = None;
        if let Some(index) = made.pod_device {
            let result = async {
                let pod = Netns::open(&self.pod_path)?.netlink()?;
                match pod
                    .link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(netlink(format!("delete {}", plan.interface)))
                {
                    Err(e) if errno(&e) == Some(nix::libc::ENODEV) => Ok(()),
                    other => other,
                }
            }
            .await;
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        if made.vm_device {
            let result = async {
                let vm = self.vm.netlink()?;
                match find_link(&vm, &plan.transient_name()).await? {
                    Some(index) => vm
                        .link()
                        .del(index)
                        .execute()
                        .await
                        .map_err(netlink(format!("delete {}", plan.transient_name()))),
                    None => Ok(()),
                }
            }
            .await;
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        for chain in made.rules.iter().rev() {
            let mut args = vec!["-D".to_owned(), (*chain).to_owned()];
            args.extend(plan.notrack_rule(chain));
            if let Err(e) = self.iptables(&args).and_then(|ok| {
                ok.then_some(()).ok_or_else(|| PodNetworkError::Iptables {
                    args: args.join(" "),
                    why: "the rule is gone".to_owned(),
                })
            }) {
                first_error.get_or_insert(e);
            }
        }
        for (base, chain) in made.chains.iter().rev() {
            if let Err(e) = self.remove_chain_if_empty(base, chain) {
                first_error.get_or_insert(e);
            }
        }
        if made.namespace
            && let Err(e) = remove_namespace(&self.pod_path)
        {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes the pod network `config` describes: the pod namespace (and
    /// the tunnel device in it; a namespace that this node's setup found
    /// already made keeps its bind mount), a device left in the VM's namespace by an
    /// interrupted setup, and the NOTRACK rules (each chain too once
    /// empty). Idempotent: what is already gone is skipped, so it may run
    /// after a crash, twice, or with no setup before. Must run inside a
    /// tokio runtime.
    ///
    /// # Errors
    /// [`PodNetworkError::Invalid`] and the others of [`PodNetworkError`]
    /// as for [`PodNode::setup`] (the config must describe a pod network,
    /// since the rules are found from it), when the kernel or `iptables`
    /// refuses a removal.
    pub async fn teardown(&self, config: &PodNetwork) -> Result<(), PodNetworkError> {
        let plan = Plan::new(config)?;
        if is_mounted_namespace(&self.pod_path) {
            // The device goes first and at once: a namespace is destroyed
            // asynchronously, and the VXLAN socket (in the VM's namespace,
            // holding the VNI and port) with it.
            let pod = Netns::open(&self.pod_path)?.netlink()?;
            if let Some(index) = find_link(&pod, &plan.interface).await? {
                pod.link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(netlink(format!("delete {}", plan.interface)))?;
            }
        }
        if !self.adopted.load(std::sync::atomic::Ordering::Relaxed) {
            remove_namespace(&self.pod_path)?;
        }
        let vm = self.vm.netlink()?;
        if let Some(index) = find_link(&vm, &plan.transient_name()).await? {
            vm.link()
                .del(index)
                .execute()
                .await
                .map_err(netlink(format!("delete {}", plan.transient_name())))?;
        }
        for (base, chain) in CHAINS {
            let mut check = vec!["-C".to_owned(), chain.to_owned()];
            check.extend(plan.notrack_rule(chain));
            if self.iptables(&check)? {
                check[0] = "-D".to_owned();
                self.iptables_ok(&check)?;
            }
            self.remove_chain_if_empty(base, chain)?;
        }
        Ok(())
    }

    /// Adds CAA's NOTRACK rules (and their chains, when absent), noting
    /// in `made` what this call added.
    fn add_notrack_rules(&self, plan: &Plan, made: &mut Made) -> Result<(), PodNetworkError> {
        for (base, chain) in CHAINS {
            let created = !self.iptables(&["-S".into(), chain.into()])?;
            if created {
                self.iptables_ok(&["-N".into(), chain.into()])?;
                made.chains.push((base, chain));
                self.iptables_ok(&["-A".into(), base.into(), "-j".into(), chain.into()])?;
            }
            let mut rule = vec!["-C".to_owned(), chain.to_owned()];
            rule.extend(plan.notrack_rule(chain));
            // A chain just made is empty: no need to look for the rule.
            if created || !self.iptables(&rule)? {
                rule[0] = "-A".to_owned();
                self.iptables_ok(&rule)?;
                made.rules.push(chain);
            }
        }
        Ok(())
    }

    /// Removes `chain` and the jump to it from `base` when it holds no rule.
    fn remove_chain_if_empty(&self, base: &str, chain: &str) -> Result<(), PodNetworkError> {
        let Some(listing) = self.iptables_stdout(&["-S".into(), chain.into()])? else {
            return Ok(()); // no such chain
        };
        // `-S CHAIN` prints `-N CHAIN`, then one line per rule.
        if listing.lines().filter(|l| !l.trim().is_empty()).count() > 1 {
            return Ok(());
        }
        let jump = ["-C".into(), base.into(), "-j".into(), chain.into()];
        while self.iptables(&jump)? {
            self.iptables_ok(&["-D".into(), base.into(), "-j".into(), chain.into()])?;
        }
        self.iptables_ok(&["-X".into(), chain.into()])
    }

    /// Runs `iptables -w -t raw ARGS` in the VM's namespace: whether it
    /// exited 0.
    fn iptables(&self, args: &[String]) -> Result<bool, PodNetworkError> {
        Ok(self.iptables_stdout(args)?.is_some())
    }

    /// As [`Self::iptables`], an exit other than 0 an error.
    fn iptables_ok(&self, args: &[String]) -> Result<(), PodNetworkError> {
        let output = self.run_iptables(args)?;
        if output.status.success() {
            return Ok(());
        }
        Err(PodNetworkError::Iptables {
            args: format!("-t raw {}", args.join(" ")),
            why: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }

    /// Its standard output when it exited 0.
    fn iptables_stdout(&self, args: &[String]) -> Result<Option<String>, PodNetworkError> {
        let output = self.run_iptables(args)?;
        Ok(output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
    }

    fn run_iptables(&self, args: &[String]) -> Result<std::process::Output, PodNetworkError> {
        Ok(self.vm.command_output(
            Command::new("iptables")
                .args(["-w", "-t", "raw"])
                .args(args),
        )?)
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The index of the link `name`.
async fn link_index(handle: &Handle, name: &str) -> Result<u32, PodNetworkError> {
    find_link(handle, name)
        .await?
        .ok_or_else(|| PodNetworkError::Netlink {
            what: format!("find the interface {name}"),
            source: io::Error::from_raw_os_error(nix::libc::ENODEV),
        })
}

/// The index of the link `name`, `None` when there is none.
async fn find_link(handle: &Handle, name: &str) -> Result<Option<u32>, PodNetworkError> {
    let result = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(netlink(format!("find the interface {name}")));
    match result {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if errno(&e) == Some(nix::libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn link_up(handle: &Handle, name: &str) -> Result<(), PodNetworkError> {
    let index = link_index(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("bring {name} up")))
}

/// Deletes the route the kernel made for the pod's subnet (CAA's podnode.go:
/// PTP and GKE CNI plugins need it gone; Flannel's and Calico's routes put
/// it back). Already gone is fine.
async fn remove_subnet_route(
    handle: &Handle,
    plan: &Plan,
    index: u32,
) -> Result<(), PodNetworkError> {
    let network = Prefix {
        addr: IpAddr::V4(plan.pod_ip),
        len: plan.pod_len,
    }
    .network_v4()
    .unwrap_or(plan.pod_ip);
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network, plan.pod_len)
        .output_interface(index)
        // Unspecified protocol and scope "nowhere" match any.
        .protocol(NlProtocol::Unspec)
        .scope(NlScope::NoWhere)
        .build();
    match handle
        .route()
        .del(route)
        .execute()
        .await
        .map_err(netlink(format!(
            "remove the kernel's route {network}/{} dev {}",
            plan.pod_len, plan.interface
        ))) {
        Err(e) if errno(&e) == Some(nix::libc::ESRCH) => Ok(()),
        other => other,
    }
}

async fn add_route(handle: &Handle, route: &PlannedRoute) -> Result<(), PodNetworkError> {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .protocol(route.protocol)
        .scope(route.scope);
    if let Some((dst, len)) = route.dst {
        builder = builder.destination_prefix(dst, len);
    }
    if let Some(gw) = route.gw {
        builder = builder.gateway(gw);
    }
    if let Some(dev) = &route.dev {
        builder = builder.output_interface(link_index(handle, dev).await?);
    }
    let dst = route
        .dst
        .map_or_else(|| "default".to_owned(), |(a, l)| format!("{a}/{l}"));
    let via = route.gw.map(|g| format!(" via {g}")).unwrap_or_default();
    let dev = route
        .dev
        .as_ref()
        .map(|d| format!(" dev {d}"))
        .unwrap_or_default();
    handle
        .route()
        .add(builder.build())
        .execute()
        .await
        .map_err(netlink(format!(
            "add routes[{}] {dst}{via}{dev} in the pod namespace",
            route.index
        )))
}

/// Makes a network namespace and bind-mounts it at `path` (as `ip netns
/// add` does): a thread leaves its namespace for a new one and mounts
/// `/proc/thread-self/ns/net` on an empty file at `path`. Returns the new
/// namespace, open.
fn create_namespace(path: &Path) -> Result<File, PodNetworkError> {
    let fail = |action, source| PodNetworkError::Namespace {
        action,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(PodNetworkError::NamespaceExists {
                path: path.to_owned(),
                why: "is not a network namespace".to_owned(),
            });
        }
        Err(e) => return Err(fail("create", e)),
    }
    let target = path.to_owned();
    let made = std::thread::Builder::new()
        .name("podns".to_owned())
        .spawn(move || -> Result<File, (&'static str, io::Error)> {
            use nix::sched::{CloneFlags, unshare};
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ("create", e.into()))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ("mount", e.into()))?;
            File::open("/proc/thread-self/ns/net").map_err(|e| ("open", e))
        })
        .map_err(|e| fail("start a thread to create", e))
        .and_then(|t| {
            t.join()
                .map_err(|_| fail("create", io::Error::other("the thread panicked")))?
                .map_err(|(action, e)| fail(action, e))
        });
    if made.is_err() {
        // Nothing mounted: the empty file only.
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Whether `path` is a mounted network namespace (a bind mount of an
/// `nsfs` file), not a plain file.
fn is_mounted_namespace(path: &Path) -> bool {
    // NSFS_MAGIC from linux/magic.h.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| {
        // `f_type`'s width and sign differ by architecture (s390x's is u32).
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let kind = s.filesystem_type().0 as i64;
        kind == NSFS_MAGIC
    })
}

/// Unmounts and removes the namespace file at `path`; absent is fine.
fn remove_namespace(path: &Path) -> Result<(), PodNetworkError> {
    let fail = |action, source| PodNetworkError::Namespace {
        action,
        path: path.to_owned(),
        source,
    };
    if is_mounted_namespace(path) {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| fail("unmount", e.into()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fail("remove", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::config::{Neighbor, Route, RouteProtocol, RouteScope};

    fn config() -> PodNetwork {
        PodNetwork {
            pod_ip: Some("10.244.1.5/24".parse().unwrap()),
            pod_hw_addr: "32:b9:59:6b:f0:d5".into(),
            interface: "eth0".into(),
            worker_node_ip: Some("192.168.50.1/24".parse().unwrap()),
            tunnel_type: "vxlan".into(),
            routes: vec![
                Route {
                    dst: Some("0.0.0.0/0".parse().unwrap()),
                    gw: Some("10.244.1.1".parse().unwrap()),
                    dev: "eth0".into(),
                    protocol: Some(RouteProtocol::Boot),
                    scope: RouteScope::Universe,
                },
                Route {
                    dst: Some("10.244.1.0/24".parse().unwrap()),
                    gw: None,
                    dev: "eth0".into(),
                    protocol: Some(RouteProtocol::Kernel),
                    scope: RouteScope::Link,
                },
            ],
            neighbors: vec![Neighbor {
                ip: Some("10.244.1.1".parse().unwrap()),
                hw_addr: "ee:ee:ee:ee:ee:ee".into(),
                dev: "eth0".into(),
                state: NeighborState::Permanent,
            }],
            mtu: 1500,
            index: 1,
            vxlan_port: 4789,
            vxlan_id: 555_001,
            dedicated: false,
            external_net_via_pod_vm: false,
        }
    }

    #[test]
    fn a_plan_puts_gateway_less_routes_first_and_caps_the_mtu() {
        let plan = Plan::new(&config()).unwrap();
        assert_eq!(plan.mtu, 1450);
        assert_eq!(plan.routes[0].index, 1);
        assert_eq!(plan.routes[0].scope, NlScope::Link);
        assert_eq!(plan.routes[1].gw, Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(plan.routes[1].protocol, NlProtocol::Boot);
        let mut small = config();
        small.mtu = 1400;
        assert_eq!(Plan::new(&small).unwrap().mtu, 1400);
        assert_eq!(
            plan.notrack_rule("peerpod-OUTPUT").join(" "),
            "-m comment --comment peerpod [vni:555001] -d 192.168.50.1 -p udp -m udp --dport 4789 -j NOTRACK"
        );
    }

    #[test]
    fn bad_values_are_refused_before_anything_is_made() {
        type Change = fn(&mut PodNetwork);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.pod_ip = None, "pod-network podip is not set"),
            (|c| c.worker_node_ip = None, "worker-node-ip is not set"),
            (|c| c.interface.clear(), "interface is not set"),
            (|c| c.interface = "a/b".into(), "is not an interface name"),
            (
                |c| c.pod_hw_addr = "zz".into(),
                "pod-hw-addr \"zz\" is not a MAC",
            ),
            (
                |c| c.pod_hw_addr = "01:00:5e:00:00:01".into(),
                "not a unicast MAC",
            ),
            (|c| c.mtu = 40, "mtu is 40: below 68"),
            (|c| c.mtu = 0, "mtu is 0"),
            (|c| c.vxlan_id = 0, "vxlan-id is 0"),
            (|c| c.vxlan_id = 1 << 24, "a VNI is 1 to 16777215"),
            (|c| c.vxlan_port = 0, "vxlan-port is not set"),
            (
                |c| c.tunnel_type = "geneve".into(),
                "\"geneve\" is not known",
            ),
            (|c| c.tunnel_type.clear(), "\"\" is not known"),
            (
                |c| c.external_net_via_pod_vm = true,
                "external-net-via-pod-vm is set",
            ),
            (
                |c| c.pod_ip = Some("fd00::5/64".parse().unwrap()),
                "IPv4 only",
            ),
            (
                |c| c.routes[1].dst = Some("10.244.1.5/24".parse().unwrap()),
                "routes[1].dst 10.244.1.5/24 has host bits set",
            ),
            (
                |c| c.neighbors[0].state = NeighborState::None,
                "neighbors[0].state is not set",
            ),
            (
                |c| c.neighbors[0].dev.clear(),
                "neighbors[0].dev is not set",
            ),
            (|c| c.neighbors[0].hw_addr.clear(), "neighbors[0].hw-addr"),
        ];
        for (change, want) in cases {
            let mut c = config();
            change(&mut c);
            let err = Plan::new(&c).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    #[test]
    fn macs_parse_as_go_parses_six_byte_ones() {
        assert_eq!(
            parse_mac("0e:8f:62:f3:81:AD"),
            Some([0x0e, 0x8f, 0x62, 0xf3, 0x81, 0xad])
        );
        assert_eq!(
            parse_mac("0e-8f-62-f3-81-ad"),
            Some([0x0e, 0x8f, 0x62, 0xf3, 0x81, 0xad])
        );
        for bad in [
            "",
            "0e:8f:62:f3:81",
            "0e:8f:62:f3:81:ad:00",
            "e:8f:62:f3:81:ad",
            "0e:8f:62:f3:81:ag",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(mac_text(&[0xee; 6]), "ee:ee:ee:ee:ee:ee");
    }
}
