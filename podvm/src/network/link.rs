//! What a netlink link message says of a link, for both ends of the
//! tunnel.

use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};

/// A link's name (`IFLA_IFNAME`), if the message carries it.
#[must_use]
pub fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

/// A link's VNI when it is a VXLAN device, else `None`.
#[must_use]
pub fn vxlan_id(link: &LinkMessage) -> Option<u32> {
    let infos = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })?;
    if !infos
        .iter()
        .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    infos.iter().find_map(|info| match info {
        LinkInfo::Data(InfoData::Vxlan(data)) => data.iter().find_map(|d| match d {
            InfoVxlan::Id(id) => Some(*id),
            _ => None,
        }),
        _ => None,
    })
}
