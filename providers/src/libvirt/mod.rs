//! The `libvirt` provider: a pod VM is a libvirt domain (QEMU/KVM, or TCG
//! where there is no KVM) with a qcow2 overlay on the base volume and a
//! NoCloud `cidata` ISO, both in one storage pool. podvisor's `<metadata>`
//! element in the domain carries the idempotency token, the node and the
//! sandbox: that is how instances are found, listed and collected.
//!
//! Tested on libvirt's test driver (`test:///default`) through the real
//! `virt` bindings; see `providers/tests/libvirt_conformance.rs`.

mod cidata;
mod config;
mod connection;
mod errors;
mod instances;
mod lifecycle;
mod manager;
mod provider;
mod volumes;
mod xml;

pub use cidata::{cidata_image, meta_data};
pub use config::{CpuSet, LaunchSecurity, LibvirtConfig, LibvirtUri};
pub use instances::uuid_for_token;
pub use manager::LibvirtManager;
pub use provider::{LibvirtProvider, LibvirtSettings};
pub use xml::{METADATA_NAMESPACE, domain_xml};
