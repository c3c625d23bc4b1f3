//! Restarts: every pod VM is accounted for after SIGKILL or SIGTERM; orphans
//! are collected; the journal survives corruption and is never shared.

mod common;

use common::*;
use podvisor_providers::Provider;
use podvisor_providers::local::LocalProvider;
use std::time::Duration;

/// Running and Deleting sandboxes, a restart, and each ends where it must.
async fn restart_with_running_and_deleting(kill: bool) {
    let mut setup = Setup::new();
    // The first daemon's deletes hang (a slow cloud), so StopVM leaves a
    // sandbox in Deleting when the daemon goes down.
    setup.local.extend(["--delete-delay".into(), "1h".into()]);
    // SIGTERM waits this long for the hanging delete, then leaves it to
    // recovery.
    setup
        .global
        .extend(["--shutdown-grace".into(), "1s".into()]);
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let (running, deleting) = (sandbox_id(), sandbox_id());
    for (id, pod) in [(&running, "keeps"), (&deleting, "goes")] {
        client.create(id, pod_annotations(pod, "ns")).await.unwrap();
        client.start(id).await.unwrap();
    }
    let kept = daemon.instance(&running).await.unwrap();
    let kept_id = kept["instance_id"].as_str().unwrap().to_owned();
    let kept_pid = instance_pid(&setup.local_dir(), &kept_id).unwrap();
    let gone_id = daemon.instance(&deleting).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let gone_pid = instance_pid(&setup.local_dir(), &gone_id).unwrap();

    client.stop(&deleting).await.unwrap();
    assert_eq!(
        daemon.instance(&deleting).await.unwrap()["state"],
        "deleting"
    );

    if kill {
        daemon.kill9();
    } else {
        assert!(
            daemon.sigterm().success(),
            "clean exit:\n{}",
            daemon.log_text()
        );
        assert!(
            !setup.socket().exists(),
            "the socket is removed on a clean exit"
        );
        assert!(
            daemon.log_text().contains("settled=false"),
            "the hanging delete was not waited for past the grace:\n{}",
            daemon.log_text()
        );
    }
    drop(daemon);
    assert!(
        alive(kept_pid) && alive(gone_pid),
        "pod VMs outlive the daemon"
    );

    setup.local.clear(); // the cloud is fast again
    let daemon = setup.start().await;
    let client = daemon.client().await;

    // Running is Running again, with the same instance (and process).
    let rec = daemon.instance(&running).await.unwrap();
    assert_eq!(rec["state"], "running");
    assert_eq!(rec["instance_id"], kept_id.as_str());
    assert!(alive(kept_pid));
    assert_eq!(client.info("keeps", "ns", false, 5).await.unwrap(), kept_id);
    client
        .start(&running)
        .await
        .expect("StartVM of the recovered sandbox succeeds");
    assert_eq!(daemon.recovered("verified").await, 1.0);

    // Deleting finishes.
    eventually(
        "the Deleting sandbox to finish",
        Duration::from_secs(20),
        async || daemon.instance(&deleting).await.is_none().then_some(()),
    )
    .await;
    assert!(!alive(gone_pid));
    assert_eq!(daemon.recovered("resumed_delete").await, 1.0);

    // And the survivor still stops cleanly.
    client.stop(&running).await.unwrap();
    eventually(
        "the recovered sandbox to stop",
        Duration::from_secs(20),
        async || daemon.instance(&running).await.is_none().then_some(()),
    )
    .await;
    assert!(!alive(kept_pid));
    let left = std::fs::read_dir(setup.local_dir().join("instances"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "nothing leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_running_and_deleting_sandboxes_loses_nothing() {
    restart_with_running_and_deleting(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_running_and_deleting_sandboxes_loses_nothing() {
    restart_with_running_and_deleting(false).await;
}

/// Pending records read back at start-up wait without an actor (promise 3
/// of `SPECIFICATION.md`): each still answers CreateVM, StartVM and StopVM
/// as before the crash, and still expires at its `--pending-ttl`; its
/// recovery is counted once, and each counts against the node's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_records_wait_without_an_actor_and_wake_at_a_request_or_their_expiry() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--pending-ttl", "20s", "--peerpods-limit-per-node", "3"].map(String::from));
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let (started, stopped, expires) = (sandbox_id(), sandbox_id(), sandbox_id());
    for (id, pod) in [
        (&started, "starts"),
        (&stopped, "stops"),
        (&expires, "expires"),
    ] {
        client.create(id, pod_annotations(pod, "ns")).await.unwrap();
    }
    daemon.kill9();
    drop(daemon);

    let daemon = setup.start().await;
    let client = daemon.client().await;
    assert!(
        daemon.log_text().contains("records=3 action=\"kept\""),
        "the three Pending records were kept without actors:\n{}",
        daemon.log_text()
    );
    assert_eq!(daemon.recovered("kept").await, 3.0);
    for id in [&started, &stopped, &expires] {
        assert_eq!(daemon.instance(id).await.unwrap()["state"], "pending");
    }

    // A retried CreateVM of the same pod gets the same answer; another
    // pod's CreateVM with the sandbox's id is refused.
    client
        .create(&expires, pod_annotations("expires", "ns"))
        .await
        .expect("a retried CreateVM of a kept sandbox succeeds");
    let other = client
        .create(&expires, pod_annotations("another", "ns"))
        .await
        .expect_err("another pod's CreateVM with a kept sandbox's id");
    let other = format!("{other:?}");
    assert!(other.contains("already exists"), "{other}");
    // The kept sandboxes count against the node's limit.
    let over = client
        .create(&sandbox_id(), pod_annotations("fourth", "ns"))
        .await
        .expect_err("a fourth pod VM over the limit of 3");
    let over = format!("{over:?}");
    assert!(over.contains("3 of 3"), "{over}");

    // StartVM wakes its sandbox, which starts.
    client
        .start(&started)
        .await
        .expect("StartVM of a kept sandbox succeeds");
    assert_eq!(daemon.instance(&started).await.unwrap()["state"], "running");
    // StopVM wakes its sandbox, which goes.
    client.stop(&stopped).await.unwrap();
    eventually(
        "the stopped sandbox's record to go",
        Duration::from_secs(20),
        async || daemon.instance(&stopped).await.is_none().then_some(()),
    )
    .await;
    // The last one expires at its TTL, counted from its CreateVM.
    eventually(
        "the untouched sandbox to expire",
        Duration::from_secs(60),
        async || daemon.instance(&expires).await.is_none().then_some(()),
    )
    .await;
    // Recovery was counted once, at start-up, however each record woke.
    assert_eq!(daemon.recovered("kept").await, 3.0);
    assert_eq!(daemon.recovered("expired").await, 0.0);

    client.stop(&started).await.unwrap();
    eventually(
        "the started sandbox to stop",
        Duration::from_secs(20),
        async || daemon.instance(&started).await.is_none().then_some(()),
    )
    .await;
    let left = std::fs::read_dir(setup.local_dir().join("instances"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "nothing leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creating_sandbox_killed_mid_create_is_adopted_not_duplicated() {
    let mut setup = Setup::new();
    setup.local.extend(["--create-delay".into(), "1h".into()]);
    let mut daemon = setup.start().await;
    // StartVM blocks on the hour-long create; the record is Creating.
    let (id, starter) = daemon.start_until_creating("slow").await;
    daemon.kill9();
    let _ = starter.await;
    setup.local.clear();
    let daemon = setup.start().await;
    // Recovery re-issues the same idempotent create and reaches Running.
    eventually(
        "the recovered create to run",
        Duration::from_secs(20),
        async || (daemon.instance(&id).await.unwrap()["state"] == "running").then_some(()),
    )
    .await;
    let rec = daemon.instance(&id).await.unwrap();
    assert_eq!(
        rec["generation"], 1,
        "the same generation (token), not a new one"
    );
    let n = std::fs::read_dir(setup.local_dir().join("instances"))
        .unwrap()
        .count();
    assert_eq!(n, 1, "exactly one instance for the sandbox");
    assert_eq!(daemon.recovered("recreated").await, 1.0);
}

/// Start-up recovery checks every Running pod VM against one listing of
/// the node's instances (promise 3), not a lookup each; an instance missing
/// from the listing is looked up before it is called gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_checks_running_pod_vms_against_one_listing() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let ids: Vec<String> = (0..4).map(|_| sandbox_id()).collect();
    let mut instances = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        client
            .create(id, pod_annotations(&format!("listed-{i}"), "ns"))
            .await
            .unwrap();
        client.start(id).await.unwrap();
        let rec = daemon.instance(id).await.unwrap();
        instances.push(rec["instance_id"].as_str().unwrap().to_owned());
    }
    daemon.kill9();
    // While the daemon is down, the last pod VM disappears from the cloud.
    let gone = instances.last().unwrap();
    let pid = instance_pid(&setup.local_dir(), gone).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::fs::remove_dir_all(setup.local_dir().join("instances").join(gone)).unwrap();

    let daemon = setup.start().await;
    let requests = async |operation: &str| {
        daemon
            .metric(
                "podvisor_provider_requests_total",
                &[("operation", operation)],
            )
            .await
    };
    assert_eq!(daemon.recovered("verified").await, 3.0);
    assert_eq!(daemon.recovered("vanished").await, 1.0);
    assert_eq!(
        requests("find").await,
        1.0,
        "one lookup, of the instance the listing did not show:\n{}",
        daemon.metrics_text().await
    );
    assert!(requests("list").await >= 1.0);
    for (id, instance) in ids.iter().zip(&instances).take(3) {
        let rec = daemon.instance(id).await.unwrap();
        assert_eq!(rec["state"], "running");
        assert_eq!(rec["instance_id"], instance.as_str());
    }
    let rec = daemon.instance(ids.last().unwrap()).await.unwrap();
    assert_eq!(rec["state"], "failed");
    let client = daemon.client().await;
    for id in &ids {
        client.stop(id).await.unwrap();
    }
    eventually("every sandbox to go", Duration::from_secs(20), async || {
        for id in &ids {
            if daemon.instance(id).await.is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_deletes_orphans_tagged_with_this_node_and_spares_others() {
    let mut setup = Setup::new();
    setup.global.extend([
        "--gc-interval".into(),
        "1s".into(),
        "--gc-grace-period".into(),
        "0s".into(),
    ]);
    // Instances made behind the daemon's back: an orphan of this node's
    // journal, one for another node, and one of this node that names no
    // journal (nobody can say it is an orphan).
    let provider = LocalProvider::new(
        setup.local_dir(),
        podvisor_podvm::testing::forwarder_binary().unwrap(),
        setup.forwarder_port,
    )
    .unwrap();
    let journal_id = journal_id_of(&setup);
    let mut ours = podvisor_providers::conformance::Fixture::new(&setup.node).request(1);
    ours.tags
        .insert(podvisor_providers::TAG_JOURNAL.into(), journal_id.clone());
    let mut theirs = podvisor_providers::conformance::Fixture::new("another-node").request(1);
    theirs
        .tags
        .insert(podvisor_providers::TAG_JOURNAL.into(), journal_id);
    let mut untagged_fixture = podvisor_providers::conformance::Fixture::new(&setup.node);
    untagged_fixture.sandbox_id = "untagged-sandbox".into();
    let orphan = provider.create_instance(&ours).await.unwrap();
    let foreign = provider.create_instance(&theirs).await.unwrap();
    let untagged = provider
        .create_instance(&untagged_fixture.request(1))
        .await
        .unwrap();
    let orphan_pid = instance_pid(&setup.local_dir(), &orphan.id).unwrap();

    let daemon = setup.start().await;
    // A live sandbox of this node must survive every GC pass.
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("live", "ns"))
        .await
        .unwrap();
    client.start(&id).await.unwrap();

    eventually(
        "the orphan to be deleted",
        Duration::from_secs(20),
        async || {
            (!setup
                .local_dir()
                .join("instances")
                .join(&orphan.id)
                .exists())
            .then_some(())
        },
    )
    .await;
    assert!(!alive(orphan_pid));
    assert_eq!(
        daemon.metric("podvisor_orphans_deleted_total", &[]).await,
        1.0
    );
    // Several more passes: the foreign instance and the live one stay.
    let runs = daemon.metric("podvisor_gc_runs_total", &[]).await;
    eventually("two more GC passes", Duration::from_secs(20), async || {
        (daemon.metric("podvisor_gc_runs_total", &[]).await >= runs + 2.0).then_some(())
    })
    .await;
    assert!(
        setup
            .local_dir()
            .join("instances")
            .join(&foreign.id)
            .exists(),
        "another node's instance is not ours to delete"
    );
    assert!(
        setup
            .local_dir()
            .join("instances")
            .join(&untagged.id)
            .exists(),
        "an instance that names no journal is never taken for an orphan"
    );
    assert_eq!(
        daemon
            .metric("podvisor_unowned_instances", &[("reason", "untagged")])
            .await,
        1.0
    );
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    assert_eq!(
        daemon.metric("podvisor_orphans_deleted_total", &[]).await,
        1.0
    );
    provider.delete_instance(&foreign.id).await.unwrap();
    provider.delete_instance(&untagged.id).await.unwrap();
}

/// The id of the journal in `setup`'s state directory, made now if new.
fn journal_id_of(setup: &Setup) -> String {
    use podvisor_state::Journal;
    podvisor_state::SledJournal::open(&setup.state_dir().join("journal"))
        .unwrap()
        .identity()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_journal_record_is_quarantined_and_the_rest_recover() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("ok", "ns"))
        .await
        .unwrap();
    daemon.kill9();
    drop(daemon);
    {
        // Bytes written by hand: a truncated record.
        let journal =
            podvisor_state::SledJournal::open(&setup.state_dir().join("journal")).unwrap();
        journal
            .put_raw(
                "broken-sandbox",
                br#"{"schema_version":1,"sandbox_id":"brok"#,
            )
            .unwrap();
        // And bytes that are not JSON at all.
        journal
            .put_raw("garbage-sandbox", &[0xff, 0x00, 0xfe, 0x13, 0x37, 0x80])
            .unwrap();
        use podvisor_state::Journal;
        journal.flush().unwrap();
    }
    let daemon = setup.start().await;
    assert_eq!(
        daemon.instance(&id).await.unwrap()["state"],
        "pending",
        "the good record is back"
    );
    assert!(daemon.instance("broken-sandbox").await.is_none());
    assert!(daemon.instance("garbage-sandbox").await.is_none());
    assert_eq!(
        daemon
            .metric("podvisor_journal_quarantined_records_total", &[])
            .await,
        2.0
    );
    assert!(
        daemon.log_text().contains("journal record quarantined"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_never_share_a_journal() {
    let setup = Setup::new();
    let _first = setup.start().await;
    let mut second = Setup::new();
    second.shared_state = Some(setup.state_dir());
    let out = second.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Cannot open the journal") && err.contains("another running podvisor"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_does_not_take_over_a_live_socket() {
    let setup = Setup::new();
    let first = setup.start().await;
    let mut second = Setup::new();
    second.shared_socket = Some(setup.socket());
    let out = second.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--socket (REMOTE_HYPERVISOR_ENDPOINT)")
            && err.contains("another process is serving on it"),
        "{err}"
    );
    // Refused before it made anything of its own: no journal, no keys.
    assert!(
        !second.state_dir().exists(),
        "the refused daemon made {}",
        second.state_dir().display()
    );
    // The first daemon still serves Kata.
    let client = first.client().await;
    client
        .create(&sandbox_id(), pod_annotations("still", "here"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_records_instance_is_spared_by_the_gc_across_restarts() {
    let mut setup = Setup::new();
    setup.global.extend([
        "--gc-interval".into(),
        "1s".into(),
        "--gc-grace-period".into(),
        "0s".into(),
    ]);
    // A pod VM whose record will not decode: its instance may still be in use.
    let mut fixture = podvisor_providers::conformance::Fixture::new(&setup.node);
    fixture.sandbox_id = "unreadable-sandbox".into();
    let provider = LocalProvider::new(
        setup.local_dir(),
        podvisor_podvm::testing::forwarder_binary().unwrap(),
        setup.forwarder_port,
    )
    .unwrap();
    // Tagged with this node's journal: only the quarantine spares it.
    let mut request = fixture.request(1);
    request.tags.insert(
        podvisor_providers::TAG_JOURNAL.into(),
        journal_id_of(&setup),
    );
    let instance = provider.create_instance(&request).await.unwrap();
    {
        let journal =
            podvisor_state::SledJournal::open(&setup.state_dir().join("journal")).unwrap();
        journal
            .put_raw("unreadable-sandbox", br#"{"schema_version":1,"sandb"#)
            .unwrap();
        use podvisor_state::Journal;
        journal.flush().unwrap();
    }
    let exists = || {
        setup
            .local_dir()
            .join("instances")
            .join(&instance.id)
            .exists()
    };

    // First start: quarantined now. Second start: quarantined before.
    for start in 0..2 {
        let mut daemon = setup.start().await;
        assert_eq!(
            daemon
                .metric("podvisor_journal_quarantined_records_total", &[])
                .await,
            if start == 0 { 1.0 } else { 0.0 },
            "a record is quarantined once"
        );
        let runs = daemon.metric("podvisor_gc_runs_total", &[]).await;
        eventually("two GC passes", Duration::from_secs(20), async || {
            (daemon.metric("podvisor_gc_runs_total", &[]).await >= runs + 2.0).then_some(())
        })
        .await;
        assert!(
            exists(),
            "start {start}: the GC deleted a quarantined record's instance"
        );
        assert_eq!(
            daemon.metric("podvisor_orphans_deleted_total", &[]).await,
            0.0
        );
        daemon.kill9();
    }
    provider.delete_instance(&instance.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_create_under_way_finish_and_journal_it() {
    let mut setup = Setup::new();
    setup
        .local
        .extend(["--create-delay".into(), "1500ms".into()]);
    let mut daemon = setup.start().await;
    let (id, starting) = daemon.start_until_creating("draining").await;
    let status = daemon.sigterm();
    assert!(status.success(), "{status}: {}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains("shutdown: in-flight operations drained") && log.contains("settled=true"),
        "{log}"
    );
    let _ = starting.await; // the caller lost its connection; Kata retries
    drop(daemon);

    // The create finished before the exit: the restart finds it Running and
    // only verifies it, rather than looking for what a create may have made.
    let daemon = setup.start().await;
    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running", "{record}");
    assert_eq!(daemon.recovered("verified").await, 1.0);
    client_stop_and_wait(&daemon, &id).await;
}

async fn client_stop_and_wait(daemon: &Daemon, id: &str) {
    daemon.client().await.stop(id).await.unwrap();
    eventually("the record to go", Duration::from_secs(20), async || {
        daemon.instance(id).await.is_none().then_some(())
    })
    .await;
}

#[test]
fn a_state_dir_that_cannot_be_used_fails_start_up_naming_it() {
    let mut setup = Setup::new();
    let file = setup.root.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    setup.shared_state = Some(file.clone());
    let out = setup.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--state-dir") && err.contains(&*file.to_string_lossy()),
        "{err}"
    );
}

/// Group commit under load: 200 clients create and stop sandboxes at once
/// (their writes share flushes) and the daemon is killed with SIGKILL in the
/// middle. Every CreateVM acknowledged with no StopVM sent has its record,
/// and the restarted daemon keeps it; every acknowledged StopVM left its
/// sandbox Deleting or gone, and the restarted daemon finishes the delete;
/// the journal is not in doubt. (A StopVM sent but not acknowledged may
/// have been journaled or not: either is right.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_200_concurrent_lifecycles_loses_no_acknowledged_write() {
    use podvisor_state::Journal;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 200;
    const KILL_AFTER: usize = 600;
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "0".into()]);
    setup.global.extend(["--log-level".into(), "warn".into()]);
    let mut daemon = setup.start().await;
    let created = Arc::new(Mutex::new(HashSet::new()));
    let stop_sent = Arc::new(Mutex::new(HashSet::new()));
    let stopped = Arc::new(Mutex::new(HashSet::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let client = daemon.client().await;
        let (created, stop_sent, stopped) = (created.clone(), stop_sent.clone(), stopped.clone());
        clients.push(tokio::spawn(async move {
            for n in 0.. {
                let id = sandbox_id();
                let pod = format!("load-{c}-{n}");
                if client
                    .create(&id, pod_annotations(&pod, "default"))
                    .await
                    .is_err()
                {
                    return;
                }
                created.lock().unwrap().insert(id.clone());
                // Every other sandbox is left Pending.
                if n % 2 == 1 {
                    continue;
                }
                stop_sent.lock().unwrap().insert(id.clone());
                if client.stop(&id).await.is_err() {
                    return;
                }
                stopped.lock().unwrap().insert(id);
            }
        }));
    }
    eventually(
        "acknowledged CreateVMs",
        Duration::from_secs(120),
        async || (created.lock().unwrap().len() >= KILL_AFTER).then_some(()),
    )
    .await;
    daemon.kill9();
    for c in clients {
        c.await.unwrap();
    }
    let stop_sent = stop_sent.lock().unwrap().clone();
    // Created, and no StopVM sent: must be kept.
    let kept: HashSet<String> = created
        .lock()
        .unwrap()
        .difference(&stop_sent)
        .cloned()
        .collect();
    let stopped = stopped.lock().unwrap().clone();
    assert!(!stopped.is_empty());

    let journal = podvisor_state::SledJournal::open(&setup.state_dir().join("journal")).unwrap();
    assert_eq!(journal.verdict(), podvisor_state::Verdict::Intact);
    let records: std::collections::HashMap<String, podvisor_state::State> = journal
        .load()
        .unwrap()
        .records
        .into_iter()
        .map(|r| (r.sandbox_id, r.state))
        .collect();
    drop(journal);
    assert!(!kept.is_empty());
    for id in &kept {
        assert!(
            records.contains_key(id),
            "acknowledged CreateVM of {id} lost ({} kept, {} stopped)",
            kept.len(),
            stopped.len()
        );
    }
    for id in &stopped {
        if let Some(state) = records.get(id) {
            assert_eq!(*state, podvisor_state::State::Deleting, "{id} was stopped");
        }
    }

    let daemon = setup.start().await;
    for id in &kept {
        assert!(daemon.instance(id).await.is_some(), "{id} after restart");
    }
    eventually(
        "the stopped sandboxes gone",
        Duration::from_secs(60),
        async || {
            for id in &stopped {
                if daemon.instance(id).await.is_some() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}
