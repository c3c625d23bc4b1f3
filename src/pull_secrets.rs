//! Registry credentials for the pod VM: `/run/peerpod/auth.json`, built as
//! the reference builds it from the pod's and its ServiceAccount's
//! `imagePullSecrets`, read from the Kubernetes API.
//!
//! The API is the node's in-cluster one (`KUBERNETES_SERVICE_HOST`/`_PORT`,
//! the ServiceAccount token and CA) unless `--kube-api-server` names another;
//! without either, no credentials are passed (the pod VM pulls anonymously).
//! As in the reference, a lookup that fails is logged and the pod VM starts
//! without credentials (Kubernetes treats missing pull secrets the same
//! way), a secret that is missing is skipped, and an `auth.json` above
//! 12,288 bytes is left out with a warning. The credentials are secrets:
//! they go into the user data only, never into a log line or an error.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The largest `auth.json` the reference puts in user data.
pub const MAX_AUTH_JSON: usize = 12_288;
/// In-cluster ServiceAccount token.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// In-cluster API CA.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The time limit of one API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One registry's credentials, as `auth.json` holds them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Auth {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    password: String,
    #[serde(default)]
    auth: String,
}

/// `{"auths": {registry: Auth}}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Auths {
    #[serde(default)]
    auths: BTreeMap<String, Auth>,
}

/// Merges one secret's registries into `into`, as the reference does:
/// `.dockerconfigjson` (`{"auths": …}`) or `.dockercfg` (the registries
/// map); `auth` made from username and password when missing; entries
/// with neither skipped; only `auth` kept.
fn merge_secret(
    name: &str,
    data: &BTreeMap<String, String>,
    into: &mut BTreeMap<String, Auth>,
) -> Result<(), String> {
    let decode = |key: &str| -> Option<Result<Vec<u8>, String>> {
        data.get(key).map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("secret {name}: {key} is not base64: {e}"))
        })
    };
    let registries: BTreeMap<String, Auth> = if let Some(bytes) = decode(".dockerconfigjson") {
        serde_json::from_slice::<Auths>(&bytes?)
            .map_err(|e| format!("secret {name}: .dockerconfigjson: {}", json_error(&e)))?
            .auths
    } else if let Some(bytes) = decode(".dockercfg") {
        serde_json::from_slice(&bytes?)
            .map_err(|e| format!("secret {name}: .dockercfg: {}", json_error(&e)))?
    } else {
        BTreeMap::new()
    };
    for (registry, mut creds) in registries {
        if creds.auth.is_empty() {
            if creds.username.is_empty() || creds.password.is_empty() {
                continue;
            }
            creds.auth = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", creds.username, creds.password));
        }
        into.insert(
            registry,
            Auth {
                auth: creds.auth,
                ..Default::default()
            },
        );
    }
    Ok(())
}

/// A JSON error's kind and place, without the input it quotes (a secret's
/// bytes).
fn json_error(e: &serde_json::Error) -> String {
    format!(
        "malformed JSON ({:?} at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// The Kubernetes objects' fields read here.
#[derive(Deserialize, Default)]
struct LocalObjectReference {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    image_pull_secrets: Vec<LocalObjectReference>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccount {
    #[serde(default)]
    image_pull_secrets: Vec<LocalObjectReference>,
}

#[derive(Deserialize)]
struct Secret {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// Where the Kubernetes API is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct KubeApiConfig {
    /// `https://host:port`.
    pub server: String,
    /// The bearer token's file (read at every lookup: tokens rotate).
    pub token_file: PathBuf,
    /// The API server's CA, PEM.
    pub ca_file: PathBuf,
}

impl KubeApiConfig {
    /// The API `server` names, else the in-cluster one from `service_host`
    /// and `service_port` (`KUBERNETES_SERVICE_HOST`/`_PORT`); `None`
    /// without either.
    pub fn resolve(
        server: Option<&str>,
        service_host: Option<&str>,
        service_port: Option<&str>,
        token_file: &Path,
        ca_file: &Path,
    ) -> Option<Self> {
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
        Some(Self {
            server,
            token_file: token_file.to_owned(),
            ca_file: ca_file.to_owned(),
        })
    }
}

/// Reads pull secrets from the Kubernetes API.
pub struct PullSecrets {
    config: KubeApiConfig,
    agent: ureq::Agent,
}

impl std::fmt::Debug for PullSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PullSecrets({})", self.config.server)
    }
}

impl PullSecrets {
    /// A client for `config`; fails if the CA does not load.
    ///
    /// # Errors
    /// A message naming the value when the server is not an `https://` URL,
    /// or naming the CA file when it cannot be read, does not parse as PEM
    /// or holds no certificate.
    pub fn new(config: KubeApiConfig) -> Result<Self, String> {
        if !config.server.starts_with("https://") {
            return Err(format!(
                "'{}' is not an https:// URL (the Kubernetes API speaks TLS)",
                config.server
            ));
        }
        let pem = std::fs::read(&config.ca_file)
            .map_err(|e| format!("{}: {e}", config.ca_file.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", config.ca_file.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{}: no certificate in the file",
                config.ca_file.display()
            ));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Ok(Self { config, agent })
    }

    /// The API server.
    pub fn server(&self) -> &str {
        &self.config.server
    }

    /// `GET path`: the object, `None` on 404.
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>, String> {
        let token = std::fs::read_to_string(&self.config.token_file)
            .map_err(|e| format!("{}: {e}", self.config.token_file.display()))?;
        let url = format!("{}{path}", self.config.server);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .header("Accept", "application/json")
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if status != 200 {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_vec()
            .map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("GET {url}: {}", json_error(&e)))
    }

    /// `auth.json` for the pod, blocking: `None` when it has no pull
    /// secrets.
    fn lookup(&self, pod: &str, namespace: &str) -> Result<Option<String>, String> {
        let seg = |s: &str| -> Result<String, String> {
            // Kubernetes names are DNS labels/subdomains: nothing to escape.
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                Err(format!("'{s}' is not a Kubernetes object name"))
            } else {
                Ok(s.to_owned())
            }
        };
        let (pod, ns) = (seg(pod)?, seg(namespace)?);
        let Some(pod_obj) = self.get::<Pod>(&format!("/api/v1/namespaces/{ns}/pods/{pod}"))? else {
            return Err(format!("pod {ns}/{pod} not found"));
        };
        let account = match pod_obj.spec.service_account_name.as_str() {
            "" => "default".to_owned(),
            name => seg(name)?,
        };
        let account_obj = self
            .get::<ServiceAccount>(&format!(
                "/api/v1/namespaces/{ns}/serviceaccounts/{account}"
            ))?
            .ok_or_else(|| format!("service account {ns}/{account} not found"))?;
        let mut registries = BTreeMap::new();
        for secret in account_obj
            .image_pull_secrets
            .iter()
            .chain(&pod_obj.spec.image_pull_secrets)
        {
            let Ok(name) = seg(&secret.name) else {
                continue;
            };
            // A secret that is missing or cannot be read is skipped, as the
            // kubelet and the reference do.
            match self.get::<Secret>(&format!("/api/v1/namespaces/{ns}/secrets/{name}")) {
                Ok(Some(s)) => merge_secret(&name, &s.data, &mut registries)?,
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(secret = %name, error = %e, "skipping an image pull secret");
                }
            }
        }
        if registries.is_empty() {
            return Ok(None);
        }
        serde_json::to_string(&Auths { auths: registries })
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Adds the pod's registry credentials to `request`'s user data as
    /// [`crate::userdata::AUTH_JSON_PATH`], read now (they may have changed
    /// since CreateVM). Without any (see [`PullSecrets::auth_json`]) the
    /// request is left as it was and the pod VM pulls anonymously.
    pub async fn add_auth_json(self: &Arc<Self>, request: &mut podvisor_providers::CreateRequest) {
        if let Some(auth) = self
            .auth_json(&request.pod_name, &request.pod_namespace)
            .await
        {
            crate::userdata::add_file(
                &mut request.user_data,
                crate::userdata::AUTH_JSON_PATH,
                &auth,
            );
        }
    }

    /// `auth.json` for the pod, or `None`: no pull secrets, a failed lookup
    /// (logged), or too large for user data (logged).
    pub async fn auth_json(self: &Arc<Self>, pod: &str, namespace: &str) -> Option<String> {
        let this = self.clone();
        let (p, n) = (pod.to_owned(), namespace.to_owned());
        let result = tokio::task::spawn_blocking(move || this.lookup(&p, &n))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match result {
            Ok(Some(json)) if json.len() > MAX_AUTH_JSON => {
                tracing::warn!(
                    pod,
                    namespace,
                    bytes = json.len(),
                    limit = MAX_AUTH_JSON,
                    "the pod's registry credentials are too large for user data; the pod VM gets none"
                );
                None
            }
            Ok(Some(json)) => {
                tracing::info!(
                    pod,
                    namespace,
                    "registry credentials from the pod's image pull secrets go to the pod VM"
                );
                Some(json)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(pod, namespace, error = %e, "cannot read the pod's image pull secrets; the pod VM gets no registry credentials");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn data(key: &str, json: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(key.to_owned(), b64(json))])
    }

    #[test]
    fn secrets_merge_as_the_reference_merges_them() {
        let mut into = BTreeMap::new();
        merge_secret(
            "sa",
            &data(
                ".dockerconfigjson",
                r#"{"auths":{"a.io":{"auth":"c2E6MQ=="},"b.io":{"username":"u","password":"p"},"c.io":{"username":"only"}}}"#,
            ),
            &mut into,
        )
        .unwrap();
        // The pod's secret comes later and wins for the same registry.
        merge_secret(
            "pod",
            &data(".dockercfg", r#"{"a.io":{"auth":"cG9kOjI="}}"#),
            &mut into,
        )
        .unwrap();
        merge_secret("opaque", &BTreeMap::new(), &mut into).unwrap();
        let json = serde_json::to_string(&Auths { auths: into }).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"auths":{{"a.io":{{"auth":"cG9kOjI="}},"b.io":{{"auth":"{}"}}}}}}"#,
                b64("u:p")
            )
        );
    }

    #[test]
    fn a_malformed_secret_is_an_error_that_does_not_quote_it() {
        let mut into = BTreeMap::new();
        let e = merge_secret(
            "bad",
            &data(".dockerconfigjson", r#"{"auths": "hunter2"#),
            &mut into,
        )
        .unwrap_err();
        assert!(
            e.contains("secret bad: .dockerconfigjson: malformed JSON"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = merge_secret(
            "bad",
            &BTreeMap::from([(".dockercfg".to_owned(), "%%%".to_owned())]),
            &mut into,
        )
        .unwrap_err();
        assert!(e.contains("is not base64"), "{e}");
    }

    #[test]
    fn the_api_is_the_flag_else_in_cluster_else_none() {
        let (t, c) = (Path::new("/t"), Path::new("/c"));
        let r = |s, h, p| KubeApiConfig::resolve(s, h, p, t, c).map(|c| c.server);
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

    #[test]
    fn a_client_needs_https_and_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let cfg = |server: &str| KubeApiConfig {
            server: server.into(),
            token_file: dir.path().join("token"),
            ca_file: ca.clone(),
        };
        let e = PullSecrets::new(cfg("http://api")).unwrap_err();
        assert!(e.contains("not an https:// URL"), "{e}");
        let e = PullSecrets::new(cfg("https://api")).unwrap_err();
        assert!(e.contains("ca.crt"), "{e}");
        std::fs::write(&ca, "no pem here").unwrap();
        let e = PullSecrets::new(cfg("https://api")).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }
}
