//! The daemon's pod network: whether it builds tunnels, with what, and the
//! tunnel of one sandbox from its record.

use super::inspect::{self, HostNetwork, InspectError, PodNetwork as Inspected};
use super::tunnel::{self, TunnelConfig, TunnelError};
use super::vni::VniRange;
use podvisor_podvm::network::config::{
    Neighbor, NeighborState, PodNetwork, Prefix, Route, RouteProtocol, RouteScope,
};
use podvisor_podvm::network::netns::SELF_NETNS;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// How this daemon joins its pods' networks to their pod VMs (from
/// `--vxlan-port`, `--vxlan-min-id`, `--host-interface`,
/// `--pod-subnet-cidrs`). Absent (`None` where it is held) when the
/// provider's instances have no network of their own.
#[derive(Debug, Clone)]
pub struct PodNetworkSettings {
    /// The namespace the tunnels' UDP sockets and NOTRACK rules live in:
    /// the daemon's own ([`SELF_NETNS`]).
    pub host_netns: PathBuf,
    /// `--host-interface`, else the default route's.
    pub host_interface: Option<String>,
    /// The VXLAN UDP port (`VXLAN_PORT`).
    pub vxlan_port: u16,
    /// The VNIs handed out.
    pub vnis: VniRange,
    /// `POD_SUBNET_CIDRS`: extra routes in the pod VM's pod namespace, via
    /// the pod's gateway (source: CAA `pkg/podnetwork/workernode.go`).
    pub pod_subnets: Vec<ipnet::Ipv4Net>,
}

/// Why a sandbox's pod network could not be described or built.
#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    /// The pod's namespace could not be read, or does not hold one IPv4
    /// interface the tunnel can serve: permanent for this pod.
    #[error("Cannot inspect the pod network")]
    Inspect(#[from] InspectError),
    /// The node's end of the tunnels (the host interface and its address,
    /// in the daemon's network namespace) could not be read: may pass.
    #[error("Cannot find the node's end of the pod tunnel in the daemon's network namespace")]
    Host(#[source] InspectError),
    /// The tunnel could not be set up or removed.
    #[error("Cannot build the pod's tunnel")]
    Tunnel(#[from] TunnelError),
    /// The pod VM has no IPv4 address for the tunnel to send to.
    #[error("The pod VM has no IPv4 address for its tunnel (addresses: {0:?})")]
    NoPodVmAddress(Vec<IpAddr>),
}

impl PodNetworkError {
    /// Whether trying again may succeed: the node's side may come up (its
    /// interface, its address); a pod without a usable network will not.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Host(_) | Self::Tunnel(_))
    }

    /// The failure's class, the `cause` label of
    /// `podvisor_tunnel_failures_total`: `netns` (the pod's namespace
    /// cannot be opened: gone, or not a namespace), `pod_interface` (no
    /// primary interface, not one IPv4 address, no MAC), `mtu` (below the
    /// VXLAN overhead), `host_interface` (the node's end),
    /// `pod_vm_address` (no IPv4 address on the pod VM), `other_tunnel` (a
    /// `vxlan1` of another VNI in the pod), `vni`, `netlink`, `iptables`
    /// (the NOTRACK rules) or `internal`.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Inspect(e) => match e {
                InspectError::Netns(_) => "netns",
                InspectError::Netlink { .. } => "netlink",
                InspectError::MtuTooSmall { .. } => "mtu",
                InspectError::NoPrimaryInterface { .. }
                | InspectError::InterfaceMissing { .. }
                | InspectError::NoIpv4 { .. }
                | InspectError::SeveralIpv4 { .. }
                | InspectError::NoMac { .. } => "pod_interface",
            },
            Self::Host(_) => "host_interface",
            Self::NoPodVmAddress(_) => "pod_vm_address",
            Self::Tunnel(e) => match e {
                TunnelError::Netns(_) => "netns",
                TunnelError::InvalidVni { .. } => "vni",
                TunnelError::PodInterfaceMissing { .. } => "pod_interface",
                TunnelError::OtherTunnel { .. } => "other_tunnel",
                TunnelError::Netlink { .. } => "netlink",
                TunnelError::Notrack(_) => "iptables",
                TunnelError::Join(_) => "internal",
            },
        }
    }
}

impl PodNetworkSettings {
    /// The settings of a daemon whose host namespace is its own.
    pub fn new(
        host_interface: Option<String>,
        vxlan_port: u16,
        vnis: VniRange,
        pod_subnets: Vec<ipnet::Ipv4Net>,
    ) -> Self {
        Self {
            host_netns: PathBuf::from(SELF_NETNS),
            host_interface,
            vxlan_port,
            vnis,
            pod_subnets,
        }
    }

    /// What the pod VM needs to rebuild the pod's network (apf.json's
    /// `pod-network`): the pod namespace at `pod_netns` and the node's
    /// tunnel end, inspected now, with the sandbox's `vni`.
    ///
    /// # Errors
    /// [`PodNetworkError::Inspect`]: the namespace does not exist, the pod
    /// has no IPv4 address or two, its MTU is below the VXLAN overhead, the
    /// host interface is missing or has no address.
    pub async fn describe(
        &self,
        pod_netns: &Path,
        vni: u32,
    ) -> Result<PodNetwork, PodNetworkError> {
        let pod = inspect::inspect_pod(pod_netns).await?;
        let host = inspect::inspect_host(&self.host_netns, self.host_interface.as_deref())
            .await
            .map_err(PodNetworkError::Host)?;
        Ok(self.apf_pod_network(&pod, &host, vni))
    }

    /// The `pod-network` of apf.json for `pod` and `host`, as CAA's worker
    /// writes it (source: CAA `pkg/podnetwork/workernode.go`, `Inspect`).
    pub fn apf_pod_network(&self, pod: &Inspected, host: &HostNetwork, vni: u32) -> PodNetwork {
        let mut routes: Vec<Route> = pod
            .routes
            .iter()
            .map(|r| Route {
                dst: Some(Prefix {
                    addr: IpAddr::V4(r.destination),
                    len: r.prefix_len,
                }),
                gw: r.gateway.map(IpAddr::V4),
                dev: r.device.clone(),
                protocol: protocol(r.protocol),
                scope: scope(r.scope),
            })
            .collect();
        routes.extend(self.pod_subnets.iter().map(|net| Route {
            dst: Some(Prefix {
                addr: IpAddr::V4(net.network()),
                len: net.prefix_len(),
            }),
            gw: pod.gateway.map(IpAddr::V4),
            dev: pod.interface.clone(),
            protocol: None,
            scope: RouteScope::Universe,
        }));
        PodNetwork {
            pod_ip: Some(Prefix {
                addr: IpAddr::V4(pod.ip),
                len: pod.prefix_len,
            }),
            pod_hw_addr: mac(&pod.mac),
            interface: pod.interface.clone(),
            worker_node_ip: Some(Prefix {
                addr: IpAddr::V4(host.worker_ip),
                len: host.prefix_len,
            }),
            tunnel_type: "vxlan".into(),
            routes,
            neighbors: pod
                .neighbours
                .iter()
                .map(|n| Neighbor {
                    ip: Some(IpAddr::V4(n.ip)),
                    hw_addr: mac(&n.mac),
                    dev: n.device.clone(),
                    state: NeighborState::Permanent,
                })
                .collect(),
            mtu: pod.mtu,
            index: vni.saturating_sub(self.vnis.min),
            vxlan_port: self.vxlan_port,
            vxlan_id: vni,
            dedicated: host.dedicated,
            external_net_via_pod_vm: false,
        }
    }

    /// The tunnel of the sandbox whose pod namespace is `pod_netns`, to
    /// the pod VM at `pod_vm_ips`, with `vni`. With `rebuild` it is set up
    /// whatever is there (set-up is idempotent: a device of the VNI left
    /// half-built by a crash is replaced); without, a tunnel device of the
    /// VNI found in the pod's namespace is kept (a restart does not cut
    /// the traffic of Running pods). Returns whether it was built.
    ///
    /// The pod VM's address is its first IPv4 one, or its second when the
    /// node's tunnel interface is a dedicated one (`--host-interface` other
    /// than the default route's) and the VM has two, as the reference
    /// (CAA `tunneler/vxlan/workernode.go`, `Setup`).
    ///
    /// # Errors
    /// [`PodNetworkError`]: the namespace or interface is gone, no IPv4
    /// address, a netlink or iptables step failed (undone).
    pub async fn ensure_tunnel(
        &self,
        pod_netns: &Path,
        pod_vm_ips: &[IpAddr],
        vni: u32,
        rebuild: bool,
    ) -> Result<bool, PodNetworkError> {
        if !rebuild && tunnel::exists(pod_netns, vni).await? {
            return Ok(false);
        }
        let pod = inspect::inspect_pod(pod_netns).await?;
        let host = inspect::inspect_host(&self.host_netns, self.host_interface.as_deref())
            .await
            .map_err(PodNetworkError::Host)?;
        let v4: Vec<Ipv4Addr> = pod_vm_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        let pick = if host.dedicated && v4.len() > 1 { 1 } else { 0 };
        let pod_vm_ip = *v4
            .get(pick)
            .ok_or_else(|| PodNetworkError::NoPodVmAddress(pod_vm_ips.to_vec()))?;
        tunnel::setup(&self.tunnel(pod_netns, pod.interface, pod_vm_ip, vni)).await?;
        Ok(true)
    }

    /// Removes the tunnel of `vni` from the pod namespace `pod_netns` (if
    /// it still exists) and its NOTRACK rules. Idempotent.
    ///
    /// # Errors
    /// [`PodNetworkError::Tunnel`].
    pub async fn remove_tunnel(&self, pod_netns: &Path, vni: u32) -> Result<(), PodNetworkError> {
        // The interface name matters only to set-up; teardown finds the
        // redirects by the tunnel device.
        let interface = match inspect::inspect_pod(pod_netns).await {
            Ok(pod) => pod.interface,
            Err(_) => String::new(),
        };
        tunnel::teardown(&self.tunnel(pod_netns, interface, Ipv4Addr::UNSPECIFIED, vni)).await?;
        Ok(())
    }

    fn tunnel(
        &self,
        pod_netns: &Path,
        pod_interface: String,
        pod_vm_ip: Ipv4Addr,
        vni: u32,
    ) -> TunnelConfig {
        TunnelConfig {
            host_netns: self.host_netns.clone(),
            pod_netns: pod_netns.to_path_buf(),
            pod_interface,
            pod_vm_ip,
            vni,
            port: self.vxlan_port,
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, as Go's `net.HardwareAddr` writes it.
fn mac(bytes: &[u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn protocol(number: u8) -> Option<RouteProtocol> {
    match number {
        2 => Some(RouteProtocol::Kernel),
        3 => Some(RouteProtocol::Boot),
        4 => Some(RouteProtocol::Static),
        16 => Some(RouteProtocol::Dhcp),
        _ => None,
    }
}

fn scope(number: u8) -> RouteScope {
    match number {
        200 => RouteScope::Site,
        253 => RouteScope::Link,
        254 => RouteScope::Host,
        255 => RouteScope::Nowhere,
        _ => RouteScope::Universe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inspect::{PodNeighbour, PodRoute};

    #[test]
    fn apf_pod_network_is_what_caas_worker_writes() {
        let settings = PodNetworkSettings::new(
            None,
            4789,
            VniRange { min: 555_000 },
            vec!["10.96.0.0/12".parse().unwrap()],
        );
        let pod = Inspected {
            interface: "eth0".into(),
            ip: Ipv4Addr::new(10, 244, 1, 5),
            prefix_len: 24,
            mac: [0x0e, 0x8f, 0x62, 0xf3, 0x81, 0xad],
            mtu: 1450,
            gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
            routes: vec![
                PodRoute {
                    destination: Ipv4Addr::UNSPECIFIED,
                    prefix_len: 0,
                    gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
                    device: "eth0".into(),
                    protocol: 3,
                    scope: 0,
                    metric: 0,
                },
                PodRoute {
                    destination: Ipv4Addr::new(10, 244, 1, 0),
                    prefix_len: 24,
                    gateway: None,
                    device: "eth0".into(),
                    protocol: 2,
                    scope: 253,
                    metric: 0,
                },
            ],
            neighbours: vec![PodNeighbour {
                ip: Ipv4Addr::new(10, 244, 1, 1),
                mac: [0xee; 6],
                device: "eth0".into(),
            }],
        };
        let host = HostNetwork {
            interface: "ens3".into(),
            worker_ip: Ipv4Addr::new(192, 168, 10, 4),
            prefix_len: 24,
            dedicated: false,
        };
        let apf = settings.apf_pod_network(&pod, &host, 555_003);
        let json = serde_json::to_value(&apf).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "podip": "10.244.1.5/24",
                "pod-hw-addr": "0e:8f:62:f3:81:ad",
                "interface": "eth0",
                "worker-node-ip": "192.168.10.4/24",
                "tunnel-type": "vxlan",
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot"},
                    {"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"},
                    {"dst": "10.96.0.0/12", "gw": "10.244.1.1", "dev": "eth0"}
                ],
                "neighbors": [
                    {"ip": "10.244.1.1", "hw-addr": "ee:ee:ee:ee:ee:ee", "dev": "eth0", "state": "permanent"}
                ],
                "mtu": 1450,
                "index": 3,
                "vxlan-port": 4789,
                "vxlan-id": 555003,
                "dedicated": false,
                "external-net-via-pod-vm": false
            })
        );
        // And the pod VM side reads it back as it was.
        let text = serde_json::json!({ "pod-network": json }).to_string();
        let back = podvisor_podvm::network::config::from_apf_json(&text)
            .unwrap()
            .unwrap();
        assert_eq!(back, apf);
    }
}
