//! Clouds that hold pod VMs.
//!
//! - [`Provider`]: what a cloud does for a pod VM (create, delete, find, list,
//!   verify, teardown), with typed errors ([`ProviderError`]).
//! - [`CloudManager`]: a provider's flags, configuration and construction,
//!   and the [`registry`] the CLI is built from.
//! - One module per provider, each behind a cargo feature, laid out as
//!   `config.rs` / `manager.rs` / `provider.rs` (see `docs/adding-a-provider.md`).
//! - [`conformance`] (feature `conformance`): the suite every provider passes.
//! - [`fake`] (feature `conformance`): an in-memory provider for tests,
//!   with scripted errors and a call log.

pub mod duration;
pub mod error;
pub mod failpoints;
#[cfg(any(feature = "ibmcloud", feature = "azure"))]
pub mod https;
#[cfg(feature = "conformance")]
pub mod https_test_server;
pub mod manager;
pub mod pacing;
pub mod provider;
pub mod secret;
pub mod selection;

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "conformance")]
pub mod fake;
#[cfg(feature = "ibmcloud")]
pub mod ibmcloud;
#[cfg(feature = "libvirt")]
pub mod libvirt;
#[cfg(feature = "local")]
pub mod local;

pub use error::{ErrorClass, ProviderError};
pub use manager::{
    CallLimits, CloudManager, ConfigError, KNOWN_PROVIDERS, ProviderConfig, ProviderContext,
    find_manager, registry,
};
pub use provider::{
    CreateRequest, Instance, InstanceStatus, Provider, TAG_CLUSTER, TAG_JOURNAL, TAG_JOURNAL_SEQ,
    TAG_NODE, TAG_SANDBOX, TAG_TOKEN,
};
