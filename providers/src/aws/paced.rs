//! Every EC2 request paced on its own: the EC2 client's HTTP client waits
//! for a token of the request's class ([`RequestClass`]) from the daemon's
//! [`Pacer`] before each request it sends — so a create that also
//! allocates and associates an Elastic IP, a public-IP wait's polls and
//! every page of a listing each count, as EC2's own buckets count them
//! (<https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html>:
//! non-mutating `Describe*` actions in one bucket, mutating actions in
//! another).
//!
//! The answer adjusts the bucket of the request's class (AIMD, see
//! [`crate::pacing`]): HTTP 503 or 429 — EC2's `RequestLimitExceeded` and
//! overload answers, which the provider classes as throttled — halves its
//! rate; a 2xx gives some back.
//!
//! Under the SDK's HTTP client, not an interceptor: interceptors cannot
//! wait. The wrapped client is the SDK's own default (hyper 1 + rustls on
//! aws-lc, proxies from the environment), built as `aws-smithy-runtime`
//! builds it, since `SdkConfig` holds none until a client resolves it.

use crate::pacing::{Pacer, RequestClass};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use std::sync::Arc;

/// An HTTP client that paces each request through a [`Pacer`], then sends
/// it with the wrapped client.
#[derive(Debug, Clone)]
pub struct PacedHttpClient {
    inner: SharedHttpClient,
    pacer: Arc<Pacer>,
}

impl PacedHttpClient {
    /// `inner` (the SDK's default client when `None`) paced by `pacer`.
    pub fn new(inner: Option<SharedHttpClient>, pacer: Arc<Pacer>) -> Self {
        Self {
            inner: inner.unwrap_or_else(default_https_client),
            pacer,
        }
    }
}

/// The SDK's default HTTPS client, as `aws-smithy-runtime` makes it for
/// the latest behavior version.
fn default_https_client() -> SharedHttpClient {
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut builder =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
        builder.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        builder.set_proxy_config(Some(ProxyConfig::from_env()));
        builder.build()
    })
}

impl HttpClient for PacedHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(PacedConnector {
            inner: self.inner.http_connector(settings, components),
            pacer: self.pacer.clone(),
        })
    }

    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        self.inner.connector_metadata()
    }
}

#[derive(Debug)]
struct PacedConnector {
    inner: SharedHttpConnector,
    pacer: Arc<Pacer>,
}

impl HttpConnector for PacedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let class = request
            .body()
            .bytes()
            .map_or(RequestClass::Mutating, classify);
        let inner = self.inner.clone();
        let pacer = self.pacer.clone();
        HttpConnectorFuture::new(async move {
            pacer.take(class).await;
            let answer = inner.call(request).await;
            if let Ok(response) = &answer {
                let bucket = pacer.bucket(class);
                match response.status().as_u16() {
                    429 | 503 => {
                        bucket.throttled();
                    }
                    200..=299 => {
                        bucket.accepted();
                    }
                    _ => {}
                }
            }
            answer
        })
    }
}

/// The class of an EC2 Query API request, from its form body
/// (`Action=DescribeInstances&Version=…`): `Describe*` and `Get*` actions
/// read; any other action, or a body that names none, counts as mutating
/// (the scarcer bucket: never under-counted).
pub fn classify(body: &[u8]) -> RequestClass {
    let action = body
        .split(|b| *b == b'&')
        .find_map(|pair| pair.strip_prefix(b"Action="));
    match action {
        Some(a) if a.starts_with(b"Describe") || a.starts_with(b"Get") => RequestClass::Read,
        _ => RequestClass::Mutating,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_classed_as_ec2_buckets_them() {
        for (body, class) in [
            (
                &b"Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=tag%3Apodvisor.io%2Fnode"[..],
                RequestClass::Read,
            ),
            (b"Version=2016-11-15&Action=DescribeAddresses", RequestClass::Read),
            (b"Action=GetConsoleOutput&InstanceId=i-1", RequestClass::Read),
            (b"Action=RunInstances&ClientToken=pv-1", RequestClass::Mutating),
            (b"Action=TerminateInstances&InstanceId.1=i-1", RequestClass::Mutating),
            (b"Action=AllocateAddress&Domain=vpc", RequestClass::Mutating),
            (b"Action=AssociateAddress", RequestClass::Mutating),
            // A value that merely contains "Action=Describe" is no action.
            (b"Action=CreateTags&Tag.1.Value=Action=Describe", RequestClass::Mutating),
            (b"", RequestClass::Mutating),
            (b"\xff\xfe", RequestClass::Mutating),
        ] {
            assert_eq!(classify(body), class, "{}", String::from_utf8_lossy(body));
        }
    }
}
