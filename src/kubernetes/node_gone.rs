//! Pod VMs of deleted nodes: when a whole node goes, its daemon goes with
//! it, and every other daemon's orphan GC sees only its own node's tag, so
//! nobody would delete that node's pod VMs. One daemon of the cluster (the
//! holder of a [`super::lease::Lease`]) does:
//!
//! 1. it lists the cloud's instances tagged with this cluster
//!    ([`podvisor_providers::TAG_CLUSTER`], see [`super::cluster`]) —
//!    **before** listing the nodes, so an instance of a node that joined
//!    in between is listed with its node already there;
//! 2. it lists the cluster's nodes (one quorum read, never partial);
//! 3. an instance whose node tag names a node missing from every
//!    successful list for `--node-gone-grace`, and that is itself older
//!    than the grace (when the cloud says when it was made), is deleted
//!    through the provider calls (paced, retried; not found is done), with
//!    a warning line and [`crate::metrics::NODE_GONE_INSTANCES_DELETED`].
//!
//! Nothing is deleted on doubt: a failed listing of either kind, a node
//! list that is partial or lacks this daemon's own node (a client pointed
//! at another cluster), an unknown cluster identity, or an instance
//! without a node tag. This daemon's own node's instances are its own
//! orphan GC's. The clocks start again whenever the Lease changes hands,
//! and every delete first checks the Lease is still held; should two
//! daemons briefly both hold it, both judge the same way and a delete is
//! idempotent.

use super::absence::{Absence, check_interval};
use super::cluster::ClusterId;
use super::lease::Lease;
use super::peerpods::{PeerPods, object_node};
use super::{Kube, LastError, observe};
use crate::actors::provider::ProviderCalls;
use k8s_openapi::api::core::v1::Node;
use kube::api::DynamicObject;
use podvisor_providers::{Instance, TAG_CLUSTER, TAG_NODE};
use podvisor_state::{UnixMillis, now_millis};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The longest pause between two collections.
const INTERVAL_CAP: Duration = Duration::from_secs(60);

/// The Lease's name for `provider`: one collector per provider in the
/// cluster (two providers' daemons list different clouds).
pub fn lease_name(provider: &str) -> String {
    format!("podvisor-{provider}-node-gone")
}

/// Which term of holding the Lease this daemon is in, if it holds it: a
/// new number at every acquisition, so a collector can tell a Lease lost
/// and taken again from one held all along.
pub type Term = Option<u64>;

/// Finds and deletes the instances of deleted nodes, and releases their
/// PeerPod objects once no instance of the node is left.
pub struct NodeGone {
    kube: Kube,
    calls: Arc<ProviderCalls>,
    cluster: ClusterId,
    clocks: Clocks,
    /// The PeerPods to release (`None`: `--disable-peerpods`).
    peerpods: Option<PeerPods>,
    /// The PeerPod listing's last error, logged once.
    peerpod_error: LastError,
}

impl std::fmt::Debug for NodeGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGone")
            .field("clocks", &self.clocks)
            .finish_non_exhaustive()
    }
}

/// The decision: how long each node has been missing.
#[derive(Debug)]
pub struct Clocks {
    grace: Duration,
    /// When each node was first missing from a successful list.
    absent: Absence<String>,
}

/// What one collection decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The instances to delete.
    pub doomed: Vec<Doomed>,
    /// The missing nodes (missing for the grace) that some PeerPod names
    /// and no listed instance of this cluster does: their pod VMs are
    /// gone, so their PeerPods' finalizers may go.
    pub released: HashSet<String>,
}

/// One instance to delete and the node it was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    /// The missing node.
    pub node: String,
    /// The instance.
    pub instance: Instance,
}

impl Clocks {
    /// No clock running; judged by `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            absent: Absence::default(),
        }
    }

    /// The decision, from one listing of each: the instances of `cluster`
    /// whose node has now been missing for the grace (at monotonic `now`)
    /// and that are older than the grace (at wall-clock `wall`, in Unix
    /// milliseconds, when their creation time is known). Starts and ends
    /// the nodes' clocks.
    ///
    /// `own` is this daemon's node: never judged. An instance without a
    /// node tag, or tagged with another cluster (the cloud's filter is
    /// trusted for nothing), is never judged either. `referenced` are the
    /// nodes this provider's PeerPods name: one missing for the grace with
    /// no instance left is [`Verdict::released`].
    #[allow(clippy::too_many_arguments)] // One listing of each kind, and the clocks' two times.
    pub fn judge(
        &mut self,
        instances: Vec<Instance>,
        cluster: &str,
        nodes: &HashSet<String>,
        own: &str,
        referenced: &HashSet<String>,
        now: Instant,
        wall: UnixMillis,
    ) -> Verdict {
        let grace_ms = UnixMillis::try_from(self.grace.as_millis()).unwrap_or(UnixMillis::MAX);
        let mut missing = HashSet::new();
        let mut with_instances = HashSet::new();
        let mut doomed = Vec::new();
        for instance in instances {
            if instance.tags.get(TAG_CLUSTER).map(String::as_str) != Some(cluster) {
                continue;
            }
            let Some(node) = instance.tags.get(TAG_NODE).filter(|n| !n.is_empty()) else {
                continue;
            };
            if node == own || nodes.contains(node) {
                continue;
            }
            let node = node.clone();
            let gone_for = self.absent.missing(&node, now);
            missing.insert(node.clone());
            with_instances.insert(node.clone());
            let young = instance
                .created_at
                .is_some_and(|at| wall.saturating_sub(at) < grace_ms);
            if gone_for >= self.grace && !young {
                doomed.push(Doomed { node, instance });
            }
        }
        let mut released = HashSet::new();
        for node in referenced {
            if node == own || nodes.contains(node) || with_instances.contains(node) {
                continue;
            }
            missing.insert(node.clone());
            if self.absent.missing(node, now) >= self.grace {
                released.insert(node.clone());
            }
        }
        // A node that is back, or has nothing left, starts afresh.
        self.absent.keep_only(&missing);
        Verdict { doomed, released }
    }

    /// Forgets every clock (the Lease changed hands).
    pub fn forget(&mut self) {
        self.absent.clear();
    }
}

impl NodeGone {
    /// Deletes, through `calls`, the instances of this `cluster` whose node
    /// has been missing from `kube`'s node list for `grace`, and then
    /// releases their `peerpods` (unless `None`).
    pub fn new(
        kube: Kube,
        calls: Arc<ProviderCalls>,
        cluster: ClusterId,
        grace: Duration,
        peerpods: Option<PeerPods>,
    ) -> Self {
        Self {
            kube,
            calls,
            cluster,
            clocks: Clocks::new(grace),
            peerpods,
            peerpod_error: LastError::default(),
        }
    }

    /// How often the holder collects: a quarter of the grace, at least
    /// 1 s and at most 60 s.
    pub fn interval(&self) -> Duration {
        check_interval(self.clocks.grace, INTERVAL_CAP)
    }

    /// Lists the cloud, then this provider's PeerPods, then the nodes, and
    /// judges: the instances to delete, and the PeerPods whose node is
    /// gone with all its instances. A failed PeerPod listing only leaves
    /// the PeerPods out (logged once).
    ///
    /// # Errors
    /// The cluster's identity is not known yet, a listing of the cloud or
    /// the nodes failed or was partial, or the node list lacks this
    /// daemon's own node: nothing is judged and no clock starts or ends.
    pub async fn check(
        &mut self,
        now: Instant,
    ) -> Result<(Vec<Doomed>, Vec<DynamicObject>), String> {
        let Some(cluster) = self.cluster.get().cloned() else {
            return Err("the cluster's identity (kube-system's UID) is not known yet".to_owned());
        };
        // The cloud first: see the module's documentation.
        let instances = self
            .calls
            .list(TAG_CLUSTER, &cluster)
            .await
            .map_err(|e| format!("listing the cluster's instances: {e}"))?;
        let peerpods = match &self.peerpods {
            Some(p) => match p.list_managed().await {
                Ok(listed) => {
                    self.peerpod_error.succeeded();
                    listed
                }
                // No CRD, no PeerPod to release (the PeerPod task says so).
                Err(super::peerpods::PeerPodError::NoCrd) => Vec::new(),
                Err(e) => {
                    if self.peerpod_error.failed(&e.to_string()) {
                        tracing::warn!(error = %e, "cannot list the PeerPods of deleted nodes; none is released this time");
                    }
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        // Names are all it needs: the nodes' metadata only.
        let list = observe(
            "list",
            kube::Api::<Node>::all(self.kube.client())
                .list_metadata(&kube::api::ListParams::default())
                .await,
        )
        .map_err(|e| format!("LIST nodes: {e}"))?;
        if list
            .metadata
            .continue_
            .as_deref()
            .is_some_and(|c| !c.is_empty())
        {
            return Err("LIST nodes was partial".to_owned());
        }
        let nodes: HashSet<String> = list
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let own = self.kube.node().to_owned();
        if !nodes.contains(&own) {
            return Err(format!(
                "this daemon's node {own} is not among the cluster's nodes (another cluster, or a wrong --node-name): no node is judged gone"
            ));
        }
        let referenced: HashSet<String> = peerpods
            .iter()
            .filter_map(object_node)
            .map(str::to_owned)
            .collect();
        let verdict = self.clocks.judge(
            instances,
            &cluster,
            &nodes,
            &own,
            &referenced,
            now,
            now_millis(),
        );
        let released = peerpods
            .into_iter()
            .filter(|o| object_node(o).is_some_and(|n| verdict.released.contains(n)))
            .collect();
        Ok((verdict.doomed, released))
    }

    /// While `term` says this daemon holds the Lease, collects every
    /// [`Self::interval`] until `stop`. The clocks start over whenever the
    /// term changes, and a delete is made only while the term the check
    /// ran in still holds.
    pub async fn run(mut self, mut term: watch::Receiver<Term>, mut stop: watch::Receiver<bool>) {
        let mut last_error = LastError::default();
        let mut judged_in: Term = None;
        loop {
            let current = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                t = term.wait_for(Option::is_some) => match t {
                    Ok(t) => *t,
                    Err(_) => return,
                },
            };
            if current != judged_in {
                // Held anew: clocks of an earlier term may be stale.
                self.clocks.forget();
                judged_in = current;
            }
            match self.check(Instant::now()).await {
                Ok((doomed, released)) => {
                    if last_error.succeeded() {
                        tracing::info!("the pod VMs of deleted nodes can be judged again");
                    }
                    for d in doomed {
                        if *term.borrow() != current || *stop.borrow() {
                            break;
                        }
                        self.delete(d).await;
                    }
                    for object in released {
                        if *term.borrow() != current || *stop.borrow() {
                            break;
                        }
                        self.release(&object).await;
                    }
                }
                Err(e) => {
                    if last_error.failed(&e) {
                        tracing::warn!(error = %e, "cannot tell which pod VMs belong to deleted nodes; none is deleted");
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(self.interval()) => {}
            }
        }
    }

    /// Removes a deleted node's PeerPod whose pod VMs are all gone (its
    /// node's daemon, which would have, is gone too).
    async fn release(&mut self, object: &DynamicObject) {
        let Some(peerpods) = &self.peerpods else {
            return;
        };
        let meta = &object.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            return;
        };
        let node = object_node(object).unwrap_or_default();
        match peerpods.remove(namespace, name, meta.uid.as_deref()).await {
            Ok(super::peerpods::Removed::Removed) => {
                tracing::info!(node = %node, peerpod = %format!("{namespace}/{name}"), "a deleted node's PeerPod is released: no pod VM of the node is left");
            }
            Ok(super::peerpods::Removed::Absent) => {}
            Err(e) => {
                if self.peerpod_error.failed(&e.to_string()) {
                    tracing::warn!(node = %node, error = %e, "cannot release a deleted node's PeerPod; the next collection tries again");
                }
            }
        }
    }

    async fn delete(&self, doomed: Doomed) {
        let Doomed { node, instance } = doomed;
        tracing::warn!(
            node = %node,
            instance_id = %instance.id,
            instance_name = %instance.name,
            grace = ?self.clocks.grace,
            "the pod VM's node is gone from the cluster; deleting the pod VM"
        );
        match self.calls.delete(&instance.id).await {
            Ok(()) => {
                crate::metrics::counter!(crate::metrics::NODE_GONE_INSTANCES_DELETED).increment(1);
            }
            Err(e) => {
                tracing::error!(node = %node, instance_id = %instance.id, error = %e, "deleting a deleted node's pod VM failed; the next collection tries again");
            }
        }
    }
}

/// Takes and renews `lease` every retry period until `stop`, publishing in
/// `term` (and [`crate::metrics::NODE_GONE_LEASE_HELD`]) whether this
/// daemon holds it, and in which term; then gives it up (within 5 s).
///
/// Each try is bounded by the retry period, and a failed or timed-out try
/// ends the term at once: so the term ends at most two retry periods after
/// the last successful renewal, before another daemon can take the Lease
/// (a duration after that renewal).
pub async fn hold(mut lease: Lease, term: watch::Sender<Term>, mut stop: watch::Receiver<bool>) {
    let gauge = crate::metrics::gauge!(crate::metrics::NODE_GONE_LEASE_HELD);
    let mut last_error = LastError::default();
    let mut terms: u64 = 0;
    loop {
        let limit = lease.retry_period();
        let result = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = tokio::time::timeout(limit, lease.try_acquire_or_renew(Instant::now())) => {
                r.unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
            }
        };
        let held = matches!(result, Ok(true));
        match result {
            Ok(_) => {
                if last_error.succeeded() {
                    tracing::info!("the node-gone Lease can be read and written again");
                }
            }
            Err(e) => {
                if last_error.failed(&e) {
                    tracing::warn!(error = %e, "cannot take or renew the node-gone Lease");
                }
            }
        }
        let was = *term.borrow();
        match (was, held) {
            (None, true) => {
                terms += 1;
                term.send_replace(Some(terms));
                tracing::info!(holder = %lease.identity(), "this daemon holds the node-gone Lease: it collects the pod VMs of deleted nodes");
            }
            (Some(_), false) => {
                term.send_replace(None);
                tracing::info!("this daemon no longer holds the node-gone Lease");
            }
            _ => {}
        }
        gauge.set(if held { 1.0 } else { 0.0 });
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep(lease.retry_period()) => {}
        }
    }
    term.send_replace(None);
    gauge.set(0.0);
    match tokio::time::timeout(Duration::from_secs(5), lease.release()).await {
        Ok(Ok(true)) => tracing::info!("shutdown: the node-gone Lease is given up"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "shutdown: cannot give the node-gone Lease up; it expires on its own");
        }
        Err(_) => tracing::warn!(
            "shutdown: giving the node-gone Lease up took over 5 s; it expires on its own"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_providers::InstanceStatus;
    use std::collections::BTreeMap;

    const GRACE: Duration = Duration::from_secs(60);

    fn instance(id: &str, node: Option<&str>, created_at: Option<UnixMillis>) -> Instance {
        let mut tags = BTreeMap::from([(TAG_CLUSTER.to_owned(), "c".to_owned())]);
        if let Some(n) = node {
            tags.insert(TAG_NODE.to_owned(), n.to_owned());
        }
        Instance {
            id: id.into(),
            name: format!("podvm-{id}"),
            ips: Vec::new(),
            tags,
            created_at,
            status: InstanceStatus::Running,
        }
    }

    /// Judges `instances` against `nodes` (this daemon's node is `own`):
    /// the doomed instances' ids.
    fn judge(
        clocks: &mut Clocks,
        instances: Vec<Instance>,
        nodes: &[&str],
        now: Instant,
        wall: UnixMillis,
    ) -> Vec<String> {
        let nodes: HashSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        clocks
            .judge(instances, "c", &nodes, "own", &HashSet::new(), now, wall)
            .doomed
            .into_iter()
            .map(|d| d.instance.id)
            .collect()
    }

    #[test]
    fn only_instances_of_nodes_missing_for_the_grace_are_doomed() {
        let mut j = Clocks::new(GRACE);
        let t0 = Instant::now();
        let wall = 10_000_000;
        let listing = || {
            vec![
                instance("a1", Some("a"), Some(0)),
                instance("b1", Some("b"), Some(0)),
                instance("b2", Some("b"), None),
                instance("own1", Some("own"), Some(0)),
                instance("untagged", None, Some(0)),
                {
                    // The cloud's filter is not trusted: another cluster's.
                    let mut i = instance("foreign", Some("b"), Some(0));
                    i.tags.insert(TAG_CLUSTER.to_owned(), "x".to_owned());
                    i
                },
            ]
        };
        // Node b missing: its clock starts; nothing yet.
        assert!(judge(&mut j, listing(), &["a", "own"], t0, wall).is_empty());
        assert!(judge(&mut j, listing(), &["a", "own"], t0 + GRACE / 2, wall).is_empty());
        // After the grace: both of b's, never a's, our own, the untagged or
        // another cluster's.
        let mut doomed = judge(&mut j, listing(), &["a", "own"], t0 + GRACE, wall);
        doomed.sort();
        assert_eq!(doomed, ["b1", "b2"]);
    }

    #[test]
    fn a_node_that_comes_back_starts_its_clock_afresh() {
        let mut j = Clocks::new(GRACE);
        let t0 = Instant::now();
        let listing = || vec![instance("b1", Some("b"), Some(0))];
        assert!(judge(&mut j, listing(), &["own"], t0, 1_000_000).is_empty());
        // b is listed again (re-registered) just before its grace ends.
        assert!(
            judge(
                &mut j,
                listing(),
                &["own", "b"],
                t0 + GRACE - Duration::from_secs(1),
                1_000_000
            )
            .is_empty()
        );
        assert!(
            judge(&mut j, listing(), &["own"], t0 + GRACE, 1_000_000).is_empty(),
            "the clock restarted when b came back"
        );
        assert_eq!(
            judge(&mut j, listing(), &["own"], t0 + 2 * GRACE, 1_000_000),
            ["b1"]
        );
    }

    #[test]
    fn an_instance_younger_than_the_grace_is_spared() {
        let mut j = Clocks::new(GRACE);
        let t0 = Instant::now();
        let wall: UnixMillis = 1_000_000;
        let young = || vec![instance("b1", Some("b"), Some(wall - 1_000))];
        assert!(judge(&mut j, young(), &["own"], t0, wall).is_empty());
        assert!(judge(&mut j, young(), &["own"], t0 + GRACE, wall).is_empty());
        // Once it is older than the grace by the wall clock, it goes.
        assert_eq!(
            judge(&mut j, young(), &["own"], t0 + GRACE, wall + 60_000),
            ["b1"]
        );
    }

    #[test]
    fn a_missing_nodes_peerpods_are_released_only_once_no_instance_of_it_is_left() {
        let mut j = Clocks::new(GRACE);
        let t0 = Instant::now();
        let nodes: HashSet<String> = ["own", "a"].map(String::from).into();
        let referenced: HashSet<String> = ["a", "b", "c", "own"].map(String::from).into();
        let verdict = |j: &mut Clocks, instances: Vec<Instance>, at| {
            j.judge(instances, "c", &nodes, "own", &referenced, at, 10_000_000)
        };
        // b still has an instance; c has none; a exists.
        let listing = || vec![instance("b1", Some("b"), Some(0))];
        assert!(verdict(&mut j, listing(), t0).released.is_empty());
        let v = verdict(&mut j, listing(), t0 + GRACE);
        assert_eq!(
            v.released,
            ["c".to_owned()].into(),
            "b's VM is not gone yet"
        );
        assert_eq!(v.doomed.len(), 1);
        // b's instance deleted: its PeerPods go at the next collection,
        // its clock kept across.
        let v = verdict(&mut j, Vec::new(), t0 + GRACE + Duration::from_secs(1));
        assert_eq!(v.released, ["b".to_owned(), "c".to_owned()].into());
    }
}
