//! Network namespaces for the pod network's tests, and real packets
//! through them: fixtures made with `ip` (the product speaks netlink),
//! ICMP echo from a raw socket, TCP streams checked by SHA-256. Every test
//! makes its own namespaces (unique names, deleted by a guard even when it
//! panics) and never touches the machine's.

// Each test file uses a part.
#![allow(dead_code)]

use podvisor_podvm::network::netns::Netns;
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Makes names unique within this process (the pid makes them unique
/// across processes).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number no other caller in this process gets.
pub fn unique() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs a fixture command, panicking with its stderr when it fails;
/// returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip ARGS…` (fixtures and checks only; the product speaks netlink).
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Whether this process may create network namespaces and run iptables.
/// Under `CI=true` it must: a failure panics with the reason; elsewhere it
/// says why and the test passes without running.
pub fn namespaces_available() -> bool {
    let name = format!("pvt{}-probe{}", std::process::id(), unique());
    let outcome = Command::new("ip").args(["netns", "add", &name]).output();
    let reason = match outcome {
        Ok(output) if output.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            match Command::new("iptables-save").arg("--version").output() {
                Ok(output) if output.status.success() => return true,
                Ok(output) => format!(
                    "iptables-save --version failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ),
                Err(e) => format!("no iptables-save program: {e}"),
            }
        }
        Ok(output) => format!(
            "ip netns add failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => format!("no ip program: {e}"),
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test cannot create network namespaces: {reason}"
    );
    eprintln!("skipped: cannot create network namespaces ({reason}); run as root");
    false
}

/// A named namespace's path, as CreateVM passes it (`ip netns` mounts them
/// under `/run/netns`, which `/var/run` links to).
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// A network namespace, by its `ip netns` name or by its path (a pod VM's
/// pod namespace is a bind mount under its instance directory).
pub trait NetnsRef {
    /// Where the namespace is mounted.
    fn netns_path(&self) -> PathBuf;
}

impl NetnsRef for str {
    fn netns_path(&self) -> PathBuf {
        netns_path(self)
    }
}

impl NetnsRef for String {
    fn netns_path(&self) -> PathBuf {
        netns_path(self)
    }
}

impl NetnsRef for Path {
    fn netns_path(&self) -> PathBuf {
        self.to_path_buf()
    }
}

impl NetnsRef for PathBuf {
    fn netns_path(&self) -> PathBuf {
        self.clone()
    }
}

fn open(netns: &(impl NetnsRef + ?Sized)) -> Netns {
    let path = netns.netns_path();
    Netns::open(&path).unwrap_or_else(|e| panic!("open the namespace {}: {e}", path.display()))
}

/// The namespaces of one test; deleted on drop, even when it panics.
#[derive(Debug, Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates a namespace for `role`, with `lo` up; returns its name.
    pub fn add(&mut self, role: &str) -> String {
        let name = format!("pvt{}-{}-{role}", std::process::id(), unique());
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Whether `name` is one of them and not deleted yet.
    pub fn holds(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Deletes one now (e.g. the CNI removing the pod's namespace).
    pub fn delete(&mut self, name: &str) {
        ip(&["netns", "del", name]);
        self.names.retain(|n| n != name);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// The internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests from namespace `from` to `to`, and
/// returns each reply's round trip; panics when one is missing (2 s each).
pub fn ping(from: &(impl NetnsRef + ?Sized), to: Ipv4Addr, count: u16) -> Vec<Duration> {
    open(from)
        .run(move || {
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
                .expect("raw ICMP socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            socket
                .connect(&SocketAddrV4::new(to, 0).into())
                .expect("connect");
            let id = (std::process::id() as u16) ^ (unique() as u16);
            let mut rtts = Vec::new();
            for seq in 0..count {
                let mut request = vec![8, 0, 0, 0];
                request.extend_from_slice(&id.to_be_bytes());
                request.extend_from_slice(&seq.to_be_bytes());
                request.extend_from_slice(b"podvisor-network-test-payload...");
                let sum = checksum(&request);
                request[2..4].copy_from_slice(&sum.to_be_bytes());
                let sent = Instant::now();
                (&socket).write_all(&request).expect("send echo request");
                loop {
                    let mut buffer = [0u8; 1500];
                    let n = (&socket)
                        .read(&mut buffer)
                        .unwrap_or_else(|e| panic!("no echo reply from {to} for seq {seq}: {e}"));
                    let header = usize::from(buffer[0] & 0x0f) * 4;
                    let icmp = &buffer[header..n];
                    if icmp.len() >= 8
                        && icmp[0] == 0
                        && icmp[4..6] == id.to_be_bytes()
                        && icmp[6..8] == seq.to_be_bytes()
                    {
                        rtts.push(sent.elapsed());
                        break;
                    }
                }
            }
            rtts
        })
        .expect("run in the pinging namespace")
}

/// The namespace's count of ICMP echo replies sent (`OutEchoReps` of
/// `/proc/net/snmp`).
pub fn echo_replies_sent(netns: &(impl NetnsRef + ?Sized)) -> u64 {
    let snmp = open(netns)
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .expect("run in netns")
        .expect("read snmp");
    let mut icmp = snmp.lines().filter(|line| line.starts_with("Icmp:"));
    let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
        panic!("no Icmp lines in snmp:\n{snmp}");
    };
    let column = names
        .split_whitespace()
        .position(|n| n == "OutEchoReps")
        .expect("OutEchoReps column");
    values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .expect("OutEchoReps value")
}

/// A TCP listener on `address` inside `netns`.
pub fn listen(netns: &(impl NetnsRef + ?Sized), address: SocketAddr) -> TcpListener {
    open(netns)
        .run(move || TcpListener::bind(address))
        .expect("run in the server's namespace")
        .unwrap_or_else(|e| panic!("bind {address}: {e}"))
}

/// How long a test's socket waits for its peer before failing (a broken
/// tunnel must fail the test, not hang it while TCP retransmits).
const STALL: Duration = Duration::from_secs(30);

/// A TCP connection (no Nagle; reads and writes fail after 30 s without
/// progress) to `address` from inside `netns`.
pub fn connect(netns: &(impl NetnsRef + ?Sized), address: SocketAddr) -> TcpStream {
    let stream = open(netns)
        .run(move || TcpStream::connect_timeout(&address, Duration::from_secs(5)))
        .expect("run in the client's namespace")
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    stream.set_read_timeout(Some(STALL)).expect("read timeout");
    stream
        .set_write_timeout(Some(STALL))
        .expect("write timeout");
    stream
}

/// A finished [`transfer`].
#[derive(Debug)]
pub struct Transfer {
    /// Whether the server's SHA-256 of what it received is the data's.
    pub intact: bool,
    /// From connect to the server's digest.
    pub elapsed: Duration,
    /// The client's address as the server saw it.
    pub peer_seen: SocketAddr,
    /// The client's own address.
    pub local: SocketAddr,
}

/// Accepts one connection on `listener` (on a thread of its own), reads
/// it to its end and answers the SHA-256 of what it read; the thread
/// returns the client's address as seen.
pub fn serve_digest(listener: TcpListener) -> std::thread::JoinHandle<SocketAddr> {
    std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(STALL)).expect("read timeout");
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = stream.read(&mut buffer).expect("read");
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        stream.write_all(&hasher.finalize()).expect("write digest");
        peer
    })
}

/// Sends `bytes` of seeded pseudo-random data from `client` to a server in
/// `server` on `address`, which answers the data's SHA-256.
pub fn transfer(
    server: &(impl NetnsRef + ?Sized),
    client: &(impl NetnsRef + ?Sized),
    address: SocketAddr,
    bytes: usize,
) -> Transfer {
    let receiver = serve_digest(listen(server, address));
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut data = vec![0u8; bytes];
    rng.fill(&mut data);
    let expected = Sha256::digest(&data);
    let started = Instant::now();
    let mut stream = connect(client, address);
    stream.write_all(&data).expect("send");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let mut digest = [0u8; 32];
    stream.read_exact(&mut digest).expect("digest");
    let elapsed = started.elapsed();
    let peer_seen = receiver.join().expect("receiver");
    Transfer {
        intact: digest[..] == expected[..],
        elapsed,
        peer_seen,
        local: stream.local_addr().expect("local address"),
    }
}
