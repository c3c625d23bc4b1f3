//! The local provider passes the conformance suite, with real forwarder
//! processes on loopback, and survives being rebuilt (a daemon restart).

use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::local::LocalProvider;
use podvisor_providers::{ErrorClass, InstanceStatus, Provider, TAG_NODE};

fn provider(dir: &std::path::Path) -> LocalProvider {
    let port = podvisor_podvm::testing::free_port();
    let bin = podvisor_podvm::testing::forwarder_binary().unwrap();
    LocalProvider::new(dir.to_path_buf(), bin, port).unwrap()
}

#[tokio::test]
async fn local_provider_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    run(&provider(dir.path()), &Fixture::new("node-a")).await;
}

#[tokio::test]
async fn instances_outlive_the_provider_object_and_are_found_by_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new("node-b");
    let request = fixture.request(1);
    let first = provider(dir.path());
    let created = first.create_instance(&request).await.unwrap();
    assert_eq!(created.status, InstanceStatus::Running);
    drop(first); // the daemon "crashes"

    let second = provider(dir.path());
    let found = second
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, created.id);
    assert_eq!(
        found.status,
        InstanceStatus::Running,
        "the process outlived its creator"
    );
    let listed = second.list_instances(TAG_NODE, "node-b").await.unwrap();
    assert_eq!(listed.len(), 1);
    second.delete_instance(&created.id).await.unwrap();
    assert!(
        second
            .list_instances(TAG_NODE, "node-b")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_creates_get_distinct_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let p = std::sync::Arc::new(provider(dir.path()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let f = Fixture::new("node-c");
            p.create_instance(&f.request(1)).await.unwrap()
        }));
    }
    let mut ips = Vec::new();
    for t in tasks {
        let inst = t.await.unwrap();
        ips.push(inst.ips[0]);
        p.delete_instance(&inst.id).await.unwrap();
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "addresses must not be shared");
}

#[tokio::test]
async fn a_bad_instance_id_is_not_found_rather_than_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path());
    p.delete_instance("lvm-../../etc").await.unwrap();
    p.delete_instance("").await.unwrap();
    assert!(dir.path().exists());
}

#[tokio::test]
async fn a_create_with_the_token_of_a_dead_instance_starts_that_instance_again() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path());
    let request = Fixture::new("node-d").request(1);
    let first = p.create_instance(&request).await.unwrap();
    let file = dir
        .path()
        .join("instances")
        .join(&first.id)
        .join("instance.json");
    let pid = |f: &std::path::Path| -> i32 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        v["pid"].as_i64().unwrap() as i32
    };
    // The "VM" dies (or a crash tore its create after instance.json).
    let old = pid(&file);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut seen = None;
    for _ in 0..100 {
        let found = p
            .find_instance(&request.token, &request.instance_name)
            .await
            .unwrap()
            .unwrap();
        if found.status == InstanceStatus::Stopped {
            seen = Some(found);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "a dead instance is reported stopped");

    let again = p.create_instance(&request).await.unwrap();
    assert_eq!(again.id, first.id, "the same instance, not a second one");
    assert_eq!(again.ips, first.ips, "on its own address");
    assert_eq!(again.status, InstanceStatus::Running);
    assert_ne!(pid(&file), old);
    std::net::TcpStream::connect((again.ips[0], {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        v["port"].as_u64().unwrap() as u16
    }))
    .expect("the forwarder listens again");
    assert_eq!(p.list_instances(TAG_NODE, "node-d").await.unwrap().len(), 1);
    p.delete_instance(&first.id).await.unwrap();
}

/// The live forwarder processes of one instance, by command line.
fn processes_of(instance: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && cmd.split(|b| *b == 0).any(|a| a == instance.as_bytes())
        })
        .collect()
}

#[tokio::test]
async fn a_forwarder_whose_pid_a_crash_never_recorded_is_not_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let p = provider(dir.path());
    let request = Fixture::new("node-e").request(1);
    let made = p.create_instance(&request).await.unwrap();
    // A crash between starting the forwarder and recording its pid.
    let file = dir
        .path()
        .join("instances")
        .join(&made.id)
        .join("instance.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    v["pid"] = serde_json::Value::Null;
    std::fs::write(&file, v.to_string()).unwrap();
    assert_eq!(processes_of(&made.id).len(), 1);

    // The retried create brings up exactly one forwarder, and answers.
    let again = p.create_instance(&request).await.unwrap();
    assert_eq!(again.id, made.id);
    assert_eq!(again.status, InstanceStatus::Running);
    assert_eq!(processes_of(&made.id).len(), 1, "never two forwarders");

    // Forget the pid again: the delete still stops the process.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    v["pid"] = serde_json::Value::Null;
    std::fs::write(&file, v.to_string()).unwrap();
    p.delete_instance(&made.id).await.unwrap();
    assert!(
        processes_of(&made.id).is_empty(),
        "the delete left the process running"
    );
}

#[tokio::test]
async fn errors_of_failed_os_calls_carry_the_os_error_name_as_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let port = podvisor_podvm::testing::free_port();
    let missing = dir.path().join("no-such-forwarder");
    let provider = LocalProvider::new(dir.path().to_path_buf(), missing, port).unwrap();
    let e = provider.verify_config().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Config, "{e}");
    assert_eq!(e.code(), Some("ENOENT"), "{e}");

    // podvisor's own refusal has no OS error behind it, so no code.
    let mut request = Fixture::new("node-c").request(1);
    request.token.clear();
    let e = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code(), None, "{e}");
}
