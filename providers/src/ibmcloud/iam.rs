//! IAM access tokens: the API-key grant or the trusted-profile grant (a
//! compute-resource token from a projected service-account token file, as
//! IBM's `ContainerAuthenticator` does), cached and refreshed before expiry.
//!
//! Wire protocol (IBM Cloud IAM API, "Create an IAM access token"):
//! `POST <iam>/identity/token`, form-encoded, `grant_type` =
//! `urn:ibm:params:oauth:grant-type:apikey` with `apikey`, or
//! `urn:ibm:params:oauth:grant-type:cr-token` with `cr_token` and
//! `profile_id`; the answer holds `access_token` and `expires_in` (seconds).
//! As IBM's SDKs do, a token is refreshed once 80 % of its lifetime is
//! over; a token is used up to its expiry if a refresh fails meanwhile.

use super::errors;
use crate::error::ProviderError;
use crate::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How podvisor proves who it is to IAM.
#[derive(Debug, Clone)]
pub enum Grant {
    /// An IAM API key.
    ApiKey(Secret),
    /// A trusted profile, with the file holding the compute-resource token
    /// (re-read at every refresh: the kubelet rotates projected tokens).
    TrustedProfile {
        /// The profile id (`Profile-…`).
        profile_id: String,
        /// The compute-resource token file.
        cr_token_file: PathBuf,
    },
}

/// A cached token.
#[derive(Debug, Clone)]
struct Cached {
    token: Secret,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The IAM token source of one provider.
#[derive(Debug)]
pub struct Iam {
    http: reqwest::Client,
    /// `<iam>/identity/token`.
    token_url: String,
    grant: Grant,
    cached: tokio::sync::Mutex<Option<Cached>>,
    requests: AtomicU64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// The token endpoint of `--iam-service-url`, which may name the
/// endpoint itself (the reference's default) or only the host.
pub fn token_url(iam_service_url: &str) -> String {
    let base = iam_service_url.trim_end_matches('/');
    let base = base.strip_suffix("/identity/token").unwrap_or(base);
    format!("{base}/identity/token")
}

impl Iam {
    /// A token source for `grant` at `iam_service_url`.
    pub fn new(http: reqwest::Client, iam_service_url: &str, grant: Grant) -> Self {
        Self {
            http,
            token_url: token_url(iam_service_url),
            grant,
            cached: tokio::sync::Mutex::new(None),
            requests: AtomicU64::new(0),
        }
    }

    /// Token requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A valid access token: the cached one, or a new one when it is due
    /// for refresh. Concurrent callers share one refresh.
    ///
    /// # Errors
    /// `Transient` when IAM cannot be reached or answers 5xx and no
    /// unexpired token is cached; `Config` when IAM refuses the credentials
    /// (or the token file cannot be read), naming the flag to fix.
    pub async fn token(&self) -> Result<Secret, ProviderError> {
        let mut cached = self.cached.lock().await;
        let now = Instant::now();
        if let Some(c) = cached.as_ref()
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        match self.fetch().await {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            Err(e) => match cached.as_ref() {
                Some(c) if Instant::now() < c.expires_at => {
                    tracing::warn!(error = %e, "IAM token refresh failed; the current token is still valid");
                    Ok(c.token.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Forgets `stale` (a token a service answered 401 to), so the next
    /// [`Iam::token`] fetches a new one.
    pub async fn invalidate(&self, stale: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == stale) {
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<Cached, ProviderError> {
        let what = "IAM token request";
        let form: Vec<(&str, String)> =
            match &self.grant {
                Grant::ApiKey(key) => vec![
                    (
                        "grant_type",
                        "urn:ibm:params:oauth:grant-type:apikey".into(),
                    ),
                    ("apikey", key.expose().to_owned()),
                ],
                Grant::TrustedProfile {
                    profile_id,
                    cr_token_file,
                } => {
                    let token = tokio::fs::read_to_string(cr_token_file).await.map_err(|e| {
                    ProviderError::config(format!(
                        "--iam-cr-token-file (IBMCLOUD_CR_TOKEN_FILENAME): cannot read {}: {e}",
                        cr_token_file.display()
                    ))
                })?;
                    vec![
                        (
                            "grant_type",
                            "urn:ibm:params:oauth:grant-type:cr-token".into(),
                        ),
                        ("cr_token", token.trim().to_owned()),
                        ("profile_id", profile_id.clone()),
                    ]
                }
            };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let answer = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| errors::from_transport(what, &e))?;
        let status = answer.status().as_u16();
        let body = answer
            .bytes()
            .await
            .map_err(|e| errors::from_transport(what, &e))?;
        if !(200..300).contains(&status) {
            let e = errors::from_response(what, status, &body, None);
            // IAM answers 400/401/403 to credentials it refuses.
            return Err(if (400..500).contains(&status) && status != 429 {
                let flag = match self.grant {
                    Grant::ApiKey(_) => "--api-key (IBMCLOUD_API_KEY)",
                    Grant::TrustedProfile { .. } => {
                        "--iam-profile-id (IBMCLOUD_IAM_PROFILE_ID) / --iam-cr-token-file"
                    }
                };
                ProviderError::config(format!("{flag}: IAM refused the credentials: {e}"))
                    .with_code(e.code().unwrap_or("iam").to_owned())
            } else {
                e
            });
        }
        let parsed: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| errors::malformed(what, &e))?;
        let lifetime = Duration::from_secs(parsed.expires_in.clamp(1, 24 * 3600));
        Ok(Cached {
            token: Secret::from(parsed.access_token),
            refresh_at: sent + lifetime.mul_f64(0.8),
            expires_at: sent + lifetime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_endpoint_is_found_with_or_without_its_path() {
        for url in [
            "https://iam.cloud.ibm.com/identity/token",
            "https://iam.cloud.ibm.com/",
            "https://iam.cloud.ibm.com",
        ] {
            assert_eq!(token_url(url), "https://iam.cloud.ibm.com/identity/token");
        }
    }
}
