//! The worker node's side of the pod network: the peer pod's network
//! namespace (made by the CNI) is joined to its pod VM by a VXLAN tunnel.
//!
//! The shape is the reference's (source: CAA `pkg/podnetwork/workernode.go`,
//! `pkg/podnetwork/tunneler/vxlan/workernode.go`): the sandbox's netns
//! keeps its CNI interface (e.g. `eth0`, the pod IP on it), a VXLAN device
//! `vxlan1` whose UDP socket lives in the host netns is added beside it,
//! and tc redirects every frame between the two, so the pod's L2 traffic
//! reaches the pod VM, which holds the pod IP and MAC on its side.
//!
//! - [`inspect`]: what the pod VM must reproduce (the pod's interface,
//!   IPv4 address, MAC, MTU, routes, permanent neighbours) and the host's
//!   interface and worker IP (the pod VM's tunnel remote).
//! - [`tunnel`]: set up, tear down, check and sweep one tunnel (its VXLAN
//!   device, tc redirects and NOTRACK rules), each step undone on failure.
//! - [`notrack`]: the raw-table NOTRACK rules for the tunnels' UDP flows.
//! - [`vni`]: each sandbox's VNI, journaled in its record.
//! - [`status`]: each sandbox's tunnel as this run left it (up, failed…),
//!   for the admin endpoint and the `podvisor_tunnels_up` gauge.
//!
//! All entry points are `async fn`s to be awaited on the daemon's tokio
//! runtime; the blocking parts (`setns(2)`, `iptables`) run on threads of
//! their own ([`podvisor_podvm::network::netns`]), never on a runtime
//! worker. They need `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (`setns`).

pub mod inspect;
pub mod notrack;
pub mod settings;
pub mod status;
pub mod tunnel;
pub mod vni;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::LinkMessage;

/// The VXLAN UDP port when none is configured (CAA's `-vxlan-port`).
/// Source: CAA `pkg/podnetwork/tunneler/vxlan/workernode.go`
/// (`DefaultVXLANPort`).
pub const VXLAN_PORT: u16 = 4789;

/// The first VNI (CAA's `-vxlan-min-id`); CAA adds a per-process index.
/// Source: CAA `pkg/podnetwork/tunneler/vxlan/workernode.go`
/// (`DefaultVXLANMinID`).
pub const VXLAN_MIN_ID: u32 = 555_000;

/// The largest VNI: it is a 24-bit field (RFC 7348).
pub const VXLAN_MAX_ID: u32 = (1 << 24) - 1;

/// Bytes a VXLAN tunnel adds to each frame: outer IPv4 (20) + UDP (8) +
/// VXLAN (8) headers + the inner Ethernet header (14). The pod VM's side
/// caps its MTU at 1500 − this (source: CAA
/// `pkg/podnetwork/tunneler/vxlan/podnode.go`, `maxMTU = 1450`).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The smallest MTU an IPv4 link must carry (RFC 791: 68 bytes).
pub const MIN_IPV4_MTU: u32 = 68;

/// The smallest pod MTU accepted: [`VXLAN_OVERHEAD`] + [`MIN_IPV4_MTU`].
pub const MIN_POD_MTU: u32 = VXLAN_OVERHEAD + MIN_IPV4_MTU;

use podvisor_podvm::network::link::{name as link_name, vxlan_id};

/// All links of the handle's namespace.
async fn links(handle: &rtnetlink::Handle) -> Result<Vec<LinkMessage>, rtnetlink::Error> {
    handle.link().get().execute().try_collect().await
}

/// The link named `name` in the handle's namespace, `None` when there is
/// none.
async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(error) if is_errno(&error, nix::errno::Errno::ENODEV) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Whether the kernel answered `errno`.
fn is_errno(error: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message)
        if message.code.is_some_and(|code| -code.get() == errno as i32))
}
