//! `--netns-per-vm`: each local "pod VM" in a network namespace of its own,
//! plugged into a "cloud" bridge in the daemon's namespace, so that it has
//! a network as a cloud VM has — an address the node reaches over a link,
//! and its own routing tables for the pod-VM side of the pod network.
//!
//! ```text
//!  daemon's namespace                       the instance's namespace
//!  ┌──────────────────────────┐             ┌─────────────────────────┐
//!  │ <bridge> 192.168.x.1/24  │── pv<id> ══ │ eth0 192.168.x.N/24     │
//!  │ (one per local provider) │    (veth)   │ default via 192.168.x.1 │
//!  └──────────────────────────┘             │ the forwarder runs here │
//!                                           └─────────────────────────┘
//! ```
//!
//! The namespace lives as long as something holds it: the forwarder
//! process (started inside it), and the pod namespace the forwarder may
//! bind-mount under the instance directory (`podns`). Deleting the
//! instance kills the forwarder, detaches that mount and deletes the host
//! end of the veth; the namespace and the veth's other end go with them.
//! Links, addresses and routes go through netlink (`rtnetlink`), never by
//! running `ip`.

use crate::error::ProviderError;
use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use podvisor_podvm::network::netns::{Netns, SELF_NETNS};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use tokio::sync::OnceCell;

/// The name of the pod namespace's bind mount in an instance directory
/// (the forwarder's `--pod-netns`).
pub const POD_NETNS_FILE: &str = "podns";

/// The "cloud" network of `--netns-per-vm`.
#[derive(Debug)]
pub struct VmNetwork {
    /// The bridge in the daemon's namespace (`--cloud-bridge`).
    bridge: String,
    /// The subnet (`--cloud-subnet`); the bridge holds its first address.
    subnet: Ipv4Net,
    /// The bridge is up with its address (once per provider).
    ready: OnceCell<()>,
}

/// A failed netlink or namespace step: transient (the next create or delete
/// tries again), with the kernel's errno as the code where there is one.
fn failed(what: impl std::fmt::Display, e: &(dyn std::error::Error + 'static)) -> ProviderError {
    ProviderError::transient(format!("{what}: {}", podvisor_state::report(e)))
}

/// The errno of a netlink error, if the kernel answered with one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl VmNetwork {
    /// The network on `bridge` with addresses from `subnet` (a /8 to /30).
    pub fn new(bridge: String, subnet: Ipv4Net) -> Self {
        Self {
            bridge,
            subnet: subnet.trunc(),
            ready: OnceCell::new(),
        }
    }

    /// The bridge's address: the subnet's first host address, the pod VMs'
    /// gateway and the node's address on the cloud network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The prefix length of instance addresses.
    pub fn prefix_len(&self) -> u8 {
        self.subnet.prefix_len()
    }

    /// How many instance addresses there are (the gateway excluded).
    pub fn usable(&self) -> u32 {
        (1u32 << (32 - u32::from(self.subnet.prefix_len()))).saturating_sub(3)
    }

    /// The `n`-th instance address (wrapping), never the gateway, the
    /// network or the broadcast address.
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway()) + 1 + n % self.usable().max(1))
    }

    fn daemon_netlink() -> Result<Handle, ProviderError> {
        Netns::open(SELF_NETNS)
            .and_then(|ns| ns.netlink())
            .map_err(|e| failed("Cannot open netlink in the daemon's namespace", &e))
    }

    /// Makes the bridge with its address, up, when the provider starts: it
    /// is the node's interface towards its instances (`--host-interface`
    /// names it), so it must exist before the first pod's tunnel is
    /// described.
    ///
    /// # Errors
    /// A transient [`ProviderError`] naming the step that failed.
    pub async fn prepare(&self) -> Result<(), ProviderError> {
        self.ensure_bridge(&Self::daemon_netlink()?)
            .await
            .map(|_| ())
    }

    /// Makes the bridge (if missing), gives it the gateway address (if
    /// missing) and brings it up; once per provider.
    async fn ensure_bridge(&self, handle: &Handle) -> Result<u32, ProviderError> {
        let index = match link_index(handle, &self.bridge).await? {
            Some(index) => index,
            None => {
                match handle
                    .link()
                    .add(LinkBridge::new(&self.bridge).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    // Another create made it meanwhile.
                    Err(e) if errno(&e) == Some(libc_eexist()) => {}
                    Err(e) => {
                        return Err(failed(format!("Cannot create bridge {}", self.bridge), &e));
                    }
                }
                link_index(handle, &self.bridge).await?.ok_or_else(|| {
                    ProviderError::transient(format!("Bridge {} vanished", self.bridge))
                })?
            }
        };
        self.ready
            .get_or_try_init(|| async {
                match handle
                    .address()
                    .add(index, self.gateway().into(), self.subnet.prefix_len())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(libc_eexist()) => {}
                    Err(e) => {
                        return Err(failed(
                            format!("Cannot give bridge {} its address", self.bridge),
                            &e,
                        ));
                    }
                }
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(|e| failed(format!("Cannot bring bridge {} up", self.bridge), &e))
            })
            .await?;
        Ok(index)
    }

    /// A new namespace for instance `id` with `ip` on its `eth0`, plugged
    /// into the bridge, `lo` up and a default route via the gateway.
    /// Whatever a torn earlier attempt left for `id` is removed first.
    ///
    /// # Errors
    /// A transient [`ProviderError`] naming the step that failed; the
    /// partial namespace is gone with the returned error (nothing holds it).
    pub async fn create(&self, id: &str, ip: Ipv4Addr) -> Result<Netns, ProviderError> {
        let host = Self::daemon_netlink()?;
        let bridge = self.ensure_bridge(&host).await?;
        let (host_end, temp_end) = veth_names(id);
        delete_link(&host, &host_end).await?;
        delete_link(&host, &temp_end).await?;

        let vm = new_netns()?;
        host.link()
            .add(LinkVeth::new(&host_end, &temp_end).build())
            .execute()
            .await
            .map_err(|e| failed(format!("Cannot create veth {host_end}"), &e))?;
        let undo = async |e: ProviderError| {
            let _ = delete_link(&host, &host_end).await;
            e
        };
        let result = async {
            let temp = link_index(&host, &temp_end)
                .await?
                .ok_or_else(|| ProviderError::transient(format!("veth {temp_end} vanished")))?;
            host.link()
                .set(
                    LinkUnspec::new_with_index(temp)
                        .setns_by_fd(vm.as_fd().as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| failed(format!("Cannot move {temp_end} into {id}'s namespace"), &e))?;
            let host_index = link_index(&host, &host_end)
                .await?
                .ok_or_else(|| ProviderError::transient(format!("veth {host_end} vanished")))?;
            host.link()
                .set(
                    LinkUnspec::new_with_index(host_index)
                        .controller(bridge)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| failed(format!("Cannot plug {host_end} into {}", self.bridge), &e))?;
            let inside = vm
                .netlink()
                .map_err(|e| failed(format!("Cannot open netlink in {id}'s namespace"), &e))?;
            let eth0 = link_index(&inside, &temp_end).await?.ok_or_else(|| {
                ProviderError::transient(format!("{temp_end} not in {id}'s namespace"))
            })?;
            inside
                .link()
                .set(
                    LinkUnspec::new_with_index(eth0)
                        .name("eth0".into())
                        .address(vm_mac(id).to_vec())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| failed("Cannot rename the VM's interface to eth0", &e))?;
            inside
                .address()
                .add(eth0, ip.into(), self.subnet.prefix_len())
                .execute()
                .await
                .map_err(|e| failed(format!("Cannot give eth0 {ip}"), &e))?;
            for index in [link_index(&inside, "lo").await?, Some(eth0)]
                .into_iter()
                .flatten()
            {
                inside
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(|e| failed("Cannot bring the VM's links up", &e))?;
            }
            inside
                .route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(self.gateway())
                        .output_interface(eth0)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| failed("Cannot add the VM's default route", &e))?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(vm),
            Err(e) => Err(undo(e).await),
        }
    }

    /// Removes what an instance's network left in the daemon's namespace and
    /// on disk: the pod namespace's bind mount under `dir` and the host end
    /// of its veth. Idempotent. (The instance's own namespace ends with its
    /// last process and holder.)
    ///
    /// # Errors
    /// A transient [`ProviderError`] when the mount or the link cannot be
    /// removed.
    pub async fn destroy(&self, id: &str, dir: &Path) -> Result<(), ProviderError> {
        let podns = dir.join(POD_NETNS_FILE);
        match nix::mount::umount2(&podns, nix::mount::MntFlags::MNT_DETACH) {
            // Not mounted, or not there: nothing holds a pod namespace.
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(failed(format!("Cannot unmount {}", podns.display()), &e)),
        }
        let host = Self::daemon_netlink()?;
        let (host_end, temp_end) = veth_names(id);
        delete_link(&host, &host_end).await?;
        delete_link(&host, &temp_end).await
    }
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

/// The veth's host end (`pv` + 12 hex digits of the id) and the temporary
/// name of its other end until it is `eth0` in the instance's namespace:
/// both within the kernel's 15 characters.
fn veth_names(id: &str) -> (String, String) {
    let hex: String = id.trim_start_matches("lvm-").chars().take(12).collect();
    (format!("pv{hex}"), format!("pq{hex}"))
}

/// The MAC of instance `id`'s `eth0`: the same at every launch, as a cloud
/// VM's NIC keeps its MAC across reboots. A relaunched instance keeps its
/// address too; with a new MAC, the node's ARP entry for that address
/// would point at the dead veth until it expired (up to tens of seconds),
/// and the node could not reach the instance meanwhile. Locally
/// administered unicast: `02:` and 5 bytes of SHA-256 of the id.
fn vm_mac(id: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    [0x02, digest[0], digest[1], digest[2], digest[3], digest[4]]
}

/// A fresh network namespace, held by the returned handle only.
fn new_netns() -> Result<Netns, ProviderError> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| failed("Cannot make a network namespace (unshare)", &e))?;
        File::open("/proc/thread-self/ns/net")
            .map_err(|e| failed("Cannot open the new network namespace", &e))
    })
    .join()
    .map_err(|_| ProviderError::transient("The namespace thread panicked"))?
    .map(|file| Netns::from_fd(file.into(), "a local instance's namespace"))
}

/// The index of link `name`, `None` if there is none.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, ProviderError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(None),
        Err(e) => Err(failed(format!("Cannot look up link {name}"), &e)),
    }
}

/// Deletes link `name` if it exists.
async fn delete_link(handle: &Handle, name: &str) -> Result<(), ProviderError> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
        Err(e) => Err(failed(format!("Cannot delete link {name}"), &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_the_gateway_and_names_fit_the_kernel() {
        let net = VmNetwork::new("pvcloud0".into(), "192.168.77.9/24".parse().unwrap());
        assert_eq!(net.gateway(), Ipv4Addr::new(192, 168, 77, 1));
        assert_eq!(net.usable(), 253);
        assert_eq!(net.nth(0), Ipv4Addr::new(192, 168, 77, 2));
        assert_eq!(net.nth(252), Ipv4Addr::new(192, 168, 77, 254));
        assert_eq!(net.nth(253), Ipv4Addr::new(192, 168, 77, 2), "wraps");
        let (a, b) = veth_names("lvm-0123456789abcdef");
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("pv0123456789ab", "pq0123456789ab")
        );
        assert!(a.len() <= 15 && b.len() <= 15);
        let mac = vm_mac("lvm-0123456789abcdef");
        assert_eq!(
            mac,
            vm_mac("lvm-0123456789abcdef"),
            "the same at every launch"
        );
        assert_eq!(mac[0], 0x02, "locally administered, unicast");
        assert_ne!(mac, vm_mac("lvm-0123456789abcdee"));
    }
}
