//! `podvisor local --netns-per-vm`: each instance in a network namespace of
//! its own on a "cloud" bridge, reached over real links.
//!
//! The whole test process first moves into a fresh network namespace of its
//! own (it is one thread then, so every later thread is there too, and
//! `/proc/self/ns/net` names it), so the bridge, the veths and the
//! instances' namespaces never touch the machine's network. It needs root
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN): without them it says why and passes,
//! except under `CI=true`, where it fails.
//!
//! `harness = false`: the namespace must be entered before any thread
//! exists, which libtest's runner does not allow.

use podvisor_providers::conformance::Fixture;
use podvisor_providers::local::{LocalProvider, VmNetwork};
use podvisor_providers::{InstanceStatus, Provider};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

fn main() {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        let why = format!("cannot make a network namespace for the test (needs root): {e}");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}");
        }
        eprintln!("local_netns: skipped: {why}");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!("running 1 test");
    runtime.block_on(instances_get_namespaces_and_addresses_on_the_cloud_bridge());
    println!("test instances_get_namespaces_and_addresses_on_the_cloud_bridge ... ok");
    println!("\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}

fn netns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn pid_of(dir: &Path, id: &str) -> u32 {
    let text = std::fs::read_to_string(dir.join("instances").join(id).join("instance.json"))
        .expect("instance.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    v["pid"].as_u64().expect("a pid") as u32
}

// With `ip` (netlink, in this process's namespace): /sys/class/net shows
// the namespace that mounted sysfs, not ours.
fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(name: &str) -> bool {
    !ip(&["-o", "link", "show", "dev", name]).trim().is_empty()
}

async fn reachable(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Kills the forwarders of the instances under a local dir when dropped —
/// also when the test fails half-way (each holds its namespace alive).
struct KillForwarders(std::path::PathBuf);

impl Drop for KillForwarders {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join("instances")) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let Ok(proc_dir) = std::fs::read_dir("/proc") else {
                return;
            };
            for pid in proc_dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmdline.split(|b| *b == 0).any(|a| a == id.as_bytes()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

async fn instances_get_namespaces_and_addresses_on_the_cloud_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillForwarders(dir.path().to_path_buf());
    let port = podvisor_podvm::testing::free_port();
    let bin = podvisor_podvm::testing::forwarder_binary().unwrap();
    let provider = LocalProvider::new(dir.path().to_path_buf(), bin, port)
        .unwrap()
        .with_vm_network(VmNetwork::new(
            "pvtest0".into(),
            "192.168.50.0/24".parse().unwrap(),
        ));
    let fixture = Fixture::new("node-netns");

    let a = provider.create_instance(&fixture.request(1)).await.unwrap();
    let b = provider.create_instance(&fixture.request(2)).await.unwrap();
    assert_eq!(a.status, InstanceStatus::Running);
    let ips: Vec<IpAddr> = [&a, &b].iter().map(|i| i.ips[0]).collect();
    assert_ne!(ips[0], ips[1]);
    for ip in &ips {
        let IpAddr::V4(v4) = ip else {
            panic!("{ip} is not IPv4")
        };
        assert_eq!(
            &v4.octets()[..3],
            &[192, 168, 50],
            "{ip} is on the cloud subnet"
        );
        assert_ne!(v4.octets()[3], 1, "the gateway is the bridge's");
    }
    assert!(link_exists("pvtest0"), "the bridge was made");
    assert_eq!(
        bridge_ports().len(),
        2,
        "one veth per instance: {:?}",
        bridge_ports()
    );

    // Each forwarder runs in a namespace of its own, reached over the bridge.
    let ours = netns_of(std::process::id());
    let pid_a = pid_of(dir.path(), &a.id);
    let pid_b = pid_of(dir.path(), &b.id);
    assert_ne!(netns_of(pid_a), ours);
    assert_ne!(netns_of(pid_a), netns_of(pid_b));
    for ip in &ips {
        assert!(reachable(SocketAddr::new(*ip, port)).await, "{ip}:{port}");
    }

    // A "VM" that died is started again by a create with its token, on the
    // same address, in a new namespace.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reachable(SocketAddr::new(ips[0], port)).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed forwarder still answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = provider.create_instance(&fixture.request(1)).await.unwrap();
    assert_eq!((&again.id, again.ips[0]), (&a.id, ips[0]));
    let pid_again = pid_of(dir.path(), &a.id);
    assert_ne!(pid_again, pid_a);
    // (Its namespace's inode number may be the dead one's: the kernel
    // reuses them.)
    assert_ne!(netns_of(pid_again), ours, "in a namespace of its own");
    assert!(reachable(SocketAddr::new(ips[0], port)).await);
    assert_eq!(bridge_ports().len(), 2, "the dead VM's veth went with it");

    // Deleting takes the process, its veth and its namespace away.
    provider.delete_instance(&b.id).await.unwrap();
    assert!(!reachable(SocketAddr::new(ips[1], port)).await);
    assert_eq!(bridge_ports().len(), 1);
    provider.delete_instance(&a.id).await.unwrap();
    assert!(bridge_ports().is_empty(), "{:?}", bridge_ports());
    // Idempotent: deleting again is done.
    provider.delete_instance(&a.id).await.unwrap();
}

fn bridge_ports() -> Vec<String> {
    ip(&["-o", "link", "show", "master", "pvtest0"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}
