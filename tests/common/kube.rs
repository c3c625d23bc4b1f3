//! A real Kubernetes API server for tests: etcd and kube-apiserver on
//! random loopback ports, their data in a temporary directory (on
//! `/dev/shm` when there is one), a fresh PKI (rcgen), a kubeconfig for an
//! admin (`O=system:masters`), all stopped on drop. On demand, a
//! kube-scheduler ([`KubeApi::start_scheduler`]) and a
//! kube-controller-manager ([`KubeApi::start_controller_manager`]) run
//! against it as the admin; there is no kubelet: [`KubeApi::create_node`]
//! and [`KubeApi::sync_allocatable`] play its part for a node.
//!
//! The binaries: `KUBE_APISERVER`, `ETCD`, `KUBE_SCHEDULER` and
//! `KUBE_CONTROLLER_MANAGER` name them, else they are looked up on `PATH`.
//! `scripts/kube-apiserver.sh` builds kube-apiserver, kube-scheduler and
//! kube-controller-manager (Debian's Kubernetes 1.20 source) into a cache
//! and installs etcd; it prints the assignments (`eval
//! "$(scripts/kube-apiserver.sh)"`; `scripts/test.sh` does it). Nothing
//! listens or dials outside 127.0.0.1: `--endpoint-reconciler-type=none`
//! keeps the `kubernetes` Service's endpoints empty, nothing here uses the
//! service range, and the scheduler and controller manager serve nothing
//! (`--port=0 --secure-port=0`).

#![allow(dead_code)]

use podvisor_podvm::testing::free_port;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the API server may take to answer `/readyz` (it takes ~3.5 s
/// on an idle 2-core machine; CI shares the cores).
const READY_LIMIT: Duration = Duration::from_secs(120);

/// How long kube-scheduler must keep running after it starts to count as
/// started: with its ports off there is nothing to ask, and a refused flag,
/// configuration or kubeconfig ends it well within this.
const SETTLE: Duration = Duration::from_secs(2);

/// The binaries the harness runs.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    /// `None` when it does not run ([`KubeBinaries::require_scheduler`]
    /// says why).
    pub kube_scheduler: Option<PathBuf>,
    /// `None` when it does not run
    /// ([`KubeBinaries::require_controller_manager`] says why).
    pub kube_controller_manager: Option<PathBuf>,
}

/// The program the variable `var` names, else `default` (looked up on
/// `PATH`).
fn tool(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Whether `program --version` runs and succeeds; the reason when not.
fn runnable(program: &Path) -> Result<(), String> {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{} --version` failed ({})",
            program.display(),
            out.status
        )),
        Err(e) => Err(format!("{} cannot run: {e}", program.display())),
    }
}

/// The program of `var`/`default` if it runs, else why not.
fn optional_tool(var: &str, default: &str) -> Result<PathBuf, String> {
    let program = tool(var, default);
    runnable(&program)
        .map(|()| program)
        .map_err(|e| format!("no runnable {default} ({var}, else PATH): {e}"))
}

impl KubeBinaries {
    /// `KUBE_APISERVER` and `ETCD`, else from `PATH`; an error saying which
    /// one does not run. `KUBE_SCHEDULER` and `KUBE_CONTROLLER_MANAGER`
    /// (else `PATH`) likewise, but one that does not run is `None`, not an
    /// error: only the tests that start it need it.
    pub fn find() -> Result<Self, String> {
        let found = Self {
            kube_apiserver: tool("KUBE_APISERVER", "kube-apiserver"),
            etcd: tool("ETCD", "etcd"),
            kube_scheduler: optional_tool("KUBE_SCHEDULER", "kube-scheduler").ok(),
            kube_controller_manager: optional_tool(
                "KUBE_CONTROLLER_MANAGER",
                "kube-controller-manager",
            )
            .ok(),
        };
        for program in [&found.kube_apiserver, &found.etcd] {
            runnable(program)?;
        }
        Ok(found)
    }

    /// The kube-scheduler, or why there is none (the variable, the program
    /// tried and how it failed).
    pub fn require_scheduler(&self) -> Result<PathBuf, String> {
        match &self.kube_scheduler {
            Some(program) => Ok(program.clone()),
            None => optional_tool("KUBE_SCHEDULER", "kube-scheduler"),
        }
    }

    /// The kube-controller-manager, or why there is none (the variable,
    /// the program tried and how it failed).
    pub fn require_controller_manager(&self) -> Result<PathBuf, String> {
        match &self.kube_controller_manager {
            Some(program) => Ok(program.clone()),
            None => optional_tool("KUBE_CONTROLLER_MANAGER", "kube-controller-manager"),
        }
    }

    /// What test `test` of the file `file` needs: the API server and etcd,
    /// and the scheduler or the controller manager as `needs` says; or
    /// `None` after `tools::skip` said why and how to build them (under
    /// `CI=true`, a failure).
    pub fn for_test(file: &str, test: &str, needs: Needs) -> Option<Self> {
        let found = Self::find().and_then(|b| {
            if needs.scheduler {
                b.require_scheduler()?;
            }
            if needs.controller_manager {
                b.require_controller_manager()?;
            }
            Ok(b)
        });
        match found {
            Ok(b) => Some(b),
            Err(why) => {
                crate::tools::skip(
                    file,
                    test,
                    &format!(
                        "{why}; build them with scripts/kube-apiserver.sh and export what it \
                         prints (eval \"$(scripts/kube-apiserver.sh)\")"
                    ),
                );
                None
            }
        }
    }
}

/// What a test needs besides kube-apiserver and etcd.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// kube-scheduler.
    pub scheduler: bool,
    /// kube-controller-manager.
    pub controller_manager: bool,
}

/// A running etcd + kube-apiserver, and the kube-scheduler and
/// kube-controller-manager once started; all are killed on drop.
pub struct KubeApi {
    /// The admin's kubeconfig (for `kubectl` and `helm --kubeconfig`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub base_url: String,
    /// The cluster CA, PEM.
    pub ca_file: PathBuf,
    /// How long start-up took, until `/readyz` answered 200 and the
    /// `default` namespace existed.
    pub startup: Duration,
    admin: ureq::Agent,
    anonymous: ureq::Agent,
    scheduler: Option<Child>,
    controller_manager: Option<Child>,
    apiserver: Child,
    etcd: Child,
    // Last: removed after both processes are gone.
    dir: tempfile::TempDir,
}

fn pem_certs(pem: &str) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem.as_bytes())
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect()
}

fn agent(ca_pem: &str, client: Option<(&str, &str)>) -> Result<ureq::Agent, String> {
    let mut tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&pem_certs(ca_pem)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()));
    if let Some((cert, key)) = client {
        let key = ureq::tls::PrivateKey::from_pem(key.as_bytes())
            .map_err(|e| format!("client key: {e}"))?
            .to_owned();
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(
            &pem_certs(cert),
            key,
        )));
    }
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into())
}

struct Pki {
    ca: String,
    serving: (String, String),
    admin: (String, String),
    service_account_key: String,
    service_account_public: String,
}

fn pki() -> Result<Pki, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "podvisor test kubernetes CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec!["localhost".to_owned()])?;
    serving
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    serving.distinguished_name = DistinguishedName::new();
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_pem = serving.signed_by(&serving_key, &issuer)?.pem();

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = DistinguishedName::new();
    admin
        .distinguished_name
        .push(DnType::CommonName, "podvisor-test-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_pem = admin.signed_by(&admin_key, &issuer)?.pem();

    let sa_key = KeyPair::generate()?;
    Ok(Pki {
        ca: ca_pem,
        serving: (serving_pem, serving_key.serialize_pem()),
        admin: (admin_pem, admin_key.serialize_pem()),
        service_account_public: sa_key.public_key_pem(),
        service_account_key: sa_key.serialize_pem(),
    })
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// An error naming `name` with the end of its `log` if `child` has exited.
fn exited(child: &mut Child, log: &Path, name: &str) -> Result<(), String> {
    match child.try_wait() {
        Ok(Some(status)) => Err(format!(
            "{name} exited ({status}); its log ends:\n{}",
            log_tail(log)
        )),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{} cannot start: {e}", program.display()))
}

impl KubeApi {
    /// Starts etcd and kube-apiserver and waits until `/readyz` is 200.
    pub fn start(bin: &KubeBinaries) -> Result<Self, String> {
        let started = Instant::now();
        let shm = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("podvisor-kube-");
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        }
        .map_err(|e| format!("temporary directory: {e}"))?;
        let path = |name: &str| dir.path().join(name);
        let write = |name: &str, text: &str| -> Result<String, String> {
            let p = path(name);
            std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(p.display().to_string())
        };

        let pki = pki().map_err(|e| format!("generating the PKI: {e}"))?;
        let ca_file = write("ca.crt", &pki.ca)?;
        let serving_cert = write("apiserver.crt", &pki.serving.0)?;
        let serving_key = write("apiserver.key", &pki.serving.1)?;
        let sa_key = write("sa.key", &pki.service_account_key)?;
        let sa_pub = write("sa.pub", &pki.service_account_public)?;

        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = vec![
            "--name=podvisor-test".into(),
            format!("--data-dir={}", path("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=podvisor-test={peer_url}"),
            "--log-level=warn".into(),
        ];
        let etcd_log = path("etcd.log");
        let mut etcd = spawn(&bin.etcd, &etcd_args, &etcd_log)?;

        let port = free_port();
        let base_url = format!("https://127.0.0.1:{port}");
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--tls-cert-file={serving_cert}"),
            format!("--tls-private-key-file={serving_key}"),
            format!("--client-ca-file={ca_file}"),
            format!("--service-account-issuer={issuer}"),
            format!("--api-audiences={issuer}"),
            format!("--service-account-key-file={sa_pub}"),
            format!("--service-account-signing-key-file={sa_key}"),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=RBAC".into(),
            "--enable-priority-and-fairness=false".into(),
            format!("--cert-dir={}", path("certs").display()),
        ];
        let apiserver_log = path("kube-apiserver.log");
        let apiserver = match spawn(&bin.kube_apiserver, &apiserver_args, &apiserver_log) {
            Ok(child) => child,
            Err(e) => {
                let _ = etcd.kill();
                let _ = etcd.wait();
                return Err(e);
            }
        };

        let admin = agent(&pki.ca, Some((&pki.admin.0, &pki.admin.1)))?;
        let anonymous = agent(&pki.ca, None)?;
        let kubeconfig = path("kubeconfig");
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": base_url,
                "certificate-authority-data": b64(&pki.ca),
            }}],
            "users": [{"name": "admin", "user": {
                "client-certificate-data": b64(&pki.admin.0),
                "client-key-data": b64(&pki.admin.1),
            }}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        });
        write("kubeconfig", &config.to_string())?;

        let mut api = Self {
            kubeconfig,
            base_url,
            ca_file: PathBuf::from(ca_file),
            startup: Duration::ZERO,
            admin,
            anonymous,
            scheduler: None,
            controller_manager: None,
            apiserver,
            etcd,
            dir,
        };
        loop {
            // Ready, and the `default` namespace made: the API server makes
            // it a moment after `/readyz` first answers 200, and a test's
            // first namespaced create must not meet a 404.
            if let Ok((200, _)) = api.request("GET", "/readyz", None, None)
                && let Ok((200, _)) = api.request("GET", "/api/v1/namespaces/default", None, None)
            {
                break;
            }
            for (child, log, name) in [
                (&mut api.etcd, &etcd_log, "etcd"),
                (&mut api.apiserver, &apiserver_log, "kube-apiserver"),
            ] {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "{name} exited ({status}); its log ends:\n{}",
                        log_tail(log)
                    ));
                }
            }
            if started.elapsed() > READY_LIMIT {
                return Err(format!(
                    "kube-apiserver not ready after {READY_LIMIT:?}; its log ends:\n{}",
                    log_tail(&apiserver_log)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        api.startup = started.elapsed();
        Ok(api)
    }

    /// The temporary directory the servers' data and logs are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `method path` with `body` as JSON: as the admin, or with `token` as
    /// the bearer (and no client certificate, which would win). `GET` and
    /// `DELETE` without a body, `POST`, `PUT` and `PATCH` (a JSON merge
    /// patch, `application/merge-patch+json`) with one. The status and the
    /// body as JSON (`Value::Null` when it is not JSON); an error only when
    /// there is no HTTP answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base_url);
        let agent = if token.is_some() {
            &self.anonymous
        } else {
            &self.admin
        };
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", None) => with_auth(agent.get(&url), auth.as_deref()).call(),
            ("DELETE", None) => with_auth(agent.delete(&url), auth.as_deref()).call(),
            ("POST", Some(b)) => with_auth(agent.post(&url), auth.as_deref()).send_json(b),
            ("PUT", Some(b)) => with_auth(agent.put(&url), auth.as_deref()).send_json(b),
            ("PATCH", Some(b)) => with_auth(agent.patch(&url), auth.as_deref())
                .content_type("application/merge-patch+json")
                .send_json(b),
            _ => return Err(format!("{method} with body {body:?} is not supported here")),
        };
        let mut response = result.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {url}: {e}"))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// A token for a ServiceAccount from the TokenRequest API (the admin
    /// asks for it; one hour, the API audiences).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String, String> {
        let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token");
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        });
        match self.request("POST", &path, None, Some(&body))? {
            (201 | 200, v) => v["status"]["token"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("POST {path}: no token in {v}")),
            (status, v) => Err(format!("POST {path}: HTTP {status}: {v}")),
        }
    }

    /// Starts kube-scheduler against the API server as the admin
    /// (`--leader-elect=false`, no ports: `--port=0 --secure-port=0`), its
    /// log `kube-scheduler.log` in [`KubeApi::dir`]. Returns once it has run
    /// for two seconds (there is nothing to ask); an error with the log's
    /// end if it exits before, or if it is not there or already started.
    pub fn start_scheduler(&mut self, bin: &KubeBinaries) -> Result<(), String> {
        if self.scheduler.is_some() {
            return Err("kube-scheduler is already running".to_owned());
        }
        let program = bin.require_scheduler()?;
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
        ];
        let log = self.dir().join("kube-scheduler.log");
        let mut child = spawn(&program, &args, &log)?;
        let started = Instant::now();
        while started.elapsed() < SETTLE {
            exited(&mut child, &log, "kube-scheduler")?;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.scheduler = Some(child);
        Ok(())
    }

    /// Starts kube-controller-manager against the API server as the admin
    /// (`--leader-elect=false`, no ports, every controller but the node
    /// and cloud ones, the controllers sharing the admin's credentials;
    /// the service-account token controller signs with the API server's
    /// service-account key, and `kube-root-ca.crt` carries the cluster CA),
    /// its log `kube-controller-manager.log` in [`KubeApi::dir`]. Returns
    /// once its controllers run (the root CA publisher has made
    /// `kube-root-ca.crt` in `default`); an error with the log's end if it
    /// exits or is not there by then (two minutes), or if it is not there
    /// or already started.
    pub fn start_controller_manager(&mut self, bin: &KubeBinaries) -> Result<(), String> {
        if self.controller_manager.is_some() {
            return Err("kube-controller-manager is already running".to_owned());
        }
        let program = bin.require_controller_manager()?;
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service".into(),
            "--use-service-account-credentials=false".into(),
            format!(
                "--service-account-private-key-file={}",
                self.dir().join("sa.key").display()
            ),
            format!("--root-ca-file={}", self.ca_file.display()),
        ];
        let log = self.dir().join("kube-controller-manager.log");
        // Killed on drop from here on.
        self.controller_manager = Some(spawn(&program, &args, &log)?);
        let started = Instant::now();
        let path = "/api/v1/namespaces/default/configmaps/kube-root-ca.crt";
        loop {
            let child = self.controller_manager.as_mut().expect("started above");
            let mut failed = exited(child, &log, "kube-controller-manager").err();
            if failed.is_none() {
                if let Ok((200, _)) = self.request("GET", path, None, None) {
                    return Ok(());
                }
                if started.elapsed() > READY_LIMIT {
                    failed = Some(format!(
                        "kube-controller-manager made no {path} in {READY_LIMIT:?}; its log \
                         ends:\n{}",
                        log_tail(&log)
                    ));
                }
            }
            if let Some(e) = failed {
                if let Some(mut child) = self.controller_manager.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ok while every process the harness started still runs; else an
    /// error naming the first one that exited, with the end of its log (for
    /// a test's wait loop to fail at once rather than time out).
    pub fn running(&mut self) -> Result<(), String> {
        let dir = self.dir.path().to_owned();
        let processes = [
            (Some(&mut self.etcd), "etcd"),
            (Some(&mut self.apiserver), "kube-apiserver"),
            (self.scheduler.as_mut(), "kube-scheduler"),
            (self.controller_manager.as_mut(), "kube-controller-manager"),
        ];
        for (child, name) in processes {
            if let Some(child) = child {
                exited(child, &dir.join(format!("{name}.log")), name)?;
            }
        }
        Ok(())
    }

    /// Plays the kubelet registering node `name`: creates the Node (labels
    /// `kubernetes.io/hostname`, `kubernetes.io/os` and `kubernetes.io/arch`),
    /// sets its status through the status subresource (condition Ready
    /// True; capacity and allocatable cpu 8, memory 32Gi, pods 110), and
    /// removes the `node.kubernetes.io/not-ready` taint the
    /// TaintNodesByCondition admission plugin puts on a new node. An error
    /// with the HTTP status and body of the first call refused.
    pub fn create_node(&self, name: &str) -> Result<(), String> {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch,
                },
            },
        });
        self.expect("POST", "/api/v1/nodes", Some(&node), &[201])?;

        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let resources = json!({"cpu": "8", "memory": "32Gi", "pods": "110"});
        let status = json!({"status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status (podvisor test harness)",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }});
        let path = format!("/api/v1/nodes/{name}");
        self.expect("PATCH", &format!("{path}/status"), Some(&status), &[200])?;

        // The taint: read, then write the rest back at that resourceVersion
        // (again on a conflict).
        for _ in 0..5 {
            let node = self.expect("GET", &path, None, &[200])?;
            let taints = node["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let kept: Vec<Value> = taints
                .iter()
                .filter(|t| t["key"] != "node.kubernetes.io/not-ready")
                .cloned()
                .collect();
            if kept.len() == taints.len() {
                return Ok(());
            }
            let patch = json!({
                "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                "spec": {"taints": kept},
            });
            match self.request("PATCH", &path, None, Some(&patch))? {
                (200, _) => return Ok(()),
                (409, _) => continue,
                (status, v) => return Err(format!("PATCH {path}: HTTP {status}: {v}")),
            }
        }
        Err(format!("PATCH {path}: conflicts five times over"))
    }

    /// Plays the kubelet's copy of extended resources: reads node `node`
    /// and merge-patches its `status.allocatable` (status subresource) so
    /// that every `status.capacity` key with a `/` (an extended resource)
    /// has the capacity's value, and such a key no longer in the capacity
    /// is gone (`null`). The other keys are left alone; nothing is written
    /// when nothing differs. An error with the HTTP status and body of a
    /// refused call.
    pub fn sync_allocatable(&self, node: &str) -> Result<(), String> {
        let path = format!("/api/v1/nodes/{node}");
        let current = self.expect("GET", &path, None, &[200])?;
        let empty = serde_json::Map::new();
        let capacity = current["status"]["capacity"].as_object().unwrap_or(&empty);
        let allocatable = current["status"]["allocatable"]
            .as_object()
            .unwrap_or(&empty);
        let mut patch = serde_json::Map::new();
        for (key, value) in capacity.iter().filter(|(k, _)| k.contains('/')) {
            if allocatable.get(key) != Some(value) {
                patch.insert(key.clone(), value.clone());
            }
        }
        for key in allocatable.keys().filter(|k| k.contains('/')) {
            if !capacity.contains_key(key) {
                patch.insert(key.clone(), Value::Null);
            }
        }
        if patch.is_empty() {
            return Ok(());
        }
        let body = json!({"status": {"allocatable": patch}});
        self.expect("PATCH", &format!("{path}/status"), Some(&body), &[200])?;
        Ok(())
    }

    /// [`KubeApi::request`] as the admin, the body when the status is one
    /// of `ok`, else an error with the status and body.
    fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<Value, String> {
        match self.request(method, path, None, body)? {
            (status, v) if ok.contains(&status) => Ok(v),
            (status, v) => Err(format!("{method} {path}: HTTP {status}: {v}")),
        }
    }
}

fn with_auth<B>(request: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => request.header("Authorization", a),
        None => request,
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let components = [&mut self.scheduler, &mut self.controller_manager];
        for child in components.into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
