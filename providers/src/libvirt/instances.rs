//! Domains as instances: the instance id a token gets, podvisor's metadata
//! and the addresses of a domain, and finding and listing podvisor's
//! domains as the daemon sees them.

use super::connection::Host;
use super::errors::classify;
use super::xml::{InstanceMetadata, METADATA_NAMESPACE};
use crate::error::{ErrorClass, ProviderError};
use crate::provider::{Instance, InstanceStatus, TAG_NODE, TAG_SANDBOX, TAG_TOKEN};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

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
pub(super) fn is_uuid(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Host {
    /// podvisor's metadata of a domain; `None` if it has none (not ours).
    pub(super) fn metadata(dom: &Domain) -> Result<Option<InstanceMetadata>, ProviderError> {
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
        found.sort_by_key(std::net::IpAddr::is_ipv6);
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
    pub(super) fn find(&self, token: &str, name: &str) -> Result<Option<Instance>, ProviderError> {
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

    /// Every podvisor domain whose tag `key` is `value`.
    pub(super) fn list(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
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

    /// The addresses of the domain `uuid` now (empty if it has none yet).
    pub(super) fn addresses_of(&self, uuid: &str) -> Result<Vec<IpAddr>, ProviderError> {
        let conn = self.connect()?;
        let dom = conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|e| classify(format!("Domain {uuid}"), &e))?;
        Ok(Self::addresses(&dom))
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
}
