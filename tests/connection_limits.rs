//! File descriptors: the daemon raises its soft open-file limit, caps the
//! connections of each endpoint, and out of descriptors neither spins nor
//! floods its log — and every endpoint answers again once they come free.
//!
//! The abusive client of the admin endpoint runs as uid 1001, as any local
//! user can: a loopback port is open to all. The Kata socket admits only
//! its owner and group, so its flood comes from this (root) process.

mod common;

use common::*;
use podvisor::protocols::grpc::admin::{ListInstancesRequest, admin_client::AdminClient};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Opens `count` idle TCP connections to 127.0.0.1:`port` as uid and gid
/// 1001, and holds them until stdin closes.
const FLOOD: &str = "
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count = int(sys.argv[1]), int(sys.argv[2])
held, failed = [], 0
for _ in range(count):
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect(('127.0.0.1', port))
        held.append(s)
    except OSError:
        failed += 1
        s.close()
print('connected', len(held), 'failed', failed, flush=True)
sys.stdin.read()
";

/// Idle connections held by an unprivileged process.
struct Flood {
    child: Child,
    /// "connected N failed M".
    report: String,
}

impl Flood {
    /// `count` idle connections to the TCP `port`, from uid 1001; returns
    /// once they are all made (or given up).
    async fn tcp_as_unprivileged_user(port: u16, count: usize) -> Self {
        use std::os::unix::process::CommandExt;
        // The system's python: a per-user install under /root is out of
        // the unprivileged user's reach.
        let mut child = Command::new("/usr/bin/python3")
            .args(["-I", "-c", FLOOD, &port.to_string(), &count.to_string()])
            .env_clear()
            .current_dir("/")
            .uid(1001)
            .gid(1001)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3 runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let report = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .expect("the flood reports");
        assert!(report.starts_with("connected"), "the flood: {report:?}");
        Self {
            child,
            report: report.trim().to_owned(),
        }
    }

    /// Closes every connection and waits for the process to end.
    fn release(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU time the process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, 100 a second on every architecture.
    Duration::from_millis(ticks * 10)
}

/// Descriptors the process has open.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The process's (soft, hard) open-file limit.
fn nofile_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-file line");
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (fields[0].to_owned(), fields[1].to_owned())
}

fn lines(text: &str) -> usize {
    text.lines().count()
}

/// A sandbox through the Kata socket, as a shim makes it: CreateVM, then
/// StartVM until Running; then StopVM.
async fn sandbox_lifecycle(daemon: &Daemon, pod: &str) {
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, pod, "ns").await;
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    client.stop(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_are_closed_and_the_daemon_stays_responsive() {
    const CAP: usize = 64;
    const IDLE: usize = 1100;
    let mut setup = Setup::new();
    // systemd's soft limit is 1024; lower here, so that without the raise
    // even one endpoint's flood would use it up.
    setup.nofile = Some((256, 8192));
    setup
        .env
        .push(("PODVISOR_MAX_CONNECTIONS".into(), CAP.to_string()));
    let daemon = setup.start().await;
    let pid = daemon.pid();
    assert_eq!(
        nofile_limit(pid),
        ("8192".to_owned(), "8192".to_owned()),
        "the soft open-file limit is raised to the hard one"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("raised the soft open-file limit") && log.contains("before=256"),
        "{log}"
    );
    let files_before = open_files(pid);
    let lines_before = lines(&daemon.log_text());

    // More idle connections than the cap on the admin endpoint (any local
    // user) and on the Kata socket.
    let admin_flood = Flood::tcp_as_unprivileged_user(setup.admin_port, IDLE).await;
    let kata_flood: Vec<UnixStream> = (0..IDLE)
        .map(|_| UnixStream::connect(daemon.socket.as_path()).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Held, idle connections cost neither descriptors beyond the caps nor
    // CPU.
    let files_flooded = open_files(pid);
    let cpu_before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_time(pid) - cpu_before;
    assert!(
        files_flooded <= files_before + 2 * CAP + 16,
        "{files_flooded} descriptors open under the floods ({}; {files_before} before)",
        admin_flood.report
    );
    assert!(
        cpu < Duration::from_millis(300),
        "{cpu:?} of CPU in 3 s with idle connections held"
    );
    // One refusal line per endpoint per 10 s, whatever the number refused.
    let log = daemon.log_text();
    let grown = lines(&log) - lines_before;
    assert!(grown <= 6, "the log grew by {grown} lines:\n{log}");
    assert!(
        log.contains("--max-connections-per-endpoint"),
        "the refusal is logged: {log}"
    );
    // The other endpoints still answer.
    let mut grpc = AdminClient::connect(format!("http://127.0.0.1:{}", setup.grpc_port))
        .await
        .unwrap();
    grpc.list_instances(ListInstancesRequest::default())
        .await
        .unwrap();

    // Once the idle connections close, a shim's calls and the probes work.
    admin_flood.release();
    drop(kata_flood);
    eventually("/livez to answer", Duration::from_secs(10), async || {
        matches!(daemon.get("/livez").await, Ok((200, _))).then_some(())
    })
    .await;
    sandbox_lifecycle(&daemon, "after-the-flood").await;

    for endpoint in ["admin", "ttrpc"] {
        let refused = daemon
            .metric(
                "podvisor_connections_refused_total",
                &[("endpoint", endpoint)],
            )
            .await;
        assert!(
            refused >= (IDLE - CAP - 50) as f64,
            "{refused} connections refused on {endpoint}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_neither_spins_nor_floods_its_log_and_recovers() {
    let mut setup = Setup::new();
    // A hard limit the daemon cannot raise, below the default caps: only
    // the accept loops' pauses stand between a flood and a spinning daemon.
    setup.nofile = Some((200, 200));
    let daemon = setup.start().await;
    let pid = daemon.pid();
    assert!(
        daemon.log_text().contains("open-file limit is below"),
        "a limit that the caps do not fit is warned about"
    );

    // Idle connections until the daemon has no descriptor left, then a
    // connection waiting on every other endpoint, as a shim or a monitor
    // would make.
    let flood = Flood::tcp_as_unprivileged_user(setup.admin_port, 300).await;
    eventually(
        "the daemon to run out of descriptors",
        Duration::from_secs(10),
        async || (open_files(pid) >= 195).then_some(()),
    )
    .await;
    let waiting_kata = UnixStream::connect(daemon.socket.as_path()).unwrap();
    let waiting_grpc = UnixStream::connect(setup.grpc_socket()).unwrap();
    let waiting_grpc_tcp = std::net::TcpStream::connect(("127.0.0.1", setup.grpc_port)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let lines_before = lines(&daemon.log_text());
    let cpu_before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_time(pid) - cpu_before;
    let log = daemon.log_text();
    let grown = lines(&log) - lines_before;
    assert!(
        cpu < Duration::from_millis(300),
        "{cpu:?} of CPU in 3 s out of descriptors ({})",
        flood.report
    );
    assert!(
        grown <= 8,
        "the log grew by {grown} lines in 3 s out of descriptors"
    );
    assert!(
        log.contains("cannot accept a connection; trying again after a pause"),
        "the accept failure is logged: {log}"
    );

    // Descriptors come free: every endpoint answers again, within the
    // longest pause.
    flood.release();
    drop((waiting_kata, waiting_grpc, waiting_grpc_tcp));
    eventually("/livez to answer", Duration::from_secs(10), async || {
        matches!(daemon.get("/livez").await, Ok((200, _))).then_some(())
    })
    .await;
    sandbox_lifecycle(&daemon, "after-running-out").await;
    for endpoint in ["admin", "ttrpc"] {
        let errors = daemon
            .metric(
                "podvisor_connection_accept_errors_total",
                &[("endpoint", endpoint)],
            )
            .await;
        assert!(errors >= 1.0, "{errors} accept errors on {endpoint}");
    }
}
