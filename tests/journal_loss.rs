//! A journal that lost records never deletes a VM.
//!
//! Five pod VMs run; the daemon stops; the disk under its journal is
//! damaged — bytes flipped, the database truncated or deleted, the whole
//! state directory wiped — and a daemon starts on what is left with a GC
//! that would delete an orphan after one second. Not one pod VM may go, and
//! the loss must be reported (log, `podvisor_journal_in_doubt`, `/readyz`).
//! Then the operator's way out: `podvisor journal accept-loss`. And two
//! daemons that share a node name never delete each other's VMs.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// Starts `n` Running sandboxes; their instance ids.
async fn run_sandboxes(daemon: &Daemon, n: usize) -> Vec<String> {
    run_pods(daemon, n)
        .await
        .into_iter()
        .map(|(_, instance)| instance)
        .collect()
}

/// The instances of `ids` whose forwarder still runs.
fn alive_instances(local_dir: &Path, ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter(|id| instance_pid(local_dir, id).is_some_and(alive))
        .cloned()
        .collect()
}

/// Waits for `passes` more GC passes.
async fn gc_passes(daemon: &Daemon, passes: f64) {
    let start = daemon.metric("podvisor_gc_runs_total", &[]).await;
    eventually("GC passes", Duration::from_secs(30), async || {
        (daemon.metric("podvisor_gc_runs_total", &[]).await >= start + passes).then_some(())
    })
    .await;
}

/// `/readyz` says the journal is in doubt, for a reason that mentions `why`.
async fn assert_in_doubt(daemon: &Daemon, why: &str) {
    let (_, ready) = daemon.get("/readyz").await.unwrap();
    let integrity = &ready["journal"]["integrity"];
    assert_eq!(integrity["verdict"], "in_doubt", "{ready}");
    assert!(
        integrity["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(why),
        "{ready}"
    );
}

/// Five VMs, SIGTERM, `how`, restart: none deleted, the loss reported.
async fn no_vm_is_deleted_after(how: Damage) {
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut daemon = setup.start().await;
    let instances = run_sandboxes(&daemon, 5).await;
    assert!(daemon.sigterm().success());
    damage(&setup.state_dir(), how);
    eprintln!("{how:?}: restarting on the damaged journal");

    match setup.try_start().await {
        Ok(daemon) => {
            gc_passes(&daemon, 4.0).await;
            let (_, ready) = daemon.get("/readyz").await.unwrap();
            let (_, all) = daemon.get("/v1/instances").await.unwrap();
            let records = all["instances"].as_array().map_or(0, Vec::len);
            eprintln!("{how:?}: {records} records left, /readyz {ready}");
            if records < instances.len() {
                // Records were lost: that must be known and said.
                assert_eq!(
                    ready["journal"]["integrity"]["verdict"],
                    "in_doubt",
                    "{how:?}: {ready}\n{}",
                    daemon.log_text()
                );
                assert_eq!(daemon.metric("podvisor_journal_in_doubt", &[]).await, 1.0);
                assert!(daemon.log_text().contains("may have lost records"));
            }
            assert_eq!(
                daemon.metric("podvisor_orphans_deleted_total", &[]).await,
                0.0,
                "{how:?}"
            );
        }
        // sled refused the damaged file: the daemon did not start, and so
        // deleted nothing; it said why.
        Err(log) => {
            eprintln!("{how:?}: the daemon refused the journal");
            assert!(log.contains("journal"), "{log}");
        }
    }
    assert_eq!(
        alive_instances(&setup.local_dir(), &instances),
        instances,
        "{how:?}: every pod VM still runs"
    );
    kill_instances(&setup.local_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_the_journal_delete_no_vm() {
    for seed in [1, 2, 3] {
        no_vm_is_deleted_after(Damage::FlipBytes(seed)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_journal_deletes_no_vm() {
    no_vm_is_deleted_after(Damage::Truncate).await;
}

/// The deleted database is the case sled turns into a fresh, empty journal
/// without a word: proven in full, then the operator's way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_journal_deletes_no_vm_until_the_operator_accepts_the_loss() {
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut daemon = setup.start().await;
    let pods = run_pods(&daemon, 5).await;
    let instances: Vec<String> = pods.iter().map(|(_, i)| i.clone()).collect();
    assert!(daemon.sigterm().success());
    damage(&setup.state_dir(), Damage::DeleteDb);

    let mut daemon = setup.start().await;
    gc_passes(&daemon, 4.0).await;
    assert_eq!(alive_instances(&setup.local_dir(), &instances), instances);
    assert_in_doubt(&daemon, "came back empty").await;
    assert_eq!(daemon.metric("podvisor_journal_in_doubt", &[]).await, 1.0);
    assert_eq!(
        daemon
            .metric(
                "podvisor_unowned_instances",
                &[("reason", "journal_in_doubt")]
            )
            .await,
        5.0
    );
    // The doubt outlives a restart with new records written meanwhile.
    run_sandboxes(&daemon, 1).await;
    assert!(daemon.sigterm().success());
    let mut daemon = setup.start().await;
    gc_passes(&daemon, 3.0).await;
    assert_eq!(alive_instances(&setup.local_dir(), &instances), instances);
    assert!(daemon.sigterm().success());

    // The operator decides: the pods of two VMs still run, so those are
    // adopted (from the sandbox and token the log names); the loss is
    // accepted, and the other orphans go.
    let journal = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("--state-dir")
            .arg(setup.state_dir())
            .arg("journal")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "journal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let log = daemon.log_text();
    for (i, (sandbox, _)) in pods.iter().enumerate().take(2) {
        let token = podvisor_state::idempotency_token(sandbox, 1);
        assert!(
            log.lines().any(|l| l.contains("left alone")
                && l.contains(sandbox.as_str())
                && l.contains(&token)),
            "the log names what adoption needs:\n{log}"
        );
        let pod = format!("shop/web-{i}");
        let said = journal(&[
            "adopt",
            "--sandbox",
            sandbox,
            "--token",
            &token,
            "--pod",
            &pod,
        ]);
        assert!(said.contains("\"adopted\":true"), "{said}");
    }
    journal(&["accept-loss"]);
    let daemon = setup.start().await;
    let (kept, gone) = instances.split_at(2);
    eventually(
        "the orphans deleted after the loss was accepted",
        Duration::from_secs(30),
        async || {
            alive_instances(&setup.local_dir(), gone)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // Counted once the pass that deleted them ends.
    eventually("the deletes counted", Duration::from_secs(10), async || {
        (daemon.metric("podvisor_orphans_deleted_total", &[]).await == 3.0).then_some(())
    })
    .await;
    // The adopted ones were recovered into Running, with their agent
    // sockets, and are this journal's again.
    for (sandbox, instance) in &pods[..2] {
        let view = daemon.instance(sandbox).await.unwrap();
        assert_eq!(view["state"], "running", "{view}");
        assert_eq!(view["instance_id"], instance.as_str());
        assert!(setup.pods_dir().join(sandbox).join("agent.ttrpc").exists());
    }
    assert_eq!(alive_instances(&setup.local_dir(), kept), kept);
    assert_eq!(daemon.recovered("adopted").await, 2.0);
    kill_instances(&setup.local_dir());
}

/// A state directory restored from an older copy is intact by its own
/// account — the identity, the mark and the database all agree — but the
/// instances made after the copy carry write sequences it never held: they
/// are left alone and the journal is declared in doubt, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_restored_from_an_older_copy_deletes_no_vm() {
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut daemon = setup.start().await;
    let before = run_sandboxes(&daemon, 2).await;
    assert!(daemon.sigterm().success());
    let copy = setup.root.path().join("state-copy");
    copy_dir(&setup.state_dir(), &copy);

    let mut daemon = setup.start().await;
    let after = run_sandboxes(&daemon, 2).await;
    assert!(daemon.sigterm().success());
    std::fs::remove_dir_all(setup.state_dir()).unwrap();
    copy_dir(&copy, &setup.state_dir());

    let mut daemon = setup.start().await;
    gc_passes(&daemon, 4.0).await;
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    assert_eq!(alive_instances(&setup.local_dir(), &all), all);
    assert_eq!(
        daemon.metric("podvisor_orphans_deleted_total", &[]).await,
        0.0
    );
    assert_eq!(daemon.metric("podvisor_journal_in_doubt", &[]).await, 1.0);
    assert_in_doubt(&daemon, "older than its instances").await;
    // For good: the next start is in doubt from the outset.
    assert!(daemon.sigterm().success());
    let daemon = setup.start().await;
    let (_, ready) = daemon.get("/readyz").await.unwrap();
    assert_eq!(
        ready["journal"]["integrity"]["verdict"], "in_doubt",
        "{ready}"
    );
    gc_passes(&daemon, 2.0).await;
    assert_eq!(alive_instances(&setup.local_dir(), &all), all);
    kill_instances(&setup.local_dir());
}

/// `cp -a` of a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A wiped state directory: the new journal is another journal, so the old
/// one's VMs are never its orphans; they are reported instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_state_directory_deletes_no_vm_and_reports_them() {
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut daemon = setup.start().await;
    let instances = run_sandboxes(&daemon, 5).await;
    assert!(daemon.sigterm().success());
    std::fs::remove_dir_all(setup.state_dir()).unwrap();

    let daemon = setup.start().await;
    gc_passes(&daemon, 4.0).await;
    assert_eq!(alive_instances(&setup.local_dir(), &instances), instances);
    assert_eq!(
        daemon
            .metric("podvisor_unowned_instances", &[("reason", "other_journal")])
            .await,
        5.0
    );
    assert!(daemon.log_text().contains("belongs to another journal"));
    kill_instances(&setup.local_dir());
}

/// Two daemons with the same node name, seeing the same instances: neither
/// deletes the other's running VM, and the clash is said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_with_one_node_name_never_delete_each_others_vms() {
    let mut first = Setup::new();
    eager_gc(&mut first);
    let mut second = Setup::new();
    eager_gc(&mut second);
    second.node = first.node.clone();
    // One "cloud" account: the same local instances directory.
    second.shared_local = Some(first.local_dir());
    second.forwarder_port = first.forwarder_port;
    let a = first.start().await;
    let a_vms = run_sandboxes(&a, 2).await;
    let b = match second.try_start().await {
        Ok(b) => b,
        Err(log) => panic!("{log}"),
    };
    let b_vms = run_sandboxes(&b, 2).await;
    gc_passes(&a, 4.0).await;
    gc_passes(&b, 4.0).await;
    let all: Vec<String> = a_vms.iter().chain(&b_vms).cloned().collect();
    assert_eq!(alive_instances(&first.local_dir(), &all), all);
    for d in [&a, &b] {
        assert_eq!(d.metric("podvisor_orphans_deleted_total", &[]).await, 0.0);
        assert_eq!(
            d.metric("podvisor_unowned_instances", &[("reason", "other_journal")])
                .await,
            2.0
        );
        assert!(
            d.log_text()
                .contains("a second daemon with the same --node-name")
        );
    }
    for d in [&a, &b] {
        let (_, st) = d.get("/v1/instances").await.unwrap();
        assert_eq!(st["instances"].as_array().map_or(0, Vec::len), 2);
    }
    kill_instances(&first.local_dir());
}
