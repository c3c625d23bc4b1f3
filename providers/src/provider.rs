//! The `Provider` trait: what every cloud must do for a pod VM.

use crate::error::ProviderError;
use async_trait::async_trait;
use podvisor_state::{InstanceRef, InstanceSpec, UnixMillis};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Tag key: the node whose daemon owns the instance (the orphan GC lists by it).
pub const TAG_NODE: &str = "podvisor.io/node";
/// Tag key: the Kubernetes cluster the instance's node belongs to (the UID
/// of the cluster's `kube-system` namespace). The node-gone GC lists by it:
/// one daemon of the cluster deletes the instances of nodes that no longer
/// exist. An instance made before the daemon knew the cluster has none,
/// and is never collected that way.
pub const TAG_CLUSTER: &str = "podvisor.io/cluster";
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
    /// An earlier create with this token may have reached the cloud: a
    /// retry of a create that failed or timed out, or the recovery of a
    /// `Creating` record after a restart. `false` only when the journal
    /// proves this is the token's first create (the daemon set a fresh
    /// token for it). A provider whose cloud may ignore its idempotency
    /// token (moto ignores EC2's `ClientToken`) looks the token up before
    /// creating when this is `true`, and may skip that lookup when it is
    /// `false`. When unsure, callers set `true`: a lookup too many costs a
    /// call, one too few may make a second VM.
    pub earlier_attempt: bool,
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
            .field("earlier_attempt", &self.earlier_attempt)
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

/// A cloud that can hold pod VMs: the contract between the daemon and
/// every provider.
///
/// The daemon drives each pod VM through a journaled state machine whose
/// `Creating` and `Deleting` steps call these methods, from a provider actor
/// that paces mutating calls, bounds each call by `--provider-call-timeout`
/// and retries retryable failures. The same steps run again after a crash,
/// from the journal. So, as a Kubernetes finalizer's apply and cleanup do,
/// every method must be safe to run again, to run after an earlier run was
/// cut off anywhere, and (for a delete or a lookup) to run when the create
/// never ran at all. The conformance suite (`podvisor_providers::conformance`,
/// feature `conformance`) checks the rules a test can see; every provider,
/// and every fake, passes it.
///
/// | method | in short |
/// | --- | --- |
/// | [`create_instance`](Self::create_instance) | makes the VM, **idempotently by token**, tagged in the create call; returns it with an address |
/// | [`delete_instance`](Self::delete_instance) | deletes the VM and what it owns; **not found is success** |
/// | [`find_instance`](Self::find_instance) | the live VM of a token, or `None`; may be found **before its address** |
/// | [`list_instances`](Self::list_instances) | the live VMs with one tag, filtered by the cloud and paginated |
/// | [`verify_config`](Self::verify_config) | checks the configuration against the cloud at start-up |
/// | [`teardown`](Self::teardown) | releases clients at shutdown; the VMs stay |
///
/// "Live" means not terminated or shutting down: an instance on its way out
/// counts as gone for every method.
///
/// # Guarantees every method gives
///
/// - **Retried and replayed.** A call that failed retryably is made again
///   (with jittered backoff, at least `retry_after` later), and a crash
///   makes the daemon repeat the step it was in. Nothing may assume that
///   it runs once.
/// - **Cancelled at any `.await`.** A call is dropped when it times out or
///   the daemon stops, at whichever `.await` it has reached. The cloud may
///   then hold half of what the call meant to do; the next call (a retried
///   create, a lookup, a delete, the orphan GC's listing) must cope with
///   it, and no in-process state (a lock, a claim, a cache entry) may
///   outlive the dropped future wrongly.
/// - **Never blocks the runtime.** A blocking client library (libvirt) runs
///   on `tokio::task::spawn_blocking`, never on the calling task, and waits
///   sleep on the async side so a cancellation stops them.
/// - **Never leaks a secret.** Messages name the thing and the cause
///   (`Image ami-123 does not exist in eu-west-1`) and never hold a key, a
///   token, or user data (which carries the pod VM's TLS key and image
///   pull secrets).
///
/// # Errors
///
/// Every method fails with a [`ProviderError`]. Its
/// [`class`](ProviderError::class) is what the daemon acts on, so map the
/// cloud's errors with care, and keep the cloud's own error code in
/// [`code`](ProviderError::code): a provider branches on the class or the
/// code, never on the message.
///
/// | class | when | the daemon |
/// | --- | --- | --- |
/// | [`Transient`](crate::ErrorClass::Transient) | network errors, 5xx, no capacity right now | retries with jittered exponential backoff (`--provider-call-attempts`, `--retry-base`, `--retry-cap`), then the state machine retries the create (`--create-attempts`) |
/// | [`Throttled`](crate::ErrorClass::Throttled) | the cloud's rate limit; set `retry_after` if the cloud says | waits at least `retry_after`, then retries |
/// | [`NotFound`](crate::ErrorClass::NotFound) | the instance (or thing named) does not exist | on delete: done |
/// | [`Permanent`](crate::ErrorClass::Permanent) | a bad parameter, no permission, an image that does not exist | fails the operation with the message (StartVM returns it to Kata) |
/// | [`Config`](crate::ErrorClass::Config) | the provider's configuration is wrong | as `Permanent`; at start-up, fails naming the flag to fix |
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider's name, as on the command line and in metric labels
    /// (`local`, `aws`, `libvirt`, ...).
    fn name(&self) -> &'static str;

    /// Whether this provider paces each of its cloud requests itself,
    /// through [`crate::ProviderContext::pacer`] (a lookup or listing page
    /// as a read, anything else as mutating), and tells the request's
    /// bucket whether the cloud throttled or accepted it
    /// ([`crate::pacing::TokenBucket::throttled`], `accepted`). The daemon
    /// then neither takes a token per call nor adjusts the buckets.
    /// `false` (the default): the daemon takes one token per try of a call,
    /// of the call's class, and adjusts that bucket by the call's outcome.
    fn paces_requests(&self) -> bool {
        false
    }

    /// Whether the node can join a pod's network to its instance with a
    /// VXLAN tunnel: the instance is a VM with an address of its own that
    /// the node reaches, and its forwarder builds the pod's namespace from
    /// apf.json's `pod-network`. `true` (the default) for clouds; `false`
    /// where instances have no network of their own (the local provider
    /// without `--netns-per-vm`, the test fake): the daemon then builds no
    /// tunnel and `/v1/status` says why.
    fn pod_network(&self) -> bool {
        true
    }

    /// Creates the instance `request` describes, or returns the one its
    /// token already made, once the cloud has accepted it and it has an
    /// address.
    ///
    /// # Guarantees
    ///
    /// - **Idempotent by `request.token`.** A second call with the same
    ///   token (a retry, a recovery after a crash, a create whose answer was
    ///   lost) returns the first instance and never makes a second one. A
    ///   cloud with a client token (EC2's `ClientToken`) is given the
    ///   token; a cloud without one relies on a lookup by token first and a
    ///   deterministic name. That lookup may be skipped when
    ///   [`request.earlier_attempt`](CreateRequest::earlier_attempt) is
    ///   `false` (the token's first create: nothing can carry it yet), and
    ///   must be made when it is `true`. The daemon also calls
    ///   [`find_instance`](Self::find_instance) before every create that is
    ///   not the first attempt, so a cloud that ignores tokens still never
    ///   gets two VMs.
    /// - **Tagged and named in the create call itself.** Every pair of
    ///   `request.tags` is on the instance — at least [`TAG_NODE`],
    ///   [`TAG_SANDBOX`] and [`TAG_TOKEN`] — and it is named
    ///   `request.instance_name`. Tags (or labels, or libvirt `<metadata>`)
    ///   go in the call that makes the instance, never in a second call a
    ///   crash could skip: an untagged instance is one the orphan GC cannot
    ///   see.
    /// - **A create cut off half-way is found again.** A crash or a
    ///   cancellation can stop a create between two of its cloud calls.
    ///   Whatever the first calls made is found by the retried create (which
    ///   replaces or adopts it) or, if the sandbox is stopped instead, by
    ///   [`find_instance`](Self::find_instance) (which cleans it up). Each
    ///   such gap has a crash point ([`crate::failpoints`]) and an
    ///   end-to-end test that kills the daemon there.
    /// - **A failure after the instance exists leaves it findable.** If a
    ///   step fails once the instance is made (it never listens, it has no
    ///   address yet), either delete what was made before returning the
    ///   error, or leave it findable by its token for the retry, recovery
    ///   and the orphan GC.
    /// - **Adopts what its token made.** An instance of this token that is
    ///   stopped is started again, one without an address is waited for;
    ///   neither is replaced.
    /// - **The first address is the agent's.** The returned
    ///   [`Instance::ips`] is not empty; the daemon's readiness probe and
    ///   agent proxy dial its first entry at the forwarder port.
    ///
    /// # Errors
    ///
    /// - `Transient` when the instance may exist but cannot be handed back
    ///   yet (a lost answer, no address yet): the retried create adopts it.
    /// - `Permanent` when no retry can succeed: an image or type the cloud
    ///   does not have, user data over the cloud's limit, an instance name
    ///   held by another sandbox's token.
    /// - `Config` when the provider's settings cannot make any instance.
    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError>;

    /// Deletes instance `instance_id` and whatever it owns (volumes,
    /// addresses, network interfaces). Pod VMs of others are never touched:
    /// a provider deletes only what it made.
    ///
    /// # Guarantees
    ///
    /// - **Not found is success.** An instance that does not exist, is
    ///   already terminating, or whose id cannot exist on this cloud (a
    ///   malformed id, which must never become a path or a query) is
    ///   deleted: `Ok(())`. A retried or replayed delete therefore always
    ///   converges.
    /// - **Tolerates a create that never finished.** The id may come from a
    ///   create cut off half-way: whatever part of the instance exists is
    ///   deleted, in an order that leaves the rest findable if the delete
    ///   is itself cut off (libvirt deletes volumes before it undefines the
    ///   domain that lists them).
    ///
    /// # Errors
    ///
    /// Never `NotFound` for the instance itself (that is `Ok`). A retryable
    /// failure leaves the instance, or what is left of it, for the retry.
    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError>;

    /// The live instance created with `token`, if any. A provider that
    /// cannot store tokens may look `name` up and check the token wherever
    /// it keeps it.
    ///
    /// The daemon calls it before every create that is not the first
    /// attempt, at recovery (does the journaled instance still exist?), and
    /// when a sandbox whose create did not finish is stopped.
    ///
    /// # Guarantees
    ///
    /// - **Only this token's instance.** One made with another token is not
    ///   returned, even under the same name.
    /// - **It may be found before it is reachable.** The instance may come
    ///   back without an address, or `Stopped`; the daemon then calls
    ///   [`create_instance`](Self::create_instance) with the same token,
    ///   which adopts it and waits for its address. A provider may wait for
    ///   the address here, bounded, as the create would.
    /// - **It may clean up after a create cut off half-way.** When nothing
    ///   of the token's instance is found but parts of it are (libvirt:
    ///   volumes with no domain), it may delete them, as long as no create
    ///   of that instance is under way.
    ///
    /// # Errors
    ///
    /// Not found is `Ok(None)`, never an error.
    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError>;

    /// Every live instance carrying the tag `key=value`.
    ///
    /// # Guarantees
    ///
    /// - **Filtered by the cloud, every page.** The filter is applied on
    ///   the server side and every page is read; never an unfiltered
    ///   listing of the account.
    /// - **Only live instances**, each with its tags, so the orphan GC
    ///   (which calls it with [`TAG_NODE`]) can tell its own journal's
    ///   instances from others'.
    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError>;

    /// Checks the configuration against the cloud: the image exists, the
    /// types exist, the credentials work, the network is there. Run at
    /// start-up; `--cloud-config-verify` makes a failure fatal.
    ///
    /// # Errors
    ///
    /// `Config`, its message starting with the flag and its variable to fix
    /// (`--imageid (PODVM_AMI_ID): ...`). A cloud that cannot answer is
    /// `Transient`, not a wrong flag.
    async fn verify_config(&self) -> Result<(), ProviderError>;

    /// Releases what the provider holds (clients, connections) at
    /// shutdown. The pod VMs stay: a restarted daemon finds them again.
    async fn teardown(&self) -> Result<(), ProviderError>;
}
