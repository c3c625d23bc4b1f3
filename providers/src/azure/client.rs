//! A small typed client of Azure Resource Manager on `azure_core`'s HTTP
//! pipeline.
//!
//! Every request goes through one [`azure_core::http::Pipeline`] with
//! azure_core's retries **off** (the daemon's provider actor retries, with
//! its own backoff and budget) and a `BearerTokenAuthorizationPolicy` over
//! the configured `azure_identity` credential, which refuses to send a
//! token over plain HTTP. The pipeline's transport is [`ReqwestTransport`]:
//! reqwest on our rustls configuration (ring, the platform's roots plus
//! `--ca-bundle`), the same HTTPS stack as every other podvisor client.
//!
//! Each request draws a token of its class from the daemon's pacer first
//! (reads: GETs; everything else mutating) and reports a `429` to that
//! bucket. ARM's `x-ms-ratelimit-remaining-*` headers are read on every
//! answer: when one runs low the bucket slows down before ARM throttles.
//!
//! Long-running operations follow ARM's rules (Microsoft Learn, "Track
//! asynchronous Azure operations"): the `Azure-AsyncOperation` URL if the
//! answer has one, else the `Location` URL, else the resource's
//! `provisioningState`; `Retry-After` sets the wait between polls;
//! `Succeeded`, `Failed` and `Canceled` are terminal, case-insensitively. A
//! URL taken from an answer is followed only if it is on the configured
//! ARM endpoint: the bearer token goes nowhere else.

use super::errors::{self, ArmError};
use crate::error::{ErrorClass, ProviderError};
use crate::pacing::{Pacer, RequestClass};
use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::policies::Policy;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::{
    AsyncRawResponse, Body, ClientOptions, Context, HttpClient, Method, Pipeline,
    PipelineSendOptions, Request, RetryOptions, Transport, Url,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The Compute API version of every `Microsoft.Compute` request (VMs,
/// sizes, operations, images): pinned, so an answer's shape never changes
/// under the provider.
pub const COMPUTE_API: &str = "2024-07-01";
/// The Network API version (NICs, public IPs, subnets).
pub const NETWORK_API: &str = "2024-05-01";
/// The Compute Gallery API version (gallery image versions).
pub const GALLERY_API: &str = "2023-07-03";

/// A `x-ms-ratelimit-remaining-*` count at or below this slows the
/// request's bucket (as a 429 would) before ARM throttles.
pub const LOW_REMAINING: u64 = 10;
/// The shortest wait between two polls a `Retry-After` may ask for.
const MIN_POLL_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two polls a `Retry-After` may ask for.
const MAX_POLL_WAIT: Duration = Duration::from_secs(60);
/// The longest a `429`'s `Retry-After` is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How many polls one long-running operation may take (at the default
/// 5 s, over an hour; ARM's VM operations end well within that).
const MAX_POLLS: u32 = 1000;
/// How many pages a listing reads at most.
const MAX_PAGES: u32 = 1000;

/// `azure_core`'s HTTP transport over our reqwest client. The request body
/// is always in memory (podvisor never streams one); the answer is read
/// whole.
#[derive(Debug, Clone)]
pub struct ReqwestTransport(pub reqwest::Client);

#[async_trait]
impl HttpClient for ReqwestTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        use azure_core::error::{Error, ErrorKind};
        let method = match request.method() {
            Method::Delete => reqwest::Method::DELETE,
            Method::Get => reqwest::Method::GET,
            Method::Head => reqwest::Method::HEAD,
            Method::Patch => reqwest::Method::PATCH,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            other => {
                return Err(Error::with_message(
                    ErrorKind::Other,
                    format!("HTTP method {other:?} is not supported"),
                ));
            }
        };
        let mut builder = self.0.request(method, request.url().as_str());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = match request.body() {
            Body::Bytes(bytes) => builder.body(bytes.to_vec()),
            Body::SeekableStream(_) => {
                return Err(Error::with_message(
                    ErrorKind::Other,
                    "a streamed request body is not supported",
                ));
            }
        };
        let answer = builder.send().await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            Error::with_error(kind, e.without_url(), "HTTP request failed")
        })?;
        let status = answer.status().as_u16();
        let headers: HashMap<HeaderName, HeaderValue> = answer
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                let value = v.to_str().ok()?;
                Some((
                    HeaderName::from(k.as_str().to_owned()),
                    HeaderValue::from(value.to_owned()),
                ))
            })
            .collect();
        let body = answer
            .bytes()
            .await
            .map_err(|e| Error::with_error(ErrorKind::Io, e.without_url(), "reading the answer"))?;
        Ok(AsyncRawResponse::from_bytes(
            status.into(),
            Headers::from(headers),
            body,
        ))
    }
}

/// The pipeline options every Azure client of podvisor uses, credentials'
/// included: our transport, azure_core's retries off.
pub fn client_options(http: &reqwest::Client) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(ReqwestTransport(http.clone())))),
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    }
}

/// One ARM answer a caller reads: its status, the headers of a
/// long-running operation, and its body. The default is an answer with no
/// operation headers (a wait on it polls the resource). Its `Debug` gives
/// the body's size only: a VM's answer may echo its user data.
#[derive(Clone, Default)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// `Azure-AsyncOperation`.
    pub async_operation: Option<String>,
    /// `Location`.
    pub location: Option<String>,
    /// `Retry-After`, in seconds (capped).
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("async_operation", &self.async_operation)
            .field("location", &self.location)
            .field("retry_after", &self.retry_after)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

impl Answer {
    /// The body parsed as `T`.
    ///
    /// # Errors
    /// `Transient` naming `what` when it is not (an answer cut short or
    /// from something that is not ARM); nothing of the body is quoted.
    pub fn parse<T: DeserializeOwned>(&self, what: &str) -> Result<T, ProviderError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ProviderError::transient(format!(
                "Azure {what}: a malformed answer (HTTP {}): line {} column {}: {:?}",
                self.status,
                e.line(),
                e.column(),
                e.classify()
            ))
        })
    }
}

/// What a long-running operation falls back on when ARM gives neither
/// `Azure-AsyncOperation` nor `Location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lro {
    /// A create or update: the resource's `provisioningState`.
    Put,
    /// A delete: the resource answers 404.
    Delete,
}

/// The ARM client.
#[derive(Debug)]
pub struct Arm {
    pipeline: Pipeline,
    endpoint: Url,
    pacer: Arc<Pacer>,
    slowdowns: AtomicU64,
}

#[derive(serde::Deserialize)]
struct OperationStatus {
    status: Option<String>,
    #[serde(default)]
    error: Option<ArmError>,
}

#[derive(serde::Deserialize)]
struct Provisioning {
    #[serde(default)]
    properties: ProvisioningProperties,
}

#[derive(serde::Deserialize, Default)]
struct ProvisioningProperties {
    #[serde(rename = "provisioningState")]
    provisioning_state: Option<String>,
}

/// A page of an ARM listing.
#[derive(serde::Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    value: Vec<T>,
    #[serde(rename = "nextLink")]
    next_link: Option<String>,
}

impl Arm {
    /// A client of the ARM `endpoint` (`https://management.azure.com`)
    /// whose requests carry tokens of `credential` for the endpoint's
    /// `/.default` scope, sent through `http`, paced by `pacer`.
    pub fn new(
        http: &reqwest::Client,
        credential: Arc<dyn TokenCredential>,
        endpoint: Url,
        pacer: Arc<Pacer>,
    ) -> Self {
        let scope = format!("{}/.default", endpoint.as_str().trim_end_matches('/'));
        let auth: Arc<dyn Policy> =
            Arc::new(BearerTokenAuthorizationPolicy::new(credential, [scope]));
        let pipeline = Pipeline::new(
            Some("podvisor"),
            Some(env!("CARGO_PKG_VERSION")),
            client_options(http),
            Vec::new(),
            vec![auth],
            None,
        );
        Self {
            pipeline,
            endpoint,
            pacer,
            slowdowns: AtomicU64::new(0),
        }
    }

    /// How many times a low `x-ms-ratelimit-remaining-*` count slowed a
    /// bucket down.
    pub fn slowdowns(&self) -> u64 {
        self.slowdowns.load(Ordering::Relaxed)
    }

    /// The URL of `path` (built from checked ARM names only) at
    /// `api_version`.
    pub fn url(&self, path: &str, api_version: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.set_path(path);
        url.set_query(Some(&format!("api-version={api_version}")));
        url
    }

    /// `link` (from an answer: an operation, a `nextLink`) if it is on the
    /// ARM endpoint (same scheme, host and port).
    ///
    /// # Errors
    /// `Transient` when it is not a URL or points elsewhere: the token is
    /// not sent there.
    pub fn same_origin(&self, what: &str, link: &str) -> Result<Url, ProviderError> {
        let url = Url::parse(link).map_err(|_| {
            ProviderError::transient(format!("Azure {what}: a link that is not a URL"))
        })?;
        if url.scheme() != self.endpoint.scheme()
            || url.host_str() != self.endpoint.host_str()
            || url.port_or_known_default() != self.endpoint.port_or_known_default()
        {
            return Err(ProviderError::transient(format!(
                "Azure {what}: ARM pointed to {}, not to the configured endpoint; not followed",
                url.host_str().unwrap_or("no host")
            )));
        }
        Ok(url)
    }

    /// Sends one request: a pacer token of its class, the bearer token,
    /// JSON in and out. 2xx and the statuses in `accept` are answers.
    ///
    /// # Errors
    /// Any other status: an error classified by [`errors::from_response`];
    /// no answer at all (a credential that got no token, a connection that
    /// failed): `Config` for credentials Entra ID refused, else `Transient`.
    pub async fn send(
        &self,
        what: &str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        headers: &[(&'static str, &'static str)],
        accept: &[u16],
    ) -> Result<Answer, ProviderError> {
        let class = if method == Method::Get {
            RequestClass::Read
        } else {
            RequestClass::Mutating
        };
        self.pacer.take(class).await;
        let mut request = Request::new(url, method);
        request.insert_header("accept", "application/json");
        for (name, value) in headers {
            request.insert_header(*name, *value);
        }
        if let Some(body) = body {
            request.insert_header("content-type", "application/json");
            request.set_body(body);
        }
        let sent = self
            .pipeline
            .send(
                &Context::new(),
                &mut request,
                Some(PipelineSendOptions {
                    skip_checks: true,
                    ..PipelineSendOptions::default()
                }),
            )
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => return Err(from_pipeline(what, &e)),
        };
        let status = u16::from(answer.status());
        let header = |name: &'static str| {
            answer
                .headers()
                .get_optional_str(&HeaderName::from_static(name))
                .map(str::to_owned)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let remaining = lowest_remaining(answer.headers());
        let async_operation = header("azure-asyncoperation");
        let location = header("location");
        let bucket = self.pacer.bucket(class);
        if status == 429 {
            bucket.throttled();
        } else if remaining.is_some_and(|r| r <= LOW_REMAINING) {
            self.slowdowns.fetch_add(1, Ordering::Relaxed);
            bucket.throttled();
        } else {
            bucket.accepted();
        }
        let body = answer.into_body().to_vec();
        if (200..300).contains(&status) || accept.contains(&status) {
            return Ok(Answer {
                status,
                async_operation,
                location,
                retry_after,
                body,
            });
        }
        Err(errors::from_response(what, status, &body, retry_after))
    }

    /// `GET path` at `api_version`, parsed as `T`.
    ///
    /// # Errors
    /// As [`send`](Self::send); `Transient` for a malformed answer.
    pub async fn get<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        api_version: &str,
    ) -> Result<T, ProviderError> {
        let url = self.url(path, api_version);
        self.send(what, Method::Get, url, None, &[], &[])
            .await?
            .parse(what)
    }

    /// Every item of the listing at `path`, following `nextLink` (on the
    /// ARM endpoint only), at most [`MAX_PAGES`] pages.
    ///
    /// # Errors
    /// As [`send`](Self::send); `Transient` for a malformed page, a
    /// `nextLink` off the ARM endpoint, or more pages than that.
    pub async fn list<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        api_version: &str,
    ) -> Result<Vec<T>, ProviderError> {
        let mut items = Vec::new();
        let mut url = self.url(path, api_version);
        for _ in 0..MAX_PAGES {
            let page: Page<serde_json::Value> = self
                .send(what, Method::Get, url, None, &[], &[])
                .await?
                .parse(what)?;
            // One item of an unexpected shape is skipped, not the listing:
            // the orphan GC must still see the others.
            for item in page.value {
                match serde_json::from_value::<T>(item) {
                    Ok(item) => items.push(item),
                    Err(e) => tracing::warn!(what, error = %e, "skipped an item ARM listed"),
                }
            }
            match page.next_link.filter(|l| !l.is_empty()) {
                Some(link) => url = self.same_origin(what, &link)?,
                None => return Ok(items),
            }
        }
        Err(ProviderError::transient(format!(
            "Azure {what}: over {MAX_PAGES} pages"
        )))
    }

    /// Waits for the long-running operation `answer` started on the
    /// resource at `resource` to end, polling every `poll` unless ARM says
    /// otherwise with `Retry-After`.
    ///
    /// # Errors
    /// The operation's own error ([`errors::from_operation`]) when it ended
    /// `Failed` or `Canceled`; a poll's error; `Transient` after
    /// [`MAX_POLLS`] polls.
    pub async fn wait(
        &self,
        what: &str,
        answer: &Answer,
        resource: &Url,
        lro: Lro,
        poll: Duration,
    ) -> Result<(), ProviderError> {
        // ARM's Retry-After sets the pace, never below a second (a `0`
        // would make a busy loop); without one, `poll`.
        let wait_for = |retry_after: Option<Duration>| {
            retry_after
                .map_or(poll, |r| r.max(MIN_POLL_WAIT))
                .min(MAX_POLL_WAIT)
        };
        // A poll's failure is the poll's, not the resource's: an operation
        // URL that answers 404 says nothing of the VM, so it is retried
        // (transient), never taken for "not found".
        let poll_failed = |e: ProviderError| match e.class {
            ErrorClass::Throttled | ErrorClass::Transient | ErrorClass::Config => e,
            _ => {
                let code = e.code.clone();
                let err =
                    ProviderError::transient(format!("{} (polling the operation)", e.message));
                match code {
                    Some(code) => err.with_code(code),
                    None => err,
                }
            }
        };
        let mut delay = wait_for(answer.retry_after);
        // The operation's status URL, else its Location (`true`: a status).
        let link = answer
            .async_operation
            .as_deref()
            .map(|l| (l, true))
            .or_else(|| answer.location.as_deref().map(|l| (l, false)));
        if let Some((link, is_status)) = link {
            let url = self.same_origin(what, link)?;
            for _ in 0..MAX_POLLS {
                tokio::time::sleep(delay).await;
                let polled = self
                    .send(what, Method::Get, url.clone(), None, &[], &[])
                    .await
                    .map_err(poll_failed)?;
                if is_status {
                    let op: OperationStatus = polled.parse(what)?;
                    let status = op.status.unwrap_or_default();
                    if status.eq_ignore_ascii_case("Succeeded") {
                        return Ok(());
                    }
                    if status.eq_ignore_ascii_case("Failed")
                        || status.eq_ignore_ascii_case("Canceled")
                    {
                        return Err(errors::from_operation(
                            what,
                            &status,
                            &op.error.unwrap_or_default(),
                        ));
                    }
                } else if polled.status != 202 {
                    // Location: 202 while running, the result once done.
                    return Ok(());
                }
                delay = wait_for(polled.retry_after);
            }
        } else {
            for _ in 0..MAX_POLLS {
                let polled = self
                    .send(what, Method::Get, resource.clone(), None, &[], &[404])
                    .await?;
                if polled.status == 404 {
                    return match lro {
                        Lro::Delete => Ok(()),
                        Lro::Put => Err(ProviderError::transient(format!(
                            "Azure {what}: the resource is gone"
                        ))),
                    };
                }
                let state = polled
                    .parse::<Provisioning>(what)?
                    .properties
                    .provisioning_state
                    .unwrap_or_default();
                if lro == Lro::Put {
                    if state.eq_ignore_ascii_case("Succeeded") {
                        return Ok(());
                    }
                    if state.eq_ignore_ascii_case("Failed")
                        || state.eq_ignore_ascii_case("Canceled")
                    {
                        return Err(errors::from_operation(what, &state, &ArmError::default()));
                    }
                }
                tokio::time::sleep(wait_for(polled.retry_after)).await;
            }
        }
        Err(ProviderError::transient(format!(
            "Azure {what}: still running after {MAX_POLLS} polls"
        )))
    }
}

/// The lowest `x-ms-ratelimit-remaining-*` count of an answer:
/// `x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}` (and
/// their `-global-` forms) are plain counts; `x-ms-ratelimit-remaining-resource`
/// is `Policy;count` pairs, comma-separated
/// (`Microsoft.Compute/PutVM3Min;239,Microsoft.Compute/PutVM30Min;1199`).
pub fn lowest_remaining(headers: &Headers) -> Option<u64> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-ms-ratelimit-remaining-"))
        .flat_map(|(_, value)| {
            value
                .as_str()
                .split(',')
                .filter_map(|part| {
                    let count = part.rsplit(';').next().unwrap_or(part);
                    count.trim().parse::<u64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .min()
}

/// A failure of the pipeline itself (no HTTP answer): a credential that
/// could not get a token, a connection that failed. A credential refused
/// by Entra ID (a 4xx of its token endpoint) is `Config`; anything else
/// `Transient`. The message is azure_core's and azure_identity's, which
/// never hold the secret.
fn from_pipeline(what: &str, error: &azure_core::Error) -> ProviderError {
    use azure_core::error::ErrorKind;
    let mut refused = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(inner) = e.downcast_ref::<azure_core::Error>()
            && let ErrorKind::HttpResponse { status, .. } = inner.kind()
        {
            let status = u16::from(*status);
            if (400..500).contains(&status) && status != 408 && status != 429 {
                refused = Some(status);
            }
        }
        source = e.source();
    }
    let text = format!("Azure {what}: {error}");
    match (error.kind(), refused) {
        (ErrorKind::Credential, Some(status)) => ProviderError::config(format!(
            "{text} (Microsoft Entra ID refused the credentials: HTTP {status}; check \
             --clientid, --tenantid and --secret or the workload identity)"
        )),
        (ErrorKind::Credential, None) => ProviderError::transient(text),
        _ => ProviderError::transient(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_remaining_count_is_read_from_every_ratelimit_header() {
        let mut headers = Headers::new();
        headers.insert("x-ms-ratelimit-remaining-subscription-writes", "1199");
        headers.insert(
            "x-ms-ratelimit-remaining-resource",
            "Microsoft.Compute/PutVM3Min;7,Microsoft.Compute/PutVM30Min;1199",
        );
        headers.insert("x-ms-request-id", "1");
        assert_eq!(lowest_remaining(&headers), Some(7));
        assert_eq!(lowest_remaining(&Headers::new()), None);
        let mut junk = Headers::new();
        junk.insert("x-ms-ratelimit-remaining-subscription-reads", "many");
        assert_eq!(lowest_remaining(&junk), None);
    }
}
