//! One pod's VXLAN tunnel on the worker node: set up, torn down, checked,
//! and the NOTRACK rules of tunnels no record owns swept.
//!
//! Source: CAA `pkg/podnetwork/tunneler/vxlan/workernode.go`. Setup, in
//! order:
//!
//! 1. NOTRACK rules for the tunnel's UDP to and from the pod VM, in the
//!    host netns ([`super::notrack`]).
//! 2. A VXLAN device in the **host** netns (so its UDP socket is the
//!    host's): remote = the pod VM's IP, the VNI, the UDP port, learning
//!    off (CAA's netlink library sends `IFLA_VXLAN_LEARNING = 0`).
//! 3. The device moved into the pod's netns, renamed `vxlan1`, brought up.
//! 4. tc, in the pod's netns: an ingress qdisc on the CNI interface and on
//!    `vxlan1`, each with a u32 match-all filter whose action is mirred
//!    egress redirect to the other (so every frame of the pod goes to the
//!    pod VM and back).
//!
//! One deviation, for crash recovery: CAA names the device `ppvxlanN` in
//! the host netns with the first free N of 1–5; here it is
//! `ppvxlan<VNI>` (at most 15 bytes, the kernel's limit, since a VNI has at
//! most 8 digits), so a device left behind by a crash between steps 2 and 3
//! is found by its VNI, and concurrent setups never race for a name.
//!
//! Setup undoes what it did when a step fails, and is idempotent: a
//! `vxlan1` of the same VNI left in the pod's netns (a crash, a retry) is
//! removed first and made anew. Teardown is idempotent and does not need
//! the pod's netns to exist any more (the CNI may have removed it).
//! Neither is atomic against cancellation: a setup dropped mid-way leaves
//! what it did so far, which the next setup or teardown of the VNI
//! removes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use podvisor_podvm::network::netns::{Netns, NetnsError};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle};
use rtnetlink::{LinkUnspec, LinkVxlan};
use serde::{Deserialize, Serialize};

use super::notrack::{self, NotrackError, NotrackRule};
use super::{VXLAN_MAX_ID, is_errno, link_by_name, link_name, links, vxlan_id};

/// The tunnel device's name in the pod's netns (source: CAA
/// `tunneler/vxlan/workernode.go`, `secondPodInterface`).
pub const POD_DEVICE: &str = "vxlan1";

/// The prefix of [`host_device_name`].
const HOST_DEVICE_PREFIX: &str = "ppvxlan";

/// The tunnel device's name while it is in the host netns, before it is
/// moved: `ppvxlan<VNI>` (CAA: `ppvxlanN`, see the module's doc).
#[must_use]
pub fn host_device_name(vni: u32) -> String {
    format!("{HOST_DEVICE_PREFIX}{vni}")
}

/// `ETH_P_ALL`: a tc filter's protocol matching every frame.
const ETH_P_ALL: u16 = 0x0003;

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// One pod's tunnel, as the daemon records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelConfig {
    /// The host network namespace, where the VXLAN device's UDP socket and
    /// the NOTRACK rules live: `/proc/self/ns/net` in production
    /// ([`podvisor_podvm::network::netns::SELF_NETNS`]).
    pub host_netns: PathBuf,
    /// The sandbox's network namespace (CreateVM's
    /// `networkNamespacePath`, e.g. `/var/run/netns/cni-…`).
    pub pod_netns: PathBuf,
    /// The pod's CNI interface in it (`inspect::PodNetwork::interface`,
    /// e.g. `eth0`).
    pub pod_interface: String,
    /// The pod VM's IP the tunnel sends to (CAA: its first IP, or its
    /// second when the host interface is dedicated).
    pub pod_vm_ip: Ipv4Addr,
    /// The VNI, 1–16 777 215 (CAA: from `-vxlan-min-id`, 555000).
    pub vni: u32,
    /// The UDP destination port (CAA: `-vxlan-port`,
    /// [`super::VXLAN_PORT`]).
    pub port: u16,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A namespace cannot be opened or entered.
    #[error("Cannot use a network namespace")]
    Netns(#[from] NetnsError),
    /// The VNI is not a 24-bit non-zero number.
    #[error("VNI {vni} is outside 1–16777215")]
    InvalidVni {
        /// The VNI given.
        vni: u32,
    },
    /// The pod's CNI interface is not in its netns.
    #[error("The network namespace {netns} has no interface {interface}")]
    PodInterfaceMissing {
        /// The pod's netns.
        netns: PathBuf,
        /// The interface's name.
        interface: String,
    },
    /// The pod's netns has a `vxlan1` that is not this VNI's tunnel.
    #[error("The network namespace {netns} already has a vxlan1 of VNI {found:?}, not {vni}")]
    OtherTunnel {
        /// The pod's netns.
        netns: PathBuf,
        /// The VNI of the device found (`None`: not a VXLAN device).
        found: Option<u32>,
        /// The VNI asked for.
        vni: u32,
    },
    /// A netlink request failed.
    #[error("Cannot {action} in the network namespace {netns}")]
    Netlink {
        /// What was being done.
        action: String,
        /// The namespace's path.
        netns: PathBuf,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// The NOTRACK rules cannot be changed or read.
    #[error("Cannot change the NOTRACK rules")]
    Notrack(#[from] NotrackError),
    /// The blocking work's thread was lost.
    #[error("The iptables task for the host network namespace did not finish")]
    Join(#[from] tokio::task::JoinError),
}

/// A closure that turns a netlink error into a [`TunnelError::Netlink`].
fn netlink(
    action: impl Into<String>,
    netns: &Path,
) -> impl FnOnce(rtnetlink::Error) -> TunnelError {
    let action = action.into();
    let netns = netns.to_path_buf();
    move |source| TunnelError::Netlink {
        action,
        netns,
        source,
    }
}

/// What a setup has done so far, for undoing it.
#[derive(Debug, Default)]
struct Done {
    /// The NOTRACK rules were added.
    rules: bool,
    /// The device's index in the host netns, before the move.
    host_device: Option<u32>,
    /// The device's index in the pod's netns, after the move.
    pod_device: Option<u32>,
    /// The CNI interface's index, once its ingress qdisc was added.
    pod_qdisc: Option<u32>,
}

/// Sets the tunnel up (see the module's doc for the steps). On failure
/// everything done is undone and the first error returned.
///
/// # Errors
/// [`TunnelError::InvalidVni`], [`TunnelError::Netns`] (a namespace path
/// does not exist, or cannot be entered),
/// [`TunnelError::PodInterfaceMissing`], [`TunnelError::OtherTunnel`],
/// [`TunnelError::Netlink`] (e.g. `EEXIST` when the host netns already has
/// a VXLAN device of this VNI and port, not made by podvisor),
/// [`TunnelError::Notrack`] (e.g. no `iptables` program).
pub async fn setup(config: &TunnelConfig) -> Result<(), TunnelError> {
    if config.vni == 0 || config.vni > VXLAN_MAX_ID {
        return Err(TunnelError::InvalidVni { vni: config.vni });
    }
    let host = Arc::new(Netns::open(&config.host_netns)?);
    let pod = Netns::open(&config.pod_netns)?;
    let host_netlink = host.netlink()?;
    let pod_netlink = pod.netlink()?;

    let pod_links = links(&pod_netlink)
        .await
        .map_err(netlink("list links", &config.pod_netns))?;
    let Some(pod_interface) = pod_links
        .iter()
        .find(|link| link_name(link) == Some(config.pod_interface.as_str()))
        .map(|link| link.header.index)
    else {
        return Err(TunnelError::PodInterfaceMissing {
            netns: config.pod_netns.clone(),
            interface: config.pod_interface.clone(),
        });
    };
    if let Some(existing) = pod_links
        .iter()
        .find(|link| link_name(link) == Some(POD_DEVICE))
    {
        let found = vxlan_id(existing);
        if found != Some(config.vni) {
            return Err(TunnelError::OtherTunnel {
                netns: config.pod_netns.clone(),
                found,
                vni: config.vni,
            });
        }
        tracing::debug!(vni = config.vni, netns = %config.pod_netns.display(), "replacing the tunnel device left by an earlier setup");
    }
    remove_devices(
        config,
        &host_netlink,
        Some(&pod_netlink),
        Some(pod_interface),
    )
    .await?;

    let mut done = Done::default();
    let result = setup_steps(
        config,
        &host,
        &pod,
        &host_netlink,
        &pod_netlink,
        pod_interface,
        &mut done,
    )
    .await;
    if let Err(error) = result {
        undo(config, &host, &host_netlink, &pod_netlink, done).await;
        return Err(error);
    }
    tracing::info!(
        vni = config.vni,
        pod_vm_ip = %config.pod_vm_ip,
        port = config.port,
        netns = %config.pod_netns.display(),
        "tunnel set up"
    );
    Ok(())
}

/// Setup's steps after the checks; records each in `done`.
async fn setup_steps(
    config: &TunnelConfig,
    host: &Arc<Netns>,
    pod: &Netns,
    host_netlink: &rtnetlink::Handle,
    pod_netlink: &rtnetlink::Handle,
    pod_interface: u32,
    done: &mut Done,
) -> Result<(), TunnelError> {
    let rule = NotrackRule {
        vni: config.vni,
        pod_vm_ip: config.pod_vm_ip,
        port: config.port,
    };
    let netns = Arc::clone(host);
    // Recorded first: a failure half-way through leaves some of the rules.
    done.rules = true;
    tokio::task::spawn_blocking(move || notrack::add(&netns, &rule)).await??;

    let name = host_device_name(config.vni);
    let device = LinkVxlan::new(&name, config.vni)
        .remote(config.pod_vm_ip)
        .port(config.port)
        .learning(false)
        .build();
    host_netlink
        .link()
        .add(device)
        .execute()
        .await
        .map_err(netlink(
            format!("create the VXLAN device {name}"),
            &config.host_netns,
        ))?;
    let index = link_by_name(host_netlink, &name)
        .await
        .map_err(netlink(format!("find {name}"), &config.host_netns))?
        .map(|link| link.header.index);
    done.host_device = index;
    let Some(index) = index else {
        return Err(TunnelError::Netlink {
            action: format!("find {name} just created"),
            netns: config.host_netns.clone(),
            source: rtnetlink::Error::RequestFailed,
        });
    };
    crate::failpoints::hit(crate::failpoints::TUNNEL_CREATED_BEFORE_MOVE);

    host_netlink
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(pod.as_fd().as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(
            format!("move {name} to {}", config.pod_netns.display()),
            &config.host_netns,
        ))?;
    done.host_device = None;
    let index = link_by_name(pod_netlink, &name)
        .await
        .map_err(netlink(format!("find {name}"), &config.pod_netns))?
        .map(|link| link.header.index);
    done.pod_device = index;
    let Some(index) = index else {
        return Err(TunnelError::Netlink {
            action: format!("find {name} just moved"),
            netns: config.pod_netns.clone(),
            source: rtnetlink::Error::RequestFailed,
        });
    };
    pod_netlink
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(POD_DEVICE.to_owned())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(
            format!("rename {name} to {POD_DEVICE} and bring it up"),
            &config.pod_netns,
        ))?;

    add_ingress_qdisc(
        pod_netlink,
        pod_interface,
        &config.pod_interface,
        &config.pod_netns,
    )
    .await?;
    // Recorded only once added: an ingress qdisc that was there before
    // (the add then fails) is not ours to remove.
    done.pod_qdisc = Some(pod_interface);
    add_redirect(
        pod_netlink,
        pod_interface,
        index,
        &config.pod_interface,
        POD_DEVICE,
        &config.pod_netns,
    )
    .await?;
    add_ingress_qdisc(pod_netlink, index, POD_DEVICE, &config.pod_netns).await?;
    add_redirect(
        pod_netlink,
        index,
        pod_interface,
        POD_DEVICE,
        &config.pod_interface,
        &config.pod_netns,
    )
    .await?;
    Ok(())
}

/// An ingress qdisc on link `index` (`name`, for messages). Source: CAA
/// `pkg/util/netops/netops.go` (`RedirectAdd`).
async fn add_ingress_qdisc(
    handle: &rtnetlink::Handle,
    index: u32,
    name: &str,
    netns: &Path,
) -> Result<(), TunnelError> {
    handle
        .qdisc()
        .add(index.cast_signed())
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!("add an ingress qdisc to {name}"), netns))
}

/// A match-all u32 filter on `from`'s ingress redirecting every frame to
/// `to`'s egress (mirred egress redirect, action stolen). Source: CAA
/// `pkg/util/netops/netops.go` (`RedirectAdd`).
async fn add_redirect(
    handle: &rtnetlink::Handle,
    from: u32,
    to: u32,
    from_name: &str,
    to_name: &str,
    netns: &Path,
) -> Result<(), TunnelError> {
    let action = format!("add a tc redirect filter from {from_name} to {to_name}");
    handle
        .traffic_filter(from.cast_signed())
        .add()
        .parent(INGRESS_HANDLE)
        // tcm_info's protocol half is in network byte order.
        .protocol(ETH_P_ALL.to_be())
        .redirect(to)
        .map_err(netlink(action.clone(), netns))?
        .execute()
        .await
        .map_err(netlink(action, netns))
}

/// Undoes a failed setup's steps, newest first; failures are logged (the
/// setup's own error is the one returned) and left to the next teardown.
async fn undo(
    config: &TunnelConfig,
    host: &Arc<Netns>,
    host_netlink: &rtnetlink::Handle,
    pod_netlink: &rtnetlink::Handle,
    done: Done,
) {
    if let Some(index) = done.pod_qdisc
        && let Err(error) = remove_ingress_qdisc(pod_netlink, index, &config.pod_netns).await
    {
        tracing::warn!(vni = config.vni, error = %podvisor_state::report(&error), "undoing a tunnel setup: the ingress qdisc stays");
    }
    if let Some(index) = done.pod_device
        && let Err(error) = delete_link(pod_netlink, index, &config.pod_netns).await
    {
        tracing::warn!(vni = config.vni, error = %podvisor_state::report(&error), "undoing a tunnel setup: the pod's VXLAN device stays");
    }
    if let Some(index) = done.host_device
        && let Err(error) = delete_link(host_netlink, index, &config.host_netns).await
    {
        tracing::warn!(vni = config.vni, error = %podvisor_state::report(&error), "undoing a tunnel setup: the host's VXLAN device stays");
    }
    if done.rules {
        let netns = Arc::clone(host);
        let vni = config.vni;
        match tokio::task::spawn_blocking(move || notrack::remove(&netns, vni)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(vni, error = %podvisor_state::report(&error), "undoing a tunnel setup: NOTRACK rules stay");
            }
            Err(error) => {
                tracing::warn!(vni, error = %error, "undoing a tunnel setup: NOTRACK rules stay");
            }
        }
    }
}

/// Tears the tunnel down: the tc qdiscs (and with them their filters) and
/// `vxlan1` in the pod's netns, a device of the VNI left in the host netns,
/// and the VNI's NOTRACK rules. Uses `host_netns`, `pod_netns`,
/// `pod_interface` and `vni` of `config`. Idempotent; a pod netns that no
/// longer exists is not an error (its devices went with it), and a
/// `vxlan1` of another VNI is left alone.
///
/// # Errors
/// [`TunnelError::Netns`] (the host netns, or a pod netns that exists but
/// cannot be entered), [`TunnelError::Netlink`], [`TunnelError::Notrack`].
pub async fn teardown(config: &TunnelConfig) -> Result<(), TunnelError> {
    let host = Arc::new(Netns::open(&config.host_netns)?);
    let host_netlink = host.netlink()?;
    let pod = match Netns::open(&config.pod_netns) {
        Ok(pod) => Some(pod),
        Err(NetnsError::NotFound { .. }) => None,
        Err(error) => return Err(error.into()),
    };
    let pod_netlink = pod.as_ref().map(Netns::netlink).transpose()?;
    let pod_interface = match &pod_netlink {
        Some(handle) => link_by_name(handle, &config.pod_interface)
            .await
            .map_err(netlink(
                format!("find {}", config.pod_interface),
                &config.pod_netns,
            ))?
            .map(|link| link.header.index),
        None => None,
    };
    remove_devices(config, &host_netlink, pod_netlink.as_ref(), pod_interface).await?;
    let netns = Arc::clone(&host);
    let vni = config.vni;
    let removed = tokio::task::spawn_blocking(move || notrack::remove(&netns, vni)).await??;
    tracing::info!(
        vni,
        pod_netns_gone = pod.is_none(),
        notrack_rules = removed,
        "tunnel torn down"
    );
    Ok(())
}

/// Removes the VNI's devices: `vxlan1` of this VNI in the pod's netns (its
/// qdisc goes with it) and the ingress qdisc of the CNI interface, and
/// `ppvxlan<VNI>` in either netns.
async fn remove_devices(
    config: &TunnelConfig,
    host_netlink: &rtnetlink::Handle,
    pod_netlink: Option<&rtnetlink::Handle>,
    pod_interface: Option<u32>,
) -> Result<(), TunnelError> {
    let leftover = host_device_name(config.vni);
    if let Some(handle) = pod_netlink {
        if let Some(device) = link_by_name(handle, POD_DEVICE)
            .await
            .map_err(netlink(format!("find {POD_DEVICE}"), &config.pod_netns))?
        {
            if vxlan_id(&device) == Some(config.vni) {
                if let Some(index) = pod_interface {
                    remove_ingress_qdisc(handle, index, &config.pod_netns).await?;
                }
                delete_link(handle, device.header.index, &config.pod_netns).await?;
            } else {
                tracing::warn!(vni = config.vni, netns = %config.pod_netns.display(), "the pod's vxlan1 is not this VNI's; left alone");
            }
        }
        if let Some(device) = link_by_name(handle, &leftover)
            .await
            .map_err(netlink(format!("find {leftover}"), &config.pod_netns))?
        {
            delete_link(handle, device.header.index, &config.pod_netns).await?;
        }
    }
    if let Some(device) = link_by_name(host_netlink, &leftover)
        .await
        .map_err(netlink(format!("find {leftover}"), &config.host_netns))?
        && vxlan_id(&device) == Some(config.vni)
    {
        delete_link(host_netlink, device.header.index, &config.host_netns).await?;
    }
    Ok(())
}

/// Deletes link `index`; one already gone is not an error.
async fn delete_link(
    handle: &rtnetlink::Handle,
    index: u32,
    netns: &Path,
) -> Result<(), TunnelError> {
    match handle.link().del(index).execute().await {
        Err(error) if !is_errno(&error, nix::errno::Errno::ENODEV) => {
            Err(netlink(format!("delete link {index}"), netns)(error))
        }
        _ => Ok(()),
    }
}

/// Deletes the ingress qdisc of link `index` (its filters go with it), if
/// it has one. Source: CAA `netops.go` (`RedirectDel`, which deletes the
/// u32 filters, then the qdisc).
async fn remove_ingress_qdisc(
    handle: &rtnetlink::Handle,
    index: u32,
    netns: &Path,
) -> Result<(), TunnelError> {
    let qdiscs: Vec<_> = handle
        .qdisc()
        .get()
        .index(index.cast_signed())
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list qdiscs", netns))?;
    let has_ingress = qdiscs.iter().any(|qdisc| {
        qdisc.header.index == index.cast_signed()
            && qdisc
                .attributes
                .iter()
                .any(|attribute| matches!(attribute, TcAttribute::Kind(kind) if kind == "ingress"))
    });
    if !has_ingress {
        return Ok(());
    }
    let mut request = handle.qdisc().del(index.cast_signed());
    request.message_mut().header.parent = TcHandle::INGRESS;
    request.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match request.execute().await {
        Err(error)
            if !is_errno(&error, nix::errno::Errno::ENODEV)
                && !is_errno(&error, nix::errno::Errno::ENOENT) =>
        {
            Err(netlink(
                format!("delete the ingress qdisc of link {index}"),
                netns,
            )(error))
        }
        _ => Ok(()),
    }
}

/// Whether the pod's netns has this VNI's tunnel device (`vxlan1` of VNI
/// `vni`), for recovery. A pod netns that does not exist has none.
///
/// # Errors
/// [`TunnelError::Netns`] (the path exists but cannot be entered),
/// [`TunnelError::Netlink`].
pub async fn exists(pod_netns: &Path, vni: u32) -> Result<bool, TunnelError> {
    let pod = match Netns::open(pod_netns) {
        Ok(pod) => pod,
        Err(NetnsError::NotFound { .. }) => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    let handle = pod.netlink()?;
    let device = link_by_name(&handle, POD_DEVICE)
        .await
        .map_err(netlink(format!("find {POD_DEVICE}"), pod_netns))?;
    Ok(device.is_some_and(|device| vxlan_id(&device) == Some(vni)))
}

/// The tunnels' NOTRACK rules in the host netns (one entry per VNI),
/// sorted by VNI.
///
/// # Errors
/// [`TunnelError::Netns`], [`TunnelError::Notrack`].
pub async fn list_notrack(host_netns: &Path) -> Result<Vec<NotrackRule>, TunnelError> {
    let host = Netns::open(host_netns)?;
    Ok(tokio::task::spawn_blocking(move || notrack::list(&host)).await??)
}

/// Deletes the `ppvxlan<VNI>` devices in the host netns (`host_netns`)
/// whose VNI `owned` rejects, and returns their VNIs. Such a device exists
/// only between a set-up's creation of it and its move into the pod's
/// netns: one still there was left by a set-up cut short (a crash), and if
/// its record is gone too, nothing else would ever remove it. Never part
/// of a working tunnel, so — unlike NOTRACK rules — one whose VNI merely
/// had rules at start-up is not kept.
///
/// # Errors
/// [`TunnelError::Netns`], [`TunnelError::Netlink`] (listing or deleting).
pub async fn sweep_host_devices(
    host_netns: &Path,
    owned: impl Fn(u32) -> bool,
) -> Result<Vec<u32>, TunnelError> {
    let host = Netns::open(host_netns)?;
    let handle = host.netlink()?;
    let all = links(&handle)
        .await
        .map_err(netlink("list links", host_netns))?;
    let mut removed = Vec::new();
    for link in all {
        let Some(vni) = link_name(&link)
            .and_then(|name| name.strip_prefix(HOST_DEVICE_PREFIX))
            .and_then(|number| number.parse::<u32>().ok())
        else {
            continue;
        };
        if vxlan_id(&link) != Some(vni) || owned(vni) {
            continue;
        }
        delete_link(&handle, link.header.index, host_netns).await?;
        removed.push(vni);
    }
    Ok(removed)
}

/// Removes the NOTRACK rules of every VNI not in `owned` (the VNIs the
/// daemon's records hold), for its GC. Returns the rules removed (one
/// entry per rule, so two per tunnel).
///
/// # Errors
/// [`TunnelError::Netns`], [`TunnelError::Notrack`].
pub async fn sweep_notrack(
    host_netns: &Path,
    owned: BTreeSet<u32>,
) -> Result<Vec<NotrackRule>, TunnelError> {
    let host = Netns::open(host_netns)?;
    Ok(
        tokio::task::spawn_blocking(move || notrack::sweep(&host, |vni| owned.contains(&vni)))
            .await??,
    )
}
