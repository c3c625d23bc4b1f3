//! A pod VM's whole life on the local provider, through the real ttrpc
//! client, checked in the admin endpoint, the metrics and the process table.

mod common;

use common::*;
use std::time::Duration;
use ttrpc::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_getinfo_stop_on_the_local_provider() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    {
        // The journal holds pods' initdata: owner only.
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            setup.state_dir().join("journal"),
            setup.local_dir().join("instances"),
        ] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
        }
    }
    let client = daemon.client().await;
    let id = sandbox_id();

    // CreateVM: recorded, no cloud call, the agent socket path returned.
    let path = client
        .create(&id, pod_annotations("web", "shop"))
        .await
        .unwrap();
    assert_eq!(
        path,
        setup
            .pods_dir()
            .join(&id)
            .join("agent.ttrpc")
            .to_string_lossy()
    );
    assert!(
        setup.pods_dir().join(&id).is_dir(),
        "the pod directory exists"
    );
    let rec = daemon.instance(&id).await.unwrap();
    assert_eq!(rec["state"], "pending");
    assert_eq!(rec["pod_name"], "web");
    assert_eq!(rec["pod_namespace"], "shop");
    assert_eq!(rec["instance_name"], format!("podvm-web-{}", &id[..8]));
    assert!(rec["instance_id"].is_null());
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "pending")])
            .await,
        1.0
    );
    assert_eq!(
        daemon
            .metric(
                "podvisor_provider_requests_total",
                &[("operation", "create")]
            )
            .await,
        0.0
    );

    // StartVM: returns once the instance runs and its forwarder answers.
    client.start(&id).await.unwrap();
    let rec = daemon.instance(&id).await.unwrap();
    assert_eq!(rec["state"], "running");
    let instance_id = rec["instance_id"].as_str().unwrap().to_owned();
    let ip = rec["ips"][0].as_str().unwrap().to_owned();
    assert!(ip.starts_with("127."), "a loopback address: {ip}");
    assert_eq!(rec["generation"], 1);
    let pid = instance_pid(&setup.local_dir(), &instance_id).expect("the instance has a process");
    assert!(alive(pid), "the forwarder process runs while Running");
    std::net::TcpStream::connect((ip.as_str(), setup.forwarder_port))
        .expect("the forwarder answers");
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "running")])
            .await,
        1.0
    );
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "pending")])
            .await,
        0.0
    );
    assert_eq!(
        daemon
            .metric(
                "podvisor_state_transitions_total",
                &[("from", "creating"), ("to", "running")]
            )
            .await,
        1.0
    );
    assert_eq!(
        daemon
            .metric(
                "podvisor_provider_requests_total",
                &[("operation", "create"), ("outcome", "ok")]
            )
            .await,
        1.0
    );
    assert_eq!(
        daemon
            .metric("podvisor_vm_start_duration_seconds_count", &[])
            .await,
        1.0
    );

    // A second StartVM of a Running sandbox succeeds.
    client.start(&id).await.unwrap();

    // GetInfo: the instance id, by pod.
    assert_eq!(
        client.info("web", "shop", false, 5).await.unwrap(),
        instance_id
    );
    assert_eq!(
        client.info("web", "shop", true, 5).await.unwrap(),
        instance_id
    );

    // StopVM: acknowledged within the Rust shim's 1 s deadline; deletion follows.
    client.stop(&id).await.unwrap();
    eventually("the record to go", Duration::from_secs(20), async || {
        daemon.instance(&id).await.is_none().then_some(())
    })
    .await;
    assert!(!alive(pid), "the forwarder process is gone after StopVM");
    assert!(
        !setup
            .local_dir()
            .join("instances")
            .join(&instance_id)
            .exists()
    );
    assert!(
        !setup.pods_dir().join(&id).exists(),
        "the pod directory is removed"
    );
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "running")])
            .await,
        0.0
    );
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "deleting")])
            .await,
        0.0
    );
    assert_eq!(
        daemon
            .metric(
                "podvisor_state_transitions_total",
                &[("from", "deleting"), ("to", "removed")]
            )
            .await,
        1.0
    );
    // StopVM of a sandbox that is gone succeeds.
    client.stop(&id).await.unwrap();
    let (code, _) = rpc_error(client.start(&id).await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);

    // Every family seen in a whole lifecycle passes Prometheus' own linter
    // (names, units, HELP text).
    let text = daemon.metrics_text().await;
    for family in [
        "podvisor_instances",
        "podvisor_provider_request_duration_seconds",
        "podvisor_journal_flush_duration_seconds",
        "podvisor_vm_start_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    if let Err(complaints) = promtool_check_metrics(&text) {
        panic!("promtool check metrics:\n{complaints}\n---\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_own_error() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "2".into()]);
    let daemon = setup.start().await;
    let c = daemon.client().await;
    let ann = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let expect = async |r: ttrpc::Result<String>, code: Code, words: &[&str]| {
        let (got, message) = rpc_error(r.unwrap_err());
        assert_eq!(got, code, "{message}");
        for w in words {
            assert!(message.contains(w), "{message:?} lacks {w:?}");
        }
    };

    expect(
        c.create("", pod_annotations("p", "n")).await,
        Code::INVALID_ARGUMENT,
        &["sandbox id is empty"],
    )
    .await;
    expect(
        c.create("../etc", pod_annotations("p", "n")).await,
        Code::INVALID_ARGUMENT,
        &["may only hold"],
    )
    .await;
    expect(
        c.create("s1", ann(&[("io.kubernetes.cri.sandbox-name", "p")]))
            .await,
        Code::INVALID_ARGUMENT,
        &["io.kubernetes.cri.sandbox-namespace"],
    )
    .await;
    expect(
        c.create("s1", ann(&[])).await,
        Code::INVALID_ARGUMENT,
        &["pod's name and namespace are required"],
    )
    .await;
    // A malformed hypervisor annotation: its value, and what the error names.
    for (key, value, named) in [
        ("default_vcpus", "lots", "'lots'"),
        ("default_memory", "4Gi", "'4Gi'"),
        ("cc_init_data", "%%%", "not initdata TOML"),
        ("cc_init_data", "a", "not base64"),
        (
            "cc_init_data",
            "algorithm = \"md5\"\nversion = \"0.1.0\"\n[data]\n",
            "'md5' is not sha256, sha384 or sha512",
        ),
    ] {
        let mut bad = pod_annotations("p", "n");
        bad.insert(
            format!("io.katacontainers.config.hypervisor.{key}"),
            value.into(),
        );
        expect(
            c.create("s1", bad).await,
            Code::INVALID_ARGUMENT,
            &[key, named],
        )
        .await;
    }
    assert!(
        daemon.instance("s1").await.is_none(),
        "nothing recorded for bad input"
    );

    let start = |id: &str| {
        let id = id.to_owned();
        let c = &c;
        async move { c.start(&id).await.map(|()| String::new()) }
    };
    expect(start("").await, Code::INVALID_ARGUMENT, &["empty"]).await;
    expect(
        start("never-created").await,
        Code::NOT_FOUND,
        &["never-created", "not known"],
    )
    .await;
    c.stop("never-created")
        .await
        .expect("StopVM of an unknown sandbox succeeds");
    let (code, _) = rpc_error(c.stop("").await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT);

    // Duplicates: the same pod again is the same answer; another pod is refused.
    let p1 = c.create("dup", pod_annotations("p", "n")).await.unwrap();
    assert_eq!(
        c.create("dup", pod_annotations("p", "n")).await.unwrap(),
        p1
    );
    expect(
        c.create("dup", pod_annotations("other", "n")).await,
        Code::ALREADY_EXISTS,
        &["dup", "already exists"],
    )
    .await;

    // The per-node limit (2): the third live pod VM is refused, naming the flag.
    c.create("second", pod_annotations("q", "n")).await.unwrap();
    expect(
        c.create("third", pod_annotations("r", "n")).await,
        Code::RESOURCE_EXHAUSTED,
        &["2 of 2", "--peerpods-limit-per-node"],
    )
    .await;
    c.stop("second").await.unwrap();
    eventually("a slot to free up", Duration::from_secs(10), async || {
        c.create("third", pod_annotations("r", "n")).await.ok()
    })
    .await;

    // GetInfo.
    let info = |pod: &str, ns: &str, wait: bool| {
        let (pod, ns) = (pod.to_owned(), ns.to_owned());
        let c = &c;
        async move { c.info(&pod, &ns, wait, 2).await }
    };
    expect(
        info("", "n", false).await,
        Code::INVALID_ARGUMENT,
        &["PodName"],
    )
    .await;
    expect(
        info("nobody", "n", false).await,
        Code::NOT_FOUND,
        &["n/nobody"],
    )
    .await;
    expect(
        info("p", "n", false).await,
        Code::FAILED_PRECONDITION,
        &["no instance yet"],
    )
    .await;
    // Waiting for a pod that never starts ends at the caller's deadline.
    let r = info("p", "n", true).await.unwrap_err();
    assert!(
        matches!(&r, ttrpc::Error::RpcStatus(s) if s.code() == Code::DEADLINE_EXCEEDED)
            || matches!(&r, ttrpc::Error::Others(m) if m.contains("deadline")),
        "{r:?}"
    );

    assert!(
        daemon
            .metric(
                "podvisor_api_requests_total",
                &[("code", "invalid_argument")]
            )
            .await
            >= 7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sandboxes_concurrently() {
    let mut setup = Setup::new();
    setup.global.extend([
        "--peerpods-limit-per-node".into(),
        "0".into(),
        "--provider-rate".into(),
        "1000".into(),
        "--provider-burst".into(),
        "100".into(),
    ]);
    let daemon = setup.start().await;
    let client = std::sync::Arc::new(daemon.client().await);
    let ids: Vec<String> = (0..50).map(|_| sandbox_id()).collect();
    let mut tasks = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let (c, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            c.create(&id, pod_annotations(&format!("pod-{n}"), "load"))
                .await
                .unwrap();
            c.start(&id).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, list) = daemon.get("/v1/instances").await.unwrap();
    let instances = list["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 50);
    assert!(instances.iter().all(|i| i["state"] == "running"));
    let mut ips: Vec<_> = instances
        .iter()
        .map(|i| i["ips"][0].as_str().unwrap().to_owned())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "every pod VM has its own address");
    assert_eq!(
        daemon
            .metric("podvisor_instances", &[("state", "running")])
            .await,
        50.0
    );

    let mut tasks = Vec::new();
    for id in &ids {
        let (c, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move { c.stop(&id).await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually(
        "all 50 to be deleted",
        Duration::from_secs(60),
        async || {
            let (_, list) = daemon.get("/v1/instances").await.unwrap();
            list["instances"]
                .as_array()
                .unwrap()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let left = std::fs::read_dir(setup.local_dir().join("instances"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "no instance left in the provider");
    assert_eq!(
        daemon
            .metric("podvisor_state_transitions_total", &[("to", "removed")])
            .await,
        50.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopvm_during_a_create_cancels_cleanly_and_the_instance_is_deleted() {
    let mut setup = Setup::new();
    setup
        .local
        .extend(["--create-delay".into(), "1500ms".into()]);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let (id, starting) = daemon.start_until_creating("cancelled").await;
    let asked = std::time::Instant::now();
    client.stop(&id).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "StopVM acknowledged within 1 s"
    );

    let (code, message) = rpc_error(starting.await.unwrap().unwrap_err());
    assert!(
        message.contains(&id),
        "StartVM fails naming the sandbox: {code:?} {message}"
    );
    eventually("the record to go", Duration::from_secs(20), async || {
        daemon.instance(&id).await.is_none().then_some(())
    })
    .await;
    // The instance the create made after the stop arrived is deleted too.
    let left: Vec<_> = std::fs::read_dir(setup.local_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "instances left: {left:?}");
    assert_eq!(
        daemon
            .metric(
                "podvisor_provider_requests_total",
                &[("operation", "create"), ("outcome", "ok")]
            )
            .await,
        1.0,
        "the create did run"
    );
}

/// Readiness is a completed mutual-TLS handshake with the pod VM's
/// forwarder, not an open port: a plain TCP listener on the instance's
/// address (not our forwarder) never makes StartVM succeed, and the
/// failure names the handshake. The instance is then deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_port_that_is_not_the_forwarder_never_makes_startvm_succeed() {
    let mut setup = Setup::new();
    // Whatever the local provider starts as the "forwarder": a listener on
    // the instance's address that answers every connection with an HTTP
    // response, as an unrelated host on a reused address would.
    setup.forwarder_script(
        "impostor.py",
        r#"#!/usr/bin/env python3
import socket, sys
listen = sys.argv[sys.argv.index("--listen") + 1]
host, port = listen.rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    except OSError:
        pass
    c.close()
"#,
    );
    setup.global.extend(
        ["--proxy-timeout", "2s", "--create-attempts", "1"]
            .map(String::from)
            .to_vec(),
    );
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("impostor", "ns"))
        .await
        .unwrap();
    let (code, message) = rpc_error(client.start(&id).await.unwrap_err());
    assert_ne!(code, ttrpc::Code::OK);
    assert!(
        message.contains("did not complete a TLS handshake") && message.contains("podvm-impostor-"),
        "{message}"
    );
    // Failed creations are cleaned up: the impostor's instance goes.
    eventually(
        "the failed instance deleted",
        Duration::from_secs(30),
        async || {
            let view = daemon.instance(&id).await?;
            (view["state"] == "failed" && view["instance_id"].is_null()).then_some(())
        },
    )
    .await;
}

/// An agent socket path longer than a unix socket may be is refused at
/// CreateVM with the reason, instead of a socket that is never bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_dir_too_long_for_a_unix_socket_is_refused_at_create_vm() {
    let mut setup = Setup::new();
    let long = setup.root.path().join("p".repeat(40));
    setup.pods_dir_override = Some(long);
    let daemon = setup.start().await;
    let (code, message) = rpc_error(
        daemon
            .client()
            .await
            .create(&sandbox_id(), pod_annotations("long", "ns"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(
        message.contains("above the 107 a unix socket path may have")
            && message.contains("--pods-dir"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_files_hold_no_colour_codes() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let started = run_pods(&daemon, 1).await;
    let (id, instance) = &started[0];
    let forwarder_log = setup
        .local_dir()
        .join("instances")
        .join(instance)
        .join("forwarder.log");
    let forwarder = std::fs::read_to_string(&forwarder_log).unwrap();
    assert!(forwarder.contains("forwarder listening"), "{forwarder}");
    assert!(!forwarder.contains('\u{1b}'), "colour codes: {forwarder:?}");
    let own = daemon.log_text();
    assert!(own.contains("podvisor serving"), "{own}");
    assert!(!own.contains('\u{1b}'), "colour codes: {own:?}");
    daemon.client().await.stop(id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_and_dot_dot_are_refused_as_names_of_directories() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let client = daemon.client().await;
    for (id, names) in [
        (".", "the pods dir itself"),
        ("..", "the pods dir's parent"),
    ] {
        let (code, message) = rpc_error(
            client
                .create(id, pod_annotations("p", "n"))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, Code::INVALID_ARGUMENT, "{message}");
        assert!(
            message.contains(&format!("{id:?}")) && message.contains(names),
            "{id}: {message}"
        );
        assert!(!message.contains("may only hold"), "{id}: {message}");
    }
}

/// A CreateVM refused at `--peerpods-limit-per-node` makes nothing: no pod
/// directory is left behind for the sandbox that was never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_vm_refused_at_the_node_limit_leaves_no_pod_directory() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "1".into()]);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let accepted = sandbox_id();
    client
        .create(&accepted, pod_annotations("first", "ns"))
        .await
        .unwrap();
    assert!(setup.pods_dir().join(&accepted).is_dir());
    let refused = sandbox_id();
    let (code, message) = rpc_error(
        client
            .create(&refused, pod_annotations("second", "ns"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::RESOURCE_EXHAUSTED, "{message}");
    assert!(
        !setup.pods_dir().join(&refused).exists(),
        "a pod directory for the refused sandbox"
    );
    assert!(daemon.instance(&refused).await.is_none());
}

/// A stale socket file, as a daemon killed with its agent socket open
/// leaves it.
fn stale_socket(path: &std::path::Path) {
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
}

/// The GC removes the pod directories that no journal record owns and that
/// podvisor made (empty, or holding only a stale agent socket); it keeps
/// every directory a record owns, whatever its state, and everything under
/// `--pods-dir` it did not make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_removes_pod_directories_no_record_owns_and_nothing_else() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut daemon = setup.start().await;
    let running = run_pods(&daemon, 1).await.remove(0).0;
    let pending = sandbox_id();
    daemon
        .client()
        .await
        .create(&pending, pod_annotations("pending", "ns"))
        .await
        .unwrap();
    assert!(daemon.sigterm().success());

    let pods = setup.pods_dir();
    // Made by podvisor, owned by no record: removed.
    let (empty, with_socket) = (sandbox_id(), sandbox_id());
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(pods.join(&empty))
        .unwrap();
    std::fs::create_dir(pods.join(&with_socket)).unwrap();
    stale_socket(&pods.join(&with_socket).join("agent.ttrpc"));
    // Not podvisor's to remove: kept.
    let with_other = sandbox_id();
    std::fs::create_dir(pods.join(&with_other)).unwrap();
    std::fs::write(pods.join(&with_other).join("notes"), "mine").unwrap();
    let regular_socket = sandbox_id();
    std::fs::create_dir(pods.join(&regular_socket)).unwrap();
    std::fs::write(pods.join(&regular_socket).join("agent.ttrpc"), "").unwrap();
    std::fs::create_dir(pods.join("lost+found")).unwrap();
    let a_file = sandbox_id();
    std::fs::write(pods.join(&a_file), "").unwrap();
    let elsewhere = setup.root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let a_link = sandbox_id();
    std::os::unix::fs::symlink(&elsewhere, pods.join(&a_link)).unwrap();
    // A record's directory, even one the records' daemon did not make.
    let running_extra = pods.join(&running).join("extra");
    std::fs::write(&running_extra, "").unwrap();

    let daemon = setup.start().await;
    eventually(
        "the unowned pod directories removed",
        Duration::from_secs(15),
        async || (!pods.join(&empty).exists() && !pods.join(&with_socket).exists()).then_some(()),
    )
    .await;
    // Two more passes: whatever they would remove, they have.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for kept in [&with_other, &regular_socket, &a_link] {
        assert!(pods.join(kept).symlink_metadata().is_ok(), "{kept} removed");
    }
    assert!(pods.join(&with_other).join("notes").is_file());
    assert!(pods.join("lost+found").is_dir());
    assert!(pods.join(&a_file).is_file());
    assert!(elsewhere.is_dir());
    for owned in [&running, &pending] {
        assert!(pods.join(owned).is_dir(), "{owned}'s directory removed");
        assert!(daemon.instance(owned).await.is_some());
    }
    assert!(running_extra.is_file());
    let mode = std::fs::metadata(&pods).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    daemon.client().await.stop(&running).await.unwrap();
}

/// A failed record shows the creation attempts that its error counts, not
/// zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_shows_the_attempts_its_error_counts() {
    let mut setup = Setup::new();
    // A "VM" that never comes up: every create fails, and may be retried.
    setup.forwarder_script("dead-forwarder", "#!/bin/sh\nexit 3\n");
    setup.global.extend(
        ["--create-attempts", "2", "--retry-base", "10ms"]
            .map(String::from)
            .to_vec(),
    );
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("doomed", "ns"))
        .await
        .unwrap();
    let (_, message) = rpc_error(client.start(&id).await.unwrap_err());
    assert!(message.contains("after 2 attempt(s)"), "{message}");
    let view = daemon.instance(&id).await.unwrap();
    assert_eq!(view["state"], "failed", "{view}");
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("after 2 attempt(s)"),
        "{view}"
    );
    assert_eq!(view["attempts"], 2, "{view}");
}

/// CreateVM answers with an absolute agent socket path even when
/// `--pods-dir` is given relative to the daemon's working directory: the
/// shim runs elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_pods_dir_still_gives_an_absolute_agent_socket_path() {
    let mut setup = Setup::new();
    setup.current_dir = Some(setup.root.path().to_owned());
    setup.pods_dir_override = Some("relative-pods".into());
    let daemon = setup.start().await;
    // Short: the absolute path must stay within a unix socket's 107 bytes.
    let id = "relative-1";
    let path = daemon
        .client()
        .await
        .create(id, pod_annotations("relative", "ns"))
        .await
        .unwrap();
    let expected = setup
        .root
        .path()
        .join("relative-pods")
        .join(id)
        .join("agent.ttrpc");
    assert_eq!(std::path::Path::new(&path), expected);
    assert!(expected.parent().unwrap().is_dir());
    let (_, status) = daemon.get("/v1/status").await.unwrap();
    assert_eq!(
        status["pods_dir"].as_str(),
        Some(&*setup.root.path().join("relative-pods").to_string_lossy()),
        "{status}"
    );
}
