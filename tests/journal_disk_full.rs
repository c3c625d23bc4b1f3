//! A full disk under the journal: every caller gets an answer, and once
//! space is back the journal either works again or the daemon says it is not
//! live — never "live" while every write still fails (sled keeps failing
//! after ENOSPC until it is reopened).
//!
//! The state directory sits on a small tmpfs the test mounts (root needed;
//! CI runs as root, and under `CI=true` a failed mount fails the test).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with `dir/filler` until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0x5au8; size];
        while f.write_all(&chunk).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_every_caller_an_answer_and_never_leaves_a_poisoned_daemon_live() {
    let mut setup = Setup::new();
    let mount = setup.root.path().join("small-disk");
    let _tmpfs = match Tmpfs::mount(&mount, "16m") {
        Ok(t) => t,
        Err(why) if std::env::var_os("CI").is_none() && !nix::unistd::geteuid().is_root() => {
            eprintln!("SKIPPED journal_disk_full: cannot mount a tmpfs (not root): {why}");
            return;
        }
        Err(why) => panic!("cannot mount a tmpfs for the state directory: {why}"),
    };
    setup.shared_state = Some(mount.join("state"));
    setup
        .global
        .extend(["--peerpods-limit-per-node".to_owned(), "0".to_owned()]);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let running = sandbox_id();
    client
        .create(&running, pod_annotations("before", "ns"))
        .await
        .unwrap();
    client.start(&running).await.unwrap();
    let pending = sandbox_id();
    client
        .create(&pending, pod_annotations("pending", "ns"))
        .await
        .unwrap();

    let filler = fill(&mount);
    // sled writes into space its files already hold: CreateVM keeps working
    // until that is used up, then cannot journal and says so.
    let mut accepted = 0;
    let refusal = loop {
        match client
            .create(&sandbox_id(), pod_annotations("full", "ns"))
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => break rpc_error(e),
        }
        assert!(accepted < 20_000, "the full disk never refused a write");
    };
    eprintln!("{accepted} CreateVM journaled on the full disk before the first refusal");
    let (code, message) = refusal;
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{message}");
    // StartVM of a pending sandbox: answered, not left hanging.
    let asked = Instant::now();
    let started = tokio::time::timeout(Duration::from_secs(30), client.start(&pending)).await;
    let answer = started.expect("StartVM got no answer within 30 s");
    assert!(answer.is_err(), "StartVM succeeded on a full disk");
    eprintln!(
        "StartVM on a full disk answered in {:?}: {answer:?}",
        asked.elapsed()
    );
    // Not live while writes fail.
    let (status, body) = daemon.get("/livez").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Journal writes have failed"),
        "{body}"
    );

    // Space is back: within a probe interval or two, the journal works again
    // — or the daemon keeps saying it is not live.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut healed = false;
    while Instant::now() < deadline {
        let (live, _) = daemon.get("/livez").await.unwrap();
        if live == 200 {
            let created = client
                .create(&sandbox_id(), pod_annotations("after", "ns"))
                .await;
            assert!(
                created.is_ok(),
                "live, but the journal still fails: {created:?}\n{}",
                daemon.log_text()
            );
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "after space came back the journal {}",
        if healed {
            "healed by itself"
        } else {
            "stayed failing and /livez stayed 503"
        }
    );
    drop(client);
    drop(daemon);

    // What the kubelet does to a daemon that is not live: a restart, which
    // reopens the journal; everything journaled before the disk filled is
    // there.
    let daemon = setup.start().await;
    assert_eq!(daemon.get("/livez").await.unwrap().0, 200);
    // A write that failed for want of space lost nothing that was durable:
    // the journal is intact, not in doubt.
    let (_, ready) = daemon.get("/readyz").await.unwrap();
    assert_eq!(
        ready["journal"]["integrity"]["verdict"], "intact",
        "{ready}"
    );
    assert_eq!(daemon.instance(&running).await.unwrap()["state"], "running");
    assert!(daemon.instance(&pending).await.is_some());
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("restarted", "ns"))
        .await
        .unwrap();
    client.start(&id).await.unwrap();
    kill_instances(&setup.local_dir());
}
