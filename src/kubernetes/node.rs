//! The node's extended resource: `status.capacity["kata.peerpods.io/vm"]`
//! is the per-node limit (`--peerpods-limit-per-node`), so the scheduler
//! places no more peer pods on the node than it takes (the reference's
//! webhook makes each peer pod request one). The kubelet copies an
//! extended resource's capacity to `allocatable`.
//!
//! As the reference does: the annotation `kata.peerpods.io/caa-owner`
//! names the daemon that set the capacity (its pod's UID, `POD_UID`), and
//! at shutdown both are removed only if it still names this daemon. A
//! limit of 0 or below, which means "no limit" here, is not advertised
//! (the reference skips a negative limit and advertises 0 as 0, which
//! refuses every peer pod; see docs/operations.md).
//!
//! The capacity is checked every [`RECHECK`] and set again when it differs
//! (a node object the kubelet re-registered starts without it). A failure
//! is logged and retried with a growing pause; it never stops the daemon.

use super::{Kube, LastError, observe, observe_opt};
use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use std::time::Duration;
use tokio::sync::watch;

/// The extended resource (the reference's name).
pub const RESOURCE: &str = "kata.peerpods.io/vm";
/// The annotation naming the daemon that set [`RESOURCE`].
pub const OWNER_ANNOTATION: &str = "kata.peerpods.io/caa-owner";
/// How often the node is read to check its capacity is still advertised.
pub const RECHECK: Duration = Duration::from_secs(60);
/// The longest pause between two tries after a failure.
const RETRY_CAP: Duration = Duration::from_secs(30);

/// What one reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// The node already advertised the limit under this daemon's name.
    Unchanged,
    /// The capacity (and owner annotation) were written.
    Advertised,
}

/// Advertises `limit` as the node's [`RESOURCE`] capacity.
#[derive(Debug, Clone)]
pub struct NodeCapacity {
    kube: Kube,
    limit: u64,
    owner: String,
}

impl NodeCapacity {
    /// `limit` advertised for `kube`'s node under the name `owner`.
    pub fn new(kube: Kube, limit: u64, owner: String) -> Self {
        Self { kube, limit, owner }
    }

    /// The limit advertised.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reads the node and, unless it advertises the limit already under
    /// this daemon's name, writes the owner annotation and then the
    /// capacity (merge patches of the node and of its `status`
    /// subresource). A running daemon takes them over from any other
    /// owner, as the reference does at its start: a daemon that died
    /// without withdrawing them must not leave them owned by nobody alive.
    ///
    /// # Errors
    /// The node does not exist, or a request failed (the message names it).
    pub async fn reconcile(&self) -> Result<Reconciled, String> {
        let nodes = kube::Api::<Node>::all(self.kube.client());
        let name = self.kube.node();
        let node = observe_opt("get", nodes.get_opt(name).await)
            .map_err(|e| format!("GET node {name}: {e}"))?
            .ok_or_else(|| format!("node {name} does not exist"))?;
        let want = self.limit.to_string();
        let capacity = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get(RESOURCE))
            .map(|q| q.0.as_str());
        let owner = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(OWNER_ANNOTATION))
            .map(String::as_str);
        if capacity == Some(want.as_str()) && owner == Some(self.owner.as_str()) {
            return Ok(Reconciled::Unchanged);
        }
        let params = kube::api::PatchParams::default();
        let annotation = json!({"metadata": {"annotations": {OWNER_ANNOTATION: self.owner}}});
        observe(
            "patch",
            nodes
                .patch(name, &params, &kube::api::Patch::Merge(&annotation))
                .await,
        )
        .map_err(|e| format!("PATCH node {name} ({OWNER_ANNOTATION}): {e}"))?;
        let status = json!({"status": {"capacity": {RESOURCE: want}}});
        observe(
            "patch",
            nodes
                .patch_status(name, &params, &kube::api::Patch::Merge(&status))
                .await,
        )
        .map_err(|e| format!("PATCH node {name}/status ({RESOURCE}): {e}"))?;
        Ok(Reconciled::Advertised)
    }

    /// Removes the capacity and the owner annotation if the annotation
    /// still names this daemon: each removal is a JSON patch whose `test`
    /// of the annotation makes the check and the removal one step, so a
    /// daemon that took over in between keeps both. `Ok(false)`: another
    /// daemon owns them, or the node is gone; nothing was changed.
    ///
    /// # Errors
    /// A request failed for another reason.
    pub async fn withdraw(&self) -> Result<bool, String> {
        let nodes = kube::Api::<Node>::all(self.kube.client());
        let name = self.kube.node();
        let Some(node) = observe_opt("get", nodes.get_opt(name).await)
            .map_err(|e| format!("GET node {name}: {e}"))?
        else {
            return Ok(false);
        };
        let annotations = node.metadata.annotations.unwrap_or_default();
        if annotations.get(OWNER_ANNOTATION) != Some(&self.owner) {
            return Ok(false);
        }
        let owner_path = format!("/metadata/annotations/{}", pointer(OWNER_ANNOTATION));
        let test = json!({"op": "test", "path": owner_path, "value": self.owner});
        let has_capacity = node
            .status
            .and_then(|s| s.capacity)
            .is_some_and(|c| c.contains_key(RESOURCE));
        if has_capacity {
            let path = format!("/status/capacity/{}", pointer(RESOURCE));
            let status = json!([test, {"op": "remove", "path": path}]);
            if let Patched::Refused = self.json_patch(&format!("{name}/status"), &status).await? {
                return Ok(false);
            }
        }
        let annotation = json!([test, {"op": "remove", "path": owner_path}]);
        if let Patched::Refused = self.json_patch(name, &annotation).await? {
            // Another daemon took over between the two patches: the
            // capacity is gone, and it sets it again.
            tracing::info!(
                node = name,
                "the node's owner annotation changed hands during the withdrawal; left to its new owner"
            );
        }
        Ok(true)
    }

    /// A JSON patch of `nodes/<path>`; a failed `test` or a path that is
    /// not there (422) or a node that is gone (404) is
    /// [`Patched::Refused`].
    async fn json_patch(&self, path: &str, patch: &serde_json::Value) -> Result<Patched, String> {
        let body = serde_json::to_vec(patch).map_err(|e| e.to_string())?;
        let request = http::Request::patch(format!("/api/v1/nodes/{path}"))
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(body)
            .map_err(|e| e.to_string())?;
        match observe("patch", self.kube.client().request::<Node>(request).await) {
            Ok(_) => Ok(Patched::Yes),
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 422) => {
                tracing::debug!(node = path, reason = %status.message, "node patch refused");
                Ok(Patched::Refused)
            }
            Err(e) => Err(format!("PATCH node {path}: {e}")),
        }
    }

    /// Reconciles now and every [`RECHECK`] until `stop`; a failure is
    /// logged (once per distinct message) and retried after a pause that
    /// doubles from 1 s up to 30 s.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut pause = Duration::from_secs(1);
        let mut last_error = LastError::default();
        loop {
            let wait = match self.reconcile().await {
                Ok(done) => {
                    if last_error.succeeded() || done == Reconciled::Advertised {
                        tracing::info!(
                            node = self.kube.node(),
                            resource = RESOURCE,
                            capacity = self.limit,
                            owner = %self.owner,
                            "the node advertises its peer pod capacity"
                        );
                    }
                    pause = Duration::from_secs(1);
                    RECHECK
                }
                Err(e) => {
                    if last_error.failed(&e) {
                        tracing::warn!(
                            node = self.kube.node(),
                            resource = RESOURCE,
                            error = %e,
                            "cannot advertise the node's peer pod capacity; retrying"
                        );
                    }
                    let wait = pause;
                    pause = (pause * 2).min(RETRY_CAP);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Whether a JSON patch applied.
enum Patched {
    Yes,
    Refused,
}

/// `s` as one JSON-pointer token (RFC 6901: `~` → `~0`, `/` → `~1`).
fn pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_json_pointer_tokens() {
        assert_eq!(pointer(RESOURCE), "kata.peerpods.io~1vm");
        assert_eq!(pointer("a~b/c"), "a~0b~1c");
    }
}
