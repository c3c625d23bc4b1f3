//! The daemon (a child process, local provider) against a real
//! kube-apiserver + etcd (`tests/common/kube.rs`): the node's extended
//! resource `kata.peerpods.io/vm` and its owner annotation, checked by the
//! real kube-scheduler placing pods; stale sandboxes (a pod deleted while
//! the daemon was down) stopped after the grace period, and nothing stopped
//! while the API server is down; `/startup` after a restart.
//!
//! There is no kubelet: the test creates the Node object and copies
//! extended resources from capacity to allocatable as the kubelet does.
//! Tools: `KUBE_APISERVER`, `ETCD`, `KUBE_SCHEDULER`
//! (`eval "$(scripts/kube-apiserver.sh)"`, which `scripts/test.sh` runs).
//! Without them the tests say SKIPPED and pass, except under `CI=true`,
//! where they fail.

mod common;
#[path = "common/kube.rs"]
mod kube;
#[path = "common/tools.rs"]
mod tools;

use common::*;
use kube::{KubeApi, KubeBinaries, Needs};
use serde_json::{Value, json};
use std::time::Duration;

const FILE: &str = "kube_node";
const RESOURCE: &str = "kata.peerpods.io/vm";
const OWNER: &str = "kata.peerpods.io/caa-owner";

/// The API server's binaries (and the scheduler if `scheduler`), or `None`
/// after saying why the test is skipped.
fn binaries(test: &str, scheduler: bool) -> Option<KubeBinaries> {
    KubeBinaries::for_test(
        FILE,
        test,
        Needs {
            scheduler,
            controller_manager: false,
        },
    )
}

/// A daemon for node `node` that talks to `api` as its admin.
fn setup_for(api: &KubeApi, node: &str) -> Setup {
    let mut setup = Setup::new();
    setup.node = node.to_owned();
    setup.global.extend([
        "--kubeconfig".into(),
        api.kubeconfig.to_string_lossy().into_owned(),
    ]);
    setup
}

/// `GET path` as the admin: the object (panics on anything but 200).
fn get(api: &KubeApi, path: &str) -> Value {
    match api.request("GET", path, None, None) {
        Ok((200, v)) => v,
        other => panic!("GET {path}: {other:?}"),
    }
}

/// A pod `name` in `default`: bound to `node` when given (as if scheduled),
/// else left to the scheduler; requesting `vm` of the extended resource.
fn pod(name: &str, node: Option<&str>, vm: Option<u32>) -> Value {
    let mut resources = json!({"requests": {"cpu": "10m"}});
    if let Some(n) = vm {
        // An extended resource's request must equal its limit.
        resources["requests"][RESOURCE] = json!(n.to_string());
        resources["limits"] = json!({RESOURCE: n.to_string()});
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "automountServiceAccountToken": false,
            "runtimeClassName": null,
            "containers": [{"name": "app", "image": "registry.invalid/app", "resources": resources}],
        },
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

/// The `default` ServiceAccount, which admission requires of a pod and
/// which no controller manager makes here.
fn default_service_account(api: &KubeApi) {
    let body =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
    match api.request(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        None,
        Some(&body),
    ) {
        Ok((201 | 409, _)) => {}
        other => panic!("creating the default ServiceAccount: {other:?}"),
    }
}

fn create_pod(api: &KubeApi, body: &Value) {
    match api.request("POST", "/api/v1/namespaces/default/pods", None, Some(body)) {
        Ok((201, _)) => {}
        other => panic!("creating pod {}: {other:?}", body["metadata"]["name"]),
    }
}

/// Deletes a pod at once (no kubelet would finish a graceful delete).
fn delete_pod(api: &KubeApi, name: &str) {
    let path = format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0");
    match api.request("DELETE", &path, None, None) {
        Ok((200, _)) => {}
        other => panic!("deleting pod {name}: {other:?}"),
    }
}

/// The node's capacity of the resource and its owner annotation.
fn advertised(api: &KubeApi, node: &str) -> (Value, Value) {
    let n = get(api, &format!("/api/v1/nodes/{node}"));
    (
        n["status"]["capacity"][RESOURCE].clone(),
        n["metadata"]["annotations"][OWNER].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_advertises_its_limit_and_the_scheduler_places_no_more_peer_pods() {
    let Some(bin) = binaries("the_node_advertises_its_limit", true) else {
        return;
    };
    let mut api = KubeApi::start(&bin).unwrap();
    api.start_scheduler(&bin).unwrap();
    let node = "worker-1";
    api.create_node(node).unwrap();
    default_service_account(&api);

    let mut setup = setup_for(&api, node);
    setup.global.extend([
        "--peerpods-limit-per-node".into(),
        "10".into(),
        "--pod-uid".into(),
        "uid-of-daemon-1".into(),
    ]);
    let mut daemon = setup.start().await;
    eventually(
        "the node to advertise 10",
        Duration::from_secs(20),
        async || (advertised(&api, node) == (json!("10"), json!("uid-of-daemon-1"))).then_some(()),
    )
    .await;
    api.sync_allocatable(node).unwrap();
    let status = daemon.get("/v1/status").await.unwrap().1;
    assert_eq!(
        status["kubernetes"]["peer_pod_capacity"], RESOURCE,
        "{status}"
    );

    // The real scheduler places 10 peer pods and leaves the 11th Pending.
    for i in 0..11 {
        create_pod(&api, &pod(&format!("peer-{i}"), None, Some(1)));
    }
    let bound = |api: &KubeApi| -> usize {
        (0..11)
            .filter(|i| {
                get(api, &format!("/api/v1/namespaces/default/pods/peer-{i}"))["spec"]["nodeName"]
                    == node
            })
            .count()
    };
    eventually(
        "the scheduler to bind 10 pods",
        Duration::from_secs(60),
        async || (bound(&api) == 10).then_some(()),
    )
    .await;
    let unschedulable = |api: &KubeApi| {
        (0..11).find_map(|i| {
            let p = get(api, &format!("/api/v1/namespaces/default/pods/peer-{i}"));
            let reason = p["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PodScheduled")?["reason"]
                .clone();
            (p["spec"]["nodeName"].is_null() && reason == "Unschedulable").then_some(p)
        })
    };
    let pending = eventually(
        "the 11th pod to be Unschedulable",
        Duration::from_secs(60),
        async || unschedulable(&api),
    )
    .await;
    let message = pending["status"]["conditions"].to_string();
    assert!(message.contains(RESOURCE), "{message}");
    assert_eq!(bound(&api), 10);

    // A node re-registered without the resource gets it back.
    let patch = json!({"status": {"capacity": {RESOURCE: null}}});
    api.request(
        "PATCH",
        &format!("/api/v1/nodes/{node}/status"),
        None,
        Some(&patch),
    )
    .unwrap();
    assert!(advertised(&api, node).0.is_null());
    // (The recheck is 60 s; a restart re-advertises at once.)
    assert!(daemon.sigterm().success());
    // The owner annotation goes; the capacity was gone already.
    assert_eq!(advertised(&api, node), (Value::Null, Value::Null));

    let mut daemon = setup.start().await;
    eventually(
        "the node to advertise 10 again",
        Duration::from_secs(20),
        async || (advertised(&api, node).0 == json!("10")).then_some(()),
    )
    .await;
    // SIGTERM withdraws what this daemon owns...
    assert!(daemon.sigterm().success());
    assert_eq!(advertised(&api, node), (Value::Null, Value::Null));
    assert!(
        daemon
            .log_text()
            .contains("the node's peer pod capacity is withdrawn")
    );

    // ...and leaves what another daemon took over.
    let daemon = setup.start().await;
    eventually(
        "the node to advertise 10 again",
        Duration::from_secs(20),
        async || (advertised(&api, node).0 == json!("10")).then_some(()),
    )
    .await;
    let patch = json!({"metadata": {"annotations": {OWNER: "uid-of-daemon-2"}}});
    api.request(
        "PATCH",
        &format!("/api/v1/nodes/{node}"),
        None,
        Some(&patch),
    )
    .unwrap();
    let mut daemon = daemon;
    assert!(daemon.sigterm().success());
    assert_eq!(
        advertised(&api, node),
        (json!("10"), json!("uid-of-daemon-2"))
    );
    assert!(
        daemon
            .log_text()
            .contains("belongs to another daemon; left as it is")
    );

    // That other daemon died without withdrawing them: the next daemon of
    // the node takes them over, and withdraws them at its own shutdown.
    let mut daemon = setup.start().await;
    eventually(
        "the daemon to take the capacity over",
        Duration::from_secs(20),
        async || (advertised(&api, node) == (json!("10"), json!("uid-of-daemon-1"))).then_some(()),
    )
    .await;
    assert!(daemon.sigterm().success());
    assert_eq!(advertised(&api, node), (Value::Null, Value::Null));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_limit_advertises_nothing() {
    let Some(bin) = binaries("no_limit_advertises_nothing", false) else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    api.create_node("worker-0").unwrap();
    let mut setup = setup_for(&api, "worker-0");
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "0".into()]);
    let mut daemon = setup.start().await;
    let status = daemon.get("/v1/status").await.unwrap().1;
    assert!(
        status["kubernetes"]["peer_pod_capacity"].is_null(),
        "{status}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(advertised(&api, "worker-0"), (Value::Null, Value::Null));
    assert!(daemon.log_text().contains("is not advertised"));
    assert!(daemon.sigterm().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_pod_was_deleted_while_the_daemon_was_down_is_stopped_after_the_grace() {
    let Some(bin) = binaries("a_sandbox_whose_pod_was_deleted", false) else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    let node = "worker-2";
    api.create_node(node).unwrap();
    default_service_account(&api);
    create_pod(&api, &pod("gone", Some(node), None));
    create_pod(&api, &pod("stays", Some(node), None));
    let mut setup = setup_for(&api, node);
    setup
        .global
        .extend(["--stale-sandbox-grace".into(), "3s".into()]);

    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let (gone, stays) = (sandbox_id(), sandbox_id());
    daemon
        .create_and_start(&client, &gone, "gone", "default")
        .await;
    daemon
        .create_and_start(&client, &stays, "stays", "default")
        .await;
    let gone_instance = daemon.instance(&gone).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.kill9();

    // While the daemon is down, the pod goes; its StopVM is lost.
    delete_pod(&api, "gone");
    let started = std::time::Instant::now();
    let daemon = setup.start().await;
    eventually(
        "the stale sandbox to be stopped",
        Duration::from_secs(30),
        async || daemon.instance(&gone).await.is_none().then_some(()),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "stopped before the grace: {took:?}"
    );
    assert!(
        !setup
            .local_dir()
            .join("instances")
            .join(&gone_instance)
            .exists(),
        "the pod VM is deleted"
    );
    assert_eq!(
        daemon.instance(&stays).await.unwrap()["state"],
        "running",
        "a sandbox whose pod exists is left alone"
    );
    assert_eq!(
        daemon
            .metric("podvisor_stale_sandboxes_stopped_total", &[])
            .await,
        1.0
    );
    let log = daemon.log_text();
    assert!(
        log.contains("the sandbox's pod is gone from the node; stopping its pod VM")
            && log.contains("default/gone"),
        "{log}"
    );
    assert!(
        daemon
            .metric(
                "podvisor_kube_api_requests_total",
                &[("verb", "list"), ("outcome", "ok")]
            )
            .await
            >= 1.0
    );
    eprintln!("pod deleted (daemon down) → VM deleted after restart: {took:?} (grace 3 s)");

    // The API server goes away: a pod "missing" from no list stops nothing.
    drop(api);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(daemon.instance(&stays).await.unwrap()["state"], "running");
    assert!(
        daemon
            .log_text()
            .contains("cannot tell which sandboxes' pods are gone; none is stopped"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_node_name_stops_nothing() {
    let Some(bin) = binaries("a_wrong_node_name_stops_nothing", false) else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    // No Node object: a daemon pointed at the wrong cluster or node sees
    // an empty pod list, which must not read as "every pod is gone".
    let mut setup = setup_for(&api, "no-such-node");
    setup
        .global
        .extend(["--stale-sandbox-grace".into(), "1s".into()]);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon
        .create_and_start(&client, &id, "web", "default")
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    assert!(
        daemon
            .log_text()
            .contains("node no-such-node does not exist"),
        "{}",
        daemon.log_text()
    );
    // Nor is its pod VM tagged with the cluster: the node-gone collector of
    // the cluster, which finds no such node, would delete it.
    let instance = daemon.instance(&id).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = instance_json(&setup.local_dir(), &instance).expect("the pod VM's instance.json");
    assert_eq!(
        stored["tags"]["podvisor.io/node"], "no-such-node",
        "{stored}"
    );
    assert!(
        stored["tags"]["podvisor.io/cluster"].is_null(),
        "a pod VM of a node the cluster does not have is tagged with it: {stored}"
    );
    assert!(
        daemon.log_text().contains(
            "node no-such-node does not exist in this cluster (check --node-name): its pod VMs are not tagged with the cluster"
        ),
        "{}",
        daemon.log_text()
    );
    // A node of that name with no pod at all (not even the daemon's own):
    // another cluster's node, not one whose pods are all gone.
    api.create_node("no-such-node").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    assert!(
        daemon
            .log_text()
            .contains("no pod at all on node no-such-node"),
        "{}",
        daemon.log_text()
    );
}

/// Measurement (ignored; `cargo test --test kube_node -- --ignored
/// --nocapture`): Kubernetes API requests per minute at steady state with
/// 100 Running sandboxes (and their 100 pods) on a node, with the default
/// grace and a limit: the capacity check (one GET per minute), the
/// stale check (a GET of the node and one LIST of its pods per 30 s) and
/// the node-gone Lease (a GET and, held, a PUT every 20 s; the holder's
/// LIST of the nodes every 60 s) do not grow with the sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: about 3 minutes"]
async fn measure_api_requests_per_minute_with_100_sandboxes() {
    let Some(bin) = binaries("measure_api_requests_per_minute", false) else {
        return;
    };
    let api = KubeApi::start(&bin).unwrap();
    let node = "worker-m";
    api.create_node(node).unwrap();
    default_service_account(&api);
    let mut setup = setup_for(&api, node);
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "200".into()]);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    for i in 0..100 {
        let name = format!("pod-{i}");
        create_pod(&api, &pod(&name, Some(node), None));
        daemon
            .create_and_start(&client, &sandbox_id(), &name, "default")
            .await;
    }
    let total = async || -> f64 {
        let mut sum = 0.0;
        for verb in ["get", "list", "patch", "create", "update"] {
            for outcome in ["ok", "not_found", "error"] {
                sum += daemon
                    .metric(
                        "podvisor_kube_api_requests_total",
                        &[("verb", verb), ("outcome", outcome)],
                    )
                    .await;
            }
        }
        sum
    };
    let window = Duration::from_secs(150);
    let before = total().await;
    tokio::time::sleep(window).await;
    let after = total().await;
    let per_minute = (after - before) * 60.0 / window.as_secs_f64();
    eprintln!(
        "100 Running sandboxes: {per_minute:.1} Kubernetes API requests per minute at steady state ({} in {window:?})",
        after - before
    );
    assert!(after > before, "the checks ran");
}
