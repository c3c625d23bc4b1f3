//! PeerPod objects: for every `Running` sandbox, a PeerPod (the
//! reference's custom resource, `confidentialcontainers.org/v1alpha1`,
//! kind `PeerPod`) in its pod's namespace, owned by the pod, so that
//! `kubectl get peerpods` shows pod → instance as it does under the
//! reference. The chart ships the CRD (`deploy/helm/podvisor/crds/`).
//!
//! **The journal stays the source of truth.** An object is written only
//! from the [`InstanceView`] (which shows durable records only), and
//! nothing here ever asks for a VM action: a PeerPod that is missing,
//! stale, edited or deleted changes no VM. This module holds no handle on
//! the supervisor.
//!
//! The object, per sandbox:
//!
//! - **name** `<pod name>-resource-<5 characters>` (the reference's shape),
//!   the 5 characters derived from the sandbox id ([`object_name`]), so a
//!   restarted daemon finds the same object; the pod part is cut when the
//!   whole would pass 253 characters;
//! - **owner** the pod (`apiVersion: v1`, `kind: Pod`, its name and UID,
//!   `controller: true`, no `blockOwnerDeletion`: setting that needs
//!   `pods/finalizers` under the OwnerReferencesPermissionEnforcement
//!   admission plugin, and a PeerPod must never hold up a pod's deletion);
//! - **finalizer** [`FINALIZER`] (`podvisor.io/pod-vm`), podvisor's own,
//!   meaning "removed by podvisor once the pod VM is gone": when the pod is
//!   deleted, the garbage collector deletes the PeerPod, which stays
//!   `Terminating` until the VM is gone. Not the reference's
//!   `peer.pod/finalizer`: with that one, the reference's peerpod-ctrl,
//!   installed beside podvisor, would delete VMs behind the journal's back;
//! - **labels** `app.kubernetes.io/managed-by: podvisor` and
//!   [`NODE_LABEL`] (`podvisor.io/node`: the node's name, or, for a name a
//!   label value cannot hold, `sha256-<56 hex>` of it: [`node_label_value`]),
//!   so the daemon lists its own objects; **annotations**
//!   [`SANDBOX_ANNOTATION`] (the sandbox id, too long for a label value)
//!   and [`NODE_ANNOTATION`] (the node's full name);
//! - **spec** `cloudProvider` (the provider's name: `aws`, `azure`,
//!   `ibmcloud`, `libvirt`, `local`) and `instanceID` (the VM's id).
//!
//! **When.** Written by server-side apply (field manager `podvisor`,
//! forced) once the sandbox's record is durably `Running` with an
//! instance, after a GET of the pod for its UID (no pod of that name, or
//! one bound to another node: no object). Removed once the VM is gone —
//! the record removed, or `Failed` with its instance confirmed gone
//! (`released`) — by a DELETE, then a JSON patch that removes
//! [`FINALIZER`] at its index behind a `test` of it, so other controllers'
//! finalizers are never dropped. A sandbox in any other state
//! (`Pending`, `Creating`, `Deleting`, `Failed` still cleaning up) keeps
//! what it has and gets nothing new. Driven by the view's events, plus a
//! resync every [`RESYNC`] (and at start, and after missed events) that
//! lists this node's PeerPods in every namespace and reconciles both ways.
//! An API error changes nothing and is logged once per distinct error; the
//! next event or resync retries. Without the CRD (a 404 on the resource)
//! the daemon says so once and keeps trying at each resync.

use super::{Kube, LastError, observe, observe_opt};
use crate::view::{InstanceView, ViewEvent};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};
use podvisor_state::{InstanceRecord, State};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// The API group of the reference's PeerPod resource.
pub const GROUP: &str = "confidentialcontainers.org";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// Its kind.
pub const KIND: &str = "PeerPod";
/// Its plural, the resource's name in paths and RBAC rules.
pub const PLURAL: &str = "peerpods";
/// The CRD's name.
pub const CRD: &str = "peerpods.confidentialcontainers.org";
/// podvisor's finalizer: removed by podvisor once the pod VM is gone.
pub const FINALIZER: &str = "podvisor.io/pod-vm";
/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "podvisor";
/// The label every PeerPod podvisor writes carries, with [`MANAGED_BY`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY_LABEL`]'s value.
pub const MANAGED_BY: &str = "podvisor";
/// The label naming the node ([`node_label_value`]).
pub const NODE_LABEL: &str = "podvisor.io/node";
/// The annotation with the node's full name.
pub const NODE_ANNOTATION: &str = "podvisor.io/node";
/// The annotation with the sandbox id.
pub const SANDBOX_ANNOTATION: &str = "podvisor.io/sandbox-id";
/// How often the node's PeerPods are listed and reconciled with the view.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Longest object name (a DNS subdomain).
const MAX_NAME: usize = 253;
/// Longest label value.
const MAX_LABEL_VALUE: usize = 63;
/// The characters of the name's suffix: those of the 5 random characters
/// in the reference's names (Kubernetes' `rand.String`).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The PeerPod name of sandbox `sandbox_id` of pod `pod`:
/// `<pod>-resource-<5 characters of [b-df-hj-np-tv-xz2456789] derived
/// from SHA-256(sandbox id)>`; the pod part is cut (and stripped of a
/// trailing `-` or `.`) so the whole stays within 253 characters. A valid
/// DNS subdomain whenever `pod` is a pod's name.
pub fn object_name(pod: &str, sandbox_id: &str) -> String {
    let digest = Sha256::digest(sandbox_id.as_bytes());
    let suffix: String = digest
        .iter()
        .take(5)
        .map(|b| char::from(SUFFIX_ALPHABET[usize::from(*b) % SUFFIX_ALPHABET.len()]))
        .collect();
    let tail = format!("-resource-{suffix}");
    let room = MAX_NAME - tail.len();
    let cut = if pod.len() > room {
        // A pod's name is ASCII; a record from elsewhere may not be: cut
        // at a character boundary, never inside one.
        let mut end = room;
        while !pod.is_char_boundary(end) {
            end -= 1;
        }
        pod[..end].trim_end_matches(['-', '.'])
    } else {
        pod
    };
    format!("{cut}{tail}")
}

/// The [`NODE_LABEL`] value of node `node`: the name itself when a label
/// value can hold it (at most 63 characters of letters, digits, `-`, `_`
/// and `.`, starting and ending with a letter or digit — so a node name of
/// up to 63 characters), else `sha256-<56 hex of SHA-256(node)>` (63
/// characters). [`NODE_ANNOTATION`] has the name in full.
pub fn node_label_value(node: &str) -> String {
    let b = node.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= MAX_LABEL_VALUE
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if valid {
        return node.to_owned();
    }
    let hex: String = Sha256::digest(node.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256-{}", &hex[..56])
}

/// The node a PeerPod was written for: its [`NODE_ANNOTATION`] (the full
/// name; the label may hold a hash of it).
pub fn object_node(object: &DynamicObject) -> Option<&str> {
    object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NODE_ANNOTATION))
        .map(String::as_str)
}

/// Why a PeerPod could not be written, listed or removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerPodError {
    /// The API has no PeerPod resource (a 404 on it).
    #[error(
        "the PeerPod CRD ({CRD}, {VERSION}) is not installed: no PeerPod objects are written until it is (the chart's crds/ installs it; --disable-peerpods turns PeerPod objects off)"
    )]
    NoCrd,
    /// A request failed.
    #[error("{request}: {error}")]
    Api {
        /// The request, e.g. `PATCH peerpods default/web-resource-b2x4z`.
        request: String,
        /// The API's or the connection's error.
        error: String,
        /// What kind of failure it is, for logging it once: the API's
        /// status code and reason (`HTTP 403 Forbidden`), or `connection`
        /// for a failure to reach the API at all.
        class: String,
    },
}

impl PeerPodError {
    /// What tells two errors apart for logging: their class, not the
    /// object or connection they were met on (a down API fails every
    /// object alike, with one message or another).
    fn key(&self) -> &str {
        match self {
            Self::NoCrd => "no CRD",
            Self::Api { class, .. } => class,
        }
    }
}

/// What [`PeerPods::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The object was applied.
    Written,
    /// The sandbox is not `Running` with an instance, or has no pod name:
    /// nothing to write.
    NotRunning,
    /// No pod of the record's name on this node: nothing written.
    NoPod,
}

/// What [`PeerPods::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The object is gone (deleted, and [`FINALIZER`] removed if it had it).
    Removed,
    /// There was no such object (or, with a UID precondition, another
    /// object of that name, left alone).
    Absent,
}

/// What the view says should become of a sandbox's PeerPod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// `Running` with an instance: the object should exist.
    Apply,
    /// The VM may exist but the sandbox is not `Running`: keep what there
    /// is, write nothing new.
    Keep,
    /// The VM is gone (no record, or `Failed` and released): remove.
    Remove,
}

/// The PeerPod a sandbox's `record` wants.
fn want(record: Option<&InstanceRecord>) -> Want {
    match record {
        None => Want::Remove,
        Some(r) if r.state == State::Failed && r.released => Want::Remove,
        Some(r) if r.state == State::Running && r.instance.is_some() => Want::Apply,
        Some(_) => Want::Keep,
    }
}

/// Writes and removes the PeerPods of this node's sandboxes.
pub struct PeerPods {
    kube: Kube,
    view: Arc<InstanceView>,
    provider: String,
    resource: ApiResource,
    /// Sandbox id → the instance id its object was last applied (or found
    /// up to date) with, so a repeated event writes nothing.
    applied: HashMap<String, String>,
    /// The last error logged as a warning ([`PeerPodError::key`]).
    last_error: LastError,
}

impl std::fmt::Debug for PeerPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPods")
            .field("provider", &self.provider)
            .field("applied", &self.applied.len())
            .finish_non_exhaustive()
    }
}

impl PeerPods {
    /// PeerPods for the sandboxes of `view` on `kube`'s node, with
    /// `spec.cloudProvider` = `provider` (the provider's name).
    pub fn new(kube: Kube, view: Arc<InstanceView>, provider: &str) -> Self {
        let gvk = kube::api::GroupVersionKind::gvk(GROUP, VERSION, KIND);
        Self {
            kube,
            view,
            provider: provider.to_owned(),
            resource: ApiResource::from_gvk_with_plural(&gvk, PLURAL),
            applied: HashMap::new(),
            last_error: LastError::default(),
        }
    }

    fn api(&self, namespace: &str) -> kube::Api<DynamicObject> {
        kube::Api::namespaced_with(self.kube.client(), namespace, &self.resource)
    }

    /// The object [`Self::apply`] writes for `record` (`Running`, with an
    /// instance) whose pod has UID `pod_uid`.
    fn desired(
        &self,
        record: &InstanceRecord,
        instance_id: &str,
        pod_uid: &str,
    ) -> serde_json::Value {
        let name = object_name(&record.pod_name, &record.sandbox_id);
        let node = self.kube.node();
        json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": record.pod_namespace,
                "labels": {
                    MANAGED_BY_LABEL: MANAGED_BY,
                    NODE_LABEL: node_label_value(node),
                },
                "annotations": {
                    SANDBOX_ANNOTATION: record.sandbox_id,
                    NODE_ANNOTATION: node,
                },
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": record.pod_name,
                    "uid": pod_uid,
                    "controller": true,
                }],
                "finalizers": [FINALIZER],
            },
            "spec": {"cloudProvider": self.provider, "instanceID": instance_id},
        })
    }

    /// Whether the listed `object` already is what [`Self::apply`] would
    /// write for `record` (the owner compared by kind and name: a pod
    /// re-created under the name has had its PeerPod deleted by the garbage
    /// collector already).
    fn up_to_date(&self, object: &DynamicObject, record: &InstanceRecord) -> bool {
        let Some(instance) = &record.instance else {
            return false;
        };
        let meta = &object.metadata;
        let node = self.kube.node();
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
        let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
        let owned = meta.owner_references.as_ref().is_some_and(|refs| {
            refs.iter().any(|o| {
                o.api_version == "v1"
                    && o.kind == "Pod"
                    && o.name == record.pod_name
                    && o.controller == Some(true)
            })
        });
        let spec = &object.data["spec"];
        label(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            && label(NODE_LABEL) == Some(&node_label_value(node))
            && annotation(SANDBOX_ANNOTATION) == Some(&record.sandbox_id)
            && annotation(NODE_ANNOTATION).map(String::as_str) == Some(node)
            && meta
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
            && owned
            && spec["cloudProvider"] == self.provider.as_str()
            && spec["instanceID"] == instance.id.as_str()
    }

    /// Writes the PeerPod of `record` by server-side apply, after a GET of
    /// its pod for the owner's UID. Counted in
    /// [`crate::metrics::PEERPOD_WRITES`] (`action="apply"`).
    ///
    /// # Errors
    /// [`PeerPodError::NoCrd`] without the resource; [`PeerPodError::Api`]
    /// when the GET or the PATCH failed. Nothing was written.
    pub async fn apply(&self, record: &InstanceRecord) -> Result<Applied, PeerPodError> {
        let result = self.try_apply(record).await;
        let outcome = match &result {
            Ok(Applied::Written) => "ok",
            Ok(Applied::NoPod) => "no_pod",
            Ok(Applied::NotRunning) => return result,
            Err(PeerPodError::NoCrd) => "no_crd",
            Err(PeerPodError::Api { .. }) => "error",
        };
        count("apply", outcome);
        result
    }

    async fn try_apply(&self, record: &InstanceRecord) -> Result<Applied, PeerPodError> {
        let (State::Running, Some(instance)) = (record.state, &record.instance) else {
            return Ok(Applied::NotRunning);
        };
        let (pod, namespace) = (&record.pod_name, &record.pod_namespace);
        if !crate::api::annotations::is_pod_identity(pod, namespace) {
            return Ok(Applied::NotRunning);
        }
        let pods = kube::Api::<Pod>::namespaced(self.kube.client(), namespace);
        let found = observe_opt("get", pods.get_opt(pod).await).map_err(|e| PeerPodError::Api {
            request: format!("GET pod {namespace}/{pod}"),
            error: describe(&e),
            class: class_of(&e),
        })?;
        let node = self.kube.node();
        let uid = match found {
            Some(p) => {
                let elsewhere = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_some_and(|n| n != node);
                match p.metadata.uid {
                    Some(uid) if !elsewhere => uid,
                    _ => {
                        tracing::debug!(sandbox_id = %record.sandbox_id, pod = %format!("{namespace}/{pod}"), "the pod of that name is on another node: no PeerPod");
                        return Ok(Applied::NoPod);
                    }
                }
            }
            None => {
                tracing::debug!(sandbox_id = %record.sandbox_id, pod = %format!("{namespace}/{pod}"), "no pod of that name: no PeerPod");
                return Ok(Applied::NoPod);
            }
        };
        let object = self.desired(record, &instance.id, &uid);
        let name = object_name(pod, &record.sandbox_id);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        observe(
            "patch",
            self.api(namespace)
                .patch(&name, &params, &Patch::Apply(&object))
                .await,
        )
        .map_err(|e| api_error(format!("PATCH {PLURAL} {namespace}/{name}"), &e))?;
        Ok(Applied::Written)
    }

    /// Removes PeerPod `namespace/name`: a DELETE (with `uid` as its
    /// precondition when given), then, if the object is still there with
    /// [`FINALIZER`], a JSON patch that removes it at its index behind a
    /// `test` (retried from a new DELETE's answer if the list changed).
    /// Counted in [`crate::metrics::PEERPOD_WRITES`] (`action="remove"`).
    ///
    /// # Errors
    /// [`PeerPodError::NoCrd`] without the resource; [`PeerPodError::Api`]
    /// when a request failed (the object may then be `Terminating` with
    /// the finalizer: the next resync finishes it).
    pub async fn remove(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Removed, PeerPodError> {
        let result = self.try_remove(namespace, name, uid).await;
        let outcome = match &result {
            Ok(Removed::Removed) => "ok",
            Ok(Removed::Absent) => "absent",
            Err(PeerPodError::NoCrd) => "no_crd",
            Err(PeerPodError::Api { .. }) => "error",
        };
        count("remove", outcome);
        result
    }

    async fn try_remove(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Removed, PeerPodError> {
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let request = format!("DELETE {PLURAL} {namespace}/{name}");
        // A changed finalizer list fails the patch's test: read it again
        // from a new DELETE's answer (the object is Terminating by then,
        // and a DELETE of it only returns it).
        for _ in 0..3 {
            let object = match observe("delete", self.api(namespace).delete(name, &params).await) {
                Ok(answer) => match answer.left() {
                    Some(object) => object,
                    None => return Ok(Removed::Removed),
                },
                Err(e) if is_missing_object(&e) => return Ok(Removed::Absent),
                // The UID precondition: another object of that name.
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Removed::Absent),
                Err(e) => return Err(api_error(request, &e)),
            };
            let Some(index) = object
                .metadata
                .finalizers
                .as_ref()
                .and_then(|f| f.iter().position(|f| f == FINALIZER))
            else {
                return Ok(Removed::Removed);
            };
            let path = format!("/metadata/finalizers/{index}");
            let patch = json!([
                {"op": "test", "path": path, "value": FINALIZER},
                {"op": "remove", "path": path},
            ]);
            let body = serde_json::to_vec(&patch).expect("a JSON patch serializes");
            let url = format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}");
            let http = http::Request::patch(url)
                .header(http::header::CONTENT_TYPE, "application/json-patch+json")
                .body(body)
                .map_err(|e| PeerPodError::Api {
                    request: format!("PATCH {PLURAL} {namespace}/{name}"),
                    error: e.to_string(),
                    class: "request".to_owned(),
                })?;
            match observe(
                "patch",
                self.kube.client().request::<DynamicObject>(http).await,
            ) {
                Ok(_) => return Ok(Removed::Removed),
                Err(e) if is_missing_object(&e) => return Ok(Removed::Removed),
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    tracing::debug!(peerpod = %format!("{namespace}/{name}"), reason = %s.message, "the PeerPod's finalizers changed; reading them again");
                }
                Err(e) => {
                    return Err(api_error(
                        format!("PATCH {PLURAL} {namespace}/{name} (remove {FINALIZER})"),
                        &e,
                    ));
                }
            }
        }
        Err(PeerPodError::Api {
            request: format!("PATCH {PLURAL} {namespace}/{name} (remove {FINALIZER})"),
            error: "the finalizer list changed three times over".to_owned(),
            class: "finalizers changing".to_owned(),
        })
    }

    /// The PeerPods of this node, in every namespace: those labelled
    /// [`MANAGED_BY_LABEL`]=`podvisor` and [`NODE_LABEL`]=this node's value
    /// whose [`NODE_ANNOTATION`] names this node.
    ///
    /// # Errors
    /// [`PeerPodError::NoCrd`] without the resource; [`PeerPodError::Api`]
    /// when the LIST failed or was partial.
    pub async fn list(&self) -> Result<Vec<DynamicObject>, PeerPodError> {
        let node = self.kube.node();
        let selector = format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{NODE_LABEL}={}",
            node_label_value(node)
        );
        Ok(self
            .list_selected(&selector)
            .await?
            .into_iter()
            .filter(|o| object_node(o) == Some(node))
            .collect())
    }

    /// Every PeerPod podvisor wrote for this daemon's provider, on any
    /// node: those labelled [`MANAGED_BY_LABEL`]=`podvisor` whose
    /// `spec.cloudProvider` is this provider (another provider's pod VMs
    /// are in a cloud this daemon does not list).
    ///
    /// # Errors
    /// [`PeerPodError::NoCrd`] without the resource; [`PeerPodError::Api`]
    /// when the LIST failed or was partial.
    pub async fn list_managed(&self) -> Result<Vec<DynamicObject>, PeerPodError> {
        let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
        Ok(self
            .list_selected(&selector)
            .await?
            .into_iter()
            .filter(|o| {
                o.data
                    .pointer("/spec/cloudProvider")
                    .and_then(serde_json::Value::as_str)
                    == Some(self.provider.as_str())
            })
            .collect())
    }

    /// The PeerPods in every namespace that `selector` selects, from one
    /// LIST that is not partial.
    async fn list_selected(&self, selector: &str) -> Result<Vec<DynamicObject>, PeerPodError> {
        let request = format!("LIST {PLURAL} -l {selector}");
        let all = kube::Api::<DynamicObject>::all_with(self.kube.client(), &self.resource);
        let list = observe(
            "list",
            all.list(&ListParams::default().labels(selector)).await,
        )
        .map_err(|e| api_error(request.clone(), &e))?;
        if list
            .metadata
            .continue_
            .as_deref()
            .is_some_and(|c| !c.is_empty())
        {
            return Err(PeerPodError::Api {
                request,
                error: "the list was partial".to_owned(),
                class: "partial list".to_owned(),
            });
        }
        Ok(list.items)
    }

    /// Lists this node's PeerPods and reconciles them with the view: an
    /// object whose sandbox's VM is gone (no record, or `Failed` and
    /// released) is removed, as is one whose name or namespace is not its
    /// sandbox's; a `Running` sandbox's object that is missing or differs
    /// is applied (one being deleted is left to finish); every other object
    /// is kept. Errors are logged (once per distinct error) and change
    /// nothing.
    pub async fn resync(&mut self) {
        let listed = match self.list().await {
            Ok(listed) => listed,
            Err(e) => {
                self.failed("list", None, &e);
                return;
            }
        };
        let mut covered = HashSet::new();
        for object in listed {
            let meta = &object.metadata;
            let (Some(name), Some(namespace)) = (meta.name.clone(), meta.namespace.clone()) else {
                continue;
            };
            let sandbox = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(SANDBOX_ANNOTATION))
                .cloned();
            let record = sandbox.as_deref().and_then(|id| self.view.get(id));
            let misplaced = record.as_ref().is_some_and(|r| {
                r.pod_namespace != namespace || object_name(&r.pod_name, &r.sandbox_id) != name
            });
            let verdict = if misplaced {
                Want::Remove
            } else {
                want(record.as_ref())
            };
            match (verdict, record) {
                (Want::Remove, _) => {
                    let uid = meta.uid.clone();
                    let outcome = self.remove(&namespace, &name, uid.as_deref()).await;
                    self.removed(sandbox.as_deref(), &namespace, &name, outcome);
                }
                (Want::Apply, Some(record)) => {
                    covered.insert(record.sandbox_id.clone());
                    if meta.deletion_timestamp.is_some() || self.up_to_date(&object, &record) {
                        self.remember(&record);
                    } else {
                        self.apply_logged(&record).await;
                    }
                }
                (_, record) => {
                    if let Some(r) = record {
                        // Its object exists: the removal its VM's end
                        // brings must not be skipped as "never written".
                        let instance = object
                            .data
                            .pointer("/spec/instanceID")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        self.applied.insert(r.sandbox_id.clone(), instance);
                        covered.insert(r.sandbox_id);
                    }
                }
            }
        }
        for listed in self.view.list() {
            if covered.contains(&listed.sandbox_id) {
                continue;
            }
            // Read again: the listing may be seconds old by now.
            if let Some(record) = self.view.get(&listed.sandbox_id)
                && want(Some(&record)) == Want::Apply
            {
                self.apply_logged(&record).await;
            }
        }
    }

    /// Acts on one view event: the sandbox's current record decides (the
    /// event only names the sandbox; a removed record's last content gives
    /// the object's name).
    async fn on_event(&mut self, event: ViewEvent) {
        let (last, removed) = match event {
            ViewEvent::Updated(r) => (r, false),
            ViewEvent::Removed(r) => (r, true),
        };
        let current = if removed {
            None
        } else {
            self.view.get(&last.sandbox_id)
        };
        match want(current.as_ref()) {
            Want::Apply => {
                let Some(record) = current else { return };
                let instance = record.instance.as_ref().map(|i| i.id.as_str());
                if self.applied.get(&record.sandbox_id).map(String::as_str) != instance {
                    self.apply_logged(&record).await;
                }
            }
            Want::Keep => {}
            Want::Remove => {
                let was_applied = self.applied.remove(&last.sandbox_id).is_some();
                // A sandbox that had no pod name, or never reached Running
                // (a failed create), never had an object.
                if last.pod_name.is_empty() || (!was_applied && last.instance.is_none()) {
                    return;
                }
                if !crate::api::annotations::is_pod_identity(&last.pod_name, &last.pod_namespace) {
                    return;
                }
                let name = object_name(&last.pod_name, &last.sandbox_id);
                let outcome = self.remove(&last.pod_namespace, &name, None).await;
                self.removed(Some(&last.sandbox_id), &last.pod_namespace, &name, outcome);
            }
        }
    }

    /// [`Self::apply`], logged and remembered.
    async fn apply_logged(&mut self, record: &InstanceRecord) {
        match self.apply(record).await {
            Ok(Applied::Written) => {
                self.succeeded();
                self.remember(record);
                tracing::debug!(
                    sandbox_id = %record.sandbox_id,
                    peerpod = %format!("{}/{}", record.pod_namespace, object_name(&record.pod_name, &record.sandbox_id)),
                    "PeerPod applied"
                );
            }
            Ok(Applied::NoPod) => self.succeeded(),
            // No request was made: nothing to say about the API.
            Ok(Applied::NotRunning) => {}
            Err(e) => self.failed("apply", Some(&record.sandbox_id), &e),
        }
    }

    /// Logs a [`Self::remove`]'s outcome.
    fn removed(
        &mut self,
        sandbox: Option<&str>,
        namespace: &str,
        name: &str,
        outcome: Result<Removed, PeerPodError>,
    ) {
        if let Some(id) = sandbox {
            self.applied.remove(id);
        }
        match outcome {
            Ok(done) => {
                self.succeeded();
                if done == Removed::Removed {
                    tracing::debug!(sandbox_id = sandbox.unwrap_or(""), peerpod = %format!("{namespace}/{name}"), "PeerPod removed: its pod VM is gone");
                }
            }
            Err(e) => self.failed("remove", sandbox, &e),
        }
    }

    fn remember(&mut self, record: &InstanceRecord) {
        if let Some(instance) = &record.instance {
            self.applied
                .insert(record.sandbox_id.clone(), instance.id.clone());
        }
    }

    /// Logs `e` as a warning unless it is the last error logged so.
    fn failed(&mut self, action: &str, sandbox: Option<&str>, e: &PeerPodError) {
        if !self.last_error.failed(e.key()) {
            tracing::debug!(action, sandbox_id = sandbox.unwrap_or(""), error = %e, "cannot write PeerPod objects");
            return;
        }
        match e {
            PeerPodError::NoCrd => tracing::warn!(error = %e, "cannot write PeerPod objects"),
            PeerPodError::Api { .. } => {
                tracing::warn!(action, sandbox_id = sandbox.unwrap_or(""), error = %e, "cannot write PeerPod objects; the next resync retries (no pod VM is affected)");
            }
        }
    }

    fn succeeded(&mut self) {
        if self.last_error.succeeded() {
            tracing::info!("PeerPod objects are written again");
        }
    }

    /// Reconciles at once, then on every view event and every [`RESYNC`]
    /// (and at once after missed events) until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Subscribed before the first resync: a change during it is seen.
        let mut events = self.view.subscribe();
        let mut next = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next {
                self.resync().await;
                next = tokio::time::Instant::now() + RESYNC;
            }
            // The select only picks; the work is done after it, holding
            // no borrow of `stop` across an await.
            let event = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep_until(next) => continue,
                event = events.recv() => event,
            };
            match event {
                Ok(event) => self.on_event(event).await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "PeerPods missed view events; resyncing");
                    next = tokio::time::Instant::now();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// Counts one PeerPod write.
fn count(action: &'static str, outcome: &'static str) {
    crate::metrics::counter!(crate::metrics::PEERPOD_WRITES, "action" => action, "outcome" => outcome)
        .increment(1);
}

/// Whether `e` is a 404 for the resource itself (no CRD): the API server's
/// answer for a path it serves nothing at names no object, where a
/// missing object's names it (`details.name`).
fn is_missing_resource(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404
        && s.details.as_ref().is_none_or(|d| d.name.is_empty()))
}

/// Whether `e` is a 404 for an object the resource does not hold.
fn is_missing_object(e: &kube::Error) -> bool {
    super::is_not_found(e) && !is_missing_resource(e)
}

/// `e` met on `request`, as a [`PeerPodError`].
fn api_error(request: String, e: &kube::Error) -> PeerPodError {
    if is_missing_resource(e) {
        return PeerPodError::NoCrd;
    }
    PeerPodError::Api {
        request,
        error: describe(e),
        class: class_of(e),
    }
}

/// `e`'s class, for logging each once: the API's status code and reason,
/// or `connection` when the API could not be reached or answered nothing.
fn class_of(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("HTTP {} {}", s.code, s.reason),
        _ => "connection".to_owned(),
    }
}

/// `e` as a sentence: the API's status code, reason and message (not the
/// Rust dump of its `Status`), or the client's error.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("HTTP {} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::{InstanceRef, InstanceSpec};

    fn is_dns_subdomain(s: &str) -> bool {
        s.len() <= MAX_NAME
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }

    #[test]
    fn a_name_is_the_pods_with_a_suffix_derived_from_the_sandbox() {
        let id = "a".repeat(64);
        let name = object_name("web", &id);
        assert_eq!(name, object_name("web", &id), "deterministic");
        let suffix = name.strip_prefix("web-resource-").expect(&name);
        assert_eq!(suffix.len(), 5);
        assert!(
            suffix.bytes().all(|c| SUFFIX_ALPHABET.contains(&c)),
            "{name}"
        );
        assert_ne!(name, object_name("web", &"b".repeat(64)));
        assert!(is_dns_subdomain(&name));
    }

    #[test]
    fn a_long_pod_name_is_cut_to_a_valid_subdomain() {
        // 238 characters fit before the 15 of the suffix; here the cut
        // falls right after a dot, which must not end the pod part.
        let pod = format!("{}.{}", "a".repeat(237), "b".repeat(15));
        let name = object_name(&pod, "id");
        assert_eq!(name.len(), MAX_NAME - 1, "{name}");
        assert!(is_dns_subdomain(&name), "{name}");
        assert!(name.starts_with(&"a".repeat(237)));
        let pod = "p".repeat(253);
        let name = object_name(&pod, "id");
        assert_eq!(name.len(), MAX_NAME);
        assert!(is_dns_subdomain(&name));
    }

    #[test]
    fn node_names_a_label_cannot_hold_are_hashed() {
        assert_eq!(node_label_value("worker-1"), "worker-1");
        let long = format!("{}.example.com", "n".repeat(60));
        let value = node_label_value(&long);
        assert_eq!(value.len(), MAX_LABEL_VALUE);
        assert!(value.starts_with("sha256-"), "{value}");
        assert_eq!(value, node_label_value(&long), "deterministic");
        assert_ne!(value, node_label_value(&format!("{long}x")));
        assert!(node_label_value("-odd").starts_with("sha256-"));
        assert!(node_label_value("").starts_with("sha256-"));
    }

    #[test]
    fn only_a_running_sandbox_wants_an_object_and_only_a_gone_vm_removes_one() {
        let mut r = InstanceRecord::pending("s", "web", "ns", InstanceSpec::default(), 0);
        assert_eq!(want(None), Want::Remove);
        assert_eq!(want(Some(&r)), Want::Keep, "pending");
        r.state = State::Creating;
        assert_eq!(want(Some(&r)), Want::Keep);
        r.state = State::Running;
        assert_eq!(want(Some(&r)), Want::Keep, "running without an instance");
        r.instance = Some(InstanceRef {
            id: "i-1".into(),
            ips: vec![],
        });
        assert_eq!(want(Some(&r)), Want::Apply);
        r.state = State::Deleting;
        assert_eq!(want(Some(&r)), Want::Keep, "the VM is being deleted");
        r.state = State::Failed;
        assert_eq!(want(Some(&r)), Want::Keep, "the cleanup is under way");
        r.released = true;
        assert_eq!(want(Some(&r)), Want::Remove, "the instance is gone");
    }

    #[test]
    fn a_404_without_an_object_name_is_a_missing_crd() {
        let status = |name: Option<&str>| {
            let mut s = kube::core::Status::failure("not found", "NotFound").with_code(404);
            if let Some(name) = name {
                s = s.with_details(
                    serde_json::from_value(json!({"name": name, "kind": PLURAL})).unwrap(),
                );
            }
            kube::Error::Api(s.boxed())
        };
        assert!(is_missing_resource(&status(None)));
        assert!(!is_missing_object(&status(None)));
        assert!(is_missing_object(&status(Some("web-resource-bbbbb"))));
        assert_eq!(api_error("x".into(), &status(None)), PeerPodError::NoCrd);
    }
}
