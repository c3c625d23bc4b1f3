//! Mutual TLS between the agent proxy and the pod VMs' forwarders, with keys
//! that survive restarts and a client certificate that is renewed before it
//! expires.
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
//!
//! Lifetimes: the CA lives [`CA_LIFETIME`] and is never renewed, because
//! every running pod VM trusts exactly that CA (its user data cannot change)
//! and a new one would cut the daemon off from all of them. The client
//! certificate lives [`CLIENT_LIFETIME`] and is renewed from the same CA
//! when less than [`CLIENT_RENEW_BEFORE`] is left — at start, and by the
//! task [`Pki::spawn_renewal`] starts — which running pod VMs accept as they
//! accepted the old one. Pod VM server certificates live
//! [`SERVER_LIFETIME`], far longer than a pod VM. Every validity decision
//! (issuing, renewal, the proxy's check of the pod VMs' certificates) takes
//! the time from a [`Clock`], so tests move time instead of waiting for it.
//! The operator's certificates are never renewed: their expiry is exported
//! and warned about.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the CA podvisor makes is valid: 100 years. Running pod VMs
/// trust it and nothing else, and their user data is fixed when they are
/// made, so renewing the CA would break every one of them: it must outlive
/// the node. Its key never leaves `<state-dir>/tls/`.
pub const CA_LIFETIME: Duration = Duration::from_secs(36_525 * 86_400);

/// How long a client certificate podvisor issues is valid: one year. It is
/// the credential the daemon shows on every agent connection, so a copy that
/// leaked stops working within a year; renewing it costs nothing, because
/// pod VMs trust the CA, not the certificate.
pub const CLIENT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// A client certificate podvisor made is renewed when less than this is
/// left: 120 days, about a third of [`CLIENT_LIFETIME`]. A renewal that keeps
/// failing (a read-only state directory) is retried at every check for
/// months, and the `PodvisorTlsCertificateExpiring` alert (under
/// [`EXPIRY_WARNING`] left) fires long before agent calls would fail.
pub const CLIENT_RENEW_BEFORE: Duration = Duration::from_secs(120 * 86_400);

/// How long a pod VM's server certificate is valid: about two years, as the
/// reference's. It is not renewed — a pod VM's user data cannot change — and
/// a pod VM lives for hours to weeks, far shorter.
pub const SERVER_LIFETIME: Duration = Duration::from_secs(730 * 86_400);

/// Every certificate podvisor issues starts this long before it is issued,
/// so a pod VM whose clock lags the node's (booted before its clock synced)
/// still accepts it; as the previous "from January 1st of last year", a
/// year.
pub const BACKDATE: Duration = Duration::from_secs(365 * 86_400);

/// A certificate with less than this left is warned about in the log at
/// every check (the operator's, which podvisor does not renew, or one whose
/// renewal keeps failing): 30 days, the alert's threshold.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// How often the daemon checks its certificates: hourly. Renewal starts
/// [`CLIENT_RENEW_BEFORE`] ahead, so an hour late is never too late.
pub const RENEWAL_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The time every validity decision is made at: the validity of the
/// certificates podvisor issues, whether the client certificate is due for
/// renewal, and whether a pod VM's certificate is valid. The daemon uses
/// [`SystemClock`]; tests set their own and move it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The [`Clock`] as rustls asks for it, so the proxy checks the pod VMs'
/// certificates at the same time as everything else.
#[derive(Debug)]
struct RustlsTime(Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<UnixTime> {
        self.0
            .now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

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

/// What a check of the client certificate found (and did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// podvisor's client certificate has more than [`CLIENT_RENEW_BEFORE`]
    /// left, and stays.
    NotDue {
        /// When it expires.
        not_after: SystemTime,
    },
    /// A new client certificate from the same CA was written to the state
    /// directory; every handshake from now on presents it.
    Renewed {
        /// When the replaced one expires.
        previous: SystemTime,
        /// When the new one expires.
        not_after: SystemTime,
    },
    /// The operator's client certificate (`--cert-file`): podvisor never
    /// renews it, only reports when it expires.
    OperatorProvided {
        /// When it expires.
        not_after: SystemTime,
    },
}

/// The daemon's TLS material.
pub struct Pki {
    /// The CA certificate(s), PEM: pod VMs accept clients it signed, and the
    /// proxy accepts pod VMs it signed.
    ca_pem: String,
    /// When the CA expires (the first of them, if the operator's file holds
    /// several): exported, and warned about.
    ca_not_after: SystemTime,
    /// Present when podvisor made the CA: it then issues the pod VMs'
    /// certificates and renews its own client certificate.
    own: Option<OwnCa>,
    /// The client certificate every new handshake presents; a renewal swaps
    /// it inside, so configurations already handed out (an open agent
    /// socket keeps its own) present the new one at their next dial.
    current: Arc<CurrentClientCert>,
    /// The proxy's configuration, built once: roots, policy, and
    /// [`Self::current`] as the client certificate.
    client: Arc<rustls::ClientConfig>,
    /// Loads renewed keys with the same algorithms the policy allows.
    provider: Arc<CryptoProvider>,
    /// Every validity decision's time.
    clock: Arc<dyn Clock>,
    /// One renewal at a time: two at once would each write a key and a
    /// certificate, and the files could end up from different pairs.
    renewing: Mutex<()>,
}

/// The CA podvisor made, and where its client certificate lives.
struct OwnCa {
    /// Signs server and client certificates.
    issuer: Issuer<'static, KeyPair>,
    /// `client.pem`.
    client_cert: PathBuf,
    /// `client.key`.
    client_key: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki { keys: <redacted> }")
    }
}

/// A client certificate with its key, and when it expires.
struct ClientCert {
    /// The chain and the signing key, as rustls presents them.
    key: Arc<CertifiedKey>,
    /// The earliest notAfter of the chain.
    not_after: SystemTime,
}

/// The client certificate in use, swapped whole by a renewal: a handshake
/// sees the old pair or the new one, never a mix.
struct CurrentClientCert(RwLock<ClientCert>);

impl CurrentClientCert {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .key
            .clone()
    }

    fn not_after(&self) -> SystemTime {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .not_after
    }

    fn replace(&self, cert: ClientCert) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = cert;
    }
}

impl std::fmt::Debug for CurrentClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentClientCert { key: <redacted> }")
    }
}

impl rustls::client::ResolvesClientCert for CurrentClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `t` as rcgen takes it.
fn date_time(t: SystemTime) -> Result<time::OffsetDateTime, String> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| {
            format!(
                "{} is out of a certificate's range",
                humantime::format_rfc3339_seconds(t)
            )
        })
}

/// The validity period `[now - BACKDATE, now + lifetime]`.
fn validity(
    now: SystemTime,
    lifetime: Duration,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), String> {
    let from = now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH);
    let to = now
        .checked_add(lifetime)
        .ok_or_else(|| "the clock is too far in the future for a certificate".to_owned())?;
    Ok((date_time(from)?, date_time(to)?))
}

fn ca_params(now: SystemTime) -> Result<CertificateParams, String> {
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
    (params.not_before, params.not_after) = validity(now, CA_LIFETIME)?;
    Ok(params)
}

/// A new key and a certificate for it from `issuer`, valid for `lifetime`
/// from `now`: (certificate PEM, key PEM).
fn leaf(
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(now, lifetime)?;
    let cert = params.signed_by(&key, issuer).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The earliest notAfter of `certs`: a chain (or a CA bundle) is only as
/// good as its first certificate to expire.
fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Result<SystemTime, String> {
    let mut earliest: Option<SystemTime> = None;
    for der in certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let secs = cert.validity().not_after.timestamp();
        let at = if secs >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
        }
        .unwrap_or(UNIX_EPOCH);
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    earliest.ok_or_else(|| "no certificate".to_owned())
}

/// The certificates in a PEM text.
fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Writes a file only its owner can read, atomically and durably: a crash
/// leaves the old content or the new, never a part.
fn write_private(path: &Path, content: &str) -> Result<(), String> {
    podvisor_state::write_atomically(path, content.as_bytes(), Some(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A client certificate and its key, checked to belong together.
fn load_client(
    cert_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<ClientCert, String> {
    let chain = pem_certs(cert_pem).map_err(|e| format!("client certificate: {e}"))?;
    if chain.is_empty() {
        return Err("the client certificate file holds no certificate".into());
    }
    let not_after = earliest_not_after(&chain).map_err(|e| format!("client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("client key: {e}"))?;
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("client certificate and key: {e}"))?;
    Ok(ClientCert {
        key: Arc::new(key),
        not_after,
    })
}

impl OwnCa {
    /// Issues a new client certificate valid from `now` and writes it with
    /// its key; returns it loaded.
    ///
    /// The key is written first: a crash between the two files leaves a
    /// pair that does not match, which the next start replaces (see
    /// [`Pki::load_or_create_at`]).
    fn issue_client(
        &self,
        now: SystemTime,
        provider: &CryptoProvider,
    ) -> Result<ClientCert, String> {
        let (cert_pem, key_pem) = leaf(
            &["podvisor-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &self.issuer,
            now,
            CLIENT_LIFETIME,
        )?;
        write_private(&self.client_key, &key_pem)?;
        write_private(&self.client_cert, &cert_pem)?;
        load_client(&cert_pem, &key_pem, provider)
    }
}

impl Pki {
    /// Loads the daemon's CA and client certificate from `dir`, making them
    /// on first start, with the system clock.
    ///
    /// # Errors
    /// Those of [`Self::load_or_create_at`].
    pub fn load_or_create(dir: &Path, policy: &ClientPolicy) -> Result<Self, String> {
        Self::load_or_create_at(dir, policy, Arc::new(SystemClock))
    }

    /// [`Self::load_or_create`] with `clock`'s time. A client certificate
    /// that has expired or is due for renewal is renewed at once, and one
    /// that does not load (a crash between writing a renewed certificate and
    /// its key) is replaced: pod VMs trust the CA, not the certificate.
    ///
    /// # Errors
    /// A message naming the file when `dir` cannot be created, a key or
    /// certificate cannot be made, written or read, or the CA certificate
    /// or key does not parse; the errors of renewing a client certificate
    /// that is due. Never the content of a key.
    pub fn load_or_create_at(
        dir: &Path,
        policy: &ClientPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
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
        let provider = policy.tls.provider.clone();
        if !ca_key.exists() {
            let now = clock.now();
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let cert = ca_params(now)?
                .self_signed(&key)
                .map_err(|e| e.to_string())?;
            let own = OwnCa {
                issuer: Issuer::new(ca_params(now)?, key),
                client_cert: client_cert.clone(),
                client_key: client_key.clone(),
            };
            write_private(&ca_cert, &cert.pem())?;
            own.issue_client(now, &provider)?;
            // The CA key last: its presence means the set is complete.
            write_private(&ca_key, &own.issuer.key().serialize_pem())?;
            tracing::info!(dir = %dir.display(), "made the pod VM CA and client certificate");
        }
        let ca_pem = read(&ca_cert)?;
        let key =
            KeyPair::from_pem(&read(&ca_key)?).map_err(|e| format!("{}: {e}", ca_key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| format!("{}: {e}", ca_cert.display()))?;
        let own = OwnCa {
            issuer,
            client_cert,
            client_key,
        };
        let client = match read(&own.client_cert)
            .and_then(|cert| Ok((cert, read(&own.client_key)?)))
            .and_then(|(cert, key)| load_client(&cert, &key, &provider))
        {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "the client certificate does not load; issuing a new one from the CA");
                own.issue_client(clock.now(), &provider)?
            }
        };
        let pki = Self::new(ca_pem, Some(own), client, policy, clock)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        pki.renew_if_due()?;
        Ok(pki)
    }

    /// The operator's certificates, with the system clock: a CA that signs
    /// the pod VMs' server certificates, and the client certificate and key.
    ///
    /// # Errors
    /// Those of [`Self::from_files_at`].
    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        policy: &ClientPolicy,
    ) -> Result<Self, String> {
        Self::from_files_at(ca, cert, key, policy, Arc::new(SystemClock))
    }

    /// [`Self::from_files`] with `clock`'s time. They are never renewed: an
    /// expired one is loaded all the same (and reported by
    /// [`Self::check`]), as before.
    ///
    /// # Errors
    /// A message naming the file when one cannot be read; "CA certificate"
    /// or "client certificate"/"client key" with the cause when a PEM does
    /// not parse, holds no certificate, or the key does not match the
    /// certificate.
    pub fn from_files_at(
        ca: &Path,
        cert: &Path,
        key: &Path,
        policy: &ClientPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let ca_pem = read(ca)?;
        let client = load_client(&read(cert)?, &read(key)?, &policy.tls.provider)?;
        Self::new(ca_pem, None, client, policy, clock)
    }

    fn new(
        ca_pem: String,
        own: Option<OwnCa>,
        client: ClientCert,
        policy: &ClientPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let ca = pem_certs(&ca_pem).map_err(|e| format!("CA certificate: {e}"))?;
        if ca.is_empty() {
            return Err("the CA file holds no certificate".into());
        }
        let ca_not_after = earliest_not_after(&ca).map_err(|e| format!("CA certificate: {e}"))?;
        let current = Arc::new(CurrentClientCert(RwLock::new(client)));
        let config = client_config(ca, current.clone(), policy, clock.clone())?;
        Ok(Self {
            ca_pem,
            ca_not_after,
            own,
            current,
            client: config,
            provider: policy.tls.provider.clone(),
            clock,
            renewing: Mutex::new(()),
        })
    }

    /// The identity a new pod VM named `instance_name` gets in its user
    /// data, valid for [`SERVER_LIFETIME`] from now; `None` with operator
    /// certificates (baked into the image).
    ///
    /// # Errors
    /// rcgen's reason when the key cannot be generated, `instance_name` is
    /// not a usable certificate name, or signing fails.
    pub fn server_identity(&self, instance_name: &str) -> Result<Option<ServerIdentity>, String> {
        let Some(own) = &self.own else {
            return Ok(None);
        };
        let (cert_pem, key_pem) = leaf(
            &[instance_name.to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &own.issuer,
            self.clock.now(),
            SERVER_LIFETIME,
        )?;
        Ok(Some(ServerIdentity {
            cert_pem,
            key_pem,
            client_ca_pem: self.ca_pem.clone(),
        }))
    }

    /// The name a pod VM's certificate is checked against.
    ///
    /// # Errors
    /// "… is not a TLS server name" when `instance_name` is not a valid DNS
    /// name or IP address (never with operator certificates).
    pub fn server_name(&self, instance_name: &str) -> Result<ServerName<'static>, String> {
        let name = if self.own.is_some() {
            instance_name
        } else {
            MANUAL_SERVER_NAME
        };
        ServerName::try_from(name.to_owned())
            .map_err(|e| format!("'{name}' is not a TLS server name: {e}"))
    }

    /// The proxy's client configuration. It is the same for the daemon's
    /// life, and each handshake presents the client certificate current at
    /// that moment: after a renewal, every new connection — also through a
    /// configuration taken before it — shows the new certificate, while
    /// connections already open carry on.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// When the client certificate in use expires.
    pub fn client_not_after(&self) -> SystemTime {
        self.current.not_after()
    }

    /// When the CA expires (the first of them to, for an operator's file
    /// with several).
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// Renews podvisor's client certificate if less than
    /// [`CLIENT_RENEW_BEFORE`] is left at the clock's time: a new key and
    /// certificate from the same CA, written to the state directory, then
    /// presented by every new handshake. The operator's certificate is left
    /// as it is.
    ///
    /// # Errors
    /// "renewing the client certificate: …" when the new key or
    /// certificate cannot be made or written; the one in use stays.
    pub fn renew_if_due(&self) -> Result<Renewal, String> {
        let _one = self.renewing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now();
        let previous = self.current.not_after();
        let Some(own) = &self.own else {
            return Ok(Renewal::OperatorProvided {
                not_after: previous,
            });
        };
        let left = previous.duration_since(now).unwrap_or(Duration::ZERO);
        if left >= CLIENT_RENEW_BEFORE {
            return Ok(Renewal::NotDue {
                not_after: previous,
            });
        }
        let renewed = own
            .issue_client(now, &self.provider)
            .map_err(|e| format!("renewing the client certificate: {e}"))?;
        let not_after = renewed.not_after;
        self.current.replace(renewed);
        tracing::info!(
            previous_not_after = %humantime::format_rfc3339_seconds(previous),
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "renewed the client certificate"
        );
        Ok(Renewal::Renewed {
            previous,
            not_after,
        })
    }

    /// One check of the certificates, as the daemon makes it at start and
    /// then every [`RENEWAL_CHECK_INTERVAL`]: renews the client certificate
    /// if due, sets the expiry gauges, and warns about a certificate with
    /// less than [`EXPIRY_WARNING`] left (one podvisor does not renew, or
    /// whose renewal keeps failing).
    ///
    /// # Errors
    /// Those of [`Self::renew_if_due`]; the gauges are set and the warnings
    /// given all the same.
    pub fn check(&self) -> Result<Renewal, String> {
        let renewal = self.renew_if_due();
        let now = self.clock.now();
        let client = self.current.not_after();
        for (certificate, not_after) in [("ca", self.ca_not_after), ("client", client)] {
            crate::metrics::gauge!(crate::metrics::TLS_CERTIFICATE_EXPIRY, "certificate" => certificate)
                .set(unix_seconds(not_after));
            let not_after_text = humantime::format_rfc3339_seconds(not_after);
            match not_after.duration_since(now) {
                Err(_) => tracing::error!(
                    certificate,
                    not_after = %not_after_text,
                    operator_provided = self.own.is_none(),
                    "a TLS certificate of the agent proxy has expired: agent connections to pod VMs fail until it is replaced"
                ),
                Ok(left) if left < EXPIRY_WARNING => tracing::warn!(
                    certificate,
                    not_after = %not_after_text,
                    days_left = left.as_secs() / 86_400,
                    operator_provided = self.own.is_none(),
                    "a TLS certificate of the agent proxy expires soon"
                ),
                Ok(_) => {}
            }
        }
        renewal
    }

    /// Starts a task that runs [`Self::check`] every `every` (the first
    /// after `every`: the daemon checks once at start), for as long as the
    /// runtime runs or until the handle is aborted. A failed renewal is
    /// logged and tried again at the next check.
    pub fn spawn_renewal(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // After a suspended node wakes up, one check is enough.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let pki = self.clone();
                // Key generation and fsync: not on a runtime thread.
                match tokio::task::spawn_blocking(move || pki.check()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        error = %e,
                        "cannot renew the client certificate; trying again at the next check"
                    ),
                    Err(e) => tracing::warn!(error = %e, "the certificate check did not finish"),
                }
            }
        })
    }
}

/// `t` in seconds since the Unix epoch, as the expiry gauge shows it.
fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn client_config(
    ca: Vec<CertificateDer<'static>>,
    current: Arc<CurrentClientCert>,
    policy: &ClientPolicy,
    clock: Arc<dyn Clock>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let provider = policy.tls.provider.clone();
    let mut config =
        rustls::ClientConfig::builder_with_details(provider.clone(), Arc::new(RustlsTime(clock)))
            .with_protocol_versions(policy.tls.versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_cert_resolver(current);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DAY: Duration = Duration::from_secs(86_400);

    /// A clock the tests set and move.
    #[derive(Debug)]
    struct TestClock(Mutex<SystemTime>);

    impl TestClock {
        fn at(t: SystemTime) -> Arc<Self> {
            Arc::new(Self(Mutex::new(t)))
        }
        fn set(&self, t: SystemTime) {
            *self.0.lock().unwrap() = t;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    /// 2030-01-01T00:00:00Z: not today, so a decision that read the system
    /// clock instead of the injected one shows up.
    fn start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    fn policy() -> ClientPolicy {
        ClientPolicy {
            tls: podvisor_podvm::tls::TlsPolicy::new(None, None).unwrap(),
            skip_verify: false,
        }
    }

    fn not_after_of(pem: &str) -> SystemTime {
        earliest_not_after(&pem_certs(pem).unwrap()).unwrap()
    }

    fn not_before_of(pem: &str) -> SystemTime {
        let der = pem_certs(pem).unwrap().remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        UNIX_EPOCH + Duration::from_secs(cert.validity().not_before.timestamp() as u64)
    }

    fn first_cert(pem: &str) -> CertificateDer<'static> {
        pem_certs(pem).unwrap().remove(0)
    }

    type Streams = (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
    );

    /// A mutual-TLS connection from `client` to a server like a pod VM's
    /// forwarder: it shows `identity` and accepts only clients of
    /// `identity`'s CA, at `clock`'s time.
    async fn connect(
        client: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        identity: &ServerIdentity,
        clock: Arc<dyn Clock>,
    ) -> Result<Streams, String> {
        let provider = policy().tls.provider;
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(&identity.client_ca_pem).unwrap() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server =
            rustls::ServerConfig::builder_with_details(provider, Arc::new(RustlsTime(clock)))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    pem_certs(&identity.cert_pem).unwrap(),
                    PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
                )
                .unwrap();
        let (a, b) = tokio::io::duplex(64 << 10);
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(client).connect(server_name, a),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(b),
        );
        let (mut c, mut s) = (
            c.map_err(|e| format!("client: {e}"))?,
            s.map_err(|e| format!("server: {e}"))?,
        );
        // TLS 1.3 clients finish before the server has checked them: one
        // round trip proves both sides agreed.
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server: {e}"))?;
        Ok((c, s))
    }

    /// The client certificate the server saw in a handshake with `pki`'s
    /// client configuration.
    async fn handshake(
        pki: &Pki,
        identity: &ServerIdentity,
        name: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<CertificateDer<'static>, String> {
        let (_, s) = connect(
            pki.client_config(),
            pki.server_name(name).unwrap(),
            identity,
            clock,
        )
        .await?;
        Ok(s.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned())
    }

    /// The clock's time one day inside the first client certificate's
    /// renewal window.
    fn in_renewal_window() -> SystemTime {
        start() + CLIENT_LIFETIME - CLIENT_RENEW_BEFORE + DAY
    }

    #[tokio::test]
    async fn a_client_certificate_in_its_renewal_window_is_renewed_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let clock = TestClock::at(start());
        let pki = Pki::load_or_create_at(&tls, &policy(), clock.clone()).unwrap();
        let first = pki.client_not_after();
        assert_eq!(first, start() + CLIENT_LIFETIME);
        let ca_before = std::fs::read_to_string(tls.join("ca.pem")).unwrap();
        let client_before = std::fs::read_to_string(tls.join("client.pem")).unwrap();
        assert_eq!(not_before_of(&client_before), start() - BACKDATE);

        clock.set(in_renewal_window());
        let renewal = pki.renew_if_due().unwrap();
        let renewed = in_renewal_window() + CLIENT_LIFETIME;
        assert_eq!(
            renewal,
            Renewal::Renewed {
                previous: first,
                not_after: renewed
            }
        );
        assert_eq!(pki.client_not_after(), renewed);

        // On disk: a new client certificate and key, the same CA.
        let client_after = std::fs::read_to_string(tls.join("client.pem")).unwrap();
        assert_ne!(client_after, client_before);
        assert_eq!(not_after_of(&client_after), renewed);
        assert_eq!(
            std::fs::read_to_string(tls.join("ca.pem")).unwrap(),
            ca_before
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(tls.join("client.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A forwarder that trusts only the CA accepts it: the same CA signed it.
        let identity = pki.server_identity("podvm-new").unwrap().unwrap();
        let shown = handshake(&pki, &identity, "podvm-new", clock.clone())
            .await
            .unwrap();
        assert_eq!(shown, first_cert(&client_after));

        // A restart loads the renewed pair and keeps it.
        let again = Pki::load_or_create_at(&tls, &policy(), clock).unwrap();
        assert_eq!(again.client_not_after(), renewed);
        assert_eq!(
            std::fs::read_to_string(tls.join("client.pem")).unwrap(),
            client_after
        );
    }

    #[tokio::test]
    async fn a_client_certificate_before_its_renewal_window_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let before = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        clock.set(start() + CLIENT_LIFETIME - CLIENT_RENEW_BEFORE - Duration::from_secs(1));
        assert_eq!(
            pki.renew_if_due().unwrap(),
            Renewal::NotDue {
                not_after: start() + CLIENT_LIFETIME
            }
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("client.pem")).unwrap(),
            before
        );
    }

    #[tokio::test]
    async fn a_running_pod_vms_certificate_still_verifies_after_renewal_and_open_connections_carry_on()
     {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        // A pod VM made before the renewal, its open agent socket's
        // configuration, and a connection open through it.
        let old_vm = pki.server_identity("podvm-old").unwrap().unwrap();
        let held = pki.client_config();
        let (mut open_c, mut open_s) = connect(
            held.clone(),
            pki.server_name("podvm-old").unwrap(),
            &old_vm,
            clock.clone(),
        )
        .await
        .unwrap();

        clock.set(in_renewal_window());
        assert!(matches!(
            pki.renew_if_due().unwrap(),
            Renewal::Renewed { .. }
        ));
        let renewed = first_cert(&std::fs::read_to_string(dir.path().join("client.pem")).unwrap());

        // The open connection carries on.
        open_c.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        open_s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");

        // The old pod VM accepts the renewed certificate, and the proxy
        // accepts the old pod VM — also through the configuration it held.
        let shown = handshake(&pki, &old_vm, "podvm-old", clock.clone())
            .await
            .unwrap();
        assert_eq!(shown, renewed);
        let (_, s) = connect(held, pki.server_name("podvm-old").unwrap(), &old_vm, clock)
            .await
            .unwrap();
        assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], renewed);
    }

    #[tokio::test]
    async fn an_expired_client_certificate_on_disk_is_renewed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let old = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let vm = old.server_identity("podvm-a").unwrap().unwrap();
        let before = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();

        let later = start() + CLIENT_LIFETIME + 10 * DAY;
        clock.set(later);
        // What the old code did: the expired certificate, refused.
        let refused = handshake(&old, &vm, "podvm-a", clock.clone())
            .await
            .unwrap_err();
        assert!(
            refused.contains("expired") || refused.contains("Expired"),
            "{refused}"
        );

        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        assert_eq!(pki.client_not_after(), later + CLIENT_LIFETIME);
        let after = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        assert_ne!(after, before);
        assert_eq!(not_after_of(&after), later + CLIENT_LIFETIME);
        let shown = handshake(&pki, &vm, "podvm-a", clock).await.unwrap();
        assert_eq!(shown, first_cert(&after));
    }

    #[test]
    fn a_client_certificate_that_does_not_match_its_key_is_replaced_at_load() {
        // A crash between writing a renewed key and its certificate.
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let stray = KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(dir.path().join("client.key"), stray).unwrap();

        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock).unwrap();
        assert_eq!(pki.client_not_after(), start() + CLIENT_LIFETIME);
        let cert = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("client.key")).unwrap();
        load_client(&cert, &key, &policy().tls.provider).unwrap();
    }

    #[tokio::test]
    async fn operator_certificates_are_reported_but_never_renewed() {
        // The operator's files: a CA and a client certificate, made here.
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let made = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let vm = made.server_identity(MANUAL_SERVER_NAME).unwrap().unwrap();
        let files: Vec<_> = ["ca.pem", "client.pem", "client.key"]
            .iter()
            .map(|f| std::fs::read(dir.path().join(f)).unwrap())
            .collect();

        let expired = start() + CLIENT_LIFETIME + DAY;
        clock.set(expired);
        let pki = Pki::from_files_at(
            &dir.path().join("ca.pem"),
            &dir.path().join("client.pem"),
            &dir.path().join("client.key"),
            &policy(),
            clock.clone(),
        )
        .unwrap();
        let config = pki.client_config();
        assert_eq!(
            pki.renew_if_due().unwrap(),
            Renewal::OperatorProvided {
                not_after: start() + CLIENT_LIFETIME
            }
        );
        assert_eq!(
            pki.check().unwrap(),
            Renewal::OperatorProvided {
                not_after: start() + CLIENT_LIFETIME
            }
        );
        assert!(pki.server_identity("podvm-a").unwrap().is_none());
        assert!(Arc::ptr_eq(&config, &pki.client_config()));
        for (f, before) in ["ca.pem", "client.pem", "client.key"].iter().zip(files) {
            assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), before, "{f}");
        }
        // Still the expired certificate, which a forwarder refuses.
        let refused = handshake(&pki, &vm, "podvm-a", clock).await.unwrap_err();
        assert!(refused.contains("xpired"), "{refused}");
    }

    #[test]
    fn server_certificates_are_valid_for_two_years_from_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let later = start() + 100 * DAY;
        clock.set(later);
        let identity = pki.server_identity("podvm-a").unwrap().unwrap();
        assert_eq!(not_after_of(&identity.cert_pem), later + SERVER_LIFETIME);
        assert_eq!(not_before_of(&identity.cert_pem), later - BACKDATE);
        assert_eq!(pki.ca_not_after(), start() + CA_LIFETIME);
    }

    /// The samples of the expiry gauge in a Prometheus text exposition.
    fn expiry_gauge(text: &str, certificate: &str) -> Option<f64> {
        let prefix = format!(
            "{}{{certificate=\"{certificate}\"}} ",
            crate::metrics::TLS_CERTIFICATE_EXPIRY
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn each_certificates_expiry_is_exported_and_follows_a_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let pki = Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as f64;

        ::metrics::with_local_recorder(&recorder, || pki.check()).unwrap();
        let text = handle.render();
        assert_eq!(
            expiry_gauge(&text, "ca"),
            Some(secs(start() + CA_LIFETIME)),
            "{text}"
        );
        assert_eq!(
            expiry_gauge(&text, "client"),
            Some(secs(start() + CLIENT_LIFETIME)),
            "{text}"
        );

        clock.set(in_renewal_window());
        let renewal = ::metrics::with_local_recorder(&recorder, || pki.check()).unwrap();
        assert!(matches!(renewal, Renewal::Renewed { .. }), "{renewal:?}");
        assert_eq!(
            expiry_gauge(&handle.render(), "client"),
            Some(secs(in_renewal_window() + CLIENT_LIFETIME))
        );
    }

    #[tokio::test]
    async fn the_renewal_task_renews_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(start());
        let pki = Arc::new(Pki::load_or_create_at(dir.path(), &policy(), clock.clone()).unwrap());
        let task = pki.clone().spawn_renewal(Duration::from_millis(10));
        clock.set(in_renewal_window());
        let renewed = in_renewal_window() + CLIENT_LIFETIME;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pki.client_not_after() != renewed {
            assert!(
                std::time::Instant::now() < deadline,
                "not renewed within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        let on_disk = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        assert_eq!(not_after_of(&on_disk), renewed);
    }
}
