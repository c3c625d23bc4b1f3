//! `apf.json`'s `pod-network`: what the worker node tells the pod VM about
//! the pod's network.
//!
//! The shape is CAA's `tunneler.Config` as Go's `encoding/json` writes it
//! (`pkg/podnetwork/tunneler/tunneler.go`), so the same `apf.json` works
//! for CAA's forwarder and ours:
//!
//! - Addresses and prefixes are `netip.Addr`/`netip.Prefix`, which marshal
//!   as text: `"10.244.1.5/24"` keeps the host bits, and the zero value is
//!   `""`. A struct is never left out by Go's `omitempty`, so an absent
//!   gateway is written `"gw": ""` and a route's destination always appears.
//! - Route protocol, route scope and neighbour state marshal as strings
//!   through lookup tables (`pkg/util/netops/netops.go`, with
//!   `vishvananda/netlink`'s names); their zero values (`unspec`,
//!   `universe`, `none`) are integers 0 and so left out by `omitempty`.
//! - A nil slice marshals as `null` (the worker builds `routes` and
//!   `neighbors` by appending to nil).
//!
//! Reading follows Go's decoder: a missing key is the zero value, unknown
//! keys are ignored. Two differences: Go matches key names without regard
//! to case and this reader does not (CAA's worker writes the names exactly),
//! and `null` for a protocol, scope or state reads as absent here where Go
//! refuses it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// `apf.json`'s `pod-network` (CAA's `tunneler.Config`): the pod's address
/// and routes as the worker node saw them in the pod's CNI namespace, and
/// the VXLAN tunnel that carries its frames between worker and pod VM.
///
/// Every field may be absent in the JSON (Go's zero value); what a setup
/// needs is checked when it is used ([`crate::network::podnode`]), so a
/// parsed value is not yet a usable one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PodNetwork {
    /// `podip`: the pod's address with its prefix length
    /// (`"10.244.1.5/24"`); `None` is written `""`.
    #[serde(rename = "podip", with = "opt_text")]
    pub pod_ip: Option<Prefix>,
    /// `pod-hw-addr`: the pod interface's MAC (`"0e:8f:62:f3:81:ad"`).
    #[serde(rename = "pod-hw-addr")]
    pub pod_hw_addr: String,
    /// `interface`: the pod interface's name in its namespace (`"eth0"`).
    #[serde(rename = "interface")]
    pub interface: String,
    /// `worker-node-ip`: the worker's address with its prefix length
    /// (`"10.224.0.4/16"`), the far end of the tunnel.
    #[serde(rename = "worker-node-ip", with = "opt_text")]
    pub worker_node_ip: Option<Prefix>,
    /// `tunnel-type`: CAA registers only `"vxlan"`.
    #[serde(rename = "tunnel-type")]
    pub tunnel_type: String,
    /// `routes`: the pod namespace's routes (`null` when none).
    #[serde(rename = "routes", with = "null_as_empty")]
    pub routes: Vec<Route>,
    /// `neighbors`: the pod interface's permanent neighbours (`null` when
    /// none).
    #[serde(rename = "neighbors", with = "null_as_empty")]
    pub neighbors: Vec<Neighbor>,
    /// `mtu`: the pod interface's MTU on the worker, in bytes.
    #[serde(rename = "mtu")]
    pub mtu: u32,
    /// `index`: the worker's per-pod counter (VNI = its minimum VNI +
    /// index); informative only on the pod VM side.
    #[serde(rename = "index")]
    pub index: u32,
    /// `vxlan-port`: the tunnel's UDP destination port (CAA's default
    /// 4789); 0 (absent) is left out, as Go's `omitempty` does.
    #[serde(rename = "vxlan-port", skip_serializing_if = "is_zero_u16")]
    pub vxlan_port: u16,
    /// `vxlan-id`: the tunnel's VNI (CAA's first is 555000); 0 (absent) is
    /// left out, as Go's `omitempty` does.
    #[serde(rename = "vxlan-id", skip_serializing_if = "is_zero_u32")]
    pub vxlan_id: u32,
    /// `dedicated`: the worker uses a dedicated interface for tunnels, so
    /// the pod VM's tunnel end is its second address. Informative here: the
    /// pod VM side dials the worker whatever its own addresses.
    #[serde(rename = "dedicated")]
    pub dedicated: bool,
    /// `external-net-via-pod-vm`: CAA's experimental routing of the pod's
    /// external traffic through a secondary NIC of the pod VM (not built
    /// here: a setup refuses it).
    #[serde(rename = "external-net-via-pod-vm")]
    pub external_net_via_pod_vm: bool,
}

/// One route of the pod namespace (CAA's `tunneler.Route`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Route {
    /// `dst`: the destination (`"10.244.1.0/24"`; the worker writes the
    /// default route as `"0.0.0.0/0"`); `None`, written `""`, is also the
    /// default route (CAA passes a nil destination to netlink).
    #[serde(rename = "dst", with = "opt_text")]
    pub dst: Option<Prefix>,
    /// `gw`: the gateway; `None` (written `""`) for a route on the link.
    #[serde(rename = "gw", with = "opt_text")]
    pub gw: Option<IpAddr>,
    /// `dev`: the output interface's name; empty (left out) lets the
    /// kernel choose.
    #[serde(rename = "dev", skip_serializing_if = "String::is_empty")]
    pub dev: String,
    /// `protocol`: who made the route; `None` (0, `unspec`) is left out.
    #[serde(
        rename = "protocol",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "null_as_none"
    )]
    pub protocol: Option<RouteProtocol>,
    /// `scope`: `universe` (0) is left out.
    #[serde(
        rename = "scope",
        skip_serializing_if = "RouteScope::is_universe",
        deserialize_with = "null_as_default"
    )]
    pub scope: RouteScope,
}

/// One permanent neighbour entry of the pod interface (CAA's
/// `tunneler.Neighbor`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Neighbor {
    /// `ip`: the neighbour's address; `None` is written `""`.
    #[serde(rename = "ip", with = "opt_text")]
    pub ip: Option<IpAddr>,
    /// `hw-addr`: its MAC; empty is left out.
    #[serde(rename = "hw-addr", skip_serializing_if = "String::is_empty")]
    pub hw_addr: String,
    /// `dev`: the interface it is on; empty is left out.
    #[serde(rename = "dev", skip_serializing_if = "String::is_empty")]
    pub dev: String,
    /// `state`: `none` (0) is left out.
    #[serde(
        rename = "state",
        skip_serializing_if = "NeighborState::is_none",
        deserialize_with = "null_as_default"
    )]
    pub state: NeighborState,
}

/// A route's protocol: the four CAA's lookup table accepts
/// (`netops.routeProtocols`; its worker lists only routes of these).
/// Names are `vishvananda/netlink`'s; values are Linux's `RTPROT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    /// `RTPROT_KERNEL` (2): made by the kernel (a subnet route).
    Kernel,
    /// `RTPROT_BOOT` (3): made at configuration time (`ip route add`).
    Boot,
    /// `RTPROT_STATIC` (4): made by an administrator.
    Static,
    /// `RTPROT_DHCP` (16): made by a DHCP client.
    Dhcp,
}

impl RouteProtocol {
    /// The kernel's `RTPROT_*` number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Kernel => 2,
            Self::Boot => 3,
            Self::Static => 4,
            Self::Dhcp => 16,
        }
    }
}

/// A route's scope: CAA's lookup table (`netops.routeScopes`), with
/// `vishvananda/netlink`'s names; values are Linux's `RT_SCOPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteScope {
    /// `RT_SCOPE_UNIVERSE` (0): the default, left out of the JSON.
    #[default]
    Universe,
    /// `RT_SCOPE_SITE` (200).
    Site,
    /// `RT_SCOPE_LINK` (253): a destination on the link.
    Link,
    /// `RT_SCOPE_HOST` (254).
    Host,
    /// `RT_SCOPE_NOWHERE` (255).
    Nowhere,
}

impl RouteScope {
    /// The kernel's `RT_SCOPE_*` number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Universe => 0,
            Self::Site => 200,
            Self::Link => 253,
            Self::Host => 254,
            Self::Nowhere => 255,
        }
    }

    fn is_universe(&self) -> bool {
        *self == Self::Universe
    }
}

/// A neighbour entry's state: CAA's table (`netops.neighorStateMap`);
/// values are Linux's `NUD_*` bits. CAA's worker sends only `permanent`
/// entries, and refuses to add a `none` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeighborState {
    /// `NUD_NONE` (0): the default, left out of the JSON.
    #[default]
    None,
    /// `NUD_INCOMPLETE` (0x01).
    Incomplete,
    /// `NUD_REACHABLE` (0x02).
    Reachable,
    /// `NUD_STALE` (0x04).
    Stale,
    /// `NUD_DELAY` (0x08).
    Delay,
    /// `NUD_PROBE` (0x10).
    Probe,
    /// `NUD_FAILED` (0x20).
    Failed,
    /// `NUD_NOARP` (0x40).
    Noarp,
    /// `NUD_PERMANENT` (0x80): never expires.
    Permanent,
}

impl NeighborState {
    /// The kernel's `NUD_*` bit.
    #[must_use]
    pub fn number(self) -> u16 {
        match self {
            Self::None => 0,
            Self::Incomplete => 0x01,
            Self::Reachable => 0x02,
            Self::Stale => 0x04,
            Self::Delay => 0x08,
            Self::Probe => 0x10,
            Self::Failed => 0x20,
            Self::Noarp => 0x40,
            Self::Permanent => 0x80,
        }
    }

    fn is_none(&self) -> bool {
        *self == Self::None
    }
}

/// An address with a prefix length, as Go's `netip.Prefix` writes it:
/// `"10.244.1.5/24"`, the host bits kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The address (host bits kept).
    pub addr: IpAddr,
    /// The prefix length in bits: at most 32 for IPv4, 128 for IPv6.
    pub len: u8,
}

impl Prefix {
    /// The network address (host bits cleared); `None` for IPv6.
    #[must_use]
    pub fn network_v4(&self) -> Option<std::net::Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                Some(std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(_) => None,
        }
    }

    /// Whether the prefix is one address (`/32` for IPv4, `/128` for IPv6).
    #[must_use]
    pub fn is_single_ip(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => self.len == 32,
            IpAddr::V6(_) => self.len == 128,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a prefix does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an address with a prefix length (like \"10.244.1.5/24\"): {why}")]
pub struct PrefixError {
    text: String,
    why: &'static str,
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// Go's `netip.ParsePrefix` rules: `addr/len`, the length in decimal
    /// without leading zeros, at most the address's bit length; no zone.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| PrefixError {
            text: s.to_owned(),
            why,
        };
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
        if len.is_empty()
            || !len.bytes().all(|b| b.is_ascii_digit())
            || (len.len() > 1 && len.starts_with('0'))
        {
            return Err(bad("bad prefix length"));
        }
        let len: u8 = len.parse().map_err(|_| bad("prefix length out of range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad("prefix length out of range"));
        }
        Ok(Self { addr, len })
    }
}

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Go's zero `netip.Addr`/`netip.Prefix`: `""` both ways.
mod opt_text {
    use super::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub(super) fn serialize<T: Display, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text: Option<String> = Option::deserialize(d)?;
        match text.as_deref() {
            None | Some("") => Ok(None),
            Some(t) => t
                .parse()
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}"))),
        }
    }
}

/// Go's nil slice: `null` both ways (an empty list reads as empty too).
mod null_as_empty {
    use super::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(
        v: &Vec<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if v.is_empty() {
            s.serialize_none()
        } else {
            v.serialize(s)
        }
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
    }
}

fn null_as_none<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

fn null_as_default<'de, T: Deserialize<'de> + Default, D: Deserializer<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Reads `pod-network` from a whole `apf.json`: `None` when the key is
/// absent or `null` (a pod VM without a pod network: the forwarder serves
/// as before).
///
/// # Errors
/// A message starting `apf.json pod-network` with serde's account of the
/// first bad value (its key path and position), e.g. an unknown route
/// protocol or a prefix without a length.
pub fn from_apf_json(json: &str) -> Result<Option<PodNetwork>, String> {
    #[derive(Deserialize)]
    struct Apf {
        #[serde(rename = "pod-network", default)]
        pod_network: Option<serde_json::Value>,
    }
    let apf: Apf = serde_json::from_str(json).map_err(|e| format!("apf.json: {e}"))?;
    match apf.pod_network {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => PodNetwork::deserialize(v)
            .map(Some)
            .map_err(|e| format!("apf.json pod-network: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pod-network` as CAA's worker writes it: Go's `json.Marshal` of the
    /// `tunneler.Config` that `workernode.go` `Inspect` builds, for a
    /// Calico-like pod (a gateway-less route to the gateway, then the
    /// default route through it) and a Flannel-like subnet route.
    /// - key names and order: the struct tags of `tunneler.Config`,
    ///   `tunneler.Route`, `tunneler.Neighbor` (`tunneler.go`);
    /// - `"dst": "0.0.0.0/0"`: netops' `toPrefix(nil)` for the default route;
    /// - `"gw": ""`: a zero `netip.Addr` (a struct: `omitempty` does not
    ///   drop it); `protocol` and `scope` left out at 0 (`unspec`,
    ///   `universe`); names `boot`/`kernel`/`link`/`permanent` from the
    ///   lookup tables of `netops.go` (and CAA's `podvm/hack/smoke_test.sh`,
    ///   which holds a real one);
    /// - `vxlan-port`/`vxlan-id`: `vxlan/workernode.go` `Configure` (port
    ///   flag, 555000 + index); `external-net-via-pod-vm` from the flag.
    const CAA_POD_NETWORK: &str = r#"{
        "podip": "10.244.1.5/24",
        "pod-hw-addr": "32:b9:59:6b:f0:d5",
        "interface": "eth0",
        "worker-node-ip": "10.224.0.5/16",
        "tunnel-type": "vxlan",
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "dev": "eth0", "protocol": "boot"},
            {"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"},
            {"dst": "169.254.1.1/32", "gw": "", "dev": "eth0", "protocol": "boot", "scope": "link"}
        ],
        "neighbors": [
            {"ip": "169.254.1.1", "hw-addr": "ee:ee:ee:ee:ee:ee", "dev": "eth0", "state": "permanent"}
        ],
        "mtu": 1500,
        "index": 2,
        "vxlan-port": 4789,
        "vxlan-id": 555002,
        "dedicated": false,
        "external-net-via-pod-vm": false
    }"#;

    /// The JSON without its whitespace outside strings (key order kept).
    fn compact(json: &str) -> String {
        let mut in_string = false;
        json.chars()
            .filter(|c| {
                if *c == '"' {
                    in_string = !in_string;
                }
                in_string || !c.is_whitespace()
            })
            .collect()
    }

    #[test]
    fn caa_workers_pod_network_parses_and_writes_back_byte_for_byte() {
        let apf = format!(r#"{{"pod-network": {CAA_POD_NETWORK}, "pod-name": "p"}}"#);
        let pn = from_apf_json(&apf).unwrap().unwrap();
        assert_eq!(pn.pod_ip, Some("10.244.1.5/24".parse().unwrap()));
        assert_eq!(
            pn.pod_ip.unwrap().network_v4().unwrap().to_string(),
            "10.244.1.0"
        );
        assert_eq!(pn.interface, "eth0");
        assert_eq!(pn.vxlan_id, 555_002);
        assert_eq!(pn.vxlan_port, 4789);
        assert_eq!(pn.routes.len(), 3);
        assert_eq!(pn.routes[0].gw, Some("169.254.1.1".parse().unwrap()));
        assert_eq!(pn.routes[0].protocol, Some(RouteProtocol::Boot));
        assert_eq!(pn.routes[0].scope, RouteScope::Universe);
        assert_eq!(pn.routes[1].gw, None);
        assert_eq!(pn.routes[1].scope, RouteScope::Link);
        assert_eq!(pn.neighbors[0].state, NeighborState::Permanent);
        // serde writes fields in declaration order, which is Go's: the
        // same bytes as CAA's worker, once whitespace is removed.
        assert_eq!(
            serde_json::to_string(&pn).unwrap(),
            compact(CAA_POD_NETWORK)
        );
    }

    #[test]
    fn caas_smoke_test_apf_json_parses() {
        // CAA's podvm/hack/smoke_test.sh, verbatim: `"neighbors": null`, no
        // `external-net-via-pod-vm`.
        let json = r#"{"pod-network": {
            "podip": "10.244.1.21/24", "pod-hw-addr": "32:b9:59:6b:f0:d5",
            "interface": "eth0", "worker-node-ip": "10.224.0.5/16", "tunnel-type": "vxlan",
            "routes": [
                {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot"},
                {"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"}
            ],
            "neighbors": null, "mtu": 1500, "index": 2, "vxlan-port": 8472,
            "vxlan-id": 555002, "dedicated": false},
            "pod-namespace": "default", "pod-name": "smoketest"}"#;
        let pn = from_apf_json(json).unwrap().unwrap();
        assert!(pn.neighbors.is_empty());
        assert!(!pn.external_net_via_pod_vm);
        let back = serde_json::to_value(&pn).unwrap();
        assert_eq!(back["neighbors"], serde_json::Value::Null);
        assert_eq!(back["routes"][1]["gw"], "");
        assert!(back["routes"][0].get("scope").is_none());
    }

    #[test]
    fn zero_values_write_as_go_writes_them() {
        let v = serde_json::to_value(PodNetwork::default()).unwrap();
        assert_eq!(v["podip"], "");
        assert_eq!(v["worker-node-ip"], "");
        assert_eq!(v["routes"], serde_json::Value::Null);
        assert!(v.get("vxlan-port").is_none() && v.get("vxlan-id").is_none());
        let r = serde_json::to_value(Route::default()).unwrap();
        assert_eq!(compact(&r.to_string()), r#"{"dst":"","gw":""}"#);
        let n = serde_json::to_value(Neighbor::default()).unwrap();
        assert_eq!(n.to_string(), r#"{"ip":""}"#);
        // And back: "" is None.
        let r: Route = serde_json::from_str(r#"{"dst":"","gw":""}"#).unwrap();
        assert_eq!(r, Route::default());
    }

    #[test]
    fn absent_or_null_pod_network_is_none() {
        assert_eq!(from_apf_json(r#"{"pod-name": "p"}"#).unwrap(), None);
        assert_eq!(from_apf_json(r#"{"pod-network": null}"#).unwrap(), None);
    }

    #[test]
    fn bad_values_are_errors_that_name_them() {
        let cases = [
            (r#"{"podip": "10.244.1.5"}"#, "no '/'"),
            (r#"{"podip": "10.244.1.5/33"}"#, "out of range"),
            (r#"{"podip": "10.244.1.5/024"}"#, "bad prefix length"),
            (r#"{"worker-node-ip": "host/16"}"#, "bad address"),
            (
                r#"{"routes": [{"protocol": "bird"}]}"#,
                "unknown variant `bird`",
            ),
            (
                r#"{"routes": [{"scope": "global"}]}"#,
                "unknown variant `global`",
            ),
            (r#"{"routes": [{"gw": "10.0.0.256"}]}"#, "10.0.0.256"),
            (
                r#"{"neighbors": [{"state": "gone"}]}"#,
                "unknown variant `gone`",
            ),
            (r#"{"mtu": -1}"#, "invalid value"),
            (r#"{"vxlan-port": 70000}"#, "invalid value"),
        ];
        for (pn, want) in cases {
            let err = from_apf_json(&format!(r#"{{"pod-network": {pn}}}"#)).unwrap_err();
            assert!(err.starts_with("apf.json pod-network: "), "{err}");
            assert!(err.contains(want), "{pn}: {err}");
        }
    }

    #[test]
    fn prefixes_print_as_parsed() {
        for s in ["10.244.1.5/24", "0.0.0.0/0", "192.168.0.1/32", "fd00::1/64"] {
            assert_eq!(s.parse::<Prefix>().unwrap().to_string(), s);
        }
        assert!("10.0.0.1/32".parse::<Prefix>().unwrap().is_single_ip());
        assert_eq!(
            "10.1.2.3/0".parse::<Prefix>().unwrap().network_v4(),
            Some(std::net::Ipv4Addr::UNSPECIFIED)
        );
    }
}
