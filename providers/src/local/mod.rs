//! The `local` provider: a pod VM is a detached local process — the pod-side
//! forwarder — on its own loopback address, with its state and user data
//! under `--local-dir`. Instances outlive a daemon crash exactly as cloud VMs
//! do, which makes this provider the test bed for recovery and the worked
//! example of how to add a provider (see `docs/adding-a-provider.md`).

mod config;
mod manager;
mod provider;
mod vm_network;

pub use config::{AddressRange, LocalConfig};
pub use manager::LocalManager;
pub use provider::{LocalProvider, instance_id_for_token};
pub use vm_network::VmNetwork;
