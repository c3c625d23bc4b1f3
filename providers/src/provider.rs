//! The `Provider` trait: what every cloud must do for a pod VM.

use crate::error::ProviderError;
use async_trait::async_trait;
use podvisor_state::{InstanceRef, InstanceSpec, UnixMillis};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Tag key: the node whose daemon owns the instance (the orphan GC lists by it).
pub const TAG_NODE: &str = "podvisor.io/node";
/// Tag key: the Kata sandbox id.
pub const TAG_SANDBOX: &str = "podvisor.io/sandbox";
/// Tag key: the idempotency token the instance was created with.
pub const TAG_TOKEN: &str = "podvisor.io/token";
/// Tag key: the id of the journal whose records answer for the instance
/// (podvisor_state::JournalIdentity). The orphan GC deletes only instances
/// of its own, intact journal.
pub const TAG_JOURNAL: &str = "podvisor.io/journal";
/// Tag key: the journal's durable write sequence when the instance was
/// created (after its `Creating` record was flushed). An instance whose
/// sequence is above what its journal holds proves the journal older than
/// the instance: a state directory restored from a copy.
pub const TAG_JOURNAL_SEQ: &str = "podvisor.io/journal-seq";

/// Everything a provider needs to create one pod VM. Its `Debug` leaves the
/// user data out: it holds the pod VM's TLS key and the pod's secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct CreateRequest {
    /// Kata's sandbox id.
    pub sandbox_id: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's namespace.
    pub pod_namespace: String,
    /// The deterministic instance name (`podvm-<pod>-<id8>`).
    pub instance_name: String,
    /// The idempotency token: a second create with it must return the first
    /// instance, never make a second one.
    pub token: String,
    /// What the pod asked for.
    pub spec: InstanceSpec,
    /// The cloud-config the pod VM reads at boot.
    pub user_data: String,
    /// Tags to put on the instance: at least [`TAG_NODE`], [`TAG_SANDBOX`]
    /// and [`TAG_TOKEN`]. Providers add their own configured tags.
    pub tags: BTreeMap<String, String>,
}

impl std::fmt::Debug for CreateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRequest")
            .field("sandbox_id", &self.sandbox_id)
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("instance_name", &self.instance_name)
            .field("token", &self.token)
            .field("spec", &self.spec)
            .field(
                "user_data",
                &format_args!("<{} bytes>", self.user_data.len()),
            )
            .field("tags", &self.tags)
            .finish()
    }
}

/// The power state of an instance, as far as the provider can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Being created or booting.
    Starting,
    /// Powered on.
    Running,
    /// Exists but is not running.
    Stopped,
}

/// One instance, as a provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The provider's id.
    pub id: String,
    /// The instance name.
    pub name: String,
    /// Its addresses; the first is the agent endpoint.
    pub ips: Vec<IpAddr>,
    /// Its tags (for the orphan GC and lookups).
    pub tags: BTreeMap<String, String>,
    /// When it was created, if the provider knows.
    pub created_at: Option<UnixMillis>,
    /// Its power state.
    pub status: InstanceStatus,
}

impl Instance {
    /// The part of an instance a record keeps.
    pub fn to_ref(&self) -> InstanceRef {
        InstanceRef {
            id: self.id.clone(),
            ips: self.ips.clone(),
        }
    }
}

/// A cloud that can hold pod VMs.
///
/// Every method may be retried and may be cancelled at any `.await`:
/// creates are idempotent by token, deletes treat "already gone" as success.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider's name, as on the command line (`local`, `aws`, ...).
    fn name(&self) -> &'static str;

    /// Creates the instance, or returns the one this token already made.
    ///
    /// When a failure follows the creation, the instance is still findable
    /// by its token, so the caller can clean it up.
    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError>;

    /// Deletes an instance. An instance that does not exist (or is already
    /// terminating) is success.
    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError>;

    /// The live instance created with `token`, if any. A provider that
    /// cannot store tokens may match `name` instead.
    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError>;

    /// Every live instance carrying the tag `key=value`.
    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError>;

    /// Checks the configuration against the cloud (images, types, access).
    async fn verify_config(&self) -> Result<(), ProviderError>;

    /// Releases what the provider holds (clients, connections) at shutdown.
    async fn teardown(&self) -> Result<(), ProviderError>;
}
