//! The HTTPS client of the providers that speak REST themselves (IBM Cloud,
//! Azure): reqwest on a rustls configuration of ours, with ring as the
//! daemon's own TLS, the platform's roots plus an operator's `--ca-bundle`,
//! bounded times and no redirects.

use crate::error::ProviderError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One request's time limit: a hung connection must not hold a call for
/// the whole `--provider-call-timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TCP + TLS connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS configuration: rustls with ring, the system's roots plus the
/// PEM certificates of `bundle`.
///
/// # Errors
/// `Config` (naming `--ca-bundle` and `env`, the provider's variable for it) when the bundle cannot be read or holds no certificate, or no
/// root at all is found.
pub fn tls_config(bundle: Option<&Path>, env: &str) -> Result<rustls::ClientConfig, ProviderError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as curl does.
        let _ = roots.add(cert);
    }
    if let Some(bundle) = bundle {
        let bad = |why: String| {
            ProviderError::config(format!("--ca-bundle ({env}): {}: {why}", bundle.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(bundle)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("holds no PEM certificate".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(ProviderError::config(format!(
            "no trusted CA certificates: the system has none; give --ca-bundle ({env})"
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProviderError::config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The HTTP client of every request of a REST provider: our TLS, bounded times, no
/// redirects (a bearer token is never sent where a server points).
///
/// # Errors
/// `Config` from [`tls_config`], or when the client cannot be built.
pub fn http_client(bundle: Option<&Path>, env: &str) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(bundle, env)?)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("podvisor/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ProviderError::config(format!("HTTP client: {e}")))
}
