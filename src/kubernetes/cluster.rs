//! The cluster's identity: the UID of its `kube-system` namespace, which
//! every pod VM is tagged with ([`podvisor_providers::TAG_CLUSTER`]) so
//! that one daemon of the cluster can find the VMs of nodes that no longer
//! exist ([`super::node_gone`]). The namespace exists from a cluster's
//! creation to its end and its UID is never reused, which is why tools
//! such as Cilium and Velero use it as the cluster's id.
//!
//! It is asked once at start-up and again every 5 s until the API
//! answers; a pod VM created before then carries no cluster tag, so it is
//! never collected by another node's daemon (the safe way to be wrong).

use super::{Kube, observe};
use k8s_openapi::api::core::v1::Namespace;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The namespace whose UID names the cluster.
pub const NAMESPACE: &str = "kube-system";
/// The pause between two tries while the API does not answer.
const RETRY: Duration = Duration::from_secs(5);

/// The cluster's id, once known; shared with every pod VM actor.
pub type ClusterId = Arc<OnceLock<String>>;

/// Asks the API for `kube-system`'s UID.
///
/// # Errors
/// The API's error (the namespace missing, no permission, no answer), as
/// text naming the request.
pub async fn fetch(kube: &Kube) -> Result<String, String> {
    let api = kube::Api::<Namespace>::all(kube.client());
    let ns = observe("get", api.get(NAMESPACE).await)
        .map_err(|e| format!("GET namespace {NAMESPACE}: {e}"))?;
    ns.metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("namespace {NAMESPACE} has no UID"))
}

/// Fills `id` from the API, trying every 5 s until it answers; logs the
/// first failure and the success (at info, with the id).
pub async fn learn(kube: Kube, id: ClusterId) {
    let mut failed = false;
    loop {
        match fetch(&kube).await {
            Ok(uid) => {
                tracing::info!(cluster = %uid, "the cluster's identity (kube-system's UID) is known; every pod VM created from now on is tagged with it");
                let _ = id.set(uid);
                return;
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(error = %e, "cannot learn the cluster's identity yet; pod VMs created until then carry no cluster tag, so no other node's daemon ever collects them");
                }
                failed = true;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
