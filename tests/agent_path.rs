//! The agent path end to end, with the daemon as a child process on the
//! local provider: a ttrpc client speaking Kata's agent protocol (the
//! clients the shim uses) on the `agent.ttrpc` socket CreateVM returned →
//! the daemon's agent proxy → mutual TLS over TCP → the pod VM's forwarder
//! process → a fake kata agent (`common/kata_agent.rs`) on the agent socket,
//! whose containers run real processes.

mod common;
#[path = "common/kata_agent.rs"]
mod kata_agent;

use common::*;
use kata_agent::{FakeAgent, Shim};
use std::path::{Path, PathBuf};
use std::time::Duration;

async fn connect(socket: &Path) -> Shim {
    Shim::connect(socket).await.unwrap()
}

/// Health.Check through `socket`.
async fn check(socket: &Path) -> ttrpc::Result<bool> {
    Shim::connect(socket).await?.check().await
}

/// Serves a fake agent on `socket`.
async fn serve_agent(socket: &Path) -> (FakeAgent, ttrpc::r#async::Server) {
    let agent = FakeAgent::default();
    let server = agent.serve(socket).await;
    (agent, server)
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
async fn every_agent_call_works_through_the_proxy_and_the_forwarder() {
    let (setup, agent_socket) = setup_with_agent();
    let (agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    assert_eq!(path, setup.pods_dir().join(&id).join("agent.ttrpc"));

    let shim = connect(&path).await;
    assert!(shim.check().await.unwrap(), "Health.Check: SERVING");
    shim.create_sandbox(&id).await.unwrap();
    // The init process echoes its stdin, then says goodbye and exits 3.
    shim.create_container("c1", &["sh", "-c", "cat; printf goodbye; exit 3"], &[], &[])
        .await
        .unwrap();
    shim.start_container("c1").await.unwrap();
    assert_eq!(shim.write_stdin("c1", "", b"hello ").await.unwrap(), 6);
    assert_eq!(shim.write_stdin("c1", "", b"agent\n").await.unwrap(), 6);
    shim.close_stdin("c1", "").await.unwrap();
    assert_eq!(
        shim.read_all_stdout("c1", "").await.unwrap(),
        b"hello agent\ngoodbye"
    );
    assert_eq!(shim.wait("c1", "").await.unwrap(), 3);
    // An exec in the container: its own process, output and status.
    shim.exec("c1", "e1", &["sh", "-c", "echo \"$((6 * 7))\"; exit 0"])
        .await
        .unwrap();
    assert_eq!(shim.read_all_stdout("c1", "e1").await.unwrap(), b"42\n");
    assert_eq!(shim.wait("c1", "e1").await.unwrap(), 0);
    // The agent's errors come back as the agent gave them.
    let (code, message) = rpc_error(shim.start_container("nope").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{message}");
    assert!(message.contains("container nope not found"), "{message}");
    // Every call reached the agent, in order (reads: as many as it took).
    let calls = agent.calls();
    let without_reads: Vec<_> = calls.iter().filter(|c| **c != "ReadStdout").collect();
    assert_eq!(
        without_reads,
        [
            "Check",
            "CreateSandbox",
            "CreateContainer",
            "StartContainer",
            "WriteStdin",
            "WriteStdin",
            "CloseStdin",
            "WaitProcess",
            "ExecProcess",
            "WaitProcess",
            "StartContainer",
        ]
        .iter()
        .collect::<Vec<_>>()
    );
    assert!(calls.iter().filter(|c| **c == "ReadStdout").count() >= 4);

    // Many calls at once on one connection, and on several connections.
    let mut calls = Vec::new();
    for i in 0..50 {
        let c = if i % 2 == 0 {
            connect(&path).await
        } else {
            shim.clone()
        };
        calls.push(tokio::spawn(async move {
            let exec = format!("x{i}");
            c.exec("c1", &exec, &["echo", &exec]).await?;
            let out = c.read_all_stdout("c1", &exec).await?;
            c.wait("c1", &exec).await?;
            Ok::<_, ttrpc::Error>(out)
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), format!("x{i}\n").into_bytes());
    }

    // A method the agent does not serve, and a service nobody knows: the
    // agent's own answer comes back unchanged.
    let direct = connect(&agent_socket).await;
    let req = Default::default();
    let relayed = shim
        .agent
        .get_guest_details(ttrpc::context::with_timeout(5_000_000_000), &req)
        .await
        .unwrap_err();
    let expected = direct
        .agent
        .get_guest_details(ttrpc::context::with_timeout(5_000_000_000), &req)
        .await
        .unwrap_err();
    assert_eq!(format!("{relayed:?}"), format!("{expected:?}"));
    let raw = |socket: PathBuf| async move {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .unwrap();
        let mut r = ttrpc::Request::new();
        r.service = "podvisor.Future".into();
        r.method = "Unknown".into();
        r.payload = vec![1, 2, 3];
        r.timeout_nano = 5_000_000_000;
        c.request(r).await
    };
    let relayed = raw(path.clone()).await;
    let expected = raw(agent_socket.clone()).await;
    assert_eq!(format!("{relayed:?}"), format!("{expected:?}"));
    assert!(relayed.is_err(), "{relayed:?}");

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
async fn sixteen_mib_of_stdout_arrive_intact() {
    let (setup, agent_socket) = setup_with_agent();
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    let data: Vec<u8> = {
        let mut rng = fastrand::Rng::with_seed(16);
        (0..16 << 20).map(|_| rng.u8(..)).collect()
    };
    let file = setup.root.path().join("sixteen.bin");
    std::fs::write(&file, &data).unwrap();

    let shim = connect(&path).await;
    shim.create_sandbox(&id).await.unwrap();
    let file = file.to_string_lossy().into_owned();
    shim.create_container("big", &["cat", &file], &[], &[])
        .await
        .unwrap();
    shim.start_container("big").await.unwrap();
    let got = shim.read_all_stdout("big", "").await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
    assert_eq!(shim.wait("big", "").await.unwrap(), 0);

    // And the other way: 16 MiB into a process's stdin, counted by it.
    shim.exec("big", "wc", &["wc", "-c"]).await.unwrap();
    for chunk in data.chunks(1 << 20) {
        let n = shim.write_stdin("big", "wc", chunk).await.unwrap();
        assert_eq!(n as usize, chunk.len());
    }
    shim.close_stdin("big", "wc").await.unwrap();
    let counted = shim.read_all_stdout("big", "wc").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&counted).trim(), "16777216");
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_gets_the_reference_annotations_on_the_way() {
    let (mut setup, agent_socket) = setup_with_agent();
    // Kata's direct-volumes directory: one CSI volume published there.
    let volumes = setup.root.path().join("direct-volumes");
    let published = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-a/mount";
    let other = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-b/mount";
    {
        use base64::Engine as _;
        let name = base64::engine::general_purpose::URL_SAFE.encode(published);
        std::fs::create_dir_all(volumes.join(name)).unwrap();
    }
    setup.global.extend([
        "--kata-direct-volumes-dir".into(),
        volumes.to_string_lossy().into_owned(),
    ]);
    let (agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    let shim = connect(&path).await;
    shim.create_sandbox(&id).await.unwrap();

    shim.create_container(
        "gpu",
        &["true"],
        &[
            ("io.katacontainers.config.hypervisor.default_gpus", "1"),
            ("io.kubernetes.cri.container-name", "app"),
        ],
        &["/etc/hosts", other, published],
    )
    .await
    .unwrap();
    let seen = agent.annotations("gpu").unwrap();
    assert_eq!(seen["cdi.k8s.io/peer-pods"], "nvidia.com/gpu=all");
    assert_eq!(
        seen["io.confidentialcontainers.org.peerpodvolumes.target_path"],
        published
    );
    assert_eq!(seen["io.kubernetes.cri.container-name"], "app");
    assert_eq!(seen.len(), 4, "{seen:?}");

    // A container asking for nothing arrives as it was sent.
    shim.create_container("plain", &["true"], &[("k", "v")], &["/etc/hosts"])
        .await
        .unwrap();
    assert_eq!(
        agent.annotations("plain").unwrap(),
        [("k".to_owned(), "v".to_owned())].into()
    );
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_forwarder_fails_calls_in_flight_and_the_next_connection_dials_again() {
    let (setup, agent_socket) = setup_with_agent();
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    let shim = connect(&path).await;
    shim.create_sandbox(&id).await.unwrap();
    shim.create_container("sleeper", &["sleep", "3600"], &[], &[])
        .await
        .unwrap();
    shim.start_container("sleeper").await.unwrap();

    // A call in flight when the pod VM's forwarder dies fails at once,
    // with the reason, instead of waiting out its deadline.
    let hanging = {
        let shim = shim.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = shim.wait("sleeper", "").await;
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
        async || check(&path).await.ok(),
    )
    .await;
    assert!(again);
    // The agent kept its state: the container is still there.
    let shim = connect(&path).await;
    let (code, message) = rpc_error(shim.start_container("sleeper").await.unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{message}");
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill9_and_a_restart_the_next_call_works_through_the_recovered_proxy() {
    let (setup, agent_socket) = setup_with_agent();
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let mut daemon = setup.start().await;
    let (id, path, _) = running_sandbox(&daemon).await;
    let shim = connect(&path).await;
    shim.create_sandbox(&id).await.unwrap();
    shim.create_container("c", &["sh", "-c", "cat"], &[], &[])
        .await
        .unwrap();
    shim.start_container("c").await.unwrap();
    shim.write_stdin("c", "", b"before ").await.unwrap();

    daemon.kill9();
    drop(daemon);
    let daemon = setup.start().await;
    // The shim dials again, as it does, and carries on where it was.
    let shim = eventually("the recovered proxy", Duration::from_secs(10), async || {
        let shim = Shim::connect(&path).await.ok()?;
        shim.check().await.ok()?;
        Some(shim)
    })
    .await;
    shim.write_stdin("c", "", b"after").await.unwrap();
    shim.close_stdin("c", "").await.unwrap();
    assert_eq!(
        shim.read_all_stdout("c", "").await.unwrap(),
        b"before after"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_with_a_certificate_from_another_ca_is_refused() {
    let (setup, agent_socket) = setup_with_agent();
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    let name = daemon.instance(&id).await.unwrap()["instance_name"]
        .as_str()
        .unwrap()
        .to_owned();
    kill_forwarder(&setup, &instance);

    // An impostor on the pod VM's address: the right name, the wrong CA.
    let (_, cert, key) = identity_from_new_ca(&name, rcgen::ExtendedKeyUsagePurpose::ServerAuth);
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
    let (code, message) = rpc_error(check(&path).await.unwrap_err());
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
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, _, instance) = running_sandbox(&daemon).await;
    let v = instance_json(&setup.local_dir(), &instance).expect("the instance's instance.json");
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
    let (_, cert, key) =
        identity_from_new_ca("intruder", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
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

/// A clock stopped at one moment: the day a daemon last made its keys.
#[derive(Debug)]
struct StoppedClock(std::time::SystemTime);

impl podvisor::tls::Clock for StoppedClock {
    fn now(&self) -> std::time::SystemTime {
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_renewed_at_start_and_its_expiry_exported() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let (setup, agent_socket) = setup_with_agent();
    let (_agent, _server) = serve_agent(&agent_socket).await;
    // Keys made a year and a month ago, by a daemon that has not run since:
    // the client certificate expired a month ago.
    let made =
        SystemTime::now() - podvisor::tls::CLIENT_LIFETIME - Duration::from_secs(30 * 86_400);
    let policy = podvisor::tls::ClientPolicy {
        tls: podvisor_podvm::tls::TlsPolicy::new(None, None).unwrap(),
        skip_verify: false,
    };
    let tls = setup.state_dir().join("tls");
    let old = podvisor::tls::Pki::load_or_create_at(
        &tls,
        &policy,
        std::sync::Arc::new(StoppedClock(made)),
    )
    .unwrap();
    assert!(old.client_not_after() < SystemTime::now());
    let ca_expiry = old.ca_not_after();
    drop(old);
    let expired = std::fs::read_to_string(tls.join("client.pem")).unwrap();

    let daemon = setup.start().await;
    assert!(
        daemon.log_text().contains("renewed the client certificate"),
        "{}",
        daemon.log_text()
    );
    assert_ne!(
        std::fs::read_to_string(tls.join("client.pem")).unwrap(),
        expired
    );
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let expiry = "podvisor_tls_certificate_expiry_timestamp_seconds";
    let client = daemon.metric(expiry, &[("certificate", "client")]).await;
    let soonest = secs(SystemTime::now() + podvisor::tls::CLIENT_LIFETIME) - 3600.0;
    assert!(client > soonest, "client certificate expiry {client}");
    assert_eq!(
        daemon.metric(expiry, &[("certificate", "ca")]).await,
        secs(ca_expiry)
    );
    // The forwarder accepts the renewed certificate: StartVM waits for a
    // completed handshake, and the agent answers through the proxy.
    let (id, path, _) = running_sandbox(&daemon).await;
    assert!(check(&path).await.unwrap());
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_tls_works_and_says_so_loudly() {
    let (mut setup, agent_socket) = setup_with_agent();
    setup.global.push("--disable-tls".into());
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    assert!(check(&path).await.unwrap());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_skip_verify_accepts_a_foreign_certificate_and_says_so_loudly() {
    let (mut setup, agent_socket) = setup_with_agent();
    setup.env.push(("TLS_SKIP_VERIFY".into(), "true".into()));
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    assert!(
        daemon.log_text().contains("certificates are NOT verified"),
        "{}",
        daemon.log_text()
    );
    kill_forwarder(&setup, &instance);
    // A forwarder with a certificate from another CA, for another name: the
    // proxy no longer checks (the forwarder still checks the proxy).
    let (_, cert, key) =
        identity_from_new_ca("elsewhere", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let our_ca = std::fs::read_to_string(setup.state_dir().join("tls/ca.pem")).unwrap();
    let settings = setup.root.path().join("foreign.json");
    std::fs::write(
        &settings,
        serde_json::json!({"tls-server-cert": cert, "tls-server-key": key, "tls-client-ca": our_ca})
            .to_string(),
    )
    .unwrap();
    let mut foreign = restart_forwarder(&setup, &instance, &agent_socket, Some(&settings));
    let served = eventually(
        "the foreign forwarder",
        Duration::from_secs(10),
        async || check(&path).await.ok(),
    )
    .await;
    assert!(served);
    let _ = foreign.kill();
    let _ = foreign.wait();
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suites_go_to_the_forwarder_and_both_ends_keep_to_them() {
    let (mut setup, agent_socket) = setup_with_agent();
    setup.env.extend([
        ("TLS_MIN_VERSION".into(), "VersionTLS13".into()),
        ("TLS_CIPHER_SUITES".into(), "TLS_AES_256_GCM_SHA384".into()),
    ]);
    let (_agent, _server) = serve_agent(&agent_socket).await;
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;
    assert!(check(&path).await.unwrap());
    let own = setup
        .local_dir()
        .join("instances")
        .join(&instance)
        .join("run/peerpod/apf.json");
    let mut apf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&own).unwrap()).unwrap();
    assert_eq!(apf["tls-cipher-suites"], "TLS_AES_256_GCM_SHA384");
    assert_eq!(apf["tls-min-version"], "VersionTLS13");

    // The same pod VM offering only another suite: no common suite, no
    // handshake, a clear error.
    kill_forwarder(&setup, &instance);
    apf["tls-cipher-suites"] = "TLS_AES_128_GCM_SHA256".into();
    let settings = setup.root.path().join("other-suite.json");
    std::fs::write(&settings, apf.to_string()).unwrap();
    let mut other = restart_forwarder(&setup, &instance, &agent_socket, Some(&settings));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, message) = rpc_error(check(&path).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{message}");
    assert!(message.contains("TLS handshake"), "{message}");
    let _ = other.kill();
    let _ = other.wait();
    daemon.client().await.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_no_agent_fails_at_once_and_the_forwarder_logs_the_absent_socket() {
    // The local provider's agent socket, with no agent serving it.
    let (setup, agent_socket) = setup_with_agent();
    let daemon = setup.start().await;
    let (id, path, instance) = running_sandbox(&daemon).await;

    let started = std::time::Instant::now();
    let result = check(&path).await;
    let took = started.elapsed();
    let (code, message) = rpc_error(result.unwrap_err());
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{message}");
    assert!(message.contains("pod VM's agent"), "{message}");
    assert!(
        took < Duration::from_secs(5),
        "failed after {took:?}, not at once"
    );
    let log_path = setup
        .local_dir()
        .join("instances")
        .join(&instance)
        .join("forwarder.log");
    let log = eventually(
        "the forwarder's warning",
        Duration::from_secs(5),
        async || {
            let log = std::fs::read_to_string(&log_path).ok()?;
            log.contains("is absent").then_some(log)
        },
    )
    .await;
    assert!(
        log.contains("WARN") && log.contains(&*agent_socket.to_string_lossy()),
        "{log}"
    );
    daemon.client().await.stop(&id).await.unwrap();
}
