//! The admin HTTP endpoint as a process: the time limits on its
//! connections, so that clients that send nothing, dribble, or sit idle
//! cannot hold connections forever; the stop with such connections open;
//! and `/v1/status`, which shows the paths the daemon runs with.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection to the daemon's admin endpoint.
async fn connect(setup: &Setup) -> TcpStream {
    TcpStream::connect(("127.0.0.1", setup.admin_port))
        .await
        .expect("the admin endpoint accepts")
}

/// Reads until the daemon closes `conn` (end of stream, or a reset); how
/// long after `since` that was, or `None` if it is still open after `limit`.
async fn closed_after(conn: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()
}

/// Sends a keep-alive GET of `path` on `conn` and reads its answer: the
/// status line.
async fn get_on(conn: &mut TcpStream, path: &str) -> String {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: podvisor\r\n\r\n").as_bytes())
        .await
        .expect("the request is sent");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).await.expect("the answer arrives");
        assert_eq!(
            n,
            1,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.expect("the body arrives");
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_sending_nothing_or_half_a_request_are_closed_at_the_header_timeout() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--admin-header-timeout", "2s"].map(String::from));
    let daemon = setup.start().await;

    let opened = Instant::now();
    let mut silent = connect(&setup).await;
    let mut half = connect(&setup).await;
    half.write_all(b"GET /livez HT").await.unwrap();
    let mut dribbling = connect(&setup).await;
    let dribbler = tokio::spawn(async move {
        // A header line that never ends, a byte every 300 ms, until a
        // write fails: the daemon closed the connection.
        let mut sent = dribbling
            .write_all(b"GET /livez HTTP/1.1\r\nX-Slow: ")
            .await;
        while sent.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            sent = dribbling.write_all(b"a").await;
        }
        sent
    });

    // Meanwhile the endpoint answers as usual.
    let (status, body) = daemon.get("/livez").await.unwrap();
    assert_eq!((status, body.as_str()), (200, Some("ok\n")));

    let limit = Duration::from_secs(8);
    let (silent_after, half_after) = tokio::join!(
        closed_after(&mut silent, opened, limit),
        closed_after(&mut half, opened, limit),
    );
    let dribbler_cut = tokio::time::timeout(limit, dribbler).await;
    let dribbled_for = opened.elapsed();
    for (what, after) in [
        ("silent", silent_after),
        ("half a request line", half_after),
    ] {
        let after =
            after.unwrap_or_else(|| panic!("the {what} connection is still open after {limit:?}"));
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
            "the {what} connection closed after {after:?}, not at the 2s header timeout"
        );
    }
    match dribbler_cut {
        Ok(Ok(Err(_))) => assert!(
            dribbled_for < Duration::from_secs(6),
            "the dribbling connection was cut only after {dribbled_for:?}"
        ),
        other => panic!("the dribbling connection is still open after {limit:?}: {other:?}"),
    }

    // And still does.
    let (status, _) = daemon.get("/readyz").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_admin_connection_serves_past_the_header_timeout_and_closes_when_idle() {
    let mut setup = Setup::new();
    setup
        .global
        .extend(["--admin-header-timeout", "1s", "--admin-idle-timeout", "3s"].map(String::from));
    let _daemon = setup.start().await;
    let mut conn = connect(&setup).await;
    assert_eq!(get_on(&mut conn, "/livez").await, "HTTP/1.1 200 OK");
    // Quiet for twice the header limit: idle, not a slow request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get_on(&mut conn, "/readyz").await, "HTTP/1.1 200 OK");
    let answered = Instant::now();
    let after = closed_after(&mut conn, answered, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(
        after >= Duration::from_millis(2900) && after < Duration::from_secs(6),
        "the idle connection closed after {after:?}, not at the 3s idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_idle_and_half_sent_admin_connections_still_exits_cleanly_at_once() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    // Under the default limits (10 s, 60 s) these would stay a while.
    let mut idle = connect(&setup).await;
    assert_eq!(get_on(&mut idle, "/livez").await, "HTTP/1.1 200 OK");
    let mut half = connect(&setup).await;
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: pod")
        .await
        .unwrap();
    let _silent = connect(&setup).await;
    let asked = Instant::now();
    assert!(daemon.sigterm().success(), "{}", daemon.log_text());
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
}

/// Every null in `value` whose key names a path, as `a.b.key`.
fn null_paths(value: &serde_json::Value, at: &str, found: &mut Vec<String>) {
    if let serde_json::Value::Object(map) = value {
        for (key, v) in map {
            let here = format!("{at}{key}");
            let names_a_path = ["dir", "socket", "bin", "file", "path"]
                .iter()
                .any(|w| key.contains(w));
            if v.is_null() && names_a_path {
                found.push(here.clone());
            }
            null_paths(v, &format!("{here}."), found);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_paths_in_use_where_flags_were_left_to_their_defaults() {
    let mut setup = Setup::new();
    // `local` with no flag of its own: its directory and forwarder default.
    setup.provider = Some(vec!["local".into()]);
    let forwarder = podvisor_podvm::testing::forwarder_binary().unwrap();
    let daemon = setup.start().await;
    let (code, status) = daemon.get("/v1/status").await.unwrap();
    assert_eq!(code, 200, "{status}");
    let mut nulls = Vec::new();
    null_paths(&status, "", &mut nulls);
    assert!(nulls.is_empty(), "null paths {nulls:?} in {status:#}");
    let path = |v: &serde_json::Value| std::path::PathBuf::from(v.as_str().unwrap_or_default());
    let state = setup.state_dir();
    for (shown, in_use) in [
        (&status["socket"], setup.socket()),
        (&status["grpc_socket"], setup.grpc_socket()),
        (&status["pods_dir"], setup.pods_dir()),
        (&status["state_dir"], state.clone()),
        (&status["tls"]["dir"], state.join("tls")),
        (&status["provider_config"]["local_dir"], state.join("local")),
        (
            &status["provider_config"]["forwarder_bin"],
            forwarder.clone(),
        ),
    ] {
        assert_eq!(path(shown), in_use, "{status:#}");
    }
    assert!(setup.grpc_socket().exists());
    assert!(state.join("tls").join("ca.pem").is_file());
    assert!(state.join("local").join("instances").is_dir());
}
