//! The cluster's identity: the UID of its `kube-system` namespace, which
//! every pod VM is tagged with ([`podvisor_providers::TAG_CLUSTER`]) so
//! that one daemon of the cluster can find the VMs of nodes that no longer
//! exist ([`super::node_gone`]). The namespace exists from a cluster's
//! creation to its end and its UID is never reused, which is why tools
//! such as Cilium and Velero use it as the cluster's id.
//!
//! It is asked at start-up, with the daemon's own Node: only a daemon whose
//! Node exists in that cluster tags its pod VMs, because the collector
//! deletes the tagged VMs of nodes it cannot find — a `--node-name` that
//! names no Node (a short host name where the Node has the full one, a
//! kubeconfig of another cluster) would otherwise have its live VMs
//! collected. Until both answer (asked again after 5 s, doubling to 60 s),
//! a pod VM carries no cluster tag, so it is never collected that way (the
//! safe way to be wrong).

use super::{Kube, LastError, observe, observe_opt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The namespace whose UID names the cluster.
pub const NAMESPACE: &str = "kube-system";
/// The first pause between two tries; it doubles up to [`RETRY_CAP`].
const RETRY: Duration = Duration::from_secs(5);
/// The longest pause between two tries.
const RETRY_CAP: Duration = Duration::from_secs(60);

/// The cluster's id, once known; shared with every pod VM actor.
pub type ClusterId = Arc<OnceLock<String>>;

/// Asks the API for `kube-system`'s UID, once it has checked that this
/// daemon's Node exists in the same cluster.
///
/// # Errors
/// The API's error (the namespace missing, no permission, no answer), or
/// no Node of this daemon's name, as text naming the request.
pub async fn fetch(kube: &Kube) -> Result<String, String> {
    let node = kube.node();
    let found = observe_opt(
        "get",
        kube::Api::<Node>::all(kube.client()).get_opt(node).await,
    )
    .map_err(|e| format!("GET node {node}: {e}"))?;
    if found.is_none() {
        return Err(format!(
            "node {node} does not exist in this cluster (check --node-name): its pod VMs are not tagged with the cluster, so no daemon collects them"
        ));
    }
    let api = kube::Api::<Namespace>::all(kube.client());
    let ns = observe("get", api.get(NAMESPACE).await)
        .map_err(|e| format!("GET namespace {NAMESPACE}: {e}"))?;
    ns.metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("namespace {NAMESPACE} has no UID"))
}

/// Fills `id` from the API, trying again after 5 s, doubling to 60 s,
/// until it answers; logs each distinct failure once, and the success (at
/// info, with the id).
pub async fn learn(kube: Kube, id: ClusterId) {
    let mut last_error = LastError::default();
    let mut pause = RETRY;
    loop {
        match fetch(&kube).await {
            Ok(uid) => {
                tracing::info!(cluster = %uid, "the cluster's identity (kube-system's UID) is known; every pod VM created from now on is tagged with it");
                let _ = id.set(uid);
                return;
            }
            Err(e) => {
                if last_error.failed(&e) {
                    tracing::warn!(error = %e, "cannot learn the cluster's identity yet; pod VMs created until then carry no cluster tag, so no other node's daemon ever collects them");
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_CAP);
    }
}
