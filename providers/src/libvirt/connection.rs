//! The blocking side of the libvirt provider: the settings, one shared
//! connection (opened on first use, reopened when it dies), the claims that
//! keep two creates of one instance name apart, and the start-up check of
//! the configured pool, base volume and network.

use super::errors::{classify, code_of};
use super::provider::LibvirtSettings;
use super::xml::{HostFacts, host_facts};
use crate::error::{ErrorClass, ProviderError};
use std::collections::HashSet;
use std::sync::Mutex;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;

/// The libvirt side: the settings and one shared connection. Every method
/// blocks; the provider calls them on `spawn_blocking`.
pub(super) struct Host {
    /// The configuration.
    pub(super) settings: LibvirtSettings,
    /// The open connection, reopened when it dies.
    connection: Mutex<Option<Connect>>,
    /// Instance names with a create under way here: a second create of the
    /// same name meanwhile would replace the first one's volumes.
    creating: Mutex<HashSet<String>>,
    /// The host's capabilities as the open connection read them (once per
    /// connection, not once per create); cleared when it is reopened, which
    /// may reach another host.
    facts: Mutex<Option<HostFacts>>,
}

/// A create's claim on its instance name, released when dropped.
pub(super) struct Claim<'a> {
    /// Where the claim is held.
    host: &'a Host,
    /// The claimed instance name.
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

impl Host {
    /// A host for `settings`, not connected yet.
    pub(super) fn new(settings: LibvirtSettings) -> Self {
        Self {
            settings,
            connection: Mutex::new(None),
            creating: Mutex::new(HashSet::new()),
            facts: Mutex::new(None),
        }
    }

    /// The shared connection, opened (again) if needed.
    pub(super) fn connect(&self) -> Result<Connect, ProviderError> {
        let mut slot = lock(&self.connection);
        if let Some(conn) = slot.as_ref()
            && conn.is_alive().unwrap_or(false)
        {
            return Ok(conn.clone());
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
        lock(&self.facts).take();
        Ok(conn)
    }

    /// The host's capabilities (`virConnectGetCapabilities`), read once per
    /// connection.
    ///
    /// # Errors
    ///
    /// libvirt cannot give them (classified), or they do not parse
    /// (`Permanent`, naming the URI).
    pub(super) fn host_facts(&self, conn: &Connect) -> Result<HostFacts, ProviderError> {
        if let Some(facts) = lock(&self.facts).as_ref() {
            return Ok(facts.clone());
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
        *lock(&self.facts) = Some(facts.clone());
        Ok(facts)
    }

    /// Claims `name` for one create at a time.
    pub(super) fn claim(&self, name: &str) -> Result<Claim<'_>, ProviderError> {
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
    pub(super) fn disconnect(&self) {
        lock(&self.connection).take();
        lock(&self.facts).take();
    }

    /// The configured storage pool; a missing one is a configuration error.
    pub(super) fn pool(&self, conn: &Connect) -> Result<StoragePool, ProviderError> {
        conn.lookup_storage_pool_by_name(&self.settings.pool)
            .map_err(|e| {
                let err = classify(format!("Storage pool {}", self.settings.pool), &e);
                if err.class != ErrorClass::NotFound {
                    return err;
                }
                ProviderError {
                    code: err.code,
                    ..ProviderError::config(format!(
                        "--pool-name (LIBVIRT_POOL): storage pool {} does not exist on {}",
                        self.settings.pool, self.settings.uri
                    ))
                }
            })
    }

    /// The connection works, and the pool, the base volume and the network exist.
    pub(super) fn verify(&self) -> Result<(), ProviderError> {
        let conn = self.connect().map_err(|e| ProviderError {
            code: e.code.clone(),
            ..ProviderError::config(format!("--uri (LIBVIRT_URI): {}", e.message))
        })?;
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
                ))
                .with_code(code_of(&e)));
            }
            Err(e) => return Err(classify("Looking up the base volume", &e)),
        }
        match conn.lookup_network_by_name(&self.settings.network) {
            Ok(_) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::NoNetwork) => Err(ProviderError::config(format!(
                "--network-name (LIBVIRT_NET): network {} does not exist on {}",
                self.settings.network, self.settings.uri
            ))
            .with_code(code_of(&e))),
            Err(e) => Err(classify("Looking up the network", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
}
