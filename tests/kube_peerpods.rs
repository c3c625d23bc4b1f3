//! PeerPod objects (`src/kubernetes/peerpods.rs`) on a real kube-apiserver
//! and etcd (`tests/common/kube.rs`), with the CRD the chart ships
//! (`deploy/helm/podvisor/crds/`), the daemon as a child process (local
//! provider) and sandboxes made through the Kata wire: a Running sandbox's
//! PeerPod is owned by its pod and names its VM, as `kubectl get peerpods`
//! shows with the CRD's printer columns; the real kube-controller-manager's
//! garbage collector, once the pod is deleted, leaves it Terminating while
//! the VM lives; StopVM removes the VM, then the PeerPod. A missing CRD is
//! said once; a restart applies what is missing or stale (without a second
//! object) and removes what no sandbox owns; an API outage changes no VM.
//!
//! Tools: `KUBE_APISERVER`, `ETCD`, `KUBE_CONTROLLER_MANAGER`
//! (`eval "$(scripts/kube-apiserver.sh)"`), `KUBECTL` and PyYAML
//! (`eval "$(scripts/helm-tools.sh)"`); `scripts/test.sh` exports them.
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
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const FILE: &str = "kube_peerpods";
const CRD_FILE: &str = "deploy/helm/podvisor/crds/peerpods.confidentialcontainers.org.yaml";
const PEERPODS: &str = "/apis/confidentialcontainers.org/v1alpha1/namespaces/default/peerpods";
const FINALIZER: &str = "podvisor.io/pod-vm";
const SANDBOX: &str = "podvisor.io/sandbox-id";

/// What the tests run besides the daemon.
struct Tools {
    kube: KubeBinaries,
    kubectl: PathBuf,
    python: PathBuf,
}

/// The tools (with kube-controller-manager if `controller_manager`), or
/// `None` after saying why the test is skipped.
fn prerequisites(test: &str, controller_manager: bool) -> Option<Tools> {
    let kube = KubeBinaries::for_test(
        FILE,
        test,
        Needs {
            scheduler: false,
            controller_manager,
        },
    )?;
    let kubectl = tools::tool("KUBECTL", "kubectl");
    let python = tools::yaml_python();
    let found = tools::runs(&kubectl, &["version", "--client"])
        .and_then(|()| tools::runs(&python, &["-c", "import yaml"]));
    if let Err(why) = found {
        tools::skip(
            FILE,
            test,
            &format!(
                "{why}; install kubectl and PyYAML with scripts/helm-tools.sh and export what \
                 it prints (eval \"$(scripts/helm-tools.sh)\")"
            ),
        );
        return None;
    }
    Some(Tools {
        kube,
        kubectl,
        python,
    })
}

/// `method path` as the admin, which must answer one of `ok`: the body.
fn call(api: &KubeApi, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> Value {
    match api.request(method, path, None, body) {
        Ok((status, v)) if ok.contains(&status) => v,
        other => panic!("{method} {path}: {other:?}"),
    }
}

/// Creates the chart's PeerPod CRD and waits until the API serves it.
fn install_crd(api: &KubeApi, tools: &Tools) {
    let text = std::fs::read_to_string(tools::root().join(CRD_FILE)).unwrap();
    let docs = tools::yaml_docs(&tools.python, &text);
    assert_eq!(docs.len(), 1, "{CRD_FILE} holds one object");
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    call(api, "POST", crds, Some(&docs[0]), &[201]);
    let started = Instant::now();
    loop {
        let crd = call(
            api,
            "GET",
            &format!("{crds}/peerpods.confidentialcontainers.org"),
            None,
            &[200],
        );
        let established = crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        if established && matches!(api.request("GET", PEERPODS, None, None), Ok((200, _))) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the PeerPod CRD is not served: {crd}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `default` ServiceAccount, which admission requires of a pod.
fn default_service_account(api: &KubeApi) {
    let body =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
    let path = "/api/v1/namespaces/default/serviceaccounts";
    call(api, "POST", path, Some(&body), &[201, 409]);
}

/// Pod `name` in `default`, bound to `node` (as if scheduled); its UID.
fn create_pod(api: &KubeApi, name: &str, node: &str) -> String {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app"}],
        },
    });
    let made = call(
        api,
        "POST",
        "/api/v1/namespaces/default/pods",
        Some(&pod),
        &[201],
    );
    made["metadata"]["uid"].as_str().unwrap().to_owned()
}

/// The PeerPods in `default`.
fn peerpods(api: &KubeApi) -> Vec<Value> {
    call(api, "GET", PEERPODS, None, &[200])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The PeerPod of sandbox `id`, if any.
fn peerpod_of(api: &KubeApi, id: &str) -> Option<Value> {
    peerpods(api)
        .into_iter()
        .find(|p| p["metadata"]["annotations"][SANDBOX] == id)
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

/// The instance id of sandbox `id`'s record.
async fn instance_of(daemon: &Daemon, id: &str) -> String {
    daemon.instance(id).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sandboxs_peerpod_is_owned_by_its_pod_and_outlives_it_until_the_vm_is_gone() {
    let test = "a_running_sandboxs_peerpod_is_owned_by_its_pod";
    let Some(tools) = prerequisites(test, true) else {
        return;
    };
    let started = Instant::now();
    let mut api = KubeApi::start(&tools.kube).unwrap();
    install_crd(&api, &tools);
    // After the CRD: the garbage collector watches PeerPods from its start.
    api.start_controller_manager(&tools.kube).unwrap();
    let node = "worker-p1";
    api.create_node(node).unwrap();
    default_service_account(&api);
    let pod_uid = create_pod(&api, "web", node);
    let setup = setup_for(&api, node);
    let daemon = setup.start().await;
    let status = daemon.get("/v1/status").await.unwrap().1;
    assert_eq!(status["kubernetes"]["peerpods"], true, "{status}");

    let client = daemon.client().await;
    let id = sandbox_id();
    daemon
        .create_and_start(&client, &id, "web", "default")
        .await;
    let instance = instance_of(&daemon, &id).await;
    let peerpod = eventually(
        "the sandbox's PeerPod",
        Duration::from_secs(20),
        async || peerpod_of(&api, &id),
    )
    .await;
    let meta = &peerpod["metadata"];
    let name = meta["name"].as_str().unwrap().to_owned();
    let suffix = name
        .strip_prefix("web-resource-")
        .unwrap_or_else(|| panic!("{name}"));
    assert_eq!(suffix.len(), 5, "{name}");
    assert_eq!(
        meta["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": pod_uid, "controller": true}]),
        "owned by the pod, without blockOwnerDeletion"
    );
    assert_eq!(
        peerpod["spec"],
        json!({"cloudProvider": "local", "instanceID": instance})
    );
    assert_eq!(meta["finalizers"], json!([FINALIZER]));
    assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "podvisor");
    assert_eq!(meta["labels"]["podvisor.io/node"], node);
    assert_eq!(meta["annotations"]["podvisor.io/node"], node);

    // kubectl shows pod → instance with the CRD's printer columns.
    let out = Command::new(&tools.kubectl)
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args(["get", "peerpods", "--namespace", "default"])
        .output()
        .unwrap();
    let table = tools::text(&out);
    assert!(out.status.success(), "{table}");
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .filter(|c| !c.is_empty())
        .collect();
    let header: Vec<&str> = header.iter().map(|c| c.trim()).collect();
    assert_eq!(
        header,
        ["NAME", "CLOUD PROVIDER", "INSTANCE ID", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..3],
        [name.as_str(), "local", instance.as_str()],
        "{table}"
    );

    // The pod goes: the garbage collector deletes its PeerPod, which stays
    // Terminating while the VM lives.
    call(
        &api,
        "DELETE",
        "/api/v1/namespaces/default/pods/web?gracePeriodSeconds=0",
        None,
        &[200],
    );
    let deleting = Instant::now();
    eventually(
        "the garbage collector to delete the PeerPod",
        Duration::from_secs(60),
        async || {
            api.running().unwrap();
            let p = peerpod_of(&api, &id)?;
            (!p["metadata"]["deletionTimestamp"].is_null()).then_some(())
        },
    )
    .await;
    let marked = deleting.elapsed();
    // 5 s: more than the daemon needs to act on a view event or a GC
    // pass to follow up (each well under a second here), far less than
    // the 60 s resync, which changes nothing either.
    let watched = Instant::now();
    let vm = setup.local_dir().join("instances").join(&instance);
    while watched.elapsed() < Duration::from_secs(5) {
        let p = peerpod_of(&api, &id).expect("the PeerPod stays while its VM exists");
        assert_eq!(p["metadata"]["finalizers"], json!([FINALIZER]));
        assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
        assert!(
            vm.exists(),
            "the pod VM stays: a PeerPod's deletion is no VM action"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // StopVM: the VM goes, then its PeerPod.
    client.stop(&id).await.unwrap();
    eventually(
        "the PeerPod to be gone",
        Duration::from_secs(30),
        async || peerpod_of(&api, &id).is_none().then_some(()),
    )
    .await;
    assert!(
        daemon.instance(&id).await.is_none(),
        "the record went first"
    );
    assert!(!vm.exists(), "the VM was deleted before its PeerPod");
    for (action, outcome) in [("apply", "ok"), ("remove", "ok")] {
        let n = daemon
            .metric(
                "podvisor_peerpod_writes_total",
                &[("action", action), ("outcome", outcome)],
            )
            .await;
        assert_eq!(n, 1.0, "{action} {outcome}");
    }
    tools::say(&format!(
        "{FILE}: PeerPod marked deleted by the garbage collector {marked:.1?} after its pod; \
         whole test {:.1?}",
        started.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peerpods_follow_the_journal_through_a_missing_crd_a_restart_and_an_api_outage() {
    let test = "peerpods_follow_the_journal_through_a_missing_crd_a_restart_and_an_api_outage";
    let Some(tools) = prerequisites(test, false) else {
        return;
    };
    let started = Instant::now();
    let api = KubeApi::start(&tools.kube).unwrap();
    let node = "worker-p2";
    api.create_node(node).unwrap();
    default_service_account(&api);
    for pod in ["first", "second", "third"] {
        create_pod(&api, pod, node);
    }
    let setup = setup_for(&api, node);

    // No CRD yet: said once, and the sandbox runs.
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let first = sandbox_id();
    daemon
        .create_and_start(&client, &first, "first", "default")
        .await;
    // The start's resync (a LIST) and the sandbox's apply (a PATCH) both
    // meet the 404: one warning.
    let applies = async |outcome: &str| {
        daemon
            .metric(
                "podvisor_peerpod_writes_total",
                &[("action", "apply"), ("outcome", outcome)],
            )
            .await
    };
    eventually("the sandbox's apply", Duration::from_secs(10), async || {
        (applies("no_crd").await + applies("error").await > 0.0).then_some(())
    })
    .await;
    assert_eq!(applies("no_crd").await, 1.0, "{}", daemon.log_text());
    let warnings = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("is not installed"))
        .count();
    assert_eq!(warnings, 1, "{}", daemon.log_text());

    // The CRD comes: the next sandbox gets its PeerPod at once.
    install_crd(&api, &tools);
    let second = sandbox_id();
    daemon
        .create_and_start(&client, &second, "second", "default")
        .await;
    let before = eventually("the second PeerPod", Duration::from_secs(20), async || {
        peerpod_of(&api, &second)
    })
    .await;
    assert!(
        daemon
            .log_text()
            .contains("PeerPod objects are written again")
    );
    let instances = (
        instance_of(&daemon, &first).await,
        instance_of(&daemon, &second).await,
    );
    let mut daemon = daemon;
    daemon.kill9();

    // While the daemon is down: the second's PeerPod is edited, and a
    // PeerPod of a sandbox the journal does not know appears (as if a
    // daemon died between a VM's deletion and its PeerPod's removal).
    let second_name = before["metadata"]["name"].as_str().unwrap().to_owned();
    call(
        &api,
        "PATCH",
        &format!("{PEERPODS}/{second_name}"),
        Some(&json!({"spec": {"instanceID": "i-edited"}})),
        &[200],
    );
    let stray = json!({
        "apiVersion": "confidentialcontainers.org/v1alpha1", "kind": "PeerPod",
        "metadata": {
            "name": "gone-resource-bbbbb",
            "labels": {"app.kubernetes.io/managed-by": "podvisor", "podvisor.io/node": node},
            "annotations": {SANDBOX: "f".repeat(64), "podvisor.io/node": node},
            "finalizers": [FINALIZER],
        },
        "spec": {"cloudProvider": "local", "instanceID": "i-gone"},
    });
    call(&api, "POST", PEERPODS, Some(&stray), &[201]);

    // The restart applies the first's (missing), the second's (edited: the
    // same object again), and removes the stray one; no VM is touched.
    let restarted = Instant::now();
    let daemon = setup.start().await;
    eventually(
        "the PeerPods to be reconciled",
        Duration::from_secs(20),
        async || {
            let all = peerpods(&api);
            let first_ok = all.iter().any(|p| {
                p["metadata"]["annotations"][SANDBOX] == first.as_str()
                    && p["spec"]["instanceID"] == instances.0.as_str()
            });
            let second_ok = all.iter().any(|p| {
                p["metadata"]["annotations"][SANDBOX] == second.as_str()
                    && p["spec"]["instanceID"] == instances.1.as_str()
            });
            (first_ok && second_ok && all.len() == 2).then_some(())
        },
    )
    .await;
    let reconciled = restarted.elapsed();
    let after = peerpod_of(&api, &second).unwrap();
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "the same object, applied again"
    );
    assert_eq!(
        call(
            &api,
            "GET",
            &format!("{PEERPODS}/gone-resource-bbbbb"),
            None,
            &[404]
        )["code"],
        404
    );
    assert_eq!(instance_of(&daemon, &first).await, instances.0);
    assert_eq!(instance_of(&daemon, &second).await, instances.1);
    assert_eq!(
        daemon
            .metric(
                "podvisor_provider_requests_total",
                &[("operation", "delete")]
            )
            .await,
        0.0,
        "no VM was deleted"
    );

    // The API goes away: StopVM still deletes its VM, StartVM still makes
    // one, and the other stays; the failures are logged, once.
    drop(api);
    let client = daemon.client().await;
    client.stop(&first).await.unwrap();
    let third = sandbox_id();
    daemon
        .create_and_start(&client, &third, "third", "default")
        .await;
    eventually(
        "the first's VM to be deleted",
        Duration::from_secs(20),
        async || daemon.instance(&first).await.is_none().then_some(()),
    )
    .await;
    assert!(
        !setup
            .local_dir()
            .join("instances")
            .join(&instances.0)
            .exists()
    );
    assert_eq!(daemon.instance(&second).await.unwrap()["state"], "running");
    assert_eq!(daemon.instance(&third).await.unwrap()["state"], "running");
    eventually(
        "the failed writes to be logged",
        Duration::from_secs(20),
        async || {
            daemon
                .log_text()
                .contains("cannot write PeerPod objects; the next resync retries")
                .then_some(())
        },
    )
    .await;
    // Both failures counted (the second may still be in flight when the
    // first is logged).
    eventually(
        "the first's removal and the third's apply to fail",
        Duration::from_secs(20),
        async || {
            (daemon
                .metric("podvisor_peerpod_writes_total", &[("outcome", "error")])
                .await
                == 2.0)
                .then_some(())
        },
    )
    .await;
    let warned: Vec<String> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot write PeerPod objects"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    tools::say(&format!(
        "{FILE}: a restart reconciled the PeerPods in {reconciled:.1?}; whole test {:.1?}",
        started.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_nodes_peerpods_are_released_once_its_pod_vms_are_gone() {
    let test = "a_deleted_nodes_peerpods_are_released_once_its_pod_vms_are_gone";
    let Some(tools) = prerequisites(test, false) else {
        return;
    };
    let api = KubeApi::start(&tools.kube).unwrap();
    install_crd(&api, &tools);
    default_service_account(&api);
    for node in ["node-a", "node-b"] {
        api.create_node(node).unwrap();
    }
    create_pod(&api, "on-a", "node-a");
    create_pod(&api, "on-b", "node-b");
    // Two daemons on one cloud; a short Lease and grace (as in
    // tests/kube_node_gone.rs, which proves the VMs' side).
    let short = |setup: &mut Setup| {
        setup.global.extend(
            [
                "--lease-namespace",
                "default",
                "--lease-duration",
                "6s",
                "--node-gone-grace",
                "3s",
                "--stale-sandbox-grace",
                "0s",
            ]
            .map(String::from),
        );
    };
    let mut setup_a = setup_for(&api, "node-a");
    short(&mut setup_a);
    let mut setup_b = setup_for(&api, "node-b");
    setup_b.shared_local = Some(setup_a.local_dir());
    short(&mut setup_b);
    let daemon_a = setup_a.start().await;
    eventually(
        "daemon A to hold the node-gone Lease",
        Duration::from_secs(20),
        async || (daemon_a.metric("podvisor_node_gone_lease_held", &[]).await == 1.0).then_some(()),
    )
    .await;
    let mut daemon_b = setup_b.start().await;
    for daemon in [&daemon_a, &daemon_b] {
        eventually(
            "the daemon to learn the cluster's identity",
            Duration::from_secs(20),
            async || {
                daemon
                    .log_text()
                    .contains("the cluster's identity (kube-system's UID) is known")
                    .then_some(())
            },
        )
        .await;
    }
    let (a, b) = (sandbox_id(), sandbox_id());
    daemon_a
        .create_and_start(&daemon_a.client().await, &a, "on-a", "default")
        .await;
    daemon_b
        .create_and_start(&daemon_b.client().await, &b, "on-b", "default")
        .await;
    let vm_b = instance_of(&daemon_b, &b).await;
    for id in [&a, &b] {
        eventually(
            "both sandboxes' PeerPods",
            Duration::from_secs(20),
            async || peerpod_of(&api, id).map(|_| ()),
        )
        .await;
    }

    // Node B goes with its daemon: its VM is deleted by A (the Lease
    // holder), and then — B's own daemon being gone — B's PeerPod is
    // released by A too, or its finalizer would hold it (and its
    // namespace's deletion) for good. A's stays.
    daemon_b.kill9();
    call(&api, "DELETE", "/api/v1/nodes/node-b", None, &[200]);
    let deleted = Instant::now();
    eventually(
        "node B's PeerPod to be released",
        Duration::from_secs(60),
        async || peerpod_of(&api, &b).is_none().then_some(()),
    )
    .await;
    assert!(
        !setup_a.local_dir().join("instances").join(&vm_b).exists(),
        "released only once node B's pod VM is gone"
    );
    assert!(peerpod_of(&api, &a).is_some(), "node A's PeerPod stays");
    assert_eq!(daemon_a.instance(&a).await.unwrap()["state"], "running");
    let log = daemon_a.log_text();
    assert!(
        log.contains("a deleted node's PeerPod is released: no pod VM of the node is left"),
        "{log}"
    );
    tools::say(&format!(
        "{FILE}: node deleted → its PeerPod released in {:.1?} (grace 3 s)",
        deleted.elapsed()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_peerpods_writes_none_and_says_so() {
    let Some(tools) = prerequisites("disable_peerpods_writes_none_and_says_so", false) else {
        return;
    };
    let api = KubeApi::start(&tools.kube).unwrap();
    install_crd(&api, &tools);
    default_service_account(&api);
    let node = "worker-off";
    api.create_node(node).unwrap();
    create_pod(&api, "web", node);
    let mut setup = setup_for(&api, node);
    setup
        .env
        .push(("PODVISOR_DISABLE_PEERPODS".into(), "true".into()));
    let daemon = setup.start().await;
    let id = sandbox_id();
    daemon
        .create_and_start(&daemon.client().await, &id, "web", "default")
        .await;
    // A daemon that writes them does so within a second (the tests above):
    // this one, given three, writes none.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(peerpods(&api).is_empty(), "{:#?}", peerpods(&api));
    assert!(
        daemon
            .log_text()
            .contains("--disable-peerpods: no PeerPod objects are written")
    );
    let status = daemon.get("/v1/status").await.unwrap().1;
    assert_eq!(status["kubernetes"]["peerpods"], false, "{status}");
}
