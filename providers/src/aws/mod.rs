//! The `aws` provider: pod VMs as EC2 instances, created idempotently
//! (`ClientToken` plus a token tag that every create looks up first), tagged
//! with their node, sandbox and token in the create call itself, listed by
//! tag with server-side filters, and terminated with their Elastic IPs.
//! Flags and environment variables are the reference's.

mod config;
mod errors;
mod imds;
mod instances;
mod manager;
mod paced;
mod provider;
#[cfg(feature = "conformance")]
pub mod testing;

pub use crate::selection::{TypeSize, select_instance_type};
pub use config::{AwsConfig, Secret, TagList};
pub use errors::classify;
pub use manager::AwsManager;
pub use provider::{AwsProvider, AwsSettings};
