//! The HTTPS plumbing of the cloud test servers (feature `conformance`):
//! a throwaway CA and a server certificate from it for 127.0.0.1 and
//! localhost, the server's rustls configuration (ring, HTTP/1.1), an accept
//! loop that hands every request to a handler, and a thread with its own
//! Tokio runtime that runs that loop until dropped.
//!
//! A server binds first ([`TestServer::bind`]), so its address is known
//! before its state is made (the Azure server's state holds its URL), then
//! serves with a handler ([`TestServer::spawn`]); the [`TestServerThread`]
//! it returns stops and joins the thread when dropped.
//!
//! The handler gets each request and an [`Arc<Notify>`] of its connection:
//! notifying it drops the connection unanswered (a test server's
//! `Fault::Close`).

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The name of the CA's PEM file in a server's temporary directory.
const CA_FILE: &str = "ca.pem";

/// A CA named `ca_name`, and a server certificate from it for 127.0.0.1
/// and localhost: (CA PEM, certificate PEM, key PEM).
///
/// # Errors
///
/// rcgen's, when a key or a certificate cannot be made.
pub fn certificates(ca_name: &str) -> Result<(String, String, String), rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// A server's rustls configuration (ring, HTTP/1.1) for the certificate
/// chain `cert_pem` and its key `key_pem`.
///
/// # Errors
///
/// The reason, when the PEMs do not parse or rustls refuses them.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The accept loop on `listener` (non-blocking), until `stopped` fires or
/// its sender is dropped: TLS with `tls`, then HTTP/1 with every request
/// going to `handler` along with its connection's close signal (notified,
/// the connection is dropped unanswered).
///
/// # Panics
///
/// Outside a Tokio runtime (one with I/O and time enabled).
pub async fn serve<H, F>(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) where
    H: Fn(Request<Incoming>, Arc<Notify>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::from_std(listener).expect("a Tokio listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let close = Arc::new(Notify::new());
            let service = {
                let close = close.clone();
                hyper::service::service_fn(move |request| handler(request, close.clone()))
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = close.notified() => {}
            }
        });
    }
}

/// A test server bound to a free port of 127.0.0.1, with a new CA whose
/// PEM is in a temporary directory, not serving yet.
#[derive(Debug)]
pub struct TestServer {
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// Makes a CA named `ca_name` and a certificate from it, writes the
    /// CA's PEM, and binds a free port of 127.0.0.1. Panics (a test helper)
    /// when it cannot.
    pub fn bind(ca_name: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for the CA");
        let (ca_pem, cert_pem, key_pem) = certificates(ca_name).expect("test certificates");
        std::fs::write(dir.path().join(CA_FILE), &ca_pem).expect("writing the CA");
        let tls = tls_config(&cert_pem, &key_pem).expect("the TLS configuration");
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("the listener's address");
        Self {
            listener,
            tls,
            addr,
            dir,
        }
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's base URL: `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Serves with `handler` ([`serve`]) on a thread named `thread_name`
    /// with its own two-worker Tokio runtime, so sync and async tests can
    /// use the server. Panics (a test helper) when it cannot.
    pub fn spawn<H, F>(self, thread_name: &str, handler: H) -> TestServerThread
    where
        H: Fn(Request<Incoming>, Arc<Notify>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let Self {
            listener,
            tls,
            addr,
            dir,
        } = self;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the test server's runtime");
                runtime.block_on(serve(listener, tls, handler, stopped));
                runtime.shutdown_background();
            })
            .expect("the test server's thread");
        TestServerThread {
            addr,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// A serving test server ([`TestServer::spawn`]): its thread, the way to
/// stop it, its address and its CA. Dropping it stops the accept loop,
/// joins the thread, then removes the CA's directory.
#[derive(Debug)]
pub struct TestServerThread {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServerThread {
    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's base URL: `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The PEM of the CA the server's certificate is issued by.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(CA_FILE)
    }
}

impl Drop for TestServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
