//! `/startup` after a restart: 503 until every sandbox that was Running
//! before is verified again, then 200 for good — on the admin endpoint and
//! on `--probe-port`, the reference's probe port (a child process, local
//! provider whose lookups are slowed so the wait can be seen).

mod common;

use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_every_running_sandbox_to_be_verified_after_a_restart() {
    let mut setup = Setup::new();
    let probe_port = free_port();
    setup.global.extend([
        "--probe-port".into(),
        probe_port.to_string(),
        "--peerpods-limit-per-node".into(),
        "0".into(),
    ]);
    let mut daemon = setup.start().await;
    let (status, body) = daemon.get("/startup").await.unwrap();
    assert_eq!(
        (status, body["started"].clone()),
        (200, true.into()),
        "{body}"
    );
    let pods = run_pods(&daemon, 20).await;
    daemon.kill9();

    // Every lookup and listing of the cloud now takes 2 s.
    setup.local.extend(["--lookup-delay".into(), "2s".into()]);
    let daemon = setup.spawn();
    let probe = format!("http://127.0.0.1:{probe_port}/startup");
    let began = Instant::now();
    let mut answers = Vec::new();
    let passed = loop {
        let admin = daemon.get("/startup").await;
        let on_port = http_get(probe.clone()).await;
        if let (Ok((a, body)), Ok((p, _))) = (&admin, &on_port) {
            assert_eq!(a, p, "the probe port answers as the admin endpoint");
            if *a == 200 {
                break body.clone();
            }
            assert_eq!(*a, 503, "{body}");
            answers.push(body.clone());
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "/startup not 200 in 60 s: {admin:?}\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(passed["started"], true);
    assert!(
        !answers.is_empty() && answers.iter().all(|a| a["started"] == false),
        "503 before: {answers:?}"
    );
    // When it turned 200, all 20 were verified and Running.
    assert_eq!(daemon.recovered("verified").await, 20.0);
    for (id, _) in &pods {
        assert_eq!(daemon.instance(id).await.unwrap()["state"], "running");
    }
    assert_eq!(daemon.metric("podvisor_started", &[]).await, 1.0);
    // Only /startup is served on the probe port.
    let (status, _) = http_get(format!("http://127.0.0.1:{probe_port}/v1/status"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (_, status_doc) = daemon.get("/v1/status").await.unwrap();
    assert_eq!(status_doc["probe_port"], probe_port);
    assert!(status_doc["kubernetes"].is_null(), "no Kubernetes API here");
}

/// What `/startup` adds to `/readyz`: a sandbox that was Creating at the
/// crash is adopted by recovery (so `/readyz` turns 200) but is not Running
/// until its forwarder answers; `/startup` waits for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_a_create_recovery_adopted_until_it_is_running() {
    let mut setup = Setup::new();
    // Every pod VM's forwarder takes 12 s to start listening.
    let forwarder = podvisor_podvm::testing::forwarder_binary().unwrap();
    setup.forwarder_script(
        "slow-forwarder",
        &format!("#!/bin/sh\nsleep 12\nexec {} \"$@\"\n", forwarder.display()),
    );
    let mut daemon = setup.start().await;
    let (id, _starting) = daemon.start_until_creating("slow").await;
    // Killed once the instance exists with its (slow) forwarder started, so
    // recovery finds and adopts it. Killed earlier (the record is Creating
    // a moment before the provider writes the instance), recovery would
    // re-create it and wait on the slow forwarder before `/readyz`.
    let local_dir = setup.local_dir();
    eventually(
        "the local instance's forwarder to be started",
        Duration::from_secs(10),
        async || {
            let entries = std::fs::read_dir(local_dir.join("instances")).ok()?;
            entries
                .flatten()
                .any(|e| instance_pid(&local_dir, &e.file_name().to_string_lossy()).is_some())
                .then_some(())
        },
    )
    .await;
    daemon.kill9();

    let daemon = setup.start().await;
    // Ready (recovery decided: the instance was found and adopted)...
    let (ready, _) = daemon.get("/readyz").await.unwrap();
    assert_eq!(ready, 200);
    // ...but not started while the sandbox waits for its forwarder.
    let (status, body) = daemon.get("/startup").await.unwrap();
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "creating");
    assert_eq!(
        (status, body["waiting_for"].clone()),
        (503, 1.into()),
        "{body}"
    );
    assert_eq!(daemon.metric("podvisor_started", &[]).await, 0.0);
    eventually(
        "/startup to pass once the sandbox is Running",
        Duration::from_secs(40),
        async || {
            let (status, _) = daemon.get("/startup").await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    eventually(
        "podvisor_started to be 1 (set without a request too)",
        Duration::from_secs(5),
        async || (daemon.metric("podvisor_started", &[]).await == 1.0).then_some(()),
    )
    .await;
}
