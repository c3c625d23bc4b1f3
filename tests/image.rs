//! The container image, as CI builds it (`scripts/build-image.sh`), run with
//! podman: it says its version and help, carries its OCI labels, and its
//! daemon — under the chart's security context (read-only root, every
//! capability dropped but NET_ADMIN and SYS_ADMIN, the node's network) and
//! on the local provider — answers `/readyz` and takes a pod VM through
//! CreateVM, StartVM and StopVM from the host's client over the mounted
//! Kata socket, then exits 0 on SIGTERM. Its iptables reads and writes the
//! pod network's NOTRACK rules beside the node's, and its daemon turns the
//! pod network on with them.
//!
//! Needs `PODVISOR_IMAGE`, the OCI archive `scripts/build-image.sh` wrote
//! (`eval "$(scripts/build-image.sh)"`; `scripts/test.sh` does), and podman
//! (`PODMAN`, else on `PATH`). podman's storage is the test's own temporary
//! directory: nothing of the machine's containers configuration is used or
//! left behind. Without either, SKIPPED (under `CI=true`, a failure).

#[path = "common/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tools::{say, skip, text, tool};

const FILE: &str = "tests/image.rs";

/// The image's name in the archive (`scripts/build-image.sh`).
fn image_name() -> String {
    format!("localhost/podvisor:{}", env!("CARGO_PKG_VERSION"))
}

/// podman with its own storage in a temporary directory, the image loaded.
struct Podman {
    program: PathBuf,
    dir: tempfile::TempDir,
    /// One test's podman at a time: whatever their storage, every podman
    /// on the machine shares one lock segment (`/dev/shm/libpod_lock`), and
    /// two that start together can fail to open it ("failed to open 2048
    /// locks in /libpod_lock: bad file descriptor", seen in CI).
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Held by the [`Podman`] of the test that runs.
static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Podman {
    /// podman with the archive of `PODVISOR_IMAGE` loaded; `None` (after
    /// `skip`) when either is missing.
    fn load(test: &str) -> Option<Podman> {
        let Some(archive) = std::env::var_os("PODVISOR_IMAGE").filter(|v| !v.is_empty()) else {
            skip(
                FILE,
                test,
                "PODVISOR_IMAGE is not set (eval \"$(scripts/build-image.sh)\")",
            );
            return None;
        };
        let archive = PathBuf::from(archive);
        if !archive.is_file() {
            skip(
                FILE,
                test,
                &format!(
                    "PODVISOR_IMAGE={} is not a file (eval \"$(scripts/build-image.sh)\")",
                    archive.display()
                ),
            );
            return None;
        }
        let program = tool("PODMAN", "podman");
        if let Err(e) = tools::runs(&program, &["--version"]) {
            skip(FILE, test, &format!("podman: {e}"));
            return None;
        }
        let podman = Podman {
            program,
            dir: tempfile::tempdir().expect("tempdir"),
            // A test that failed while holding it poisoned it; the lock
            // segment is as good as before.
            _serial: PODMAN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        let out = podman.run(&["load", "--quiet", "--input", &archive.to_string_lossy()]);
        assert!(
            out.status.success(),
            "podman load {}: {}",
            archive.display(),
            text(&out)
        );
        Some(podman)
    }

    /// `podman <args…>` on the test's own storage.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        c.arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            // vfs works on any file system, overlay needs kernel support a
            // CI container may not give; cgroupfs and file events need no
            // systemd.
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        // crun 1.8 (Debian 12) refuses hybrid cgroup hierarchies, which
        // CI's machines have; runc runs on them.
        if tools::runs(Path::new("runc"), &["--version"]).is_ok() {
            c.args(["--runtime", "runc"]);
        }
        c.args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// `podman run --rm <flags> IMAGE <args…>`, with limits below the
    /// machine's hard ones (podman's defaults for root exceed them where
    /// the runtime lacks CAP_SYS_RESOURCE, as in CI's containers).
    fn run_image(&self, flags: &[&str], args: &[&str]) -> Output {
        let image = image_name();
        // No network: nothing of podman's bridge set up on the machine.
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend(LIMITS);
        all.extend(flags);
        all.push(&image);
        all.extend(args);
        self.run(&all)
    }
}

/// The container's resource limits: podvisor raises its soft NOFILE to the
/// hard one.
const LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_says_its_version_and_help_and_carries_its_oci_labels() {
    let Some(podman) =
        Podman::load("the_image_says_its_version_and_help_and_carries_its_oci_labels")
    else {
        return;
    };

    let out = podman.run_image(&[], &["--version"]);
    assert!(out.status.success(), "podvisor --version: {}", text(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("podvisor {}", env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out)
    );

    let out = podman.run_image(&[], &["--help"]);
    assert!(out.status.success(), "podvisor --help: {}", text(&out));
    let help = stdout(&out);
    assert!(
        help.contains("Providers (run the daemon), then commands"),
        "{help}"
    );
    // Every provider the chart offers is in the image's build: the aws and
    // libvirt subcommands answer (libvirt's library loaded from the image).
    for provider in ["local", "aws", "libvirt"] {
        let out = podman.run_image(&[], &[provider, "--help"]);
        assert!(
            out.status.success(),
            "podvisor {provider} --help: {}",
            text(&out)
        );
    }

    // The OCI annotation keys, as labels, from Cargo.toml and git.
    let out = podman.run(&["image", "inspect", &image_name()]);
    assert!(out.status.success(), "{}", text(&out));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let image = &inspect[0];
    let labels = &image["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "{labels}"
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE"),
        "{labels}"
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        env!("CARGO_PKG_REPOSITORY"),
        "{labels}"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default();
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(tools::root())
        .output()
        && head.status.success()
    {
        let head = stdout(&head);
        assert!(
            revision.starts_with(head.trim()),
            "the image is of {revision}, the checkout of {}: rebuild it (eval \"$(scripts/build-image.sh)\")",
            head.trim()
        );
    }
    assert_eq!(
        image["Config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/podvisor"]),
        "{image}"
    );
    // And as the manifest's annotations.
    for key in [
        "org.opencontainers.image.version",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.source",
        "org.opencontainers.image.revision",
    ] {
        assert_eq!(
            image["Annotations"][key], labels[key],
            "annotation {key}: {image}"
        );
    }

    // The files beside the binaries: name lookups from /etc/hosts first,
    // root in passwd and group, the CA bundle, /var/run as /run.
    let out = podman.run(&["create", "--name", "files", &image_name()]);
    assert!(out.status.success(), "podman create: {}", text(&out));
    let files = tempfile::tempdir().expect("tempdir");
    for (i, (path, expect)) in [
        ("/etc/nsswitch.conf", "hosts: files dns"),
        ("/etc/passwd", "root:x:0:0:"),
        ("/etc/group", "root:x:0:"),
        (
            "/etc/ssl/certs/ca-certificates.crt",
            "-----BEGIN CERTIFICATE-----",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dest = files.path().join(i.to_string());
        let out = podman.run(&["cp", &format!("files:{path}"), &dest.to_string_lossy()]);
        assert!(out.status.success(), "podman cp {path}: {}", text(&out));
        let body = std::fs::read_to_string(&dest).expect("copied file");
        assert!(body.contains(expect), "{path}: {body}");
    }
    let _ = podman.run(&["rm", "files"]);

    let size = image["Size"].as_u64().unwrap_or_default();
    say(&format!(
        "{FILE}: the image is {:.1} MiB",
        size as f64 / (1024.0 * 1024.0)
    ));
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    podvisor_podvm::testing::free_port()
}

/// GET `url`: the status and body, or why not.
fn get(url: &str) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// The host's `podvisor` client, pointed at the container's endpoints.
fn client(socket: &Path, admin: &str, grpc: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .env_clear()
        .arg("--socket")
        .arg(socket)
        .args(["--admin-addr", admin, "--grpc-addr", grpc])
        .args(args)
        .output()
        .expect("running the podvisor client");
    (
        out.status.success(),
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stops the container when a test ends, passing or not.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl<'a> Container<'a> {
    /// `podman <args…>` (a `run --detach --name <name> …`); panics if it
    /// fails.
    fn run(podman: &'a Podman, name: &str, args: &[&str]) -> Self {
        let out = podman.run(args);
        assert!(out.status.success(), "podman run: {}", text(&out));
        Self {
            podman,
            name: name.to_owned(),
        }
    }

    /// Its log so far.
    fn logs(&self) -> String {
        text(&self.podman.run(&["logs", &self.name]))
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .run(&["rm", "--force", "--time", "0", &self.name]);
    }
}

#[test]
fn the_daemon_in_the_image_serves_a_pod_vm_under_the_charts_security_context() {
    let test = "the_daemon_in_the_image_serves_a_pod_vm_under_the_charts_security_context";
    let Some(podman) = Podman::load(test) else {
        return;
    };
    // The node's directories the chart mounts (deploy/helm/podvisor/templates/daemonset.yaml).
    let node = tempfile::tempdir().expect("tempdir");
    let peerpod = node.path().join("peerpod");
    let state = node.path().join("state");
    for dir in [&peerpod, &state] {
        std::fs::create_dir(dir).expect("mkdir");
    }
    let admin = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let name = format!("podvisor-image-test-{}", std::process::id());

    // As the chart runs it: the provider as the argument, the chart's own
    // variables, its security context and volumes.
    let peerpod_mount = format!("{}:/run/peerpod", peerpod.display());
    let state_mount = format!("{}:/var/lib/podvisor", state.display());
    let admin_env = format!("PODVISOR_ADMIN_ADDR={admin}");
    let grpc_env = format!("PODVISOR_GRPC_ADDR={grpc}");
    let image = image_name();
    let mut args = vec!["run", "--detach", "--name", &name];
    args.extend(LIMITS);
    args.extend([
        "--network",
        "host",
        "--user",
        "0",
        "--read-only",
        // Kubernetes' readOnlyRootFilesystem: no writable /run or /var/tmp
        // (podman's --read-only would add them); /tmp is the chart's emptyDir.
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN,SYS_ADMIN",
        "--security-opt",
        "no-new-privileges",
        "--tmpfs",
        "/tmp",
        "--volume",
        &peerpod_mount,
        "--volume",
        &state_mount,
        "--env",
        "NODE_NAME=image-test-node",
        "--env",
        &admin_env,
        "--env",
        &grpc_env,
        "--env",
        "PODVISOR_STATE_DIR=/var/lib/podvisor",
        "--env",
        "REMOTE_HYPERVISOR_ENDPOINT=/run/peerpod/hypervisor.sock",
        "--env",
        "PODS_DIR=/run/peerpod/pods",
        "--env",
        "PODVISOR_SHUTDOWN_GRACE=10s",
        "--env",
        "PODVISOR_LOG_FORMAT=json",
        &image,
        "local",
    ]);
    let container = Container::run(&podman, &name, &args);
    let logs = || container.logs();

    // /readyz: 200 once recovery is decided (nothing to recover here).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match get(&format!("http://{admin}/readyz")) {
            Ok((200, _)) => break,
            other => assert!(
                Instant::now() < deadline,
                "/readyz never answered 200 (last: {other:?}); the container's log:\n{}",
                logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = get(&format!("http://{admin}/v1/status")).expect("/v1/status");
    assert_eq!(status, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(status["provider"], "local", "{status}");
    assert_eq!(status["node"], "image-test-node", "{status}");

    // A pod VM through the mounted Kata socket: the image's forwarder is
    // what the local provider starts.
    let socket = peerpod.join("hypervisor.sock");
    let (ok, id, err) = client(
        &socket,
        &admin,
        &grpc,
        &["create", "--pod", "web", "--namespace", "default"],
    );
    assert!(ok, "create: {err}\n{}", logs());
    let id = id.trim().to_owned();
    let (ok, _, err) = client(&socket, &admin, &grpc, &["start", &id]);
    assert!(ok, "start: {err}\n{}", logs());
    let (ok, json, err) = client(&socket, &admin, &grpc, &["instance", &id, "-o", "json"]);
    assert!(ok, "instance: {err}");
    let record: serde_json::Value = serde_json::from_str(&json).expect("instance JSON");
    assert_eq!(record["state"], "running", "{record}");
    // The journal is in the node's directory, where it outlives the pod.
    assert!(
        state.join("journal").is_dir(),
        "no journal in the mounted state directory"
    );
    let (ok, _, err) = client(&socket, &admin, &grpc, &["stop", &id]);
    assert!(ok, "stop: {err}\n{}", logs());

    // SIGTERM (podman stop): the daemon exits 0 within its grace.
    let out = podman.run(&["stop", "--time", "20", &name]);
    assert!(out.status.success(), "podman stop: {}", text(&out));
    let out = podman.run(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    assert_eq!(
        stdout(&out).trim(),
        "0",
        "exit code; the container's log:\n{}",
        logs()
    );
    let log = logs();
    assert!(!log.contains("panicked"), "{log}");
    drop(container);
}

/// A network namespace the test made, deleted when it ends.
struct TestNetns(String);

impl TestNetns {
    fn new() -> Self {
        let name = format!("pvimg{}-{}", std::process::id(), fastrand::u32(..));
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(out.status.success(), "ip netns add {name}: {}", text(&out));
        let netns = Self(name);
        // The daemon's admin endpoint listens on its loopback.
        let out = netns.exec(&["ip", "link", "set", "lo", "up"], "");
        assert!(out.status.success(), "lo up: {}", text(&out));
        netns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    /// `ip netns exec <ns> <args…>` with `input` on stdin.
    fn exec(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running ip netns exec");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("ip netns exec")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A NOTRACK rule as the daemon writes it (`src/network/notrack.rs`: the
/// reference's shape, CAA `tunneler/vxlan/iptables.go`), as
/// `iptables-save` prints it.
fn notrack_line(vni: u32, pod_vm_ip: &str) -> String {
    format!(
        "-A peerpod-OUTPUT -d {pod_vm_ip}/32 -p udp -m comment --comment \"peerpod [vni:{vni}]\" -m udp --dport 4789 -j NOTRACK"
    )
}

/// The pod network's NOTRACK rules with the image's iptables (the
/// nf_tables backend): a rule the node's own iptables wrote is read back
/// by the image's `iptables-save`, one the image's `iptables-restore`
/// writes (the daemon's way: `--noflush -w 5`) is read by the node's, and
/// the daemon in the image, run with a pod network (the local provider's
/// `--netns-per-vm`), turns it on and finds both rules' VNIs at start-up —
/// where an image without iptables ran with the pod network off.
#[test]
fn the_images_iptables_reads_and_writes_the_tunnels_notrack_rules() {
    let test = "the_images_iptables_reads_and_writes_the_tunnels_notrack_rules";
    let Some(podman) = Podman::load(test) else {
        return;
    };
    // The node's side through its nf_tables tools whatever its default
    // backend: a legacy iptables-save would not show the image's rules.
    let node_iptables = Command::new("iptables-nft-save").arg("--version").output();
    if !node_iptables.is_ok_and(|o| o.status.success()) {
        skip(
            FILE,
            test,
            "no iptables-nft-save on this machine (Debian: apt-get install iptables)",
        );
        return;
    }
    let netns = TestNetns::new();
    let network = format!("ns:{}", netns.path().display());
    let image = image_name();

    // The node writes one, the image reads it.
    let first = notrack_line(555_000, "192.168.222.2");
    let out = netns.exec(
        &["iptables-nft-restore", "--noflush"],
        &format!("*raw\n:peerpod-OUTPUT - [0:0]\n-A OUTPUT -j peerpod-OUTPUT\n{first}\nCOMMIT\n"),
    );
    assert!(
        out.status.success(),
        "the node's iptables-restore: {}",
        text(&out)
    );
    let mut save = vec!["run", "--rm", "--network", &network, "--cap-drop", "ALL"];
    save.extend(["--cap-add", "NET_ADMIN"]);
    save.extend(LIMITS);
    save.extend([
        "--entrypoint",
        "/usr/sbin/iptables-save",
        &image,
        "-t",
        "raw",
    ]);
    let out = podman.run(&save);
    assert!(
        out.status.success(),
        "the image's iptables-save: {}",
        text(&out)
    );
    let raw = stdout(&out);
    assert!(raw.contains(&first), "the image's iptables-save:\n{raw}");

    // The image writes one, the node reads it.
    let second = notrack_line(555_001, "192.168.222.3");
    let mut restore = vec!["run", "--rm", "--interactive", "--network", &network];
    // The chart's read-only root: iptables-nft needs no lock file.
    restore.extend(["--read-only", "--read-only-tmpfs=false"]);
    restore.extend(["--cap-drop", "ALL", "--cap-add", "NET_ADMIN"]);
    restore.extend(LIMITS);
    restore.extend(["--entrypoint", "/usr/sbin/iptables-restore", &image]);
    restore.extend(["-w", "5", "--noflush"]);
    let mut child = podman
        .command(&restore)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("podman run");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(format!("*raw\n{second}\nCOMMIT\n").as_bytes())
            .expect("write the rules");
    }
    let out = child.wait_with_output().expect("podman run");
    assert!(
        out.status.success(),
        "the image's iptables-restore: {}",
        text(&out)
    );
    let out = netns.exec(&["iptables-nft-save", "-t", "raw"], "");
    let raw = stdout(&out);
    assert!(
        raw.contains(&first) && raw.contains(&second),
        "the node's iptables-save:\n{raw}"
    );

    // The daemon in the image, with a pod network: on, and both VNIs known.
    let name = format!("podvisor-image-netns-{}", std::process::id());
    let admin = format!("127.0.0.1:{}", free_port());
    let admin_env = format!("PODVISOR_ADMIN_ADDR={admin}");
    let mut args = vec!["run", "--detach", "--name", &name, "--network", &network];
    args.extend(LIMITS);
    args.extend(["--cap-drop", "ALL", "--cap-add", "NET_ADMIN,SYS_ADMIN"]);
    // As the chart runs it: a read-only root, the state and the Kata
    // socket's directory mounted, /tmp an emptyDir.
    args.extend(["--read-only", "--read-only-tmpfs=false"]);
    for dir in ["/tmp", "/var/lib/podvisor", "/run/peerpod"] {
        args.extend(["--tmpfs", dir]);
    }
    args.extend(["--env", "NODE_NAME=image-netns-node", "--env", &admin_env]);
    args.extend([&image, "--host-interface", "pvcloud0"]);
    args.extend(["local", "--netns-per-vm", "--cloud-bridge", "pvcloud0"]);
    let container = Container::run(&podman, &name, &args);
    let logs = || container.logs();
    // The admin endpoint is on the namespace's loopback.
    let inside = podvisor_podvm::network::netns::Netns::open(netns.path()).expect("open the netns");
    let url = format!("http://{admin}/v1/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let url = url.clone();
        match inside.run(move || get(&url)).expect("run in the netns") {
            Ok((200, body)) => break body,
            other => assert!(
                Instant::now() < deadline,
                "/v1/status never answered (last: {other:?}); the container's log:\n{}",
                logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let pod_network = &status["pod_network"];
    assert_eq!(pod_network["tunnel_type"], "vxlan", "{status}\n{}", logs());
    assert_eq!(pod_network["vxlan_port"], 4789, "{pod_network}");
    let log = logs();
    assert!(
        log.contains("tunnels' NOTRACK rules found on the node at start-up")
            && log.contains("555000")
            && log.contains("555001"),
        "the daemon did not read the rules with the image's iptables-save:\n{log}"
    );
    assert!(
        !log.contains("cannot read the tunnels' NOTRACK rules"),
        "{log}"
    );
    drop(container);
}
