//! The pod VM's `auth.json`: the daemon (a child process, local provider)
//! reads the pod's and its ServiceAccount's image pull secrets from the
//! Kubernetes API and puts the registry credentials in the user data.
//!
//! The API here is a small HTTPS server on loopback speaking the real wire
//! protocol — HTTP/1.1 over TLS, bearer-token authentication, the v1 paths
//! and JSON of Pods, ServiceAccounts and Secrets (base64 `data`), and
//! Kubernetes' 404 `Status` for a missing one — because it records what
//! the daemon sent (paths, the token) and can serve odd objects. The same
//! lookup runs against a real kube-apiserver, under the chart's RBAC, in
//! `tests/helm_install.rs`.

mod common;

use base64::Engine as _;
use common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-service-account-token";

/// The fake API: its port, its CA (PEM), and the requests it saw
/// (path, Authorization header).
struct Api {
    port: u16,
    ca_pem: String,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

async fn serve_api(objects: HashMap<String, serde_json::Value>) -> Api {
    use rustls::pki_types::pem::PemObject;
    let (ca_pem, cert_pem, key_pem) =
        identity_from_new_ca("127.0.0.1", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let objects = Arc::new(objects);
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen, objects) = (acceptor.clone(), seen.clone(), objects.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let mut lines = head.split("\r\n");
                    let request_line = lines.next().unwrap_or_default().to_owned();
                    let path = request_line
                        .split(' ')
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    let auth = lines
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                        .map(|(_, v)| v.trim().to_owned())
                        .unwrap_or_default();
                    seen.lock().unwrap().push((path.clone(), auth.clone()));
                    let (status, body) = if auth != format!("Bearer {TOKEN}") {
                        (
                            "401 Unauthorized",
                            serde_json::json!({"kind": "Status", "code": 401}),
                        )
                    } else if !request_line.starts_with("GET ") {
                        (
                            "405 Method Not Allowed",
                            serde_json::json!({"kind": "Status", "code": 405}),
                        )
                    } else if let Some(o) = objects.get(&path) {
                        ("200 OK", o.clone())
                    } else {
                        (
                            "404 Not Found",
                            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                        )
                    };
                    let body = body.to_string();
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    }
    Api { port, ca_pem, seen }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn secret(key: &str, json: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "type": if key == ".dockercfg" { "kubernetes.io/dockercfg" } else { "kubernetes.io/dockerconfigjson" },
        "data": { key: b64(&json.to_string()) }
    })
}

/// The daemon pointed at `api` (or at `server` when given).
fn setup_for(api: &Api, server: Option<String>) -> Setup {
    let mut setup = Setup::new();
    let token = setup.root.path().join("token");
    let ca = setup.root.path().join("ca.crt");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::write(&ca, &api.ca_pem).unwrap();
    setup.global.extend([
        "--kube-api-server".into(),
        server.unwrap_or(format!("https://127.0.0.1:{}", api.port)),
        "--kube-token-file".into(),
        token.to_string_lossy().into_owned(),
        "--kube-ca-file".into(),
        ca.to_string_lossy().into_owned(),
    ]);
    setup
}

/// Runs a pod VM for pod `ns/pod`; returns the path its `auth.json` would
/// have, and the sandbox id.
async fn start_pod(daemon: &Daemon, setup: &Setup, pod: &str, ns: &str) -> (PathBuf, String) {
    let client = daemon.client().await;
    let id = sandbox_id();
    client.create(&id, pod_annotations(pod, ns)).await.unwrap();
    client.start(&id).await.unwrap();
    let instance = daemon.instance(&id).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = setup
        .local_dir()
        .join("instances")
        .join(instance)
        .join("run/peerpod");
    assert!(run.join("apf.json").exists(), "user data was applied");
    (run.join("auth.json"), id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_vm_gets_the_pods_registry_credentials_and_no_log_line_has_them() {
    let ns = "/api/v1/namespaces/shop";
    let objects = HashMap::from([
        (
            format!("{ns}/pods/web"),
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                "spec": {"serviceAccountName": "builder",
                         "imagePullSecrets": [{"name": "pod-cred"}, {"name": "gone"}],
                         "containers": [{"name": "app", "image": "b.io/app"}]}}),
        ),
        (
            format!("{ns}/serviceaccounts/builder"),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "imagePullSecrets": [{"name": "sa-cred"}]}),
        ),
        (
            format!("{ns}/secrets/sa-cred"),
            secret(
                ".dockerconfigjson",
                &serde_json::json!({"auths": {
                    "a.io": {"username": "robot", "password": "s3cr3t-sa"},
                    "b.io": {"auth": b64("old:overridden")}}}),
            ),
        ),
        (
            format!("{ns}/secrets/pod-cred"),
            secret(
                ".dockercfg",
                &serde_json::json!({"b.io": {"auth": b64("pod:s3cr3t-pod")}}),
            ),
        ),
        (
            format!("{ns}/pods/plain"),
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": {}}),
        ),
        (
            format!("{ns}/serviceaccounts/default"),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount"}),
        ),
    ]);
    let api = serve_api(objects).await;
    let mut setup = setup_for(&api, None);
    // Every crate at its most talkative: the Kubernetes client (kube,
    // tower, hyper, rustls) must still print no token and no secret.
    setup.global.extend(["--log-level".into(), "trace".into()]);
    let daemon = setup.start().await;

    let (auth_json, id) = start_pod(&daemon, &setup, "web", "shop").await;
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&auth_json)
            .unwrap_or_else(|e| panic!("auth.json: {e}\n{}", daemon.log_text())),
    )
    .unwrap();
    assert_eq!(
        written,
        serde_json::json!({"auths": {
            "a.io": {"auth": b64("robot:s3cr3t-sa")},
            "b.io": {"auth": b64("pod:s3cr3t-pod")}}})
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&auth_json).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "auth.json is a secret in the VM too");
    }
    let seen = api.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(_, auth)| auth == &format!("Bearer {TOKEN}")),
        "{seen:?}"
    );
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "/api/v1/namespaces/shop/pods/web",
        "/api/v1/namespaces/shop/serviceaccounts/builder",
        "/api/v1/namespaces/shop/secrets/sa-cred",
        "/api/v1/namespaces/shop/secrets/pod-cred",
        "/api/v1/namespaces/shop/secrets/gone",
    ] {
        assert!(paths.contains(&want), "{want} not requested: {paths:?}");
    }

    // A pod without pull secrets: no auth.json at all.
    let (plain_auth, plain_id) = start_pod(&daemon, &setup, "plain", "shop").await;
    assert!(!plain_auth.exists());

    let log = daemon.log_text();
    assert!(
        log.contains("TRACE HTTP{http.method=GET") && log.contains("hyper_util"),
        "the HTTP client's trace lines are in the log:\n{log}"
    );
    for secret in [
        "s3cr3t",
        &b64("robot:s3cr3t-sa"),
        &b64("pod:s3cr3t-pod"),
        TOKEN,
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
    let client = daemon.client().await;
    client.stop(&id).await.unwrap();
    client.stop(&plain_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_fails_leaves_the_pod_vm_without_credentials_and_says_why() {
    let api = serve_api(HashMap::new()).await;
    // Nothing listens on this port.
    let setup = setup_for(&api, Some(format!("https://127.0.0.1:{}", free_port())));
    let daemon = setup.start().await;
    let (auth_json, id) = start_pod(&daemon, &setup, "web", "shop").await;
    assert!(!auth_json.exists());
    assert!(
        daemon
            .log_text()
            .contains("cannot read the pod's image pull secrets"),
        "{}",
        daemon.log_text()
    );
    daemon.client().await.stop(&id).await.unwrap();

    // An API that answers 404 for the pod: the same, with the reason.
    let setup = setup_for(&api, None);
    let daemon = setup.start().await;
    let (auth_json, id) = start_pod(&daemon, &setup, "nowhere", "shop").await;
    assert!(!auth_json.exists());
    eventually(
        "the reason in the log",
        Duration::from_secs(5),
        async || {
            daemon
                .log_text()
                .contains("pod shop/nowhere not found")
                .then_some(())
        },
    )
    .await;
    daemon.client().await.stop(&id).await.unwrap();
}

#[test]
fn a_bad_api_url_or_ca_fails_start_naming_the_flag() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--kube-api-server".into(), "http://127.0.0.1:1".into()]);
    let out = setup.command().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--kube-api-server") && err.contains("not an https:// URL"),
        "{err}"
    );

    let mut setup = Setup::new();
    setup.global.extend([
        "--kube-api-server".into(),
        "https://127.0.0.1:1".into(),
        "--kube-ca-file".into(),
        "/nonexistent/ca.crt".into(),
    ]);
    let out = setup.command().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--kube-ca-file") && err.contains("/nonexistent/ca.crt"),
        "{err}"
    );
}
