//! The Kubernetes API: one client (kube-rs) for everything the daemon asks
//! of it — the pods' image pull secrets ([`crate::pull_secrets`]), the
//! node's extended resource ([`node`]), the pods whose sandboxes
//! outlived them ([`stale`]) and the sandboxes' PeerPod objects
//! ([`peerpods`]).
//!
//! Where the API is, in this order: `--kubeconfig` (a kubeconfig file, for
//! development); `--kube-api-server` with `--kube-token-file` and
//! `--kube-ca-file`; in a pod, the in-cluster API
//! (`KUBERNETES_SERVICE_HOST`/`_PORT`, the ServiceAccount's token and CA,
//! both re-read as they rotate). Without any, every feature that needs the
//! API is off, start-up says so, and `/v1/status` shows `kubernetes: null`.
//!
//! Every request is counted by verb in
//! [`crate::metrics::KUBE_API_REQUESTS`] with its outcome. The token never
//! reaches a log line or an error: kube-rs keeps it as a secret string.

pub mod absence;
pub mod cluster;
pub mod lease;
pub mod node;
pub mod node_gone;
pub mod peerpods;
pub mod stale;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest a TCP connect and TLS handshake to the API may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one API answer may take (no request here is a watch).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// In-cluster ServiceAccount token.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// In-cluster API CA.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// In-cluster: the namespace of the daemon's pod.
pub const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// An API server by URL, with a bearer token file and a CA.
#[derive(Debug, Clone)]
pub struct KubeApiConfig {
    /// `https://host:port`.
    pub server: String,
    /// The bearer token's file (re-read as it rotates).
    pub token_file: PathBuf,
    /// The API server's CA, PEM.
    pub ca_file: PathBuf,
}

/// Where the Kubernetes API is, as the flags and the environment say.
#[derive(Debug, Clone)]
pub enum KubeSource {
    /// `--kubeconfig`: its current context.
    Kubeconfig(PathBuf),
    /// `--kube-api-server`, or in-cluster: a URL, a token file and a CA.
    Api(KubeApiConfig),
}

impl KubeSource {
    /// `kubeconfig`, else the API `server` names, else the in-cluster one
    /// from `service_host`/`service_port` (`KUBERNETES_SERVICE_HOST`/`_PORT`,
    /// port 443 by default), the last two with `token_file` and `ca_file`;
    /// `None` without any. Empty values count as absent.
    pub fn resolve(
        kubeconfig: Option<&Path>,
        server: Option<&str>,
        service_host: Option<&str>,
        service_port: Option<&str>,
        token_file: &Path,
        ca_file: &Path,
    ) -> Option<Self> {
        if let Some(path) = kubeconfig.filter(|p| !p.as_os_str().is_empty()) {
            return Some(Self::Kubeconfig(path.to_owned()));
        }
        let server = match (server, service_host) {
            (Some(s), _) if !s.is_empty() => s.trim_end_matches('/').to_owned(),
            (_, Some(host)) if !host.is_empty() => {
                let port = service_port.filter(|p| !p.is_empty()).unwrap_or("443");
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
            _ => return None,
        };
        Some(Self::Api(KubeApiConfig {
            server,
            token_file: token_file.to_owned(),
            ca_file: ca_file.to_owned(),
        }))
    }
}

/// A client of the Kubernetes API, and this node's name in it.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    /// The API's URL, for logs and `/v1/status`.
    server: String,
    /// This node's name (`--node-name`, `NODE_NAME`).
    node: String,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kube({}, node {})", self.server, self.node)
    }
}

impl Kube {
    /// A client for `source`, acting for node `node`. Nothing is sent yet:
    /// an API that is down at start does not stop the daemon.
    ///
    /// # Errors
    /// A message naming the flag and the value: a server that is not an
    /// `https://` URL; a CA file that cannot be read, is not PEM or holds
    /// no certificate; a kubeconfig that cannot be read or has no usable
    /// current context.
    pub async fn connect(source: KubeSource, node: &str) -> Result<Self, String> {
        // kube-rs builds its TLS with the process's default provider: ring,
        // as the rest of the daemon (an error means one is installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut bearer = None;
        let mut config = match source {
            KubeSource::Kubeconfig(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
            }
            KubeSource::Api(api) => {
                bearer = Some(Arc::new(BearerFile::new(api.token_file.clone())));
                config_for(&api)?
            }
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.reset_reader_on_write = true;
        config.write_timeout = Some(CONNECT_TIMEOUT);
        // Retries are the callers' business (each feature has its own
        // cadence), and a retry would hide an error from the metric.
        config.default_retry = false;
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let builder = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| format!("the Kubernetes API client for {server}: {e}"))?;
        let client = match bearer {
            None => builder.build(),
            Some(bearer) => builder
                .with_layer(&tower::util::MapRequestLayer::new(
                    move |mut request: http::Request<kube::client::Body>| {
                        if let Some(value) = bearer.header() {
                            request
                                .headers_mut()
                                .insert(http::header::AUTHORIZATION, value);
                        }
                        request
                    },
                ))
                .build(),
        };
        Ok(Self {
            client,
            server,
            node: node.to_owned(),
        })
    }

    /// The API's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }
}

/// A kube-rs configuration for a URL, token file and CA file: the token
/// file and the CA are re-read by kube-rs as they rotate (about once a
/// minute).
fn config_for(api: &KubeApiConfig) -> Result<kube::Config, String> {
    if !api.server.starts_with("https://") {
        return Err(format!(
            "--kube-api-server: '{}' is not an https:// URL (the Kubernetes API speaks TLS)",
            api.server
        ));
    }
    let url: http::Uri = api
        .server
        .parse()
        .map_err(|e| format!("--kube-api-server: '{}' is not a URL: {e}", api.server))?;
    let ca = &api.ca_file;
    let pem = std::fs::read(ca).map_err(|e| format!("--kube-ca-file {}: {e}", ca.display()))?;
    let certs =
        pem_certificates(&pem).map_err(|e| format!("--kube-ca-file {}: {e}", ca.display()))?;
    let mut config = kube::Config::new(url);
    config.root_cert = Some(certs);
    config.root_cert_file = Some(ca.clone());
    // The token is added by a `BearerFile` layer, not by kube-rs's own
    // token-file reader (which keeps a trailing newline).
    Ok(config)
}

/// The bearer token in a file, re-read once [`TOKEN_REREAD`] has passed
/// (projected ServiceAccount tokens rotate) and trimmed: a file written by
/// `echo` ends with a newline, which an HTTP header cannot carry. A read
/// that fails keeps the last token; with none, requests go without one
/// and the API answers 401.
struct BearerFile {
    path: PathBuf,
    cached: Mutex<Option<(Instant, http::HeaderValue)>>,
    /// The last read error, logged once until it changes.
    last_error: Mutex<Option<String>>,
}

/// How long a token read from its file is used before the file is read
/// again (kube-rs and client-go re-read it every minute too).
const TOKEN_REREAD: Duration = Duration::from_secs(60);

impl BearerFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// `Bearer <token>`, marked sensitive (never logged by the HTTP stack).
    fn header(&self) -> Option<http::HeaderValue> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((read, value)) = cached.as_ref()
            && read.elapsed() < TOKEN_REREAD
        {
            return Some(value.clone());
        }
        let fresh = std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|token| {
                http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| "not a valid header value".to_owned())
            });
        match fresh {
            Ok(mut value) => {
                value.set_sensitive(true);
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                *cached = Some((Instant::now(), value.clone()));
                Some(value)
            }
            Err(e) => {
                let mut last = self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.as_deref() != Some(e.as_str()) {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot read the Kubernetes API token file; keeping the last token");
                    *last = Some(e);
                }
                cached.as_ref().map(|(_, v)| v.clone())
            }
        }
    }
}

/// The DER of every certificate in `pem`.
///
/// # Errors
/// The PEM does not parse, or holds no certificate.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// Counts one API request by `verb` (`get`, `list`, `patch`, `create`,
/// `update`, `delete`) and outcome (`ok`, `not_found`, `error`), and
/// passes its result on.
///
/// # Errors
/// `result`'s error, unchanged.
pub fn observe<T>(verb: &'static str, result: kube::Result<T>) -> kube::Result<T> {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if is_not_found(e) => "not_found",
        Err(_) => "error",
    };
    crate::metrics::counter!(crate::metrics::KUBE_API_REQUESTS, "verb" => verb, "outcome" => outcome)
        .increment(1);
    result
}

/// [`observe`] for a `get_opt`, which answers a 404 as `Ok(None)`:
/// counted as `not_found`.
///
/// # Errors
/// `result`'s error, unchanged.
pub fn observe_opt<T>(
    verb: &'static str,
    result: kube::Result<Option<T>>,
) -> kube::Result<Option<T>> {
    if matches!(result, Ok(None)) {
        crate::metrics::counter!(crate::metrics::KUBE_API_REQUESTS, "verb" => verb, "outcome" => "not_found")
            .increment(1);
        return result;
    }
    observe(verb, result)
}

/// Whether `e` is the API's 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// The last error of a repeated task, so each distinct one is logged once
/// and the end of a run of failures can be said.
#[derive(Debug, Default)]
pub struct LastError(Option<String>);

impl LastError {
    /// Records a failure: `true` when it differs from the last one (log
    /// it), `false` for a repeat.
    pub fn failed(&mut self, error: &str) -> bool {
        if self.0.as_deref() == Some(error) {
            return false;
        }
        self.0 = Some(error.to_owned());
        true
    }

    /// Records a success: `true` when it ends a run of failures (say so).
    pub fn succeeded(&mut self) -> bool {
        self.0.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_distinct_error_is_logged_once_and_its_end_said_once() {
        let mut last = LastError::default();
        assert!(!last.succeeded(), "no failure to end");
        assert!(last.failed("a"));
        assert!(!last.failed("a"), "a repeat is not logged again");
        assert!(last.failed("b"), "another error is");
        assert!(last.succeeded());
        assert!(!last.succeeded());
        assert!(last.failed("b"), "after a success the same error is new");
    }

    #[test]
    fn the_source_is_the_kubeconfig_else_the_api_flag_else_in_cluster_else_none() {
        let (t, c) = (Path::new("/t"), Path::new("/c"));
        let r = |k: Option<&str>, s, h| KubeSource::resolve(k.map(Path::new), s, h, None, t, c);
        assert!(matches!(
            r(Some("/k"), Some("https://api:6443"), Some("10.0.0.1")),
            Some(KubeSource::Kubeconfig(p)) if p == Path::new("/k")
        ));
        assert!(matches!(
            r(Some(""), Some("https://api:6443"), None),
            Some(KubeSource::Api(a)) if a.server == "https://api:6443"
        ));
        assert!(matches!(
            r(None, None, Some("10.0.0.1")),
            Some(KubeSource::Api(a)) if a.server == "https://10.0.0.1:443"
        ));
        assert!(r(None, None, None).is_none());
    }

    #[test]
    fn the_api_is_the_flag_else_in_cluster_else_none() {
        let (t, c) = (Path::new("/t"), Path::new("/c"));
        let r = |s, h, p| match KubeSource::resolve(None, s, h, p, t, c) {
            Some(KubeSource::Api(api)) => Some(api.server),
            Some(KubeSource::Kubeconfig(_)) => panic!("no kubeconfig was given"),
            None => None,
        };
        assert_eq!(
            r(Some("https://api:6443/"), Some("10.0.0.1"), None).unwrap(),
            "https://api:6443"
        );
        assert_eq!(
            r(None, Some("10.0.0.1"), Some("443")).unwrap(),
            "https://10.0.0.1:443"
        );
        assert_eq!(
            r(Some(""), Some("fd00::1"), None).unwrap(),
            "https://[fd00::1]:443"
        );
        assert!(r(None, None, Some("443")).is_none());
        assert!(r(Some(""), Some(""), None).is_none());
    }

    #[tokio::test]
    async fn a_client_needs_https_and_a_ca_and_names_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let source = |server: &str| {
            KubeSource::Api(KubeApiConfig {
                server: server.into(),
                token_file: dir.path().join("token"),
                ca_file: ca.clone(),
            })
        };
        let e = Kube::connect(source("http://api"), "n").await.unwrap_err();
        assert!(
            e.contains("--kube-api-server") && e.contains("not an https:// URL"),
            "{e}"
        );
        let e = Kube::connect(source("https://api"), "n").await.unwrap_err();
        assert!(e.contains("--kube-ca-file") && e.contains("ca.crt"), "{e}");
        std::fs::write(&ca, "no pem here").unwrap();
        let e = Kube::connect(source("https://api"), "n").await.unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = Kube::connect(KubeSource::Kubeconfig(dir.path().join("nope")), "n")
            .await
            .unwrap_err();
        assert!(e.contains("--kubeconfig") && e.contains("nope"), "{e}");
    }
}
