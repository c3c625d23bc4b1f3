//! The `ibmcloud` provider: pod VMs as IBM Cloud VPC virtual server
//! instances, through a small typed client of four REST APIs (no Rust SDK
//! exists): IAM (tokens), VPC (instances, images, profiles), Global Tagging
//! (tags) and Global Search (listing by tag).
//!
//! VPC instances take no tags in the create call: user tags are attached
//! afterwards through Global Tagging, and Global Search sees them only after
//! its index catches up. So the create call itself carries what makes it
//! idempotent and findable:
//!
//! - the **instance name** (`podvm-<pod>-<id8>`), unique in the region:
//!   a re-sent create is refused `400 validation_unique_failed`
//!   and the instance is looked up by name;
//! - the **boot volume name**, set to the idempotency token (a token is
//!   `pv-<32 hex>-g<n>`, a valid volume name): a create finds its token on
//!   the instance it adopts, so an instance of an earlier token under the
//!   same name is never taken for this one, even before its tags exist.
//!
//! The tags (`coco-pod-vm:<cluster>`, `TAGS`, podvisor's node, sandbox,
//! token and journal tags) follow in one attach; a failed attach is retried
//! by the create, which deletes the instance if tagging never succeeds, so
//! no untagged VM is left for the orphan GC to miss; a create cut off before
//! the attach is found by name (a lookup reads the instance's tags and
//! reports an untagged one as not reachable yet, so the daemon's create
//! adopts and tags it). The GC lists by tag through Global Search, then
//! reads each instance found from VPC (the search index lags creates and
//! deletes): an instance whose tags are not indexed yet is never collected.
//!
//! A delete waits until VPC answers 404 (IBM's instances stay `deleting`
//! for a while), so a record is removed only once its VM is gone; lookups
//! and listings count a `deleting` instance as gone.
//!
//! Flags and environment variables are the reference's (cloud-api-adaptor's
//! `ibmcloud` provider).

mod client;
mod config;
mod errors;
mod iam;
mod manager;
mod provider;
#[cfg(feature = "conformance")]
pub mod testing;

pub use config::IbmCloudConfig;
pub use errors::classify;
pub use manager::IbmCloudManager;
pub use provider::{IbmCloudProvider, IbmCloudSettings};
