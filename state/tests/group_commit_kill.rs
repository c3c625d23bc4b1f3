//! An acknowledged write survives `kill -9`, with concurrent writers
//! sharing flushes (group commit).
//!
//! The test runs itself again as a child process (this same test, with
//! `PODVISOR_GROUP_COMMIT_CHILD` naming the journal directory). The child's
//! writer threads each write a record of their own and wait for a flush —
//! a third `put` and block in `flush`, a third `put` and await
//! `flush_async`, a third hand the record to the flusher thread with
//! `put_durable`, as the daemon's pod VM actors do — then print
//! `acked <sandbox id>`: every line
//! the parent reads is a write whose flush returned. The parent kills the child with SIGKILL mid-stream,
//! reopens the journal and checks that every acknowledged record is there,
//! unchanged, and that the journal is not in doubt.

use podvisor_state::{InstanceRecord, InstanceSpec, Journal, SledJournal, Verdict};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;

const CHILD: &str = "PODVISOR_GROUP_COMMIT_CHILD";
/// Concurrent writers in the child.
const WRITERS: usize = 64;
/// Acknowledgements the parent waits for before it kills the child.
const KILL_AFTER: usize = 3_000;

fn record(writer: usize, n: usize) -> InstanceRecord {
    InstanceRecord::pending(
        &format!("{writer:032x}{n:032x}"),
        &format!("pod-{writer}-{n}"),
        "default",
        InstanceSpec::default(),
        1,
    )
}

/// The child: writes until killed.
fn child(dir: &str) -> ! {
    let journal = Arc::new(SledJournal::open(std::path::Path::new(dir)).expect("the journal"));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a runtime");
                for n in 0.. {
                    let r = record(w, n);
                    match w % 3 {
                        0 => {
                            journal.put(&r).expect("put");
                            journal.flush().expect("flush");
                        }
                        1 => {
                            journal.put(&r).expect("put");
                            runtime.block_on(journal.flush_async()).expect("flush");
                        }
                        _ => runtime
                            .block_on(journal.put_durable(&r))
                            .expect("a durable put"),
                    }
                    // Not `println!`: the test harness would capture it.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "acked {} {}", r.sandbox_id, journal.flushes())
                        .and_then(|()| out.flush())
                        .expect("the parent reads");
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
    std::process::exit(0)
}

#[test]
fn acknowledged_writes_of_concurrent_writers_survive_kill_9() {
    if let Ok(dir) = std::env::var(CHILD) {
        child(&dir);
    }
    let dir = tempfile::tempdir().expect("a directory");
    let journal_dir = dir.path().join("journal");
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "acknowledged_writes_of_concurrent_writers_survive_kill_9",
            "--nocapture",
        ])
        .env(CHILD, &journal_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child");
    let stdout = child.stdout.take().expect("the child's stdout");
    let mut acked = HashSet::new();
    let mut flushes = 0u64;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("a line");
        let Some(rest) = line.strip_prefix("acked ") else {
            continue;
        };
        let (id, n) = rest.split_once(' ').expect("an id and a count");
        acked.insert(id.to_owned());
        flushes = n.parse().expect("a flush count");
        if acked.len() == KILL_AFTER {
            // Killed between flushes of the next batches.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid")),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("SIGKILL");
            break;
        }
    }
    // Lines already written before the kill are acknowledgements too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some((id, _)) = line
            .strip_prefix("acked ")
            .and_then(|rest| rest.split_once(' '))
        {
            acked.insert(id.to_owned());
        }
    }
    let status = child.wait().expect("the child's status");
    assert!(!status.success(), "the child was killed: {status:?}");
    assert!(acked.len() >= KILL_AFTER, "only {} acks", acked.len());
    // Concurrent writers shared flushes.
    assert!(
        flushes < KILL_AFTER as u64,
        "{flushes} flushes for {KILL_AFTER} acknowledged writes: not batched"
    );

    let journal = SledJournal::open(&journal_dir).expect("the journal reopens");
    assert!(
        matches!(journal.verdict(), Verdict::Intact),
        "{:?}",
        journal.verdict()
    );
    let stored: HashSet<String> = journal
        .load()
        .expect("load")
        .records
        .into_iter()
        .map(|r| r.sandbox_id)
        .collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
    eprintln!(
        "{} acknowledged writes survived kill -9 ({} stored, ~{flushes} flushes)",
        acked.len(),
        stored.len()
    );
}
