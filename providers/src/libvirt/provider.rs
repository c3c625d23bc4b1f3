//! The libvirt provider (the reference's `provider.go` and `libvirt.go`).
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

use super::cidata;
use super::config::{LaunchSecurity, LibvirtUri};
use super::xml::{
    Arch, DomainSpec, InstanceMetadata, METADATA_NAMESPACE, OwnedVolume, domain_facts, domain_xml,
    host_facts, volume_format, volume_xml,
};
use crate::error::{ErrorClass, ProviderError};
use crate::provider::{
    CreateRequest, Instance, InstanceStatus, Provider, TAG_NODE, TAG_SANDBOX, TAG_TOKEN,
};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

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

/// The libvirt side: the settings and one shared connection.
struct Host {
    /// The configuration.
    settings: LibvirtSettings,
    /// The open connection, reopened when it dies.
    connection: Mutex<Option<Connect>>,
    /// Instance names with a create under way here: a second create of the
    /// same name meanwhile would replace the first one's volumes.
    creating: Mutex<HashSet<String>>,
}

/// A create's claim on its instance name, released when dropped.
struct Claim<'a> {
    host: &'a Host,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.host.creating).remove(&self.name);
    }
}

/// Locks `m`, also after a panic elsewhere held it: what it guards (the
/// connection slot, the names being created) stays usable, and a poisoned
/// lock must not wedge every later create or leave a name claimed forever.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The root disk (a qcow2 overlay on the base volume) of instance `name`.
fn root_volume_name(name: &str) -> String {
    format!("{name}-root.qcow2")
}

/// The cidata ISO (the user data) of instance `name`.
fn cidata_volume_name(name: &str) -> String {
    format!("{name}-cloudinit.iso")
}

/// Deletes volume `name` of `pool` if it exists; whether it did.
fn delete_volume(pool: &StoragePool, name: &str) -> Result<bool, ProviderError> {
    let volume = match pool.lookup_storage_vol_by_name(name) {
        Ok(volume) => volume,
        Err(e) if e.code().is(ErrorNumber::NoStorageVolume) => return Ok(false),
        Err(e) => return Err(classify(format!("Looking up volume {name}"), &e)),
    };
    match volume.delete(0) {
        Ok(()) => Ok(true),
        Err(e) if e.code().is(ErrorNumber::NoStorageVolume) => Ok(false),
        Err(e) => Err(classify(format!("Deleting volume {name}"), &e)),
    }
}

/// The time now, in Unix milliseconds.
fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instance id (domain UUID) for a token: 16 bytes of SHA-256, marked as
/// an RFC 9562 version-8 UUID. A retried create asks for the same UUID.
pub fn uuid_for_token(token: &str) -> String {
    let digest = Sha256::digest(format!("podvisor-libvirt:{token}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Whether `id` is a UUID in libvirt's textual form.
fn is_uuid(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Whether `name` can be a volume name in a pool (the image annotation).
fn is_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.chars().any(char::is_control)
}

/// Maps a libvirt error to the daemon's classes, naming what was being done.
fn classify(what: impl std::fmt::Display, e: &virt::error::Error) -> ProviderError {
    let message = format!("{what}: {}", e.message());
    let code = e.code();
    if code.is_any(vec![
        ErrorNumber::NoDomain,
        ErrorNumber::NoStorageVolume,
        ErrorNumber::NoStoragePool,
        ErrorNumber::NoNetwork,
    ]) {
        ProviderError::not_found(message)
    } else if code.is_any(vec![
        ErrorNumber::NoConnect,
        ErrorNumber::Rpc,
        ErrorNumber::OperationTimeout,
        ErrorNumber::SystemError,
        ErrorNumber::InternalError,
        ErrorNumber::OperationFailed,
        ErrorNumber::ResourceBusy,
        ErrorNumber::AgentUnresponsive,
        ErrorNumber::OperationAborted,
        ErrorNumber::AuthUnavailable,
    ]) {
        ProviderError::transient(message)
    } else {
        // Bad XML, unsupported configuration, denied, invalid arguments, ...
        ProviderError::permanent(message)
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

/// A created (or adopted) domain, before its address is known.
struct Defined {
    uuid: String,
    name: String,
    metadata: InstanceMetadata,
}

impl Host {
    fn new(settings: LibvirtSettings) -> Self {
        Self {
            settings,
            connection: Mutex::new(None),
            creating: Mutex::new(HashSet::new()),
        }
    }

    /// The shared connection, opened (again) if needed.
    fn connect(&self) -> Result<Connect, ProviderError> {
        let mut slot = lock(&self.connection);
        if let Some(conn) = slot.as_ref() {
            if conn.is_alive().unwrap_or(false) {
                return Ok(conn.clone());
            }
        }
        let conn = Connect::open(Some(self.settings.uri.as_str()))
            .map_err(|e| {
                classify(
                    format!("Cannot connect to libvirt at {}", self.settings.uri),
                    &e,
                )
            })
            .map_err(|mut e| {
                // A refused or unreachable daemon may come back.
                if e.class == ErrorClass::Permanent || e.class == ErrorClass::NotFound {
                    e.class = ErrorClass::Transient;
                }
                e
            })?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Claims `name` for one create at a time.
    fn claim(&self, name: &str) -> Result<Claim<'_>, ProviderError> {
        let mut names = lock(&self.creating);
        if !names.insert(name.to_owned()) {
            return Err(ProviderError::transient(format!(
                "A create of domain {name} is already under way"
            )));
        }
        Ok(Claim {
            host: self,
            name: name.to_owned(),
        })
    }

    /// Drops the connection (teardown).
    fn disconnect(&self) {
        lock(&self.connection).take();
    }

    fn pool(&self, conn: &Connect) -> Result<StoragePool, ProviderError> {
        conn.lookup_storage_pool_by_name(&self.settings.pool)
            .map_err(|e| {
                let mut err = classify(format!("Storage pool {}", self.settings.pool), &e);
                if err.class == ErrorClass::NotFound {
                    err = ProviderError::config(format!(
                        "--pool-name (LIBVIRT_POOL): storage pool {} does not exist on {}",
                        self.settings.pool, self.settings.uri
                    ));
                }
                err
            })
    }

    /// podvisor's metadata of a domain; `None` if it has none (not ours).
    fn metadata(dom: &Domain) -> Result<Option<InstanceMetadata>, ProviderError> {
        match dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NAMESPACE),
            sys::VIR_DOMAIN_AFFECT_CURRENT,
        ) {
            Ok(xml) => match InstanceMetadata::parse(&xml) {
                Ok(m) => Ok(Some(m)),
                Err(why) => {
                    let name = dom.name().unwrap_or_default();
                    tracing::warn!(domain = %name, "podvisor metadata unreadable: {why}");
                    Ok(None)
                }
            },
            Err(e) if e.code().is(ErrorNumber::NoDomainMetadata) => Ok(None),
            Err(e) => Err(classify("Reading a domain's metadata", &e)),
        }
    }

    /// The domain's addresses: the network's DHCP leases first, then the
    /// host's ARP table; IPv4 before IPv6, no loopback or link-local.
    fn addresses(dom: &Domain) -> Vec<IpAddr> {
        let mut found = Vec::new();
        for source in [
            sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
        ] {
            let Ok(interfaces) = dom.interface_addresses(source, 0) else {
                continue;
            };
            for ip in interfaces
                .iter()
                .flat_map(|i| i.addrs.iter())
                .filter_map(|a| a.addr.parse::<IpAddr>().ok())
            {
                let usable = !ip.is_loopback()
                    && !ip.is_unspecified()
                    && match ip {
                        IpAddr::V4(v4) => !v4.is_link_local(),
                        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                    };
                if usable && !found.contains(&ip) {
                    found.push(ip);
                }
            }
            if !found.is_empty() {
                break;
            }
        }
        found.sort_by_key(|ip| ip.is_ipv6());
        found
    }

    /// The instance a domain is, as the daemon sees it.
    fn describe(dom: &Domain, metadata: &InstanceMetadata) -> Result<Instance, ProviderError> {
        let id = dom
            .uuid_string()
            .map_err(|e| classify("Reading a domain's UUID", &e))?;
        let name = dom
            .name()
            .map_err(|e| classify("Reading a domain's name", &e))?;
        let active = dom
            .is_active()
            .map_err(|e| classify(format!("Domain {name}"), &e))?;
        let mut tags = metadata.tags.clone();
        tags.entry(TAG_TOKEN.to_owned())
            .or_insert_with(|| metadata.token.clone());
        if !metadata.node.is_empty() {
            tags.entry(TAG_NODE.to_owned())
                .or_insert_with(|| metadata.node.clone());
        }
        if !metadata.sandbox.is_empty() {
            tags.entry(TAG_SANDBOX.to_owned())
                .or_insert_with(|| metadata.sandbox.clone());
        }
        Ok(Instance {
            id,
            name,
            ips: if active {
                Self::addresses(dom)
            } else {
                Vec::new()
            },
            tags,
            created_at: (metadata.created_at > 0).then_some(metadata.created_at),
            status: if active {
                InstanceStatus::Running
            } else {
                InstanceStatus::Stopped
            },
        })
    }

    /// The domain named `name` if podvisor made it with `token`.
    fn find(&self, token: &str, name: &str) -> Result<Option<Instance>, ProviderError> {
        let conn = self.connect()?;
        let dom = match conn.lookup_domain_by_name(name) {
            Ok(dom) => dom,
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {
                self.delete_leftover_volumes(&conn, name)?;
                return Ok(None);
            }
            Err(e) => return Err(classify(format!("Looking up domain {name}"), &e)),
        };
        match Self::metadata(&dom)? {
            Some(m) if m.token == token => Self::describe(&dom, &m).map(Some),
            _ => Ok(None),
        }
    }

    /// Deletes the volumes a create of `name` makes, when no domain has that
    /// name and no create of it is under way here: the remains of a create
    /// cut off (a crash, a kill) between making its volumes and defining its
    /// domain. Without this, a sandbox stopped after such a crash would be
    /// looked up, found gone, and its volumes left in the pool for good.
    fn delete_leftover_volumes(&self, conn: &Connect, name: &str) -> Result<(), ProviderError> {
        // A create of this name holds the claim while it makes its volumes.
        let Ok(_claim) = self.claim(name) else {
            return Ok(());
        };
        // Looked up again under the claim: a create may have just finished.
        match conn.lookup_domain_by_name(name) {
            Ok(_) => return Ok(()),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(classify(format!("Looking up domain {name}"), &e)),
        }
        let pool = match conn.lookup_storage_pool_by_name(&self.settings.pool) {
            Ok(pool) => pool,
            Err(e) if e.code().is(ErrorNumber::NoStoragePool) => return Ok(()),
            Err(e) => return Err(classify(format!("Storage pool {}", self.settings.pool), &e)),
        };
        for volume in [root_volume_name(name), cidata_volume_name(name)] {
            if delete_volume(&pool, &volume)? {
                tracing::info!(
                    domain = %name,
                    volume = %volume,
                    "deleted a volume left by a create that never defined its domain"
                );
            }
        }
        Ok(())
    }

    /// Every podvisor domain whose tag `key` is `value`.
    fn list(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        let conn = self.connect()?;
        let domains = conn
            .list_all_domains(0)
            .map_err(|e| classify("Listing domains", &e))?;
        let mut out = Vec::new();
        for dom in domains {
            let metadata = match Self::metadata(&dom) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                // Gone between the listing and the read.
                Err(e) if e.class == ErrorClass::NotFound => continue,
                Err(e) => return Err(e),
            };
            let matches = match key {
                TAG_TOKEN => metadata.token == value,
                TAG_NODE if metadata.node == value => true,
                TAG_SANDBOX if metadata.sandbox == value => true,
                _ => metadata.tags.get(key).is_some_and(|v| v == value),
            };
            if matches {
                match Self::describe(&dom, &metadata) {
                    Ok(instance) => out.push(instance),
                    Err(e) if e.class == ErrorClass::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Defines and starts the domain for `request`, or adopts (and starts)
    /// the one this token already made. Volumes made here are deleted again
    /// if the domain does not end up defined and started.
    fn define_and_start(
        &self,
        request: &CreateRequest,
        now: u64,
    ) -> Result<Defined, ProviderError> {
        let name = &request.instance_name;
        let _claim = self.claim(name)?;
        let conn = self.connect()?;
        match conn.lookup_domain_by_name(name) {
            Ok(dom) => return self.adopt(&conn, dom, request),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(classify(format!("Looking up domain {name}"), &e)),
        }

        let caps = conn
            .capabilities()
            .map_err(|e| classify("Reading the host's capabilities", &e))?;
        let facts = host_facts(&caps).map_err(|why| {
            ProviderError::permanent(format!(
                "Cannot read {}'s capabilities: {why}",
                self.settings.uri
            ))
        })?;
        let arch = Arch::for_host(&facts.host_arch).ok_or_else(|| {
            ProviderError::permanent(format!(
                "Host arch {} of {} is not one podvisor makes pod VMs for (x86_64, aarch64, s390x)",
                facts.host_arch, self.settings.uri
            ))
        })?;
        let s390_pv = match (self.settings.launch_security, self.settings.disable_cvm) {
            (LaunchSecurity::None, _) | (LaunchSecurity::Auto, true) => false,
            (LaunchSecurity::Auto, false) => {
                if arch != Arch::S390x {
                    return Err(ProviderError::config(format!(
                        "--disable-cvm (DISABLECVM): confidential VMs are asked for, but libvirt \
                         launch security is only supported on s390x (the host is {})",
                        facts.host_arch
                    )));
                }
                true
            }
            (LaunchSecurity::S390Pv, _) => {
                if arch != Arch::S390x {
                    return Err(ProviderError::config(format!(
                        "--launch-security (LIBVIRT_LAUNCH_SECURITY): s390-pv needs an s390x host; {} is {}",
                        self.settings.uri, facts.host_arch
                    )));
                }
                true
            }
        };

        let pool = self.pool(&conn)?;
        let base_name = request
            .spec
            .image
            .as_deref()
            .filter(|i| !i.is_empty())
            .unwrap_or(&self.settings.base_volume);
        if !is_volume_name(base_name) {
            return Err(ProviderError::permanent(format!(
                "Image '{base_name}' is not a volume name"
            )));
        }
        let base = pool.lookup_storage_vol_by_name(base_name).map_err(|e| {
            if e.code().is(ErrorNumber::NoStorageVolume) {
                ProviderError::permanent(format!(
                    "Base volume {base_name} does not exist in pool {}",
                    self.settings.pool
                ))
            } else {
                classify(format!("Base volume {base_name}"), &e)
            }
        })?;
        let base_info = base
            .info()
            .map_err(|e| classify(format!("Base volume {base_name}"), &e))?;
        let base_path = base
            .path()
            .map_err(|e| classify(format!("Base volume {base_name}"), &e))?;
        let base_xml = base
            .xml_desc(0)
            .map_err(|e| classify(format!("Base volume {base_name}"), &e))?;
        let base_format = volume_format(&base_xml)
            .map_err(|why| ProviderError::permanent(format!("Base volume {base_name}: {why}")))?
            .unwrap_or_else(|| "qcow2".into());

        let uuid = uuid_for_token(&request.token);
        let root_name = root_volume_name(name);
        let cidata_name = cidata_volume_name(name);
        let metadata = InstanceMetadata {
            token: request.token.clone(),
            node: request.tags.get(TAG_NODE).cloned().unwrap_or_default(),
            sandbox: request.sandbox_id.clone(),
            created_at: now,
            tags: request.tags.clone(),
            volumes: [&root_name, &cidata_name]
                .iter()
                .map(|v| OwnedVolume {
                    pool: self.settings.pool.clone(),
                    name: (*v).clone(),
                })
                .collect(),
        };

        let mut made: Vec<StorageVol> = Vec::new();
        let result = (|| -> Result<(), ProviderError> {
            let capacity = self.settings.root_disk_bytes.max(base_info.capacity);
            let root_xml = volume_xml(
                &root_name,
                capacity,
                "qcow2",
                Some((&base_path, &base_format)),
            );
            made.push(Self::fresh_volume(&pool, &root_name, &root_xml)?);

            let iso = cidata::cidata_image(
                request.user_data.as_bytes(),
                cidata::meta_data(&uuid, name).as_bytes(),
                now / 1000,
            );
            let iso_xml = volume_xml(&cidata_name, iso.len() as u64, "raw", None);
            let iso_volume = Self::fresh_volume(&pool, &cidata_name, &iso_xml)?;
            made.push(iso_volume.clone());
            Self::upload(&conn, &iso_volume, &cidata_name, &iso)?;
            crate::failpoints::hit(crate::failpoints::LIBVIRT_VOLUMES_BEFORE_DEFINE);

            let spec = DomainSpec {
                name: name.clone(),
                uuid: uuid.clone(),
                domain_type: facts.domain_type.clone(),
                arch,
                vcpus: request.spec.vcpus.unwrap_or(self.settings.vcpus),
                memory_mib: request.spec.memory_mib.unwrap_or(self.settings.memory_mib),
                cpuset: self.settings.cpuset.clone(),
                firmware: self.settings.firmware.clone(),
                s390_pv,
                pool: self.settings.pool.clone(),
                root_volume: root_name.clone(),
                cidata_volume: cidata_name.clone(),
                network: self.settings.network.clone(),
                metadata: metadata.clone(),
            };
            let dom = conn
                .define_domain_xml(&domain_xml(&spec))
                .map_err(|e| classify(format!("Defining domain {name}"), &e))?;
            if let Err(e) = dom.create() {
                let err = classify(format!("Starting domain {name}"), &e);
                // Defined but not started is never left behind.
                if let Err(undefine) = Self::undefine(&dom, name) {
                    tracing::warn!(domain = %name, "{undefine}");
                }
                return Err(err);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for volume in &made {
                if let Err(del) = volume.delete(0) {
                    if !del.code().is(ErrorNumber::NoStorageVolume) {
                        tracing::warn!(domain = %name, "Cannot delete a volume of a failed create: {}", del.message());
                    }
                }
            }
            return Err(e);
        }
        tracing::info!(domain = %name, uuid = %uuid, "pod VM defined and started");
        Ok(Defined {
            uuid,
            name: name.clone(),
            metadata,
        })
    }

    /// The create found a domain with the instance name: adopt it if it has
    /// the token (starting it if it is defined but stopped).
    fn adopt(
        &self,
        conn: &Connect,
        dom: Domain,
        request: &CreateRequest,
    ) -> Result<Defined, ProviderError> {
        let name = &request.instance_name;
        let Some(metadata) = Self::metadata(&dom)? else {
            return Err(ProviderError::permanent(format!(
                "A domain named {name} exists on {} and is not podvisor's",
                self.settings.uri
            )));
        };
        if metadata.token != request.token {
            let why = format!(
                "Domain {name} exists with token {}, not {}",
                metadata.token, request.token
            );
            return Err(if metadata.sandbox == request.sandbox_id {
                // An earlier generation of this sandbox, on its way out.
                ProviderError::transient(format!("{why}: waiting for its deletion"))
            } else {
                ProviderError::permanent(format!("{why}: another sandbox holds the name"))
            });
        }
        let uuid = dom
            .uuid_string()
            .map_err(|e| classify(format!("Domain {name}"), &e))?;
        let active = dom
            .is_active()
            .map_err(|e| classify(format!("Domain {name}"), &e))?;
        if !active {
            if let Err(e) = dom.create() {
                let err = classify(format!("Starting adopted domain {name}"), &e);
                // Never a defined, stopped and forgotten domain: remove it.
                if let Err(cleanup) = self.remove(conn, &dom, &metadata, name) {
                    tracing::warn!(domain = %name, "{cleanup}");
                }
                return Err(err);
            }
            tracing::info!(domain = %name, uuid = %uuid, "adopted a stopped pod VM and started it");
        }
        Ok(Defined {
            uuid,
            name: name.clone(),
            metadata,
        })
    }

    /// Creates a volume, replacing one of the same name (the remains of an
    /// attempt that crashed before its domain was defined: no domain has
    /// this instance name, so no domain uses it).
    fn fresh_volume(
        pool: &StoragePool,
        name: &str,
        xml: &str,
    ) -> Result<StorageVol, ProviderError> {
        delete_volume(pool, name)?;
        StorageVol::create_xml(pool, xml, 0)
            .map_err(|e| classify(format!("Creating volume {name}"), &e))
    }

    /// Writes `data` into a volume over a libvirt stream (works on remote
    /// hosts). libvirt's test driver keeps no volume contents and has no
    /// upload; there the bytes are skipped (the ISO is tested on its own).
    fn upload(
        conn: &Connect,
        volume: &StorageVol,
        name: &str,
        data: &[u8],
    ) -> Result<(), ProviderError> {
        let stream = Stream::new(conn, 0).map_err(|e| classify("Opening a libvirt stream", &e))?;
        if let Err(e) = volume.upload(&stream, 0, data.len() as u64, 0) {
            let test_driver = conn
                .driver_type()
                .is_ok_and(|t| t.eq_ignore_ascii_case("test"));
            if test_driver && e.code().is(ErrorNumber::NoSupport) {
                tracing::debug!(volume = %name, "the test driver stores no volume contents");
                return Ok(());
            }
            return Err(classify(format!("Uploading volume {name}"), &e));
        }
        let mut sent = 0;
        while sent < data.len() {
            match stream.send(&data[sent..]) {
                Ok(n) if n > 0 => sent += n as usize,
                Ok(_) => {
                    let _ = stream.abort();
                    return Err(ProviderError::transient(format!(
                        "Uploading volume {name}: the stream took no data"
                    )));
                }
                Err(e) => {
                    let _ = stream.abort();
                    return Err(classify(format!("Uploading volume {name}"), &e));
                }
            }
        }
        stream
            .finish()
            .map_err(|e| classify(format!("Uploading volume {name}"), &e))
    }

    /// Undefines a domain, with its NVRAM if it has one.
    fn undefine(dom: &Domain, name: &str) -> Result<(), ProviderError> {
        let facts = dom
            .xml_desc(0)
            .ok()
            .and_then(|xml| domain_facts(&xml).ok())
            .unwrap_or_default();
        let result = if facts.has_nvram {
            dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
        } else {
            dom.undefine()
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(()),
            Err(e) => Err(classify(format!("Undefining domain {name}"), &e)),
        }
    }

    /// Destroys the domain if it runs, deletes every volume it owns, then
    /// undefines it (volumes first: a failed volume delete leaves the domain
    /// for the retry to find).
    fn remove(
        &self,
        conn: &Connect,
        dom: &Domain,
        metadata: &InstanceMetadata,
        name: &str,
    ) -> Result<(), ProviderError> {
        match dom.is_active() {
            Ok(true) => match dom.destroy() {
                Ok(()) => {}
                Err(e)
                    if e.code()
                        .is_any(vec![ErrorNumber::OperationInvalid, ErrorNumber::NoDomain]) => {}
                Err(e) => return Err(classify(format!("Destroying domain {name}"), &e)),
            },
            Ok(false) => {}
            Err(e) if e.code().is(ErrorNumber::NoDomain) => return Ok(()),
            Err(e) => return Err(classify(format!("Domain {name}"), &e)),
        }
        // What the metadata says it owns, and any disk named after it.
        let mut volumes = metadata.volumes.clone();
        if let Ok(facts) = dom.xml_desc(0).map(|x| domain_facts(&x)) {
            let prefix = format!("{name}-");
            for v in facts.unwrap_or_default().volumes {
                if v.name.starts_with(&prefix) && !volumes.contains(&v) {
                    volumes.push(v);
                }
            }
        }
        for v in &volumes {
            let pool = match conn.lookup_storage_pool_by_name(&v.pool) {
                Ok(pool) => pool,
                Err(e) if e.code().is(ErrorNumber::NoStoragePool) => continue,
                Err(e) => return Err(classify(format!("Storage pool {}", v.pool), &e)),
            };
            delete_volume(&pool, &v.name)?;
        }
        Self::undefine(dom, name)
    }

    /// Deletes the instance `id` (a domain UUID); a missing one is success.
    fn delete(&self, id: &str) -> Result<(), ProviderError> {
        if !is_uuid(id) {
            return Ok(());
        }
        let conn = self.connect()?;
        let dom = match conn.lookup_domain_by_uuid_string(id) {
            Ok(dom) => dom,
            Err(e) if e.code().is(ErrorNumber::NoDomain) => return Ok(()),
            Err(e) => return Err(classify(format!("Looking up domain {id}"), &e)),
        };
        let name = dom.name().unwrap_or_else(|_| id.to_owned());
        let Some(metadata) = Self::metadata(&dom)? else {
            return Err(ProviderError::permanent(format!(
                "Domain {name} ({id}) has no podvisor metadata; podvisor deletes only its own"
            )));
        };
        self.remove(&conn, &dom, &metadata, &name)?;
        tracing::info!(domain = %name, uuid = %id, "pod VM deleted");
        Ok(())
    }

    /// The addresses of the domain `uuid` now (empty if it has none yet).
    fn addresses_of(&self, uuid: &str) -> Result<Vec<IpAddr>, ProviderError> {
        let conn = self.connect()?;
        let dom = conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|e| classify(format!("Domain {uuid}"), &e))?;
        Ok(Self::addresses(&dom))
    }

    /// The connection works, and the pool, the base volume and the network exist.
    fn verify(&self) -> Result<(), ProviderError> {
        let conn = self
            .connect()
            .map_err(|e| ProviderError::config(format!("--uri (LIBVIRT_URI): {}", e.message)))?;
        let pool = self.pool(&conn)?;
        if !pool.is_active().unwrap_or(false) {
            return Err(ProviderError::config(format!(
                "--pool-name (LIBVIRT_POOL): storage pool {} is not active",
                self.settings.pool
            )));
        }
        match pool.lookup_storage_vol_by_name(&self.settings.base_volume) {
            Ok(_) => {}
            Err(e) if e.code().is(ErrorNumber::NoStorageVolume) => {
                return Err(ProviderError::config(format!(
                    "--vol-name (LIBVIRT_VOL_NAME): base volume {} is not in pool {}",
                    self.settings.base_volume, self.settings.pool
                )));
            }
            Err(e) => return Err(classify("Looking up the base volume", &e)),
        }
        match conn.lookup_network_by_name(&self.settings.network) {
            Ok(_) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::NoNetwork) => Err(ProviderError::config(format!(
                "--network-name (LIBVIRT_NET): network {} does not exist on {}",
                self.settings.network, self.settings.uri
            ))),
            Err(e) => Err(classify("Looking up the network", &e)),
        }
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
        self.blocking(|host| host.verify()).await
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        self.blocking(|host| {
            host.disconnect();
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_per_token_and_well_formed() {
        let a = uuid_for_token("pv-0123-g1");
        assert_eq!(a, uuid_for_token("pv-0123-g1"));
        assert_ne!(a, uuid_for_token("pv-0123-g2"));
        assert!(is_uuid(&a), "{a}");
        assert_eq!(&a[14..15], "8", "version 8: {a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "variant: {a}");
    }

    #[test]
    fn only_uuids_are_instance_ids() {
        assert!(is_uuid("6695eb01-f6a4-8304-79aa-97f2502e193f"));
        for bad in [
            "",
            "test",
            "6695eb01f6a4830479aa97f2502e193f",
            "6695eb01-f6a4-8304-79aa-97f2502e193g",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn a_panic_while_a_lock_is_held_wedges_no_later_create() {
        let host = Arc::new(Host::new(LibvirtSettings::new("test:///default")));
        let h = host.clone();
        let crashed = std::thread::spawn(move || {
            let _claim = h.claim("podvm-a-1").unwrap();
            let _names = h.creating.lock().unwrap();
            panic!("a libvirt call panicked with the lock held");
        })
        .join();
        assert!(crashed.is_err());
        assert!(host.creating.is_poisoned());
        // The claim was released on the way out, and the name is free again.
        let again = host.claim("podvm-a-1").unwrap();
        assert!(
            host.claim("podvm-a-1").is_err(),
            "still one create at a time"
        );
        drop(again);
        host.claim("podvm-a-1").unwrap();
    }

    #[test]
    fn one_create_per_instance_name_at_a_time() {
        let host = Host::new(LibvirtSettings::new("test:///default"));
        let first = host.claim("podvm-a-1").unwrap();
        let err = host.claim("podvm-a-1").err().unwrap();
        assert_eq!(err.class, ErrorClass::Transient, "{err}");
        assert!(err.message.contains("already under way"), "{err}");
        let other = host.claim("podvm-b-2").unwrap();
        drop(first);
        host.claim("podvm-a-1")
            .expect("released when the create ends");
        drop(other);
    }

    #[test]
    fn image_annotations_must_be_volume_names() {
        assert!(is_volume_name("podvm-base.qcow2"));
        for bad in ["", "..", "a/b", "../../etc/passwd", "x\ny"] {
            assert!(!is_volume_name(bad), "{bad:?}");
        }
    }
}
