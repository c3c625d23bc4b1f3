//! The Kubernetes test harness itself (`tests/common/kube.rs`) against real
//! binaries: kube-scheduler binds pods to the node `create_node` registers,
//! `sync_allocatable` copies extended resources from the node's capacity to
//! its allocatable (and drops the ones gone), and kube-controller-manager's
//! garbage collector removes an object whose owner is deleted.
//!
//! Tools: `KUBE_APISERVER`, `ETCD`, `KUBE_SCHEDULER` and
//! `KUBE_CONTROLLER_MANAGER` (`scripts/kube-apiserver.sh`) name them, else
//! they are looked up on `PATH`. Without them the test says SKIPPED and
//! passes, except under `CI=true`, where it fails.

#[path = "common/kube.rs"]
mod kube;
#[path = "common/tools.rs"]
mod tools;

use kube::{KubeApi, KubeBinaries};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tools::{say, skip};

/// This test file, as SKIPPED lines name it.
const FILE: &str = "kube_harness";
/// How long the scheduler may take to bind the pods, and the garbage
/// collector to remove a dependent.
const LIMIT: Duration = Duration::from_secs(60);
const NODE: &str = "node-1";

/// The binaries, with the scheduler and the controller manager, or `None`
/// after saying why the test is skipped.
fn binaries(test: &str) -> Option<KubeBinaries> {
    let found = KubeBinaries::find().and_then(|bin| {
        bin.require_scheduler()?;
        bin.require_controller_manager()?;
        Ok(bin)
    });
    match found {
        Ok(bin) => Some(bin),
        Err(why) => {
            skip(
                FILE,
                test,
                &format!(
                    "{why}; build kube-apiserver, kube-scheduler and kube-controller-manager \
                     and install etcd with scripts/kube-apiserver.sh and export what it prints \
                     (eval \"$(scripts/kube-apiserver.sh)\")"
                ),
            );
            None
        }
    }
}

/// `request` that must answer one of `ok`: the body.
fn call(api: &KubeApi, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> Value {
    match api.request(method, path, None, body) {
        Ok((status, v)) if ok.contains(&status) => v,
        Ok((status, v)) => panic!("{method} {path}: HTTP {status}: {v}"),
        Err(e) => panic!("{e}"),
    }
}

/// Polls `f` every 200 ms until it is `Some`, failing at once when a
/// harness process exits and after `LIMIT` naming `what`; the value and
/// how long it took.
fn eventually<T>(
    api: &mut KubeApi,
    what: &str,
    mut f: impl FnMut(&KubeApi) -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(v) = f(api) {
            return (v, started.elapsed());
        }
        api.running()
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        assert!(
            started.elapsed() < LIMIT,
            "timed out after {LIMIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "pause",
                "image": "registry.invalid/pause",
                "resources": {"requests": {"cpu": "100m"}},
            }],
        },
    })
}

fn owned_config_map(name: &str, owner: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "blockOwnerDeletion": false,
            }],
        },
        "data": {"owner": owner["metadata"]["name"]},
    })
}

#[test]
fn scheduler_binds_pods_allocatable_follows_capacity_and_gc_removes_dependents() {
    let test = "scheduler_binds_pods_allocatable_follows_capacity_and_gc_removes_dependents";
    let Some(bin) = binaries(test) else {
        return;
    };
    let mut api = KubeApi::start(&bin).unwrap_or_else(|e| panic!("{e}"));
    say(&format!(
        "{FILE}: etcd + kube-apiserver ready in {:.1?} at {}",
        api.startup, api.base_url
    ));
    let started = Instant::now();
    api.start_scheduler(&bin).unwrap_or_else(|e| panic!("{e}"));
    say(&format!(
        "{FILE}: kube-scheduler started in {:.1?}",
        started.elapsed()
    ));

    // The node, as a kubelet registers it: Ready, the resources, untainted.
    api.create_node(NODE).unwrap_or_else(|e| panic!("{e}"));
    let node = call(&api, "GET", &format!("/api/v1/nodes/{NODE}"), None, &[200]);
    assert_eq!(node["spec"]["taints"], Value::Null, "{node}");
    let ready = node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .unwrap_or_else(|| panic!("no Ready condition: {node}"));
    assert_eq!(ready["status"], "True", "{node}");
    for resources in ["capacity", "allocatable"] {
        assert_eq!(
            node["status"][resources],
            json!({"cpu": "8", "memory": "32Gi", "pods": "110"}),
            "{node}"
        );
    }

    // Extended resources: copied from the capacity, and dropped with it.
    let status = format!("/api/v1/nodes/{NODE}/status");
    let capacity =
        |widgets: Value| json!({"status": {"capacity": {"example.com/widget": widgets}}});
    call(&api, "PATCH", &status, Some(&capacity(json!("4"))), &[200]);
    api.sync_allocatable(NODE).unwrap_or_else(|e| panic!("{e}"));
    let node = call(&api, "GET", &format!("/api/v1/nodes/{NODE}"), None, &[200]);
    assert_eq!(
        node["status"]["allocatable"]["example.com/widget"], "4",
        "{node}"
    );
    assert_eq!(node["status"]["allocatable"]["cpu"], "8", "{node}");
    call(&api, "PATCH", &status, Some(&capacity(Value::Null)), &[200]);
    api.sync_allocatable(NODE).unwrap_or_else(|e| panic!("{e}"));
    let node = call(&api, "GET", &format!("/api/v1/nodes/{NODE}"), None, &[200]);
    assert_eq!(
        node["status"]["allocatable"],
        json!({"cpu": "8", "memory": "32Gi", "pods": "110"}),
        "{node}"
    );

    // Pods need their ServiceAccount to exist (the ServiceAccount admission
    // plugin), and the controller that makes `default` is not running yet.
    let service_accounts = "/api/v1/namespaces/default/serviceaccounts";
    let account =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
    call(&api, "POST", service_accounts, Some(&account), &[201, 409]);
    let pods = "/api/v1/namespaces/default/pods";
    let names = ["pod-0", "pod-1"];
    for name in names {
        call(&api, "POST", pods, Some(&pod(name)), &[201]);
    }
    let (bound, took) = eventually(&mut api, "the scheduler to bind both pods", |api| {
        let bound: Vec<Value> = names
            .iter()
            .map(|name| call(api, "GET", &format!("{pods}/{name}"), None, &[200]))
            .collect();
        bound
            .iter()
            .all(|p| p["spec"]["nodeName"] == NODE)
            .then_some(bound)
    });
    say(&format!("{FILE}: both pods bound to {NODE} in {took:.1?}"));

    // The garbage collector: a ConfigMap owned by a deleted pod goes, one
    // owned by a pod still there stays.
    let started = Instant::now();
    api.start_controller_manager(&bin)
        .unwrap_or_else(|e| panic!("{e}"));
    say(&format!(
        "{FILE}: kube-controller-manager's controllers running in {:.1?}",
        started.elapsed()
    ));
    let config_maps = "/api/v1/namespaces/default/configmaps";
    let orphan = owned_config_map("owned-by-pod-0", &bound[0]);
    let kept = owned_config_map("owned-by-pod-1", &bound[1]);
    for config_map in [&orphan, &kept] {
        call(&api, "POST", config_maps, Some(config_map), &[201]);
    }
    // No kubelet: a bound pod is gone at once only with no grace period.
    call(
        &api,
        "DELETE",
        &format!("{pods}/pod-0?gracePeriodSeconds=0&propagationPolicy=Background"),
        None,
        &[200],
    );
    call(&api, "GET", &format!("{pods}/pod-0"), None, &[404]);
    let ((), took) = eventually(
        &mut api,
        "the garbage collector to delete owned-by-pod-0",
        |api| {
            let path = format!("{config_maps}/owned-by-pod-0");
            match api.request("GET", &path, None, None) {
                Ok((404, _)) => Some(()),
                Ok((200, _)) => None,
                Ok((status, v)) => panic!("GET {path}: HTTP {status}: {v}"),
                Err(e) => panic!("{e}"),
            }
        },
    );
    say(&format!(
        "{FILE}: the garbage collector deleted pod-0's ConfigMap in {took:.1?}"
    ));
    let kept = call(
        &api,
        "GET",
        &format!("{config_maps}/owned-by-pod-1"),
        None,
        &[200],
    );
    assert_eq!(kept["data"]["owner"], "pod-1", "{kept}");
    api.running().unwrap_or_else(|e| panic!("{e}"));
}
