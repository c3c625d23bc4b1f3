//! The forwarder as a process: it listens where told and refuses a taken address.

use podvisor_podvm::testing::free_port;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_binary_relays_a_connection_to_the_agent_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let agent = UnixListener::bind(&sock).unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor-forwarder"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--agent-socket"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("forwarder never listened: {e}"),
        }
    };
    client.write_all(b"ping").unwrap();
    let (mut conn, _) = agent.accept().unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_taken_address_is_a_clear_failure() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor-forwarder"))
        .args(["--listen", &addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}
