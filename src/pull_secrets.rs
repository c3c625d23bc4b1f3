//! Registry credentials for the pod VM: `/run/peerpod/auth.json`, built as
//! the reference builds it from the pod's and its ServiceAccount's
//! `imagePullSecrets`, read from the Kubernetes API.
//!
//! The API is the daemon's one client ([`crate::kubernetes`]); without
//! one, no credentials are passed (the pod VM pulls anonymously).
//! As in the reference, a lookup that fails is logged and the pod VM starts
//! without credentials (Kubernetes treats missing pull secrets the same
//! way), a secret that is missing is skipped, and an `auth.json` above
//! 12,288 bytes is left out with a warning. The credentials are secrets:
//! they go into the user data only, never into a log line or an error.

use crate::kubernetes::{Kube, observe_opt};
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The largest `auth.json` the reference puts in user data.
pub const MAX_AUTH_JSON: usize = 12_288;

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
    data: &BTreeMap<String, ByteString>,
    into: &mut BTreeMap<String, Auth>,
) -> Result<(), String> {
    let registries: BTreeMap<String, Auth> = if let Some(bytes) = data.get(".dockerconfigjson") {
        serde_json::from_slice::<Auths>(&bytes.0)
            .map_err(|e| format!("secret {name}: .dockerconfigjson: {}", json_error(&e)))?
            .auths
    } else if let Some(bytes) = data.get(".dockercfg") {
        serde_json::from_slice(&bytes.0)
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

/// Reads pull secrets from the Kubernetes API.
#[derive(Debug)]
pub struct PullSecrets {
    kube: Kube,
}

impl PullSecrets {
    /// Pull secrets read through `kube`.
    pub fn new(kube: Kube) -> Self {
        Self { kube }
    }

    /// `GET` one object: `None` on 404.
    async fn get<K>(&self, namespace: &str, name: &str) -> Result<Option<K>, String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api = kube::Api::<K>::namespaced(self.kube.client(), namespace);
        observe_opt("get", api.get_opt(name).await).map_err(|e| {
            format!(
                "GET {} {namespace}/{name}: {e}",
                K::kind(&K::DynamicType::default())
            )
        })
    }

    /// `auth.json` for the pod: `None` when it has no pull secrets.
    async fn lookup(&self, pod: &str, namespace: &str) -> Result<Option<String>, String> {
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
        let Some(pod_obj) = self.get::<Pod>(&ns, &pod).await? else {
            return Err(format!("pod {ns}/{pod} not found"));
        };
        let spec = pod_obj.spec.unwrap_or_default();
        let account = match spec.service_account_name.as_deref().unwrap_or_default() {
            "" => "default".to_owned(),
            name => seg(name)?,
        };
        let account_obj = self
            .get::<ServiceAccount>(&ns, &account)
            .await?
            .ok_or_else(|| format!("service account {ns}/{account} not found"))?;
        let mut registries = BTreeMap::new();
        for secret in account_obj
            .image_pull_secrets
            .iter()
            .flatten()
            .chain(spec.image_pull_secrets.iter().flatten())
        {
            let Ok(name) = seg(&secret.name) else {
                continue;
            };
            // A secret that is missing or cannot be read is skipped, as the
            // kubelet and the reference do.
            match self.get::<Secret>(&ns, &name).await {
                Ok(Some(s)) => merge_secret(&name, &s.data.unwrap_or_default(), &mut registries)?,
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
        match self.lookup(pod, namespace).await {
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

    fn data(key: &str, json: &str) -> BTreeMap<String, ByteString> {
        BTreeMap::from([(key.to_owned(), ByteString(json.as_bytes().to_vec()))])
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
    }
}
