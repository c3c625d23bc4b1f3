//! The Helm chart in `deploy/helm/podvisor` installed into a real
//! kube-apiserver (etcd + kube-apiserver 1.20, `tests/common/kube.rs`):
//! `helm install` creates every object `helm template` renders, as
//! rendered; the chart's ServiceAccount can make exactly the daemon's
//! Kubernetes calls (the image pull secret lookup of `src/pull_secrets.rs`,
//! the node's capacity patches of `src/kubernetes/node.rs` and the PeerPod
//! apply, list and removal of `src/kubernetes/peerpods.rs`, through the
//! daemon's own client, and the node's pod list of
//! `src/kubernetes/stale.rs`, the cluster's identity, node list and Lease
//! of `src/kubernetes/node_gone.rs`, the PeerPods of
//! `src/kubernetes/peerpods.rs`) and is refused (403) outside them; `helm
//! uninstall` removes every object but the PeerPod CRD (`crds/`), which
//! Helm installs once and leaves, and a second install skips.
//!
//! Tools: `HELM` and `KUBECTL` (`scripts/helm-tools.sh`), `KUBE_APISERVER`
//! and `ETCD` (`scripts/kube-apiserver.sh`) name them, else they are looked
//! up on `PATH`; `scripts/test.sh` exports all four. YAML is read with
//! `python3` and PyYAML (or the Python of `KUBERNETES_VALIDATE`'s
//! virtualenv). Without the tools the test says SKIPPED and passes, except
//! under `CI=true`, where it fails.

#[path = "common/kube.rs"]
mod kube;

use kube::{KubeApi, KubeBinaries};
use podvisor::kubernetes::lease::Lease;
use podvisor::kubernetes::node::{NodeCapacity, Reconciled};
use podvisor::kubernetes::peerpods::{self, Applied, PeerPods, Removed};
use podvisor::kubernetes::{Kube, KubeApiConfig, KubeSource};
use podvisor::pull_secrets::PullSecrets;
#[path = "common/tools.rs"]
mod tools;

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tools::{root, runs, say, skip, text, tool};

const CHART: &str = "deploy/helm/podvisor";
/// This test file, as SKIPPED lines name it.
const FILE: &str = "helm_install";
const RELEASE: &str = "podvisor";
/// The namespace `helm install --create-namespace` creates.
const NAMESPACE: &str = "peerpods-test";
/// Where the workload pod whose pull secrets the daemon reads lives.
const WORKLOAD: &str = "workload";
/// The CRD the chart ships in `crds/`.
const CRD: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/peerpods.confidentialcontainers.org";

struct Tools {
    helm: PathBuf,
    kubectl: PathBuf,
    python: PathBuf,
    kube: KubeBinaries,
}

/// The tools, or `None` after saying why the test is skipped.
fn tools(test: &str) -> Option<Tools> {
    let helm = tool("HELM", "helm");
    let kubectl = tool("KUBECTL", "kubectl");
    let python = tools::yaml_python();
    let helm_tools = runs(&helm, &["version", "--short"])
        .and_then(|()| runs(&kubectl, &["version", "--client"]))
        .and_then(|()| runs(&python, &["-c", "import yaml"]));
    if let Err(why) = helm_tools {
        skip(
            FILE,
            test,
            &format!(
                "{why}; install helm and kubectl with scripts/helm-tools.sh and export what \
                 it prints (eval \"$(scripts/helm-tools.sh)\")"
            ),
        );
        return None;
    }
    match KubeBinaries::find() {
        Ok(kube) => Some(Tools {
            helm,
            kubectl,
            python,
            kube,
        }),
        Err(why) => {
            skip(
                FILE,
                test,
                &format!(
                    "{why}; build kube-apiserver and install etcd with scripts/kube-apiserver.sh \
                     and export what it prints (eval \"$(scripts/kube-apiserver.sh)\")"
                ),
            );
            None
        }
    }
}

impl Tools {
    fn run(&self, program: &Path, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
    }

    fn helm(&self, api: &KubeApi, args: &[&str]) -> Output {
        let kubeconfig = api.kubeconfig.to_str().expect("utf-8 path");
        let mut all = args.to_vec();
        all.extend(["--kubeconfig", kubeconfig]);
        self.run(&self.helm, &all)
    }

    fn kubectl(&self, api: &KubeApi, args: &[&str]) -> Output {
        let kubeconfig = api.kubeconfig.to_str().expect("utf-8 path");
        let mut all = vec!["--kubeconfig", kubeconfig];
        all.extend(args);
        self.run(&self.kubectl, &all)
    }

    /// Every document of a YAML stream as JSON (null documents dropped).
    fn yaml_docs(&self, yaml: &str) -> Vec<Value> {
        tools::yaml_docs(&self.python, yaml)
    }
}

/// `(kind, name)` of an object.
fn id(doc: &Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or("").to_owned(),
        doc["metadata"]["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// The REST path of a rendered object (the kinds the chart renders by
/// default).
fn api_path(doc: &Value) -> String {
    let (kind, name) = id(doc);
    let ns = doc["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
    match kind.as_str() {
        "ServiceAccount" => format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}"),
        "ConfigMap" => format!("/api/v1/namespaces/{ns}/configmaps/{name}"),
        "Secret" => format!("/api/v1/namespaces/{ns}/secrets/{name}"),
        "DaemonSet" => format!("/apis/apps/v1/namespaces/{ns}/daemonsets/{name}"),
        "ClusterRole" => format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}"),
        "ClusterRoleBinding" => {
            format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}")
        }
        "Role" => format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{name}"),
        "RoleBinding" => {
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/{name}")
        }
        other => panic!("the chart renders a {other} ({name}) this test does not know"),
    }
}

fn get(api: &KubeApi, path: &str) -> (u16, Value) {
    api.request("GET", path, None, None)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A Secret's data as the API returns it: `stringData` merged into `data`,
/// base64.
fn secret_data(doc: &Value) -> Value {
    use base64::Engine;
    let mut data = doc["data"].as_object().cloned().unwrap_or_default();
    if let Some(strings) = doc["stringData"].as_object() {
        for (k, v) in strings {
            let v = v.as_str().unwrap_or("");
            data.insert(
                k.clone(),
                base64::engine::general_purpose::STANDARD.encode(v).into(),
            );
        }
    }
    Value::Object(data)
}

/// Checks the live object against the rendered one: the labels, and the
/// fields that carry the chart's meaning for each kind.
fn assert_as_rendered(rendered: &Value, live: &Value) {
    let (kind, name) = id(rendered);
    assert_eq!(id(live), id(rendered), "the live object is another one");
    let labels = rendered["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (k, v) in &labels {
        assert_eq!(
            &live["metadata"]["labels"][k], v,
            "{kind}/{name}: label {k} is not as rendered: {live}"
        );
    }
    let same = |field: &str| {
        assert_eq!(
            live[field], rendered[field],
            "{kind}/{name}: {field} is not as rendered"
        );
    };
    match kind.as_str() {
        "ClusterRole" | "Role" => same("rules"),
        "ClusterRoleBinding" | "RoleBinding" => {
            same("roleRef");
            same("subjects");
        }
        "ConfigMap" => same("data"),
        "Secret" => assert_eq!(
            secret_data(live),
            secret_data(rendered),
            "Secret/{name}: data is not as rendered"
        ),
        "ServiceAccount" => {}
        "DaemonSet" => {
            let (r, l) = (&rendered["spec"], &live["spec"]);
            assert_eq!(l["selector"], r["selector"], "DaemonSet/{name}: selector");
            assert_eq!(
                l["template"]["spec"]["serviceAccountName"],
                r["template"]["spec"]["serviceAccountName"],
                "DaemonSet/{name}: serviceAccountName"
            );
            assert_eq!(
                l["template"]["spec"]["hostNetwork"], r["template"]["spec"]["hostNetwork"],
                "DaemonSet/{name}: hostNetwork"
            );
            let container = |spec: &Value, field: &str| {
                spec["template"]["spec"]["containers"][0][field].clone()
            };
            for field in ["image", "args", "envFrom", "securityContext"] {
                assert_eq!(
                    container(l, field),
                    container(r, field),
                    "DaemonSet/{name}: the container's {field}"
                );
            }
            // Exactly as rendered for this server's version, and never two
            // daemons on one node: a rolling update without surge.
            let strategy = &r["updateStrategy"];
            assert_eq!(
                strategy["type"], "RollingUpdate",
                "DaemonSet/{name}: updateStrategy {strategy}"
            );
            let surge = &strategy["rollingUpdate"]["maxSurge"];
            assert!(
                surge.is_null() || *surge == json!(0) || *surge == json!("0%"),
                "DaemonSet/{name}: the update strategy may run two daemons on a node: {strategy}"
            );
            assert_eq!(
                l["updateStrategy"], *strategy,
                "DaemonSet/{name}: updateStrategy is not as rendered"
            );
        }
        other => panic!("{other}/{name}: no check for this kind"),
    }
}

/// A pod with an image pull secret through its ServiceAccount, the objects
/// the daemon reads when it creates the pod's VM.
fn create_workload(api: &KubeApi) -> String {
    let auth = r#"{"auths":{"registry.example":{"auth":"dXNlcjpwYXNz"}}}"#;
    let objects = [
        (
            "/api/v1/namespaces".to_owned(),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": WORKLOAD}}),
        ),
        (
            format!("/api/v1/namespaces/{WORKLOAD}/secrets"),
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "regcred"},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": auth},
            }),
        ),
        (
            format!("/api/v1/namespaces/{WORKLOAD}/serviceaccounts"),
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "app"},
                "imagePullSecrets": [{"name": "regcred"}],
            }),
        ),
        (
            format!("/api/v1/namespaces/{WORKLOAD}/pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app"},
                "spec": {
                    "serviceAccountName": "app",
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": "registry.example/app:1"}],
                },
            }),
        ),
    ];
    for (path, body) in objects {
        let (status, v) = api
            .request("POST", &path, None, Some(&body))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 201, "POST {path}: {v}");
    }
    auth.to_owned()
}

#[test]
fn helm_install_creates_the_rendered_objects_with_tight_rbac_and_uninstall_removes_them() {
    let test =
        "helm_install_creates_the_rendered_objects_with_tight_rbac_and_uninstall_removes_them";
    let Some(tools) = tools(test) else {
        return;
    };
    let api = KubeApi::start(&tools.kube).unwrap_or_else(|e| panic!("{e}"));
    say(&format!(
        "helm_install: etcd + kube-apiserver ready in {:.1?} at {}",
        api.startup, api.base_url
    ));
    let (status, version) = get(&api, "/version");
    assert_eq!(status, 200, "GET /version: {version}");
    let version = version["gitVersion"].as_str().unwrap_or("").to_owned();

    // What `helm template` renders for this release, against this server's
    // version (the chart's kubeVersion constraint is checked by both).
    let out = tools.run(
        &tools.helm,
        &[
            "template",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            &version,
        ],
    );
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        text(&out)
    );
    let rendered = tools.yaml_docs(&String::from_utf8_lossy(&out.stdout));
    let kinds: BTreeSet<(String, String)> = rendered.iter().map(id).collect();
    let expected: BTreeSet<(String, String)> = [
        ("ClusterRole", "podvisor"),
        ("ClusterRoleBinding", "podvisor"),
        ("ConfigMap", "peer-pods-cm"),
        ("DaemonSet", "podvisor"),
        ("Role", "podvisor"),
        ("RoleBinding", "podvisor"),
        ("Secret", "peer-pods-secret"),
        ("ServiceAccount", "podvisor"),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.to_owned()))
    .collect();
    assert_eq!(kinds, expected, "the default values render other objects");
    for doc in &rendered {
        let (status, _) = get(&api, &api_path(doc));
        assert_eq!(status, 404, "{:?} exists before helm install", id(doc));
    }
    assert_eq!(
        get(&api, CRD).0,
        404,
        "the PeerPod CRD exists before helm install"
    );

    // helm install (no --wait: there is no kubelet, the DaemonSet gets no
    // pods; the objects are what is checked).
    let installing = Instant::now();
    let out = tools.helm(
        &api,
        &[
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--timeout",
            "2m",
        ],
    );
    assert!(out.status.success(), "helm install failed:\n{}", text(&out));
    for doc in &rendered {
        let path = api_path(doc);
        let (status, live) = get(&api, &path);
        assert_eq!(status, 200, "GET {path} after helm install: {live}");
        assert_as_rendered(doc, &live);
    }
    // And the PeerPod CRD of crds/, with the reference's names and the
    // printer columns `kubectl get peerpods` shows.
    let (status, crd) = get(&api, CRD);
    assert_eq!(status, 200, "helm install did not install crds/: {crd}");
    assert_eq!(crd["spec"]["names"]["kind"], "PeerPod");
    let columns: Vec<&Value> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .map(|c| c.iter().map(|c| &c["name"]).collect())
        .unwrap_or_default();
    assert_eq!(
        columns,
        [
            &json!("Cloud Provider"),
            &json!("Instance ID"),
            &json!("Age")
        ]
    );
    say(&format!(
        "helm_install: helm install to all {} objects present and checked in {:.1?}",
        rendered.len(),
        installing.elapsed()
    ));
    // kubectl sees them too, in the namespace helm created.
    let out = tools.kubectl(
        &api,
        &[
            "get",
            "daemonset,serviceaccount,configmap,secret",
            "--namespace",
            NAMESPACE,
            "-o",
            "name",
        ],
    );
    assert!(out.status.success(), "kubectl get failed:\n{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for name in [
        "daemonset.apps/podvisor",
        "serviceaccount/podvisor",
        "configmap/peer-pods-cm",
        "secret/peer-pods-secret",
    ] {
        assert!(
            listed.lines().any(|l| l == name),
            "kubectl get does not list {name}:\n{listed}"
        );
    }

    // RBAC: the chart's ServiceAccount, through the daemon's own client.
    let auth = create_workload(&api);
    let sa = rendered
        .iter()
        .find(|d| id(d).0 == "ServiceAccount")
        .map(|d| id(d).1)
        .expect("a ServiceAccount");
    let token = api
        .service_account_token(NAMESPACE, &sa)
        .unwrap_or_else(|e| panic!("{e}"));
    for path in [
        format!("/api/v1/namespaces/{WORKLOAD}/pods/app"),
        format!("/api/v1/namespaces/{WORKLOAD}/serviceaccounts/app"),
        format!("/api/v1/namespaces/{WORKLOAD}/secrets/regcred"),
    ] {
        let (status, v) = api
            .request("GET", &path, Some(&token), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "GET {path} as {NAMESPACE}:{sa}: {v}");
    }
    let token_file = api.dir().join("sa-token");
    std::fs::write(&token_file, &token).expect("writing the token");
    let node = "worker-rbac";
    api.create_node(node).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kube = runtime
        .block_on(Kube::connect(
            KubeSource::Api(KubeApiConfig {
                server: api.base_url.clone(),
                token_file,
                ca_file: api.ca_file.clone(),
            }),
            node,
        ))
        .expect("the daemon's client");
    let client = Arc::new(PullSecrets::new(kube.clone()));
    // A PeerPod of a Running sandbox of the workload's pod, through the
    // daemon's own code: applied (a PATCH that creates: the API server
    // wants create and patch), listed, removed (a DELETE, then a JSON patch
    // of its finalizers).
    let sandbox = "a".repeat(64);
    let mut record = podvisor_state::InstanceRecord::pending(
        &sandbox,
        "app",
        WORKLOAD,
        podvisor_state::InstanceSpec::default(),
        0,
    );
    record.state = podvisor_state::State::Running;
    record.instance = Some(podvisor_state::InstanceRef {
        id: "i-rbac".into(),
        ips: vec![],
    });
    let view = podvisor::view::InstanceView::new();
    view.update(record.clone());
    let peerpods = PeerPods::new(kube.clone(), view, "local");
    assert_eq!(
        runtime.block_on(peerpods.apply(&record)),
        Ok(Applied::Written),
        "the daemon's PeerPod apply as {NAMESPACE}:{sa}"
    );
    let listed = runtime
        .block_on(peerpods.list())
        .expect("the daemon's PeerPod list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let peerpod = peerpods::object_name("app", &sandbox);
    let peerpod_path = format!(
        "/apis/confidentialcontainers.org/v1alpha1/namespaces/{WORKLOAD}/peerpods/{peerpod}"
    );
    let (_, live) = get(&api, &peerpod_path);
    assert_eq!(live["spec"]["instanceID"], "i-rbac", "{live}");
    assert_eq!(
        runtime.block_on(peerpods.remove(WORKLOAD, &peerpod, None)),
        Ok(Removed::Removed),
        "the daemon's PeerPod removal as {NAMESPACE}:{sa}"
    );
    assert_eq!(get(&api, &peerpod_path).0, 404, "the PeerPod is gone");
    // The node's peer pod capacity, through the daemon's own code.
    let capacity = NodeCapacity::new(kube.clone(), 7, "rbac-test".into());
    assert_eq!(
        runtime.block_on(capacity.reconcile()),
        Ok(Reconciled::Advertised),
        "the daemon's node patch as {NAMESPACE}:{sa}"
    );
    let (_, live) = get(&api, &format!("/api/v1/nodes/{node}"));
    assert_eq!(live["status"]["capacity"]["kata.peerpods.io/vm"], "7");
    assert_eq!(runtime.block_on(capacity.withdraw()), Ok(true));
    // The stale-sandbox check's list of the node's pods.
    let (status, v) = api
        .request(
            "GET",
            &format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"),
            Some(&token),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status, 200,
        "listing the node's pods as {NAMESPACE}:{sa}: {v}"
    );
    // The node-gone collector: the cluster's identity, the node list and
    // its Lease, taken and given up through the daemon's own code.
    let (_, system) = get(&api, "/api/v1/namespaces/kube-system");
    assert_eq!(
        runtime.block_on(podvisor::kubernetes::cluster::fetch(&kube)),
        Ok(system["metadata"]["uid"].as_str().unwrap_or("").to_owned()),
        "the cluster's identity as {NAMESPACE}:{sa}"
    );
    let (status, v) = api
        .request("GET", "/api/v1/nodes", Some(&token), None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "listing the nodes as {NAMESPACE}:{sa}: {v}");
    let mut lease = Lease::new(
        &kube,
        NAMESPACE,
        &podvisor::kubernetes::node_gone::lease_name("local"),
        "worker-rbac/rbac-test".into(),
        std::time::Duration::from_secs(15),
    );
    let now = tokio::time::Instant::now();
    assert_eq!(
        runtime.block_on(lease.try_acquire_or_renew(now)),
        Ok(true),
        "creating the Lease as {NAMESPACE}:{sa}"
    );
    assert_eq!(
        runtime.block_on(lease.try_acquire_or_renew(now)),
        Ok(true),
        "renewing the Lease as {NAMESPACE}:{sa}"
    );
    assert_eq!(runtime.block_on(lease.release()), Ok(true));
    let looked_up = runtime.block_on(client.auth_json("app", WORKLOAD));
    let looked_up: Value =
        serde_json::from_str(&looked_up.expect("the daemon's lookup found no pull secret"))
            .expect("auth.json is JSON");
    assert_eq!(
        looked_up["auths"]["registry.example"],
        serde_json::from_str::<Value>(&auth).expect("auth")["auths"]["registry.example"],
        "the daemon's lookup did not return the pod's pull secret"
    );
    // Outside the role: refused.
    for (method, path) in [
        ("GET", format!("/api/v1/namespaces/{WORKLOAD}/secrets")),
        ("DELETE", format!("/api/v1/namespaces/{WORKLOAD}/pods/app")),
        ("DELETE", format!("/api/v1/nodes/{node}")),
        ("GET", "/api/v1/namespaces/default".to_owned()),
        (
            "GET",
            format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/another"),
        ),
        (
            "GET",
            format!(
                "/apis/coordination.k8s.io/v1/namespaces/{WORKLOAD}/leases/podvisor-local-node-gone"
            ),
        ),
        ("GET", format!("/api/v1/namespaces/{WORKLOAD}/configmaps")),
        (
            "GET",
            format!("/api/v1/namespaces/{NAMESPACE}/configmaps/peer-pods-cm"),
        ),
        ("GET", peerpod_path.clone()),
        ("DELETE", CRD.to_owned()),
    ] {
        let (status, v) = api
            .request(method, &path, Some(&token), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            status, 403,
            "{method} {path} as {NAMESPACE}:{sa} was not refused: {}",
            v["kind"]
        );
    }
    // A token that is not the ServiceAccount's is not authenticated at all
    // (so the 403s above are the role's, for that account).
    let (status, _) = api
        .request(
            "GET",
            &format!("/api/v1/namespaces/{WORKLOAD}/pods/app"),
            Some("not-a-token"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 401, "a bogus token was accepted");

    // helm uninstall removes every object.
    let out = tools.helm(
        &api,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
        ],
    );
    assert!(
        out.status.success(),
        "helm uninstall failed:\n{}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for doc in &rendered {
        let path = api_path(doc);
        loop {
            let (status, live) = get(&api, &path);
            if status == 404 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{path} still there after helm uninstall (HTTP {status}): {live}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Helm leaves crds/ at uninstall (PeerPods may still be there, each
    // waiting for its pod VM to go), and skips a CRD that exists at
    // install: as it does when the reference's is there.
    assert_eq!(
        get(&api, CRD).0,
        200,
        "helm uninstall removed the PeerPod CRD"
    );
    let out = tools.helm(
        &api,
        &[
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--timeout",
            "2m",
        ],
    );
    assert!(
        out.status.success(),
        "helm install over an existing PeerPod CRD failed:\n{}",
        text(&out)
    );
    let out = tools.helm(&api, &["uninstall", RELEASE, "--namespace", NAMESPACE]);
    assert!(
        out.status.success(),
        "helm uninstall failed:\n{}",
        text(&out)
    );
}
