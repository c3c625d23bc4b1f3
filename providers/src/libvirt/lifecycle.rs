//! A pod VM's life as a domain: defining and starting it for a create (or
//! adopting the one its token already made), and removing it with its
//! volumes for a delete.

use super::cidata;
use super::config::LaunchSecurity;
use super::connection::Host;
use super::errors::classify;
use super::instances::{is_uuid, uuid_for_token};
use super::volumes::{
    BaseVolume, cidata_volume_name, delete_volume, is_volume_name, make_volumes, root_volume_name,
};
use super::xml::{
    Arch, DomainFacts, DomainSpec, InstanceMetadata, OwnedVolume, domain_facts, domain_xml,
};
use crate::error::ProviderError;
use crate::provider::{CreateRequest, TAG_NODE};
use podvisor_state::UnixMillis;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

/// A created (or adopted) domain, before its address is known.
pub(super) struct Defined {
    /// Its UUID: the instance id.
    pub(super) uuid: String,
    /// Its name: the instance name.
    pub(super) name: String,
    /// podvisor's metadata in it.
    pub(super) metadata: InstanceMetadata,
}

/// The kind of domain this host makes: read from its capabilities and the
/// launch security setting.
struct Machine {
    /// The domain type (`kvm`, `qemu`, the test driver's `test`).
    domain_type: String,
    /// The guest arch (the host's).
    arch: Arch,
    /// Whether the domain is an s390x protected virtualization guest.
    s390_pv: bool,
}

impl Host {
    /// Defines and starts the domain for `request`, or adopts (and starts)
    /// the one this token already made. Volumes made here are deleted again
    /// if the domain does not end up defined and started.
    pub(super) fn define_and_start(
        &self,
        request: &CreateRequest,
        now: UnixMillis,
    ) -> Result<Defined, ProviderError> {
        let name = &request.instance_name;
        let _claim = self.claim(name)?;
        let conn = self.connect()?;
        match conn.lookup_domain_by_name(name) {
            Ok(dom) => return self.adopt(&conn, &dom, request),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
            Err(e) => return Err(classify(format!("Looking up domain {name}"), &e)),
        }
        let machine = self.machine(&conn)?;
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
        let base = BaseVolume::read(&pool, &self.settings.pool, base_name)?;

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
        let spec = DomainSpec {
            name: name.clone(),
            uuid: uuid.clone(),
            domain_type: machine.domain_type,
            arch: machine.arch,
            vcpus: request.spec.vcpus.unwrap_or(self.settings.vcpus),
            memory_mib: request.spec.memory_mib.unwrap_or(self.settings.memory_mib),
            cpuset: self.settings.cpuset.clone(),
            firmware: self.settings.firmware.clone(),
            s390_pv: machine.s390_pv,
            pool: self.settings.pool.clone(),
            root_volume: root_name,
            cidata_volume: cidata_name,
            network: self.settings.network.clone(),
            metadata: metadata.clone(),
        };
        let iso = cidata::cidata_image(
            request.user_data.as_bytes(),
            cidata::meta_data(&uuid, name).as_bytes(),
            now / 1000,
        );

        let mut made: Vec<StorageVol> = Vec::new();
        let result = make_volumes(
            &conn,
            &pool,
            &base,
            name,
            self.settings.root_disk_bytes,
            &iso,
            &mut made,
        )
        .and_then(|()| {
            crate::failpoints::hit(crate::failpoints::LIBVIRT_VOLUMES_BEFORE_DEFINE);
            Self::define_and_boot(&conn, &spec)
        });
        if let Err(e) = result {
            for volume in &made {
                if let Err(del) = volume.delete(0)
                    && !del.code().is(ErrorNumber::NoStorageVolume)
                {
                    tracing::warn!(domain = %name, "Cannot delete a volume of a failed create: {}", del.message());
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

    /// The kind of domain this host makes, from its capabilities (read once
    /// per connection) and the launch security setting; a confidential VM
    /// the host cannot make is a configuration error.
    fn machine(&self, conn: &Connect) -> Result<Machine, ProviderError> {
        let facts = self.host_facts(conn)?;
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
        Ok(Machine {
            domain_type: facts.domain_type,
            arch,
            s390_pv,
        })
    }

    /// Defines the domain of `spec` and starts it; a domain that does not
    /// start is undefined again.
    fn define_and_boot(conn: &Connect, spec: &DomainSpec) -> Result<(), ProviderError> {
        let name = &spec.name;
        let dom = conn
            .define_domain_xml(&domain_xml(spec))
            .map_err(|e| classify(format!("Defining domain {name}"), &e))?;
        if let Err(e) = dom.create() {
            let err = classify(format!("Starting domain {name}"), &e);
            // Defined but not started is never left behind.
            if let Err(undefine) = Self::undefine(&dom, &Self::facts(&dom), name) {
                tracing::warn!(domain = %name, "{undefine}");
            }
            return Err(err);
        }
        Ok(())
    }

    /// The create found a domain with the instance name: adopt it if it has
    /// the token (starting it if it is defined but stopped).
    fn adopt(
        &self,
        conn: &Connect,
        dom: &Domain,
        request: &CreateRequest,
    ) -> Result<Defined, ProviderError> {
        let name = &request.instance_name;
        let Some(metadata) = Self::metadata(dom)? else {
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
                if let Err(cleanup) = self.remove(conn, dom, &metadata, name) {
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

    /// What a delete needs to know of a domain, from its XML (one
    /// `virDomainGetXMLDesc`); nothing known if it cannot be read.
    fn facts(dom: &Domain) -> DomainFacts {
        dom.xml_desc(0)
            .ok()
            .and_then(|xml| domain_facts(&xml).ok())
            .unwrap_or_default()
    }

    /// Undefines a domain whose XML said `facts`, with its NVRAM if it has
    /// one.
    fn undefine(dom: &Domain, facts: &DomainFacts, name: &str) -> Result<(), ProviderError> {
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
    ///
    /// libvirt calls, for a running domain with its two volumes in one pool:
    /// destroy, the domain's XML, the pool, each volume's lookup and delete,
    /// undefine (8). It does not ask whether the domain runs first (destroy
    /// says so), reads the XML once for both the disks and the NVRAM, and
    /// looks each pool up once.
    fn remove(
        &self,
        conn: &Connect,
        dom: &Domain,
        metadata: &InstanceMetadata,
        name: &str,
    ) -> Result<(), ProviderError> {
        match dom.destroy() {
            Ok(()) => {}
            // Not running (defined, or a create torn before its start).
            Err(e) if e.code().is(ErrorNumber::OperationInvalid) => {}
            // Gone already (deleted by another call meanwhile).
            Err(e) if e.code().is(ErrorNumber::NoDomain) => return Ok(()),
            Err(e) => return Err(classify(format!("Destroying domain {name}"), &e)),
        }
        let facts = Self::facts(dom);
        // What the metadata says it owns, and any disk named after it.
        let mut volumes = metadata.volumes.clone();
        let prefix = format!("{name}-");
        for v in &facts.volumes {
            if v.name.starts_with(&prefix) && !volumes.contains(v) {
                volumes.push(v.clone());
            }
        }
        let mut pools: Vec<(String, Option<StoragePool>)> = Vec::new();
        for v in &volumes {
            let at = match pools.iter().position(|(n, _)| n == &v.pool) {
                Some(at) => at,
                None => {
                    let pool = match conn.lookup_storage_pool_by_name(&v.pool) {
                        Ok(pool) => Some(pool),
                        Err(e) if e.code().is(ErrorNumber::NoStoragePool) => None,
                        Err(e) => return Err(classify(format!("Storage pool {}", v.pool), &e)),
                    };
                    pools.push((v.pool.clone(), pool));
                    pools.len() - 1
                }
            };
            if let (_, Some(pool)) = &pools[at] {
                delete_volume(pool, &v.name)?;
            }
        }
        Self::undefine(dom, &facts, name)
    }

    /// Deletes the instance `id` (a domain UUID); a missing one is success.
    pub(super) fn delete(&self, id: &str) -> Result<(), ProviderError> {
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
}
