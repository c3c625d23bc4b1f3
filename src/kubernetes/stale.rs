//! Sandboxes whose pod is gone: a pod deleted while the daemon was down
//! (its StopVM lost) would keep its pod VM forever. Every check lists the
//! pods on this node (field selector `spec.nodeName`); a `Running` or
//! `Failed` sandbox whose pod (namespace and name, from CreateVM's
//! annotations) has been absent from every successful list for longer than
//! `--stale-sandbox-grace` is stopped through the normal journaled StopVM
//! path, with a log line and [`crate::metrics::STALE_SANDBOXES_STOPPED`].
//!
//! Nothing is stopped on doubt: a failed or timed-out list, a list that
//! says it is partial (a `continue` token), a node that does not exist (a
//! client pointed at the wrong cluster, a wrong `--node-name`) or one with
//! no pod at all (not even this daemon's own) neither starts nor ends
//! anyone's grace, and is logged. A sandbox without pod
//! annotations (a runtime that sends none) is never judged.

use super::absence::{Absence, check_interval};
use super::{Kube, LastError, observe, observe_opt};
use crate::actors::supervisor::{StopVm, Supervisor};
use crate::view::InstanceView;
use actix::Addr;
use k8s_openapi::api::core::v1::{Node, Pod};
use podvisor_state::State;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The longest pause between two checks.
const INTERVAL_CAP: Duration = Duration::from_secs(30);

/// Finds and stops sandboxes whose pod is gone.
pub struct StaleSandboxes {
    kube: Kube,
    view: Arc<InstanceView>,
    supervisor: Addr<Supervisor>,
    grace: Duration,
    /// When each sandbox's pod was first missing from a successful list.
    absent_since: Absence<String>,
}

impl std::fmt::Debug for StaleSandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleSandboxes")
            .field("grace", &self.grace)
            .field("absent", &self.absent_since.len())
            .finish_non_exhaustive()
    }
}

impl StaleSandboxes {
    /// Stops sandboxes of `view` through `supervisor` once their pod has
    /// been missing from `kube`'s node for `grace`.
    pub fn new(
        kube: Kube,
        view: Arc<InstanceView>,
        supervisor: Addr<Supervisor>,
        grace: Duration,
    ) -> Self {
        Self {
            kube,
            view,
            supervisor,
            grace,
            absent_since: Absence::default(),
        }
    }

    /// How often [`Self::run`] checks: a quarter of the grace period, at
    /// least 1 s and at most 30 s.
    pub fn interval(&self) -> Duration {
        check_interval(self.grace, INTERVAL_CAP)
    }

    /// One check: lists the node's pods and returns the sandboxes whose
    /// pod has now been missing for the grace period (their clocks are
    /// dropped; the caller stops them).
    ///
    /// # Errors
    /// The node does not exist, the list failed, or it was partial: no
    /// clock starts or ends.
    pub async fn check(&mut self, now: Instant) -> Result<Vec<String>, String> {
        let node = self.kube.node();
        let client = self.kube.client();
        if observe_opt(
            "get",
            kube::Api::<Node>::all(client.clone()).get_opt(node).await,
        )
        .map_err(|e| format!("GET node {node}: {e}"))?
        .is_none()
        {
            return Err(format!(
                "node {node} does not exist (check --node-name): no sandbox is judged stale"
            ));
        }
        let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = observe("list", kube::Api::<Pod>::all(client).list(&params).await)
            .map_err(|e| format!("LIST pods on node {node}: {e}"))?;
        if pods
            .metadata
            .continue_
            .as_deref()
            .is_some_and(|c| !c.is_empty())
        {
            return Err(format!("LIST pods on node {node} was partial"));
        }
        // A node with no pod at all is a node this daemon does not run on
        // (its own DaemonSet pod would be listed): a client pointed at
        // another cluster whose node has the same name, not a node whose
        // peer pods are all gone.
        if pods.items.is_empty() {
            return Err(format!(
                "no pod at all on node {node}, not even this daemon's: no sandbox is judged stale"
            ));
        }
        let present: HashSet<(String, String)> = pods
            .items
            .into_iter()
            .filter_map(|p| Some((p.metadata.namespace?, p.metadata.name?)))
            .collect();
        let mut judged = HashSet::new();
        let mut stale = Vec::new();
        for record in self.view.list() {
            if !matches!(record.state, State::Running | State::Failed)
                || record.pod_name.is_empty()
                || record.pod_namespace.is_empty()
            {
                continue;
            }
            let key = (record.pod_namespace.clone(), record.pod_name.clone());
            if present.contains(&key) {
                continue;
            }
            judged.insert(record.sandbox_id.clone());
            if self.absent_since.missing(&record.sandbox_id, now) >= self.grace {
                stale.push(record.sandbox_id);
            }
        }
        // Sandboxes whose pod is back, that are gone, or changed state.
        self.absent_since.keep_only(&judged);
        for id in &stale {
            self.absent_since.end(id);
        }
        Ok(stale)
    }

    /// Checks every [`Self::interval`] until `stop`, stopping each stale
    /// sandbox as StopVM would.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut last_error = LastError::default();
        loop {
            match self.check(Instant::now()).await {
                Ok(stale) => {
                    if last_error.succeeded() {
                        tracing::info!("the pods on this node can be listed again");
                    }
                    for id in stale {
                        self.stop(id).await;
                    }
                }
                Err(e) => {
                    if last_error.failed(&e) {
                        tracing::warn!(error = %e, "cannot tell which sandboxes' pods are gone; none is stopped");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval()) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn stop(&self, id: String) {
        let pod = self
            .view
            .get(&id)
            .map(|r| format!("{}/{}", r.pod_namespace, r.pod_name))
            .unwrap_or_default();
        tracing::warn!(
            sandbox_id = %id,
            pod = %pod,
            grace = ?self.grace,
            "the sandbox's pod is gone from the node; stopping its pod VM"
        );
        match self.supervisor.send(StopVm(id.clone())).await {
            Ok(Ok(())) => {
                crate::metrics::counter!(crate::metrics::STALE_SANDBOXES_STOPPED).increment(1);
            }
            Ok(Err(e)) => {
                tracing::error!(sandbox_id = %id, error = %e, "stopping a stale sandbox failed");
            }
            Err(e) => {
                tracing::error!(sandbox_id = %id, error = %e, "stopping a stale sandbox failed");
            }
        }
    }
}
