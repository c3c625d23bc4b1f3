//! A pod VM's volumes: the names a create gives them, the base volume the
//! root disk overlays, making them (replacing the remains of a create cut
//! off before its domain was defined), uploading the cidata ISO, deleting
//! them, and collecting those a cut-off create left behind.

use super::connection::Host;
use super::errors::classify;
use super::xml::{volume_format, volume_xml};
use crate::error::ProviderError;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

/// The root disk (a qcow2 overlay on the base volume) of instance `name`.
pub(super) fn root_volume_name(name: &str) -> String {
    format!("{name}-root.qcow2")
}

/// The cidata ISO (the user data) of instance `name`.
pub(super) fn cidata_volume_name(name: &str) -> String {
    format!("{name}-cloudinit.iso")
}

/// Whether `name` can be a volume name in a pool (the image annotation).
pub(super) fn is_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.chars().any(char::is_control)
}

/// Deletes volume `name` of `pool` if it exists; whether it did.
pub(super) fn delete_volume(pool: &StoragePool, name: &str) -> Result<bool, ProviderError> {
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

/// The base volume a root disk overlays.
pub(super) struct BaseVolume {
    /// Its size in bytes: the least size of the overlay.
    pub(super) capacity: u64,
    /// Its path on the host, the overlay's backing file.
    pub(super) path: String,
    /// Its format (`qcow2` when the pool does not say).
    pub(super) format: String,
}

impl BaseVolume {
    /// Reads volume `name` of `pool` (named `pool_name` in messages); a
    /// missing one is a permanent failure of the create.
    pub(super) fn read(
        pool: &StoragePool,
        pool_name: &str,
        name: &str,
    ) -> Result<Self, ProviderError> {
        let base = pool.lookup_storage_vol_by_name(name).map_err(|e| {
            let err = classify(format!("Base volume {name}"), &e);
            if !e.code().is(ErrorNumber::NoStorageVolume) {
                return err;
            }
            ProviderError {
                code: err.code,
                ..ProviderError::permanent(format!(
                    "Base volume {name} does not exist in pool {pool_name}"
                ))
            }
        })?;
        let info = base
            .info()
            .map_err(|e| classify(format!("Base volume {name}"), &e))?;
        let path = base
            .path()
            .map_err(|e| classify(format!("Base volume {name}"), &e))?;
        let xml = base
            .xml_desc(0)
            .map_err(|e| classify(format!("Base volume {name}"), &e))?;
        let format = volume_format(&xml)
            .map_err(|why| ProviderError::permanent(format!("Base volume {name}: {why}")))?
            .unwrap_or_else(|| "qcow2".into());
        Ok(Self {
            capacity: info.capacity,
            path,
            format,
        })
    }
}

/// Makes the volumes of instance `name`: its root overlay on `base`, of at
/// least `root_bytes`, then its cidata volume holding `iso`. Each volume is
/// pushed to `made` as soon as it exists, so a failure later (here or in
/// the define) can delete it again.
pub(super) fn make_volumes(
    conn: &Connect,
    pool: &StoragePool,
    base: &BaseVolume,
    name: &str,
    root_bytes: u64,
    iso: &[u8],
    made: &mut Vec<StorageVol>,
) -> Result<(), ProviderError> {
    let (root_name, cidata_name) = (root_volume_name(name), cidata_volume_name(name));
    let capacity = root_bytes.max(base.capacity);
    let root_xml = volume_xml(
        &root_name,
        capacity,
        "qcow2",
        Some((&base.path, &base.format)),
    );
    made.push(fresh_volume(pool, &root_name, &root_xml)?);
    let iso_xml = volume_xml(&cidata_name, iso.len() as u64, "raw", None);
    let iso_volume = fresh_volume(pool, &cidata_name, &iso_xml)?;
    made.push(iso_volume.clone());
    upload(conn, &iso_volume, &cidata_name, iso)
}

/// Creates a volume, replacing one of the same name (the remains of an
/// attempt that crashed before its domain was defined: no domain has
/// this instance name, so no domain uses it). The common case is one call
/// (the create); only a create that fails looks for such remains, deletes
/// them and creates again.
fn fresh_volume(pool: &StoragePool, name: &str, xml: &str) -> Result<StorageVol, ProviderError> {
    let first = match StorageVol::create_xml(pool, xml, 0) {
        Ok(volume) => return Ok(volume),
        Err(e) => e,
    };
    // Drivers differ in how they say "exists" (the storage driver's
    // VIR_ERR_STORAGE_VOL_EXIST, the test driver's OPERATION_FAILED): so
    // whatever the error, retry only if a volume of the name was there.
    if !delete_volume(pool, name)? {
        return Err(classify(format!("Creating volume {name}"), &first));
    }
    tracing::info!(volume = %name, "replaced a volume left by a create that never defined its domain");
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

impl Host {
    /// Deletes the volumes a create of `name` makes, when no domain has that
    /// name and no create of it is under way here: the remains of a create
    /// cut off (a crash, a kill) between making its volumes and defining its
    /// domain. Without this, a sandbox stopped after such a crash would be
    /// looked up, found gone, and its volumes left in the pool for good.
    pub(super) fn delete_leftover_volumes(
        &self,
        conn: &Connect,
        name: &str,
    ) -> Result<(), ProviderError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_annotations_must_be_volume_names() {
        assert!(is_volume_name("podvm-base.qcow2"));
        for bad in ["", "..", "a/b", "../../etc/passwd", "x\ny"] {
            assert!(!is_volume_name(bad), "{bad:?}");
        }
    }
}
