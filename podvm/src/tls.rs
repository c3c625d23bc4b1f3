//! The TLS policy both ends of the agent path share: the least protocol
//! version (`TLS_MIN_VERSION`) and the cipher suites (`TLS_CIPHER_SUITES`),
//! with the reference's names. The daemon validates them at start and
//! hands them to each forwarder in `apf.json`, so both sides agree.

use rustls::SupportedProtocolVersion;
use rustls::crypto::CryptoProvider;
use std::sync::Arc;

/// TLS 1.2 and 1.3.
static TLS12_AND_13: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
/// TLS 1.3 only.
static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A validated policy: the crypto provider (its cipher suites chosen) and
/// the protocol versions.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    /// ring, with the chosen cipher suites.
    pub provider: Arc<CryptoProvider>,
    /// The protocol versions allowed.
    pub versions: &'static [&'static SupportedProtocolVersion],
}

impl TlsPolicy {
    /// The policy `min_version` (`VersionTLS12`, `VersionTLS13`, or empty
    /// for TLS 1.2) and `cipher_suites` (comma-separated IANA names, or
    /// empty for all) ask for.
    ///
    /// As in Go, whose names the reference takes, the list governs TLS 1.2;
    /// TLS 1.3 suites are all allowed unless the list names some of them,
    /// and then only those.
    ///
    /// # Errors
    /// A message naming the value when `min_version` is not a TLS version,
    /// a cipher suite is unknown (listing the supported ones), or no listed
    /// suite works with the least allowed version.
    pub fn new(min_version: Option<&str>, cipher_suites: Option<&str>) -> Result<Self, String> {
        let versions = match min_version.map(str::trim) {
            None | Some("") | Some("VersionTLS12") => TLS12_AND_13,
            Some("VersionTLS13") => TLS13_ONLY,
            Some(other) => {
                return Err(format!(
                    "'{other}' is not a TLS version: use VersionTLS12 or VersionTLS13"
                ));
            }
        };
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(list) = cipher_suites.map(str::trim).filter(|l| !l.is_empty()) {
            let all = provider.cipher_suites.clone();
            let mut chosen = Vec::new();
            for name in list.split(',').map(str::trim) {
                let suite = all
                    .iter()
                    .find(|s| iana_name(s) == Some(alias(name)))
                    .ok_or_else(|| {
                        format!(
                            "'{name}' is not a cipher suite podvisor supports; supported: {}",
                            all.iter()
                                .filter_map(iana_name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                if !chosen.contains(suite) {
                    chosen.push(*suite);
                }
            }
            if !chosen
                .iter()
                .any(|s| s.version() == &rustls::version::TLS13)
            {
                chosen.extend(
                    all.iter()
                        .filter(|s| s.version() == &rustls::version::TLS13),
                );
            }
            let usable = chosen.iter().any(|s| versions.contains(&s.version()));
            if !usable {
                return Err(format!(
                    "no cipher suite in '{list}' works with the least TLS version"
                ));
            }
            provider.cipher_suites = chosen;
        }
        Ok(Self {
            provider: Arc::new(provider),
            versions,
        })
    }
}

/// A suite's IANA name (rustls calls the TLS 1.3 ones `TLS13_…`).
pub fn iana_name(suite: &rustls::SupportedCipherSuite) -> Option<&'static str> {
    let name = suite.suite().as_str()?;
    Some(match name {
        "TLS13_AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256" => "TLS_CHACHA20_POLY1305_SHA256",
        other => other,
    })
}

/// Go's legacy names for the ChaCha20 suites.
fn alias(name: &str) -> &str {
    match name {
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &TlsPolicy) -> Vec<&'static str> {
        p.provider
            .cipher_suites
            .iter()
            .filter_map(iana_name)
            .collect()
    }

    #[test]
    fn defaults_are_tls12_and_all_suites() {
        let p = TlsPolicy::new(None, None).unwrap();
        assert_eq!(p.versions.len(), 2);
        assert_eq!(
            names(&p).len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        let p = TlsPolicy::new(Some(""), Some(" ")).unwrap();
        assert_eq!(p.versions.len(), 2);
        let p = TlsPolicy::new(Some("VersionTLS13"), None).unwrap();
        assert_eq!(p.versions, TLS13_ONLY);
    }

    #[test]
    fn a_tls12_list_restricts_tls12_and_keeps_tls13() {
        let p = TlsPolicy::new(
            None,
            Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"),
        )
        .unwrap();
        let n = names(&p);
        assert!(n.contains(&"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"));
        assert!(n.contains(&"TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"));
        assert!(!n.contains(&"TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"));
        assert!(n.contains(&"TLS_AES_128_GCM_SHA256"));
        assert!(n.contains(&"TLS_AES_256_GCM_SHA384"));
    }

    #[test]
    fn a_tls13_name_restricts_tls13() {
        let p = TlsPolicy::new(Some("VersionTLS13"), Some("TLS_AES_256_GCM_SHA384")).unwrap();
        assert_eq!(names(&p), vec!["TLS_AES_256_GCM_SHA384"]);
    }

    #[test]
    fn bad_values_are_named() {
        let e = TlsPolicy::new(Some("TLS1.2"), None).unwrap_err();
        assert!(e.contains("'TLS1.2' is not a TLS version"), "{e}");
        let e = TlsPolicy::new(
            None,
            Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_RSA_WITH_RC4_128_SHA"),
        )
        .unwrap_err();
        assert!(
            e.contains("'TLS_RSA_WITH_RC4_128_SHA' is not a cipher suite podvisor supports"),
            "{e}"
        );
        assert!(e.contains("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"), "{e}");
    }
}
