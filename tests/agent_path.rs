//! The agent path end to end, with the daemon as a child process on the
//! local provider: a ttrpc client on the `agent.ttrpc` socket CreateVM
//! returned → the daemon's agent proxy → TCP → the pod VM's forwarder
//! process → a ttrpc server on the "agent" socket.
//!
//! The relay is byte for byte, so any ttrpc service proves it; the stand-in
//! agent here serves the `hypervisor.Hypervisor` service (Version answers
//! with a marker, StartVM hangs until cancelled). The Kata agent protocol
//! itself comes with the fake kata agent of the agent-path issue.

mod common;

use async_trait::async_trait;
use common::*;
use podvisor::protocols::ttrpc::hypervisor::{
    StartVMRequest, StartVMResponse, VersionRequest, VersionResponse,
};
use podvisor::protocols::ttrpc::hypervisor_ttrpc::{self, HypervisorClient};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A ttrpc server standing in for the kata agent.
struct Agent;

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for Agent {
    async fn version(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            version: format!("agent answers {}", req.version),
            ..Default::default()
        })
    }
    async fn start_vm(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        _: StartVMRequest,
    ) -> ttrpc::Result<StartVMResponse> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(StartVMResponse::default())
    }
}

async fn serve_agent(socket: &Path) -> ttrpc::r#async::Server {
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(hypervisor_ttrpc::create_hypervisor(Arc::new(Agent)));
    server.start().await.unwrap();
    server
}

async fn connect(socket: &Path) -> HypervisorClient {
    HypervisorClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .unwrap(),
    )
}

async fn version(c: &HypervisorClient, what: &str) -> ttrpc::Result<String> {
    let req = VersionRequest {
        version: what.into(),
        ..Default::default()
    };
    c.version(ctx(5), &req).await.map(|r| r.version)
}

/// A Running sandbox whose pod VM relays to `agent`; returns its id, the
/// agent socket path CreateVM returned, and its instance id.
async fn running_sandbox(daemon: &Daemon) -> (String, PathBuf, String) {
    let client = daemon.client().await;
    let id = sandbox_id();
    let path = client
        .create(&id, pod_annotations("agent", "ns"))
        .await
        .unwrap();
    client.start(&id).await.unwrap();
    let instance = daemon.instance(&id).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, PathBuf::from(path), instance)
}

fn setup_with_agent() -> (Setup, PathBuf) {
    let mut setup = Setup::new();
    let agent = setup.root.path().join("agent.sock");
    setup.local.extend([
        "--agent-socket".into(),
        agent.to_string_lossy().into_owned(),
    ]);
    (setup, agent)
}

/// Starts a forwarder like the local provider does, for the instance's
/// address (a "VM" whose forwarder came back), with the settings at
/// `config` (the instance's own `apf.json` when `None`).
fn restart_forwarder(
    setup: &Setup,
    instance: &str,
    agent: &Path,
    config: Option<&Path>,
) -> std::process::Child {
    let dir = setup.local_dir().join("instances").join(instance);
    let own = dir.join("run/peerpod/apf.json");
    let file = dir.join("instance.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    std::process::Command::new(podvisor_podvm::testing::forwarder_binary().unwrap())
        .arg("--listen")
        .arg(format!("{}:{}", v["ip"].as_str().unwrap(), v["port"]))
        .arg("--agent-socket")
        .arg(agent)
        .arg("--instance-id")
        .arg(instance)
        .arg("--config")
        .arg(config.unwrap_or(&own))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_the_agent_through_the_proxy_and_the_forwarder() {
    let (setup, agent_socket) = setup_with_agent();
    let _agent = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    assert_eq!(path, setup.pods_dir().join(&id).join("agent.ttrpc"));

    let shim = connect(&path).await;
    assert_eq!(
        version(&shim, "hello").await.unwrap(),
        "agent answers hello"
    );
    // Many calls at once on one connection, and on several connections.
    let mut calls = Vec::new();
    for i in 0..50 {
        let c = if i % 2 == 0 {
            connect(&path).await
        } else {
            shim.clone()
        };
        calls.push(tokio::spawn(
            async move { version(&c, &i.to_string()).await },
        ));
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), format!("agent answers {i}"));
    }

    // A method the agent does not have: its own answer comes back unchanged.
    let direct = connect(&agent_socket).await;
    let relayed = shim.stop_vm(ctx(5), &Default::default()).await.unwrap_err();
    let expected = direct
        .stop_vm(ctx(5), &Default::default())
        .await
        .unwrap_err();
    assert_eq!(format!("{relayed:?}"), format!("{expected:?}"));

    // The TLS keys are the daemon's own, and never in its log.
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "client.key"] {
            let path = setup.state_dir().join("tls").join(key);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert!(!daemon.log_text().contains("PRIVATE KEY"));
    }

    // StopVM closes the agent socket.
    daemon.client().await.stop(&id).await.unwrap();
    eventually(
        "the agent socket to close",
        Duration::from_secs(10),
        async || (!path.exists()).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_forwarder_fails_calls_in_flight_and_the_next_connection_dials_again() {
    let (setup, agent_socket) = setup_with_agent();
    let _agent = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    let shim = connect(&path).await;
    assert!(version(&shim, "before").await.is_ok());

    // A call in flight when the pod VM's forwarder dies fails at once,
    // with the reason, instead of waiting out its deadline.
    let hanging = {
        let shim = shim.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = shim
                .start_vm(
                    ttrpc::context::with_duration(Duration::from_secs(60)),
                    &Default::default(),
                )
                .await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = instance_pid(&setup.local_dir(), &instance).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (result, took) = hanging.await.unwrap();
    let (code, message) = rpc_error(result.unwrap_err());
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{message}");
    assert!(
        message.contains("dropped") && message.contains("pod VM's agent"),
        "{message}"
    );
    assert!(
        took < Duration::from_secs(10),
        "failed in {took:?}, not at the deadline"
    );

    // The forwarder comes back; a new connection dials it again.
    let mut forwarder = restart_forwarder(&setup, &instance, &agent_socket, None);
    let again = eventually(
        "the relay to work again",
        Duration::from_secs(10),
        async || version(&connect(&path).await, "after").await.ok(),
    )
    .await;
    assert_eq!(again, "agent answers after");
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill9_and_a_restart_the_next_call_works_through_the_recovered_proxy() {
    let (setup, agent_socket) = setup_with_agent();
    let _agent = serve_agent(&agent_socket).await;
    let mut daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    assert!(version(&connect(&path).await, "before").await.is_ok());

    daemon.kill9();
    drop(daemon);
    let daemon = setup.start().await;
    let answer = eventually("the recovered proxy", Duration::from_secs(10), async || {
        version(&connect(&path).await, "after a crash").await.ok()
    })
    .await;
    assert_eq!(answer, "agent answers after a crash");
    daemon.client().await.stop(&id).await.unwrap();
}

/// Kills the instance's forwarder process.
fn kill_forwarder(setup: &Setup, instance: &str) {
    let pid = instance_pid(&setup.local_dir(), instance).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
}

/// A CA of someone else's, and a certificate from it for `name`.
fn foreign_identity(name: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    leaf.extended_key_usages = vec![usage];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_with_a_certificate_from_another_ca_is_refused() {
    let (setup, agent_socket) = setup_with_agent();
    let _agent = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    let name = daemon.instance(&id).await.unwrap()["instance_name"]
        .as_str()
        .unwrap()
        .to_owned();
    kill_forwarder(&setup, &instance);

    // An impostor on the pod VM's address: the right name, the wrong CA.
    let (_, cert, key) = foreign_identity(&name, rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let our_ca = std::fs::read_to_string(setup.state_dir().join("tls/ca.pem")).unwrap();
    let settings = setup.root.path().join("impostor.json");
    std::fs::write(
        &settings,
        serde_json::json!({"tls-server-cert": cert, "tls-server-key": key, "tls-client-ca": our_ca})
            .to_string(),
    )
    .unwrap();
    let mut impostor = restart_forwarder(&setup, &instance, &agent_socket, Some(&settings));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, message) = rpc_error(version(&connect(&path).await, "x").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{message}");
    assert!(
        message.contains("TLS handshake") && message.contains("failed"),
        "{message}"
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_our_certificate_is_refused_by_the_forwarder() {
    let (setup, agent_socket) = setup_with_agent();
    let _agent = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, _, instance) = running_sandbox(&daemon).await;
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            setup
                .local_dir()
                .join("instances")
                .join(&instance)
                .join("instance.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("{}:{}", v["ip"].as_str().unwrap(), v["port"])
        .parse()
        .unwrap();
    let name = daemon.instance(&id).await.unwrap()["instance_name"]
        .as_str()
        .unwrap()
        .to_owned();
    let our_ca = std::fs::read_to_string(setup.state_dir().join("tls/ca.pem")).unwrap();

    // Trusts the forwarder, but shows a client certificate from another CA.
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(our_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let (_, cert, key) = foreign_identity("intruder", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(|c| c.unwrap())
            .collect(),
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
    // TLS 1.3 reports a refused client certificate on the first read.
    let refused = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(server_name, tcp)
        .await
    {
        Err(_) => true,
        Ok(mut tls) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(&[0u8; 10]).await;
            let mut buf = [0u8; 1];
            !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "the forwarder served a client it does not know");
    // And a plain TCP client gets nothing from the agent either.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = plain.write_all(&[0, 0, 0, 0, 0, 0, 0, 1, 1, 0]).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert!(n == 0 || buf[0] == 0x15, "not a TLS alert: {:?}", &buf[..n]);
    }
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_tls_works_and_says_so_loudly() {
    let (mut setup, agent_socket) = setup_with_agent();
    setup.global.push("--disable-tls".into());
    let _agent = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    assert_eq!(
        version(&connect(&path).await, "plain").await.unwrap(),
        "agent answers plain"
    );
    assert!(
        daemon.log_text().contains("WITHOUT TLS"),
        "{}",
        daemon.log_text()
    );
    let apf = std::fs::read_to_string(
        setup
            .local_dir()
            .join("instances")
            .join(&instance)
            .join("run/peerpod/apf.json"),
    )
    .unwrap();
    assert!(!apf.contains("tls-server-key"), "{apf}");
    assert!(!setup.state_dir().join("tls").exists(), "no keys made");
    daemon.client().await.stop(&id).await.unwrap();
}
