//! Pod VMs of deleted nodes, against a real kube-apiserver + etcd
//! (`tests/common/kube.rs`): two daemons for two nodes share one local
//! provider directory (one "cloud"); every pod VM carries the cluster's
//! identity (`kube-system`'s UID); one daemon holds the
//! `coordination.k8s.io/v1` Lease `podvisor-local-node-gone`, and when the
//! other's node is deleted (its daemon killed with it) the holder deletes
//! that node's pod VMs — and only those — after `--node-gone-grace`. The
//! Lease passes to the other daemon when its holder is killed (after the
//! Lease expires) or stops (at once: it gives the Lease up).
//!
//! Tools: `KUBE_APISERVER`, `ETCD` (`eval "$(scripts/kube-apiserver.sh)"`,
//! which `scripts/test.sh` runs). Without them the tests say SKIPPED and
//! pass, except under `CI=true`, where they fail.

mod common;
#[path = "common/kube.rs"]
mod kube;
#[path = "common/tools.rs"]
mod tools;

use common::*;
use kube::{KubeApi, KubeBinaries, Needs};
use serde_json::Value;
use std::time::{Duration, Instant};

const FILE: &str = "kube_node_gone";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/default/leases/podvisor-local-node-gone";
/// `--lease-duration` in these tests: renewals and tries every 2 s, each
/// bounded by that, so only an answer slower than 2 s on a loaded machine
/// loses the Lease by itself.
const LEASE_SECONDS: u64 = 6;
/// `--node-gone-grace` in these tests.
const GRACE_SECONDS: u64 = 3;

fn binaries(test: &str) -> Option<KubeBinaries> {
    KubeBinaries::for_test(FILE, test, Needs::default())
}

/// A daemon for `node` on `api`, sharing `local` (another daemon's local
/// provider directory) when given; a Lease of `lease` seconds, a short
/// grace; no stale check.
fn setup_for(
    api: &KubeApi,
    node: &str,
    uid: &str,
    local: Option<std::path::PathBuf>,
    lease: u64,
) -> Setup {
    let mut setup = Setup::new();
    setup.node = node.to_owned();
    setup.shared_local = local;
    setup.global.extend(
        [
            "--kubeconfig",
            api.kubeconfig.to_str().unwrap(),
            "--pod-uid",
            uid,
            "--lease-namespace",
            "default",
            "--lease-duration",
            &format!("{lease}s"),
            "--node-gone-grace",
            &format!("{GRACE_SECONDS}s"),
            "--stale-sandbox-grace",
            "0s",
        ]
        .map(String::from),
    );
    setup
}

/// The Lease's spec, `Null` while there is none.
fn lease_spec(api: &KubeApi) -> Value {
    match api.request("GET", LEASE, None, None) {
        Ok((200, v)) => v["spec"].clone(),
        Ok((404, _)) => Value::Null,
        other => panic!("GET the Lease: {other:?}"),
    }
}

/// The Lease's holder, `None` while there is no Lease or no holder.
fn holder(api: &KubeApi) -> Option<String> {
    lease_spec(api)["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// A MicroTime of the Lease's spec (`renewTime`, `acquireTime`).
fn micro_time(spec: &Value, field: &str) -> k8s_openapi::jiff::Timestamp {
    spec[field]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{field} of {spec}"))
}

/// `kube-system`'s UID: the cluster's identity.
async fn cluster_uid(api: &KubeApi) -> String {
    eventually(
        "the kube-system namespace",
        Duration::from_secs(20),
        async || match api.request("GET", "/api/v1/namespaces/kube-system", None, None) {
            Ok((200, v)) => v["metadata"]["uid"].as_str().map(str::to_owned),
            _ => None,
        },
    )
    .await
}

/// Waits until `daemon` knows the cluster's identity (every pod VM it
/// creates from then on is tagged with it).
async fn knows_the_cluster(daemon: &Daemon, uid: &str) {
    eventually(
        "the daemon to learn the cluster's identity",
        Duration::from_secs(20),
        async || {
            let log = daemon.log_text();
            (log.contains("the cluster's identity (kube-system's UID) is known")
                && log.contains(uid))
            .then_some(())
        },
    )
    .await;
}

/// The tags of instance `id` in the local provider directory `local`.
fn tags(local: &std::path::Path, id: &str) -> Value {
    instance_json(local, id).expect("the instance's instance.json")["tags"].clone()
}

/// Creates and starts `n` sandboxes on `daemon`: their instance ids.
async fn sandboxes(daemon: &Daemon, pod: &str, n: usize) -> Vec<(String, String)> {
    let client = daemon.client().await;
    let mut out = Vec::new();
    for i in 0..n {
        let id = sandbox_id();
        daemon
            .create_and_start(&client, &id, &format!("{pod}-{i}"), "default")
            .await;
        let instance = daemon.instance(&id).await.unwrap()["instance_id"]
            .as_str()
            .unwrap()
            .to_owned();
        out.push((id, instance));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_deletes_the_pod_vms_of_a_deleted_node_and_only_those() {
    let Some(bin) = binaries("the_lease_holder_deletes_the_pod_vms_of_a_deleted_node") else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    let cluster = cluster_uid(&api).await;
    for node in ["node-a", "node-b", "node-c"] {
        api.create_node(node).unwrap();
    }
    let setup_a = setup_for(&api, "node-a", "uid-a", None, LEASE_SECONDS);
    let local = setup_a.local_dir();
    let setup_b = setup_for(&api, "node-b", "uid-b", Some(local.clone()), LEASE_SECONDS);
    let setup_c = setup_for(&api, "node-c", "uid-c", Some(local.clone()), LEASE_SECONDS);

    let daemon_a = setup_a.start().await;
    eventually(
        "daemon A to hold the Lease",
        Duration::from_secs(20),
        async || (holder(&api).as_deref() == Some("node-a/uid-a")).then_some(()),
    )
    .await;
    let mut daemon_b = setup_b.start().await;
    let mut daemon_c = setup_c.start().await;
    knows_the_cluster(&daemon_a, &cluster).await;
    knows_the_cluster(&daemon_b, &cluster).await;
    knows_the_cluster(&daemon_c, &cluster).await;
    let on_a = sandboxes(&daemon_a, "web-a", 2).await;
    let on_b = sandboxes(&daemon_b, "web-b", 2).await;
    // Node C stays in the cluster but its daemon dies: its pod VM is no
    // deleted node's, however long nobody answers for it.
    let on_c = sandboxes(&daemon_c, "web-c", 1).await;
    daemon_c.kill9();
    for ((_, instance), node) in on_a
        .iter()
        .map(|s| (s, "node-a"))
        .chain(on_b.iter().map(|s| (s, "node-b")))
        .chain(on_c.iter().map(|s| (s, "node-c")))
    {
        let t = tags(&local, instance);
        assert_eq!(t["podvisor.io/cluster"], cluster.as_str(), "{t}");
        assert_eq!(t["podvisor.io/node"], node, "{t}");
    }

    // Nothing of a live node is touched, however long it runs.
    tokio::time::sleep(Duration::from_secs(GRACE_SECONDS + 2)).await;
    for (_, instance) in on_a.iter().chain(&on_b).chain(&on_c) {
        let pid = instance_pid(&local, instance).unwrap();
        assert!(alive(pid), "pod VM {instance} of a live node was deleted");
    }
    assert_eq!(
        daemon_a
            .metric("podvisor_node_gone_instances_deleted_total", &[])
            .await,
        0.0
    );

    // Node B goes, its daemon with it.
    daemon_b.kill9();
    match api.request("DELETE", "/api/v1/nodes/node-b", None, None) {
        Ok((200, _)) => {}
        other => panic!("deleting node-b: {other:?}"),
    }
    let deleted_at = Instant::now();
    eventually(
        "node B's pod VMs to be deleted",
        Duration::from_secs(60),
        async || {
            on_b.iter()
                .all(|(_, i)| !local.join("instances").join(i).exists())
                .then_some(())
        },
    )
    .await;
    let took = deleted_at.elapsed();
    assert!(
        took >= Duration::from_secs(GRACE_SECONDS),
        "deleted before the grace: {took:?}"
    );
    for (id, instance) in &on_a {
        assert!(
            alive(instance_pid(&local, instance).unwrap()),
            "node A's pod VM {instance} was deleted"
        );
        assert_eq!(daemon_a.instance(id).await.unwrap()["state"], "running");
    }
    let (_, c_instance) = &on_c[0];
    assert!(
        alive(instance_pid(&local, c_instance).unwrap()),
        "node C exists: its pod VM stays"
    );
    // Counted once each delete has returned (a moment after the files go).
    eventually(
        "both deletes to be counted",
        Duration::from_secs(10),
        async || {
            (daemon_a
                .metric("podvisor_node_gone_instances_deleted_total", &[])
                .await
                == 2.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        daemon_a.metric("podvisor_node_gone_lease_held", &[]).await,
        1.0
    );
    let log = daemon_a.log_text();
    assert!(
        log.contains("the pod VM's node is gone from the cluster; deleting the pod VM")
            && log.contains("node-b"),
        "{log}"
    );
    eprintln!(
        "node deleted → its pod VMs deleted: {took:?} (grace {GRACE_SECONDS} s, Lease {LEASE_SECONDS} s)"
    );

    // The API server goes away: no node can be listed, and nothing is
    // deleted — not node C's pod VM either, whose daemon is gone — and it
    // is said.
    drop(api);
    tokio::time::sleep(Duration::from_secs(2 * GRACE_SECONDS + 2)).await;
    for (_, instance) in on_a.iter().chain(&on_c) {
        assert!(alive(instance_pid(&local, instance).unwrap()));
    }
    let log = daemon_a.log_text();
    assert!(
        log.contains("cannot take or renew the node-gone Lease"),
        "{log}"
    );
    assert_eq!(
        daemon_a.metric("podvisor_node_gone_lease_held", &[]).await,
        0.0,
        "a Lease that cannot be renewed is lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_passes_to_another_daemon_when_its_holder_dies_or_stops() {
    let Some(bin) = binaries("the_lease_passes_to_another_daemon") else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    for node in ["node-a", "node-b", "node-c"] {
        api.create_node(node).unwrap();
    }
    let lease = LEASE_SECONDS;
    let setup_a = setup_for(&api, "node-a", "uid-a", None, lease);
    let local = Some(setup_a.local_dir());
    let setups = [
        setup_a,
        setup_for(&api, "node-b", "uid-b", local.clone(), lease),
        setup_for(&api, "node-c", "uid-c", local, lease),
    ];
    let mut daemons = Vec::new();
    for s in &setups {
        daemons.push(Some(s.start().await));
    }
    let identity = |i: usize| {
        format!(
            "{}/uid-{}",
            ["node-a", "node-b", "node-c"][i],
            ["a", "b", "c"][i]
        )
    };
    let current = |api: &KubeApi| {
        let h = holder(api)?;
        (0..3).find(|i| identity(*i) == h)
    };
    let first = eventually("a holder", Duration::from_secs(20), async || current(&api)).await;
    tokio::time::sleep(Duration::from_secs(lease)).await;
    assert_eq!(current(&api), Some(first), "the holder keeps renewing it");
    for (i, d) in daemons.iter().enumerate() {
        let held = d
            .as_ref()
            .unwrap()
            .metric("podvisor_node_gone_lease_held", &[])
            .await;
        assert_eq!(held, f64::from(u8::from(i == first)), "daemon {i}");
    }

    // Killed: another takes over once the Lease has expired — never
    // before a whole duration after the dead holder's last renewal (both
    // times are stamped by this host's clock, so they compare), and within
    // the duration plus two tries (the bound the docs give), here with
    // room for a loaded machine.
    daemons[first].as_mut().unwrap().kill9();
    let killed = Instant::now();
    let last_renewal = micro_time(&lease_spec(&api), "renewTime");
    let second = eventually(
        "another daemon to take the Lease over",
        Duration::from_secs(3 * lease + 10),
        async || current(&api).filter(|h| *h != first),
    )
    .await;
    let took = killed.elapsed();
    let acquired = micro_time(&lease_spec(&api), "acquireTime");
    let waited = acquired.duration_since(last_renewal);
    assert!(
        waited >= k8s_openapi::jiff::SignedDuration::from_millis(lease as i64 * 1000 - 500),
        "taken {waited:?} after the last renewal, before the Lease of {lease} s expired"
    );
    assert!(
        took <= Duration::from_secs(3 * lease + 5),
        "taken over only {took:?} after the kill"
    );
    eprintln!(
        "holder killed → Lease taken over: {took:?} after the kill, {waited:?} after its last renewal (Lease {lease} s)"
    );

    // Stopped (SIGTERM, a rolling update): it gives the Lease up, and the
    // last daemon takes it at its next try, well before it would expire.
    let status = daemons[second].as_mut().unwrap().sigterm();
    assert!(status.success());
    let stopped = Instant::now();
    let third = eventually(
        "the last daemon to take the Lease over",
        Duration::from_secs(30),
        async || current(&api).filter(|h| *h != first && *h != second),
    )
    .await;
    let handed = stopped.elapsed();
    assert!(
        handed < Duration::from_secs(lease),
        "a Lease given up is taken at the next try, before it would expire: {handed:?}"
    );
    assert!(
        daemons[second]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("shutdown: the node-gone Lease is given up")
    );
    eprintln!("holder stopped → Lease taken over: {handed:?}");
    assert_eq!(
        daemons[third]
            .as_ref()
            .unwrap()
            .metric("podvisor_node_gone_lease_held", &[])
            .await,
        1.0
    );
}
