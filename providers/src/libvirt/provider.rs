//! The libvirt provider (the reference's `provider.go` and `libvirt.go`):
//! the `Provider` impl and its settings. The blocking work is in the
//! sibling modules: `connection` (the shared connection, claims, the
//! start-up check), `instances` (reading domains), `lifecycle` (define,
//! adopt, remove), `volumes` and `errors`.
//!
//! A pod VM is a libvirt domain named after the instance, whose UUID is the
//! instance id (derived from the idempotency token, so a retried create asks
//! for the same UUID), with two volumes in the pool: a qcow2 overlay on the
//! base volume and a NoCloud `cidata` ISO. podvisor's `<metadata>` element
//! holds the token, the node, the sandbox, the tags and the owned volumes:
//! that is how instances are found, listed and collected.
//!
//! libvirt's API blocks, so every call runs on `spawn_blocking`; the address
//! wait sleeps on the async side between short blocking queries, so a
//! cancelled create stops waiting.

use super::config::{LaunchSecurity, LibvirtUri};
use super::connection::Host;
use crate::error::ProviderError;
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider, TAG_TOKEN};
use async_trait::async_trait;
use podvisor_state::now_millis;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

/// The largest user data accepted (the ISO is built in memory and uploaded).
const MAX_USER_DATA: usize = 16 << 20;

/// What the provider needs from the configuration.
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    /// The connection URI (shown without a password).
    pub uri: LibvirtUri,
    /// The pool of the base volume and of the pod VMs' volumes.
    pub pool: String,
    /// The network of the pod VMs' NIC.
    pub network: String,
    /// The base volume, unless the pod names another.
    pub base_volume: String,
    /// vCPUs, unless the pod asks.
    pub vcpus: u32,
    /// Memory in MiB, unless the pod asks.
    pub memory_mib: u64,
    /// Host CPUs to pin to, if any.
    pub cpuset: Option<String>,
    /// The least root disk size, in bytes.
    pub root_disk_bytes: u64,
    /// UEFI firmware path on the host, if any.
    pub firmware: Option<String>,
    /// The launch security setting.
    pub launch_security: LaunchSecurity,
    /// Confidential VMs are not wanted.
    pub disable_cvm: bool,
    /// How often to look for the new VM's address, and how long between looks
    /// (the reference: 20 × 3 s).
    pub address_attempts: u32,
    /// See `address_attempts`.
    pub address_interval: Duration,
}

impl LibvirtSettings {
    /// Settings with the reference's defaults for `uri`.
    pub fn new(uri: impl Into<LibvirtUri>) -> Self {
        Self {
            uri: uri.into(),
            pool: "default".into(),
            network: "default".into(),
            base_volume: "podvm-base.qcow2".into(),
            vcpus: 2,
            memory_mib: 8192,
            cpuset: None,
            root_disk_bytes: 10 << 30,
            firmware: Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
            launch_security: LaunchSecurity::Auto,
            disable_cvm: true,
            address_attempts: 20,
            address_interval: Duration::from_secs(3),
        }
    }
}

/// Pod VMs as libvirt domains.
pub struct LibvirtProvider {
    /// The blocking side, shared with the `spawn_blocking` tasks.
    host: Arc<Host>,
}

impl std::fmt::Debug for LibvirtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI's own Debug leaves its password out.
        f.debug_struct("LibvirtProvider")
            .field("settings", &self.host.settings)
            .finish_non_exhaustive()
    }
}

impl LibvirtProvider {
    /// A provider for `settings`; connects on first use.
    pub fn new(settings: LibvirtSettings) -> Self {
        static QUIET: Once = Once::new();
        // libvirt prints every error to stderr by default; ours are returned.
        QUIET.call_once(virt::error::clear_error_callback);
        Self {
            host: Arc::new(Host::new(settings)),
        }
    }

    /// The domain's addresses, looked for up to `address_attempts` times
    /// (empty if it has none by then). Sleeps here, not on the blocking
    /// pool, so a cancelled call stops waiting.
    async fn wait_for_address(&self, uuid: &str) -> Result<Vec<IpAddr>, ProviderError> {
        let settings = &self.host.settings;
        for attempt in 0..settings.address_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(settings.address_interval).await;
            }
            let uuid = uuid.to_owned();
            let ips = self.blocking(move |host| host.addresses_of(&uuid)).await?;
            if !ips.is_empty() {
                return Ok(ips);
            }
        }
        Ok(Vec::new())
    }

    /// Runs `f` against the host on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, ProviderError>
    where
        T: Send + 'static,
        F: FnOnce(&Host) -> Result<T, ProviderError> + Send + 'static,
    {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || f(&host))
            .await
            .map_err(|e| ProviderError::transient(format!("A libvirt call did not finish: {e}")))?
    }
}

#[async_trait]
impl Provider for LibvirtProvider {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        if request.user_data.len() > MAX_USER_DATA {
            return Err(ProviderError::permanent(format!(
                "User data of {} bytes is more than the {} MiB a cidata volume takes here",
                request.user_data.len(),
                MAX_USER_DATA >> 20
            )));
        }
        let owned = request.clone();
        let defined = self
            .blocking(move |host| host.define_and_start(&owned, now_millis()))
            .await?;
        let settings = &self.host.settings;
        let started = Instant::now();
        let ips = self.wait_for_address(&defined.uuid).await?;
        if ips.is_empty() {
            // Kept: the retried create finds it by name and token and waits again.
            return Err(ProviderError::transient(format!(
                "Pod VM {} ({}) runs but has no address in network {}'s leases after {:.0?}",
                defined.name,
                defined.uuid,
                settings.network,
                started.elapsed()
            )));
        }
        let mut tags: BTreeMap<String, String> = defined.metadata.tags.clone();
        tags.entry(TAG_TOKEN.to_owned())
            .or_insert_with(|| defined.metadata.token.clone());
        Ok(Instance {
            id: defined.uuid,
            name: defined.name,
            ips,
            tags,
            created_at: Some(defined.metadata.created_at),
            status: InstanceStatus::Running,
        })
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        let id = instance_id.to_owned();
        self.blocking(move |host| host.delete(&id)).await
    }

    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        let (token, name) = (token.to_owned(), name.to_owned());
        let mut found = self.blocking(move |host| host.find(&token, &name)).await?;
        if let Some(instance) = found.as_mut() {
            // Running without an address yet (a create that gave up waiting
            // for the lease, or a crash right after the start): wait as the
            // create would, since the daemon adopts what it finds running.
            if instance.status == InstanceStatus::Running && instance.ips.is_empty() {
                instance.ips = self.wait_for_address(&instance.id).await?;
                if instance.ips.is_empty() {
                    instance.status = InstanceStatus::Starting;
                }
            }
        }
        Ok(found)
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |host| host.list(&key, &value)).await
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        self.blocking(super::connection::Host::verify).await
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        self.blocking(|host| {
            host.disconnect();
            Ok(())
        })
        .await
    }
}
