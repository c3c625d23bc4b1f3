//! What the pod VM must reproduce of the pod's network, and where the
//! worker node's end of the tunnel is.
//!
//! Source: CAA `pkg/podnetwork/workernode.go` (`Inspect`, `getPodIP`) and
//! `pkg/podnetwork/common.go` (`findPrimaryInterface`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use podvisor_podvm::network::netns::{Netns, NetnsError};
use rtnetlink::IpVersion;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use serde::{Deserialize, Serialize};

use super::{MIN_POD_MTU, link_name, links};

/// The pod's network as the CNI made it: what the pod VM recreates on its
/// side of the tunnel. Source: CAA `tunneler.Config` (fields `PodIP`,
/// `PodHwAddr`, `InterfaceName`, `MTU`, `Routes`, `Neighbors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pod's primary interface (the CNI's, e.g. `eth0`).
    pub interface: String,
    /// The pod IP: the interface's only IPv4 address.
    pub ip: Ipv4Addr,
    /// The pod IP's prefix length, 0–32.
    pub prefix_len: u8,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    /// The interface's MTU in bytes (at least [`MIN_POD_MTU`]).
    pub mtu: u32,
    /// The gateway of the default route through the interface, if it has
    /// one (CAA uses it for the `POD_SUBNET_CIDRS` routes).
    pub gateway: Option<Ipv4Addr>,
    /// The pod's IPv4 routes, in CAA's order (destination address, then
    /// prefix length, then metric).
    pub routes: Vec<PodRoute>,
    /// The interface's permanent IPv4 neighbours.
    pub neighbours: Vec<PodNeighbour>,
}

/// One IPv4 route of the pod's netns: main table, unicast, protocol
/// kernel, boot, static or DHCP (source: CAA `pkg/util/netops/netops.go`,
/// `RouteList`'s default filters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRoute {
    /// The destination network's address (`0.0.0.0` for the default
    /// route).
    pub destination: Ipv4Addr,
    /// The destination's prefix length, 0–32 (0: the default route).
    pub prefix_len: u8,
    /// The next hop, `None` for a directly connected network.
    pub gateway: Option<Ipv4Addr>,
    /// The output interface's name (empty when the route has none, e.g.
    /// multipath).
    pub device: String,
    /// `rtm_protocol` as the kernel numbers it (2 kernel, 3 boot, 4
    /// static, 16 DHCP).
    pub protocol: u8,
    /// `rtm_scope` as the kernel numbers it (0 universe, 253 link, 254
    /// host).
    pub scope: u8,
    /// The route's metric (`RTA_PRIORITY`; 0 when unset).
    pub metric: u32,
}

/// A permanent IPv4 neighbour of the pod's interface (source: CAA
/// `workernode.go`, `NeighborList` with `NeighborStatePermanent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNeighbour {
    /// The neighbour's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The interface it is on.
    pub device: String,
}

/// The worker node's end of the tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNetwork {
    /// The host interface: the one named by `--host-interface`, else the
    /// primary one (the default route's, lowest metric).
    pub interface: String,
    /// The worker IP: the interface's first IPv4 address. The pod VM's
    /// VXLAN device sends to it.
    pub worker_ip: Ipv4Addr,
    /// The worker IP's prefix length, 0–32.
    pub prefix_len: u8,
    /// Whether the interface was named and is not the primary one: CAA
    /// then sends to the pod VM's second IP (source: CAA
    /// `workernode.go`, `config.Dedicated`).
    pub dedicated: bool,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The namespace cannot be opened or entered (e.g. its path does not
    /// exist: [`NetnsError::NotFound`]).
    #[error("Cannot use the network namespace")]
    Netns(#[from] NetnsError),
    /// A netlink request failed.
    #[error("Cannot {action} in the network namespace {netns}")]
    Netlink {
        /// What was being read.
        action: &'static str,
        /// The namespace's path.
        netns: PathBuf,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// No default route, so no primary interface.
    #[error("The network namespace {netns} has no default route, so no primary interface")]
    NoPrimaryInterface {
        /// The namespace's path.
        netns: PathBuf,
    },
    /// The interface named (or the default route's) does not exist.
    #[error("The network namespace {netns} has no interface {interface}")]
    InterfaceMissing {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
    },
    /// The pod's interface has no IPv4 address.
    #[error("The interface {interface} in {netns} has no IPv4 address")]
    NoIpv4 {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
    },
    /// The pod's interface has more than one IPv4 address; CAA requires
    /// exactly one.
    #[error(
        "The interface {interface} in {netns} has {count} IPv4 addresses; a pod needs exactly one"
    )]
    SeveralIpv4 {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
        /// How many.
        count: usize,
    },
    /// The pod's interface has no 6-byte MAC address.
    #[error("The interface {interface} in {netns} has no Ethernet MAC address")]
    NoMac {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
    },
    /// The pod's MTU leaves less than a minimal IPv4 packet once the VXLAN
    /// overhead is taken off.
    #[error(
        "The interface {interface} in {netns} has MTU {mtu}, below {min}: the VXLAN overhead (50 bytes) plus the minimum IPv4 MTU (68 bytes)"
    )]
    MtuTooSmall {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
        /// Its MTU in bytes.
        mtu: u32,
        /// [`MIN_POD_MTU`].
        min: u32,
    },
}

/// Reads the pod's network from its network namespace (`netns`: CreateVM's
/// `networkNamespacePath`, e.g. `/var/run/netns/cni-…`).
///
/// The primary interface is CAA's pick: among the main table's default
/// routes, by metric, the first, unless a later one's interface has the
/// same name stem and a lower number (`eth0` over `eth1`).
///
/// # Errors
/// [`InspectError::Netns`] ([`NetnsError::NotFound`] when the path does not
/// exist), [`InspectError::NoPrimaryInterface`],
/// [`InspectError::InterfaceMissing`], [`InspectError::NoIpv4`],
/// [`InspectError::SeveralIpv4`], [`InspectError::NoMac`],
/// [`InspectError::MtuTooSmall`], [`InspectError::Netlink`].
pub async fn inspect_pod(netns: &Path) -> Result<PodNetwork, InspectError> {
    let namespace = Netns::open(netns)?;
    let handle = namespace.netlink()?;
    let netlink = |action| {
        move |source| InspectError::Netlink {
            action,
            netns: netns.to_path_buf(),
            source,
        }
    };
    let all_links = links(&handle).await.map_err(netlink("list links"))?;
    let all_routes = ipv4_routes(&handle).await.map_err(netlink("list routes"))?;
    let Some((interface, gateway)) = primary_interface(&all_routes, &all_links) else {
        return Err(InspectError::NoPrimaryInterface {
            netns: netns.to_path_buf(),
        });
    };
    let Some(link) = all_links
        .iter()
        .find(|link| link_name(link) == Some(interface.as_str()))
    else {
        return Err(InspectError::InterfaceMissing {
            netns: netns.to_path_buf(),
            interface,
        });
    };
    let index = link.header.index;

    let addresses = ipv4_addresses(&handle, index)
        .await
        .map_err(netlink("list addresses"))?;
    let (ip, prefix_len) = match addresses.as_slice() {
        [] => {
            return Err(InspectError::NoIpv4 {
                netns: netns.to_path_buf(),
                interface,
            });
        }
        [one] => *one,
        several => {
            return Err(InspectError::SeveralIpv4 {
                netns: netns.to_path_buf(),
                interface,
                count: several.len(),
            });
        }
    };
    let Some(mac) = link_mac(link) else {
        return Err(InspectError::NoMac {
            netns: netns.to_path_buf(),
            interface,
        });
    };
    let mtu = link_mtu(link);
    if mtu < MIN_POD_MTU {
        return Err(InspectError::MtuTooSmall {
            netns: netns.to_path_buf(),
            interface,
            mtu,
            min: MIN_POD_MTU,
        });
    }

    let routes = all_routes
        .iter()
        .filter(|route| is_pod_route(route))
        .map(|route| to_pod_route(route, &all_links))
        .collect();
    let neighbours = permanent_neighbours(&handle, index, &interface)
        .await
        .map_err(netlink("list neighbours"))?;
    Ok(PodNetwork {
        interface,
        ip,
        prefix_len,
        mac,
        mtu,
        gateway,
        routes,
        neighbours,
    })
}

/// Reads the worker node's end of the tunnels in the host network
/// namespace `netns` (in production `/proc/self/ns/net`): the interface
/// named `host_interface` (`--host-interface`), else the primary one (as
/// for [`inspect_pod`]), and its first IPv4 address.
///
/// # Errors
/// [`InspectError::Netns`], [`InspectError::NoPrimaryInterface`] (no
/// interface named and no default route), [`InspectError::InterfaceMissing`]
/// (the named interface does not exist), [`InspectError::NoIpv4`],
/// [`InspectError::Netlink`].
pub async fn inspect_host(
    netns: &Path,
    host_interface: Option<&str>,
) -> Result<HostNetwork, InspectError> {
    let namespace = Netns::open(netns)?;
    let handle = namespace.netlink()?;
    let netlink = |action| {
        move |source| InspectError::Netlink {
            action,
            netns: netns.to_path_buf(),
            source,
        }
    };
    let all_links = links(&handle).await.map_err(netlink("list links"))?;
    let all_routes = ipv4_routes(&handle).await.map_err(netlink("list routes"))?;
    let primary = primary_interface(&all_routes, &all_links).map(|(name, _)| name);
    let (interface, dedicated) = match (host_interface, primary) {
        (Some(named), primary) => (named.to_owned(), primary.as_deref() != Some(named)),
        (None, Some(primary)) => (primary, false),
        (None, None) => {
            return Err(InspectError::NoPrimaryInterface {
                netns: netns.to_path_buf(),
            });
        }
    };
    let Some(link) = all_links
        .iter()
        .find(|link| link_name(link) == Some(interface.as_str()))
    else {
        return Err(InspectError::InterfaceMissing {
            netns: netns.to_path_buf(),
            interface,
        });
    };
    let addresses = ipv4_addresses(&handle, link.header.index)
        .await
        .map_err(netlink("list addresses"))?;
    let Some(&(worker_ip, prefix_len)) = addresses.first() else {
        return Err(InspectError::NoIpv4 {
            netns: netns.to_path_buf(),
            interface,
        });
    };
    Ok(HostNetwork {
        interface,
        worker_ip,
        prefix_len,
        dedicated,
    })
}

/// The routing table main's number.
const RT_TABLE_MAIN: u32 = 254;

/// All IPv4 routes of the namespace, in CAA's order (table, destination
/// address, prefix length, metric; source: CAA `netops.go`,
/// `Route.compare`).
async fn ipv4_routes(handle: &rtnetlink::Handle) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let request = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut routes: Vec<RouteMessage> = handle.route().get(request).execute().try_collect().await?;
    routes.retain(|route| route.header.address_family == AddressFamily::Inet);
    routes.sort_by_key(|route| {
        (
            table(route),
            route_destination(route),
            route.header.destination_prefix_length,
            route_metric(route),
        )
    });
    Ok(routes)
}

/// The route's table (`RTA_TABLE` when present: it holds ids above 255).
fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or_else(|| u32::from(route.header.table))
}

/// The route's destination address (`0.0.0.0` when none: default route).
fn route_destination(route: &RouteMessage) -> Ipv4Addr {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// The route's gateway, if any.
fn route_gateway(route: &RouteMessage) -> Option<Ipv4Addr> {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Gateway(RouteAddress::Inet(address)) => Some(*address),
            _ => None,
        })
}

/// The route's metric (0 when unset).
fn route_metric(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Priority(metric) => Some(*metric),
            _ => None,
        })
        .unwrap_or(0)
}

/// The name of the route's output interface, if it has one.
fn route_device<'a>(route: &RouteMessage, links: &'a [LinkMessage]) -> Option<&'a str> {
    let index = route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })?;
    links
        .iter()
        .find(|link| link.header.index == index)
        .and_then(link_name)
}

/// Whether CAA passes the route on to the pod VM (main table, unicast;
/// kernel, boot, static or DHCP).
fn is_pod_route(route: &RouteMessage) -> bool {
    let RouteHeader { kind, protocol, .. } = route.header;
    table(route) == RT_TABLE_MAIN
        && kind == RouteType::Unicast
        && matches!(
            protocol,
            RouteProtocol::Kernel
                | RouteProtocol::Boot
                | RouteProtocol::Static
                | RouteProtocol::Dhcp
        )
}

/// A route in the API's terms.
fn to_pod_route(route: &RouteMessage, links: &[LinkMessage]) -> PodRoute {
    PodRoute {
        destination: route_destination(route),
        prefix_len: route.header.destination_prefix_length,
        gateway: route_gateway(route),
        device: route_device(route, links).unwrap_or_default().to_owned(),
        protocol: route.header.protocol.into(),
        scope: route.header.scope.into(),
        metric: route_metric(route),
    }
}

/// The primary interface and its default route's gateway, as CAA picks
/// it: the main table's default routes in metric order; the first wins
/// unless a later one's interface has the same name stem and a lower
/// number. Source: CAA `pkg/podnetwork/common.go`
/// (`findPrimaryInterface`, `extractInterfaceNumber`).
fn primary_interface(
    routes: &[RouteMessage],
    links: &[LinkMessage],
) -> Option<(String, Option<Ipv4Addr>)> {
    let mut primary: Option<(&str, &str, u64, Option<Ipv4Addr>)> = None;
    for route in routes {
        if table(route) != RT_TABLE_MAIN || route.header.destination_prefix_length != 0 {
            continue;
        }
        let Some(device) = route_device(route, links) else {
            continue;
        };
        let (stem, number) = split_interface_number(device);
        let better = match primary {
            None => true,
            Some((_, primary_stem, primary_number, _)) => {
                stem == primary_stem && number < primary_number
            }
        };
        if better {
            primary = Some((device, stem, number, route_gateway(route)));
        }
    }
    primary.map(|(device, _, _, gateway)| (device.to_owned(), gateway))
}

/// `eth10` → (`eth`, 10); a name without digits, or whose tail after the
/// first digit is not a number, gets the highest number. Source: CAA
/// `common.go` (`extractInterfaceNumber`).
fn split_interface_number(name: &str) -> (&str, u64) {
    match name.find(|c: char| c.is_ascii_digit()) {
        None => (name, u64::MAX),
        Some(at) => (&name[..at], name[at..].parse().unwrap_or(u64::MAX)),
    }
}

/// The link's IPv4 addresses with prefix lengths, in the kernel's order.
async fn ipv4_addresses(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8)>, rtnetlink::Error> {
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(messages
        .iter()
        .filter(|message| message.header.index == index)
        .filter_map(|message| {
            let address = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Local(std::net::IpAddr::V4(address))
                    | AddressAttribute::Address(std::net::IpAddr::V4(address)) => Some(*address),
                    _ => None,
                })?;
            Some((address, message.header.prefix_len))
        })
        .collect())
}

/// The link's MAC address when it is a 6-byte one.
fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
}

/// The link's MTU in bytes (0 when the kernel did not say).
fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0)
}

/// The permanent IPv4 neighbours on link `index`.
async fn permanent_neighbours(
    handle: &rtnetlink::Handle,
    index: u32,
    device: &str,
) -> Result<Vec<PodNeighbour>, rtnetlink::Error> {
    let messages: Vec<_> = handle
        .neighbours()
        .get()
        .set_family(IpVersion::V4)
        .execute()
        .try_collect()
        .await?;
    Ok(messages
        .iter()
        .filter(|message| {
            message.header.ifindex == index && message.header.state == NeighbourState::Permanent
        })
        .filter_map(|message| {
            let ip = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })?;
            let mac = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    NeighbourAttribute::LinkLocalAddress(bytes) => {
                        <[u8; 6]>::try_from(bytes.as_slice()).ok()
                    }
                    _ => None,
                })?;
            Some(PodNeighbour {
                ip,
                mac,
                device: device.to_owned(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_numbers_split_as_caa_does() {
        assert_eq!(split_interface_number("eth0"), ("eth", 0));
        assert_eq!(split_interface_number("ens10"), ("ens", 10));
        assert_eq!(split_interface_number("lo"), ("lo", u64::MAX));
        assert_eq!(split_interface_number("veth1a"), ("veth", u64::MAX));
    }

    #[tokio::test]
    async fn a_missing_netns_path_is_named() {
        let err = inspect_pod(Path::new("/var/run/netns/podvisor-no-such-netns"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, InspectError::Netns(NetnsError::NotFound { .. })),
            "{err:?}"
        );
    }
}
