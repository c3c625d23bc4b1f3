//! The client subcommands (`podvisor instances|instance|watch|status|
//! quarantine|create|start|stop`) as an operator runs them: the binary as a
//! process, against a daemon as a process on the local provider; their
//! tables and JSON parsed.

#[path = "common/cli.rs"]
mod cli;
mod common;

use common::{Setup, eventually};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The client, pointed at `setup`'s daemon by the global flags an operator
/// would give (and no `PODVISOR_*` variable of the developer's).
fn client(setup: &Setup) -> Command {
    let mut c = cli::podvisor_without(&["REMOTE_HYPERVISOR_ENDPOINT"], &[]);
    c.arg("--socket").arg(setup.socket());
    c.args(["--admin-addr", &format!("127.0.0.1:{}", setup.admin_port)]);
    c.args(["--grpc-addr", &format!("127.0.0.1:{}", setup.grpc_port)]);
    c
}

/// Runs the client with `args`: exit code, stdout, stderr.
fn run(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    cli::run(client(setup).args(args))
}

/// Runs the client with `args` on a blocking thread (the daemon's tests
/// run on the test's runtime); panics unless it succeeds.
async fn ok(setup: &Setup, args: &[&str]) -> String {
    let mut c = client(setup);
    c.args(args);
    let line = args.join(" ");
    let (code, out, err) = tokio::task::spawn_blocking(move || cli::run(&mut c))
        .await
        .unwrap();
    assert_eq!(code, 0, "podvisor {line}\nstdout: {out}\nstderr: {err}");
    out
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The rows of a table as their cells (split on runs of two spaces).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_inspect_watch_and_stop_a_pod_vm_with_the_client() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    let initdata = setup.root.path().join("initdata.toml");
    std::fs::write(
        &initdata,
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"aa.toml\" = ''\n",
    )
    .unwrap();

    // create: a new sandbox id on stdout, nothing else.
    let out = ok(
        &setup,
        &[
            "create",
            "--pod",
            "web",
            "--namespace",
            "shop",
            "--vcpus",
            "2",
            "--memory",
            "2048",
            "--initdata-file",
            initdata.to_str().unwrap(),
        ],
    )
    .await;
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 64, "{out}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
    // What the daemon recorded is what the flags said, as annotations.
    let record = daemon.instance(&id).await.expect("the sandbox is known");
    assert_eq!(record["pod_name"], "web");
    assert_eq!(record["pod_namespace"], "shop");
    assert_eq!(record["spec"]["vcpus"], 2);
    assert_eq!(record["spec"]["memory_mib"], 2048);
    assert_eq!(record["state"], "pending");

    // watch, from before the start: every change, one JSON object a line.
    let mut watch = client(&setup)
        .args(["watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events = BufReader::new(watch.stdout.take().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        for line in events.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The current state first.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("watch prints the current pod VMs")
        .unwrap();
    let first = json(&first);
    assert_eq!(first["event"], "updated");
    assert_eq!(first["instance"]["sandbox_id"], id.as_str());

    ok(&setup, &["start", &id]).await;

    // instances: a table with the short id, the pod, the state, the IPs.
    let table = ok(&setup, &["instances"]).await;
    let table = rows(&table);
    assert_eq!(
        table[0],
        [
            "SANDBOX",
            "POD",
            "STATE",
            "INSTANCE",
            "IPS",
            "AGE",
            "LAST ERROR"
        ]
    );
    let row = table
        .iter()
        .find(|r| r[0] == id[..12])
        .unwrap_or_else(|| panic!("{table:?}"));
    assert_eq!(row[1], "shop/web");
    assert_eq!(row[2], "running");
    assert!(row[4].starts_with("127."), "{row:?}");
    assert_eq!(row[6], "-", "no last error: {row:?}");

    // -o json: the admin endpoint's own JSON.
    let listed = json(&ok(&setup, &["instances", "-o", "json"]).await);
    let (_, served) = daemon.get("/v1/instances").await.unwrap();
    assert_eq!(listed, served["instances"]);
    // -o wide: every column, the full id.
    let wide = ok(&setup, &["instances", "-o", "wide"]).await;
    assert!(
        wide.lines().next().unwrap().contains("GENERATION"),
        "{wide}"
    );
    assert!(wide.contains(&id), "{wide}");

    // instance: by a unique prefix, as the table shows it.
    let one = ok(&setup, &["instance", &id[..12]]).await;
    assert!(
        one.contains(&format!("Sandbox:            {id}\n")),
        "{one}"
    );
    assert!(one.contains("State:              running\n"), "{one}");
    assert!(one.contains("vcpus=2"), "{one}");
    let one = json(&ok(&setup, &["instance", &id, "-o", "json"]).await);
    assert_eq!(one["state"], "running");
    assert_eq!(one["sandbox_id"], id.as_str());

    // status.
    let status = ok(&setup, &["status"]).await;
    assert!(status.contains("ready:"), "{status}");
    assert!(status.contains("instances.running:"), "{status}");
    let status = json(&ok(&setup, &["status", "-o", "json"]).await);
    assert_eq!(status["ready"], true);
    assert_eq!(status["instances"]["running"], 1);

    ok(&setup, &["stop", &id]).await;
    eventually("the record to go", Duration::from_secs(20), async || {
        daemon.instance(&id).await.is_none().then_some(())
    })
    .await;

    // The watch saw it run and go.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| e["event"] == "removed" && e["instance"]["sandbox_id"] == id.as_str())
    {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no removal event; seen {seen:?}"))
            .unwrap();
        seen.push(json(&line));
    }
    let states: Vec<&str> = seen
        .iter()
        .filter_map(|e| e["instance"]["state"].as_str())
        .collect();
    assert!(states.contains(&"creating"), "{states:?}");
    assert!(states.contains(&"running"), "{states:?}");

    // The watch ends, cleanly, as soon as the daemon shuts down.
    daemon.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = watch.try_wait().unwrap() {
                return Some((status, watch));
            }
            if std::time::Instant::now() > deadline {
                let _ = watch.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let (status, mut watch) = status.expect("watch exits when the daemon shuts down");
    assert!(status.success(), "{status}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("shutting down"), "{err}");
    reader.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_says_which_endpoint_it_could_not_reach_and_what_the_daemon_refused() {
    let setup = Setup::new();
    // No daemon yet: each command names its endpoint and flag.
    let (code, out, err) = run(&setup, &["instances"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the daemon at 127.0.0.1:{} (--admin-addr (PODVISOR_ADMIN_ADDR)): ",
            setup.admin_port
        )),
        "{err}"
    );
    assert!(err.contains("Is podvisor running"), "{err}");
    let (code, _, err) = run(&setup, &["start", "abc"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the daemon at {} (--socket (REMOTE_HYPERVISOR_ENDPOINT)): No such file or directory",
            setup.socket().display()
        )),
        "{err}"
    );
    let (code, _, err) = run(&setup, &["quarantine", "list"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("(--grpc-socket (PODVISOR_GRPC_SOCKET)): No such file or directory"),
        "{err}"
    );

    let _daemon = setup.start().await;
    let setup = &setup;
    let (code, _, err) = tokio::task::block_in_place(|| run(setup, &["instance", "0123abc"]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: no pod VM has sandbox id 0123abc (or an id starting with it); `podvisor instances` lists them\n"
    );
    // StopVM answers OK for an unknown sandbox, as Kata needs; the client
    // does not tell an operator who mistyped an id that it stopped it.
    let (code, out, err) = tokio::task::block_in_place(|| run(setup, &["stop", "deadbeef"]));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        err,
        "error: no pod VM has sandbox id deadbeef: nothing stopped; `podvisor instances` lists them\n"
    );
    // The daemon's own refusal, as it said it.
    let (code, _, err) = tokio::task::block_in_place(|| run(setup, &["start", "../x"]));
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: StartVM refused: The sandbox id \"../x\" may only hold"),
        "{err}"
    );
    assert!(!err.contains("{"), "no Debug dump: {err}");
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(
            setup,
            &["create", "--pod", "w", "--initdata-file", "/nonexistent"],
        )
    });
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: --initdata-file /nonexistent: No such file or directory (os error 2)\n"
    );
    // A command line that cannot run is clap's: exit 2.
    let (code, _, err) = tokio::task::block_in_place(|| run(setup, &["instances", "-o", "yaml"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[possible values: table, wide, json]"),
        "{err}"
    );
}

/// `quarantine drop <id>`, answering its question with `answer`.
async fn drop_answering(setup: &Setup, id: &str, answer: &'static str) -> std::process::Output {
    let mut c = client(setup);
    c.args(["quarantine", "drop", id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// A journal with one record that does not decode: `quarantine list`
/// shows it, `show` its bytes, `drop` asks first and removes it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_list_show_and_drop_a_corrupt_record() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    daemon.sigterm();
    drop(daemon);
    let garbage: &[u8] = &[0xff, 0x00, 0xfe, 0x13, 0x37, 0x80];
    {
        use podvisor_state::Journal;
        let journal =
            podvisor_state::SledJournal::open(&setup.state_dir().join("journal")).unwrap();
        journal.put_raw("broken-sandbox", garbage).unwrap();
        journal.flush().unwrap();
    }
    let mut daemon = setup.start().await;

    let listed = json(&ok(&setup, &["quarantine", "list", "-o", "json"]).await);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["key"], "broken-sandbox");
    assert_eq!(listed[0]["size"], garbage.len());
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("broken-sandbox@"), "{id}");

    let table = rows(&ok(&setup, &["quarantine", "list"]).await);
    assert_eq!(table[0], ["ID", "SANDBOX", "AGE", "BYTES", "REASON"]);
    assert_eq!(table[1][0], id);
    assert_eq!(table[1][1], "broken-sandbox");
    assert_eq!(table[1][3], "6");

    let shown = ok(&setup, &["quarantine", "show", &id]).await;
    assert!(
        shown.contains("Stored bytes (6, not UTF-8):\n  00000000  ff 00 fe 13 37 80\n"),
        "{shown}"
    );
    let shown = json(&ok(&setup, &["quarantine", "show", &id, "-o", "json"]).await);
    assert_eq!(shown["bytes_base64"], "/wD+EzeA");

    // Not confirmed: nothing dropped.
    let out = drop_answering(&setup, &id, "no\n").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the GC treats its instance as an orphan"),
        "{err}"
    );
    assert!(err.contains("error: nothing dropped"), "{err}");
    assert_eq!(
        json(&ok(&setup, &["quarantine", "list", "-o", "json"]).await)
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Confirmed on stdin.
    let out = drop_answering(&setup, &id, "yes\n").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!("Dropped quarantined record {id}. Sandbox broken-sandbox has no record left in the quarantine")),
        "{stdout}"
    );
    assert_eq!(
        ok(&setup, &["quarantine", "list"]).await,
        "The journal's quarantine is empty.\n"
    );

    // Gone for good: not back after a restart, and a second drop is refused.
    daemon.sigterm();
    drop(daemon);
    let _daemon = setup.start().await;
    assert_eq!(
        ok(&setup, &["quarantine", "list"]).await,
        "The journal's quarantine is empty.\n"
    );
    let setup = &setup;
    let (code, _, err) =
        tokio::task::block_in_place(|| run(setup, &["quarantine", "drop", &id, "--yes"]));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "error: no quarantined record has the id {id}; `podvisor quarantine list` shows the ids\n"
        )
    );
}
