//! The `azure` provider: pod VMs as Azure virtual machines, through Azure
//! Resource Manager (ARM) REST.
//!
//! **Why no management crate.** The HTTP pipeline and the credentials are
//! Microsoft's own (`azure_core` 1.x with its retries off — the daemon's
//! provider actor retries — and `azure_identity` 1.x: client secret,
//! workload identity, managed identity). The ARM calls themselves are a
//! small typed client here ([`client`] and the serde structs of the VM,
//! NIC, public IP, VM sizes and operation-status bodies in `provider.rs`),
//! because Microsoft publishes no 1.x management crate for Compute or
//! Network: the retired `azure_mgmt_compute` 0.21 line needs `azure_core`
//! 0.21, and its long-running-operation poller re-sends the PUT and
//! reports `Succeeded` while the VM is still `Creating`. When Microsoft
//! publishes a `azure_resourcemanager_compute` on `azure_core` 1.x, the
//! client can move onto it; the provider's logic (below) stays.
//!
//! **One PUT, idempotent by name.** A VM is one `PUT` of its deterministic
//! name (`podvm-<pod>-<id8>`) with `If-None-Match: *`: ARM's PUT is
//! create-or-replace, and the header makes it create-only, so a retry, a
//! recovery or a PUT whose answer was lost never makes a second VM nor
//! rewrites the first: it is answered `412`, and the VM found by name is
//! adopted when its token tag is this create's. The OS disk
//! (`<name>-disk`), the NIC (`<name>-net`) and the public IP (`<name>-ip`)
//! are made inside the VM's PUT with `deleteOption: Delete`, so they go
//! with the VM and nothing is left when it is deleted. The tags (`TAGS`
//! and podvisor's, `podvisor.io/x` written `podvisor.io_x`: Azure tag names
//! cannot hold `/`) are in the same PUT.
//!
//! **Ids.** An instance id is the VM's ARM id, `#`, and its `vmId`: the
//! next generation of a sandbox reuses the VM name, and the `vmId` keeps a
//! replayed delete of an old record off the new VM.
//!
//! **Delete** is `DELETE` + the operation, then a `GET` until it answers
//! 404: the record goes only once the VM is gone. A VM `Deleting` counts as
//! gone for lookups and listings.
//!
//! Flags and environment variables are the reference's (cloud-api-adaptor's
//! `azure` provider).

mod client;
mod config;
mod errors;
mod manager;
mod provider;
#[cfg(feature = "conformance")]
pub mod testing;

pub use client::{Arm, COMPUTE_API, NETWORK_API};
pub use config::AzureConfig;
pub use errors::classify;
pub use manager::{AZURE_CALL_LIMITS, AzureManager};
pub use provider::{AzureProvider, AzureSettings, azure_tag_name, instance_id};
