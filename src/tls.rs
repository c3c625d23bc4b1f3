//! Mutual TLS between the agent proxy and the pod VMs' forwarders, with keys
//! that survive restarts.
//!
//! On first start the daemon makes a CA and a client certificate in
//! `<state-dir>/tls/` (keys `0600`, never logged) and keeps them: a
//! restarted daemon can still reach the pod VMs it made before. Each pod VM
//! gets its own server certificate — its instance name as the DNS name,
//! signed by that CA — and the CA certificate, through its user data; the
//! proxy verifies the server against the CA and the forwarder verifies the
//! client against it. With `--ca-cert-file`, `--cert-file` and `--cert-key`
//! the operator's certificates are used instead; pod VMs then carry their own
//! server certificate for the name `podvm-server`, as in the reference.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// How the proxy's TLS client behaves: the shared policy (least version,
/// cipher suites) and whether it checks the pod VMs' certificates at all.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    /// `--tls-min-version`, `--tls-cipher-suites`.
    pub tls: podvisor_podvm::tls::TlsPolicy,
    /// `--tls-skip-verify`: accept any server certificate (the handshake's
    /// signatures are still checked, so the peer must hold the key of the
    /// certificate it shows — but anyone may show one).
    pub skip_verify: bool,
}

/// The server name of operator-provided pod VM certificates.
pub const MANUAL_SERVER_NAME: &str = "podvm-server";

/// A server certificate for one pod VM, and what its forwarder needs.
#[derive(Clone)]
pub struct ServerIdentity {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its key, PEM. A secret: never logged.
    pub key_pem: String,
    /// The CA that signs the clients the forwarder accepts, PEM.
    pub client_ca_pem: String,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerIdentity { key: <redacted> }")
    }
}

/// The daemon's TLS material.
pub struct Pki {
    ca_pem: String,
    /// Present when podvisor made the CA (it then issues server certificates).
    issuer: Option<Issuer<'static, KeyPair>>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { keys: <redacted> }")
    }
}

fn ca_params() -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "podvisor pod VM CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

fn leaf(
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(names.clone()).map_err(|e| e.to_string())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // About two years, as the reference's pod VM certificates; from the
    // start of last year, so clock skew between node and VM does not matter.
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let cert = params.signed_by(&key, issuer).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The current year (UTC), near enough for validity periods.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, content: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl Pki {
    /// Loads the daemon's CA and client certificate from `dir`, making them
    /// on first start.
    pub fn load_or_create(dir: &Path, policy: &ClientPolicy) -> Result<Self, String> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let (ca_cert, ca_key, client_cert, client_key) = (
            dir.join("ca.pem"),
            dir.join("ca.key"),
            dir.join("client.pem"),
            dir.join("client.key"),
        );
        if !ca_key.exists() {
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let cert = ca_params()?.self_signed(&key).map_err(|e| e.to_string())?;
            let issuer = Issuer::new(ca_params()?, key);
            let (cpem, kpem) = leaf(
                vec!["podvisor-client".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
                &issuer,
            )?;
            // The CA key last: its presence means the set is complete.
            write_private(&ca_cert, &cert.pem())?;
            write_private(&client_cert, &cpem)?;
            write_private(&client_key, &kpem)?;
            write_private(&ca_key, &issuer_key_pem(&issuer))?;
            tracing::info!(dir = %dir.display(), "made the pod VM CA and client certificate");
        }
        let ca_pem = read(&ca_cert)?;
        let key =
            KeyPair::from_pem(&read(&ca_key)?).map_err(|e| format!("{}: {e}", ca_key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
        let client = client_config(&ca_pem, &read(&client_cert)?, &read(&client_key)?, policy)?;
        Ok(Self {
            ca_pem,
            issuer: Some(issuer),
            client,
        })
    }

    /// The operator's certificates: a CA that signs the pod VMs' server
    /// certificates, and the client certificate and key.
    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        policy: &ClientPolicy,
    ) -> Result<Self, String> {
        let ca_pem = read(ca)?;
        let client = client_config(&ca_pem, &read(cert)?, &read(key)?, policy)?;
        Ok(Self {
            ca_pem,
            issuer: None,
            client,
        })
    }

    /// The identity a new pod VM named `instance_name` gets in its user
    /// data; `None` with operator certificates (baked into the image).
    pub fn server_identity(&self, instance_name: &str) -> Result<Option<ServerIdentity>, String> {
        let Some(issuer) = &self.issuer else {
            return Ok(None);
        };
        let (cert_pem, key_pem) = leaf(
            vec![instance_name.to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
            issuer,
        )?;
        Ok(Some(ServerIdentity {
            cert_pem,
            key_pem,
            client_ca_pem: self.ca_pem.clone(),
        }))
    }

    /// The name a pod VM's certificate is checked against.
    pub fn server_name(&self, instance_name: &str) -> Result<ServerName<'static>, String> {
        let name = if self.issuer.is_some() {
            instance_name
        } else {
            MANUAL_SERVER_NAME
        };
        ServerName::try_from(name.to_owned())
            .map_err(|e| format!("'{name}' is not a TLS server name: {e}"))
    }

    /// The proxy's client configuration.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }
}

fn issuer_key_pem(issuer: &Issuer<'_, KeyPair>) -> String {
    issuer.key().serialize_pem()
}

fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    policy: &ClientPolicy,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| format!("CA certificate: {e}"))?)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA file holds no certificate".into());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("client key: {e}"))?;
    let provider = policy.tls.provider.clone();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(policy.tls.versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate and key: {e}"))?;
    if policy.skip_verify {
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(AnyServerCertificate(provider)));
    }
    Ok(Arc::new(config))
}

/// `--tls-skip-verify`: any server certificate is accepted; the handshake
/// signatures are still verified against the certificate shown.
#[derive(Debug)]
struct AnyServerCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
