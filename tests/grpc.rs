//! The gRPC endpoint: the same hypervisor semantics, and the admin API with
//! its watch stream and the journal's quarantine; and who may reach which:
//! `hypervisor.Hypervisor` on the unix socket (mode 0660, as the Kata
//! socket) and, only with the bearer token, on TCP; the read-only Admin on
//! both; the Admin's operator RPCs (the quarantine) on the unix socket only.

mod common;

use common::*;
use podvisor::protocols::grpc::admin::admin_client::AdminClient;
use podvisor::protocols::grpc::admin::{self, instance_event::Kind};
use podvisor::protocols::grpc::hypervisor as hv;
use podvisor::protocols::grpc::hypervisor::hypervisor_client::HypervisorClient;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// `hypervisor.Hypervisor` on the daemon's gRPC unix socket.
async fn unix_hypervisor(setup: &Setup) -> HypervisorClient<Channel> {
    HypervisorClient::connect(format!("unix://{}", setup.grpc_socket().display()))
        .await
        .unwrap()
}

fn tcp_endpoint(setup: &Setup) -> String {
    format!("http://127.0.0.1:{}", setup.grpc_port)
}

/// Writes `token` (with the newline `echo` adds) to a file the daemon is
/// pointed at with `--grpc-token-file`.
fn with_token_file(setup: &mut Setup, token: &str) -> PathBuf {
    let path = setup.root.path().join("grpc-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    setup
        .global
        .extend(["--grpc-token-file".to_owned(), path.display().to_string()]);
    path
}

/// A Running sandbox, made through the Kata socket.
async fn running_sandbox(daemon: &Daemon, pod: &str) -> String {
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, pod, "ns").await;
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    id
}

/// What a TCP client sends as `authorization`, if anything.
#[derive(Clone)]
struct Authorization(Option<String>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        Ok(req)
    }
}

type TcpHypervisor =
    HypervisorClient<tonic::service::interceptor::InterceptedService<Channel, Authorization>>;

/// `hypervisor.Hypervisor` on the daemon's TCP endpoint, sending
/// `authorization` as given.
async fn tcp_hypervisor(setup: &Setup, authorization: Option<String>) -> TcpHypervisor {
    let channel = Channel::from_shared(tcp_endpoint(setup))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HypervisorClient::with_interceptor(channel, Authorization(authorization))
}

/// StopVM of `id` and CreateVM of `new_id`, both expected to fail: their
/// statuses.
async fn stop_and_create(
    hv: &mut TcpHypervisor,
    id: &str,
    new_id: &str,
) -> (tonic::Status, tonic::Status) {
    let stop = hv
        .stop_vm(hv::StopVmRequest { id: id.to_owned() })
        .await
        .unwrap_err();
    let create = hv
        .create_vm(hv::CreateVmRequest {
            id: new_id.to_owned(),
            annotations: pod_annotations("intruder", "ns"),
            network_namespace_path: String::new(),
        })
        .await
        .unwrap_err();
    (stop, create)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_drives_a_pod_vm_and_the_admin_api_watches_it() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let mut hv = unix_hypervisor(&setup).await;
    let mut admin = AdminClient::connect(tcp_endpoint(&setup)).await.unwrap();

    let mut watch = admin
        .watch_instances(admin::WatchInstancesRequest {
            include_existing: true,
        })
        .await
        .unwrap()
        .into_inner();

    let version = hv
        .version(hv::VersionRequest {
            version: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.version, "0.0.0");

    let id = sandbox_id();
    let created = hv
        .create_vm(hv::CreateVmRequest {
            id: id.clone(),
            annotations: pod_annotations("grpc-pod", "ns"),
            network_namespace_path: "/var/run/netns/x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        created
            .agent_socket_path
            .ends_with(&format!("{id}/agent.ttrpc"))
    );
    hv.start_vm(hv::StartVmRequest { id: id.clone() })
        .await
        .unwrap();

    let listed = admin
        .list_instances(admin::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.instances.len(), 1);
    let one = admin
        .get_instance(admin::GetInstanceRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.state, "running");
    assert!(one.instance_id.starts_with("lvm-"));
    let missing = admin
        .get_instance(admin::GetInstanceRequest {
            sandbox_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The unix socket serves the admin API too.
    let mut unix_admin = AdminClient::connect(format!("unix://{}", setup.grpc_socket().display()))
        .await
        .unwrap();
    let listed = unix_admin
        .list_instances(admin::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.instances.len(), 1);

    let bad = hv
        .start_vm(hv::StartVmRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    hv.stop_vm(hv::StopVmRequest { id: id.clone() })
        .await
        .unwrap();

    // The watch saw the whole life, in order.
    let mut states = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
        let event = event.unwrap();
        let instance = event.instance.unwrap();
        assert_eq!(instance.sandbox_id, id);
        let kind = Kind::try_from(event.kind).unwrap();
        states.push(if kind == Kind::Removed {
            "removed".to_owned()
        } else {
            instance.state
        });
        if kind == Kind::Removed {
            break;
        }
    }
    states.dedup();
    assert_eq!(
        states,
        ["pending", "creating", "running", "deleting", "removed"]
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypervisor_is_not_served_over_tcp_without_a_token() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let id = running_sandbox(&daemon, "tcp-target").await;

    let mut hv = tcp_hypervisor(&setup, None).await;
    let intruder = sandbox_id();
    let (stop, create) = stop_and_create(&mut hv, &id, &intruder).await;
    assert_eq!(stop.code(), tonic::Code::Unimplemented, "{stop:?}");
    assert_eq!(create.code(), tonic::Code::Unimplemented, "{create:?}");

    // Nothing happened: the sandbox still runs, no VM was made.
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    assert!(daemon.instance(&intruder).await.is_none());
    // The read-only admin API is still there.
    let mut admin = AdminClient::connect(tcp_endpoint(&setup)).await.unwrap();
    let one = admin
        .get_instance(admin::GetInstanceRequest {
            sandbox_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.state, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypervisor_over_tcp_needs_the_configured_bearer_token() {
    let mut setup = Setup::new();
    let token = format!("tok-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    with_token_file(&mut setup, &token);
    let daemon = setup.start().await;
    let id = running_sandbox(&daemon, "token-target").await;
    let intruder = sandbox_id();
    // No token, a wrong one, the right one under another scheme.
    for authorization in [
        None,
        Some(format!("Bearer {token}x")),
        Some(format!("Bearer {}", &token[1..])),
        Some(format!("Basic {token}")),
    ] {
        let mut hv = tcp_hypervisor(&setup, authorization).await;
        let (stop, create) = stop_and_create(&mut hv, &id, &intruder).await;
        for status in [stop, create] {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            assert!(
                status.message().contains("authorization: Bearer")
                    && status.message().contains("--grpc-token-file"),
                "{status:?}"
            );
            assert!(!status.message().contains(&token), "{status:?}");
        }
    }
    assert_eq!(daemon.instance(&id).await.unwrap()["state"], "running");
    assert!(daemon.instance(&intruder).await.is_none());

    // With the token, it drives pod VMs.
    let mut hv = tcp_hypervisor(&setup, Some(format!("Bearer {token}"))).await;
    hv.stop_vm(hv::StopVmRequest { id: id.clone() })
        .await
        .unwrap();
    eventually(
        "the stopped sandbox to be gone",
        Duration::from_secs(10),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
    let log = daemon.log_text();
    assert!(log.contains("refused"), "{log}");
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
}

/// Tries, as uid and gid 1001 (no other groups), to connect to each unix
/// socket: "connected", "EACCES" or the error.
fn connect_as_unprivileged_user(sockets: &[&Path]) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = "
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        print('connected')
    except PermissionError:
        print('EACCES')
    except OSError as e:
        print('error', e)
";
    // The system's python: a per-user install under /root is out of the
    // unprivileged user's reach.
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-I", "-c", SCRIPT])
        .args(sockets)
        .env_clear()
        .current_dir("/")
        .uid(1001)
        .gid(1001)
        .output()
        .expect("/usr/bin/python3 runs");
    assert!(
        out.status.success(),
        "python3 as uid 1001: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_socket_admits_only_owner_and_group_and_drives_pod_vms() {
    let mut setup = Setup::new();
    // A group besides root's and the unprivileged user's, so "set" shows.
    let group = another_group();
    setup
        .global
        .extend(["--socket-group".to_owned(), group.name.clone()]);
    // Others may pass through the test's directory, so only the socket's own
    // mode stands between them and the socket.
    std::fs::set_permissions(setup.root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let daemon = setup.start().await;

    let socket = setup.grpc_socket();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "the gRPC socket");
    assert_eq!(meta.gid(), group.gid.as_raw(), "the gRPC socket's group");

    // A socket open to all in the same directory: the unprivileged user
    // does reach it, so what stops them below is the gRPC socket's mode.
    let control = setup.root.path().join("control.sock");
    let _control = std::os::unix::net::UnixListener::bind(&control).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        connect_as_unprivileged_user(&[&control, &socket]),
        ["connected", "EACCES"]
    );

    // Root, the owner, stops a pod's VM over it.
    let id = running_sandbox(&daemon, "unix-target").await;
    unix_hypervisor(&setup)
        .await
        .stop_vm(hv::StopVmRequest { id: id.clone() })
        .await
        .unwrap();
    eventually(
        "the stopped sandbox to be gone",
        Duration::from_secs(10),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_bound_beyond_loopback_start_with_a_warning() {
    let mut setup = Setup::new();
    setup.listen_ip = std::net::Ipv4Addr::UNSPECIFIED.into();
    let daemon = setup.start().await;
    let log = daemon.log_text();
    for warning in [
        "--admin-addr (PODVISOR_ADMIN_ADDR) is not a loopback address",
        "--grpc-addr (PODVISOR_GRPC_ADDR) is not a loopback address",
        "pod name, namespace, IP addresses, instance id",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(warning)),
            "no warning {warning:?}:\n{log}"
        );
    }
    // Still no mutating service on TCP.
    let mut hv = tcp_hypervisor(&setup, None).await;
    let stop = hv
        .stop_vm(hv::StopVmRequest { id: sandbox_id() })
        .await
        .unwrap_err();
    assert_eq!(stop.code(), tonic::Code::Unimplemented, "{stop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_guards_nothing_stops_start_up_naming_the_flag() {
    for (content, why) in [
        (Some(" \n"), "is empty"),
        (Some("short\n"), "at least 16"),
        (None, "cannot read it"),
    ] {
        let mut setup = Setup::new();
        setup.listen_ip = std::net::Ipv4Addr::UNSPECIFIED.into();
        let path = with_token_file(&mut setup, "placeholder");
        match content {
            Some(c) => std::fs::write(&path, c).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        let out = setup.command().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--grpc-token-file (PODVISOR_GRPC_TOKEN_FILE)") && err.contains(why),
            "{why}: {err}"
        );
        assert!(
            !setup.socket().exists() && !setup.grpc_socket().exists(),
            "{err}"
        );
    }
}

/// SIGTERM ends every open WatchInstances stream at once: the server closes
/// each with its status (no waiting out the shutdown's 5 s allowance per
/// endpoint), and the daemon exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_watch_streams_and_the_daemon_exits() {
    let setup = Setup::new();
    let mut daemon = setup.start().await;
    let _id = running_sandbox(&daemon, "watched").await;
    let mut tcp = AdminClient::connect(tcp_endpoint(&setup)).await.unwrap();
    let mut unix = AdminClient::connect(format!("unix://{}", setup.grpc_socket().display()))
        .await
        .unwrap();
    let mut streams = Vec::new();
    for admin in [&mut tcp, &mut unix] {
        let mut watch = admin
            .watch_instances(admin::WatchInstancesRequest {
                include_existing: true,
            })
            .await
            .unwrap()
            .into_inner();
        // The stream is open and served: the existing sandbox arrives.
        assert!(watch.message().await.unwrap().is_some());
        streams.push(watch);
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let asked = std::time::Instant::now();
    for mut watch in streams {
        // Ended by the server, with an OK status: not cut off when the
        // process exits after the shutdown gave up waiting for it.
        let end = tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("the stream ends");
        assert!(
            matches!(end, Ok(None)),
            "the stream ended with {end:?} after {:?}, not closed by the server\n{}",
            asked.elapsed(),
            daemon.log_text()
        );
    }
    let status = daemon
        .exited_within(Duration::from_secs(20))
        .await
        .expect("the daemon exits");
    assert!(status.success(), "{status}");
}

/// The Admin service on the daemon's gRPC unix socket.
async fn unix_admin(setup: &Setup) -> AdminClient<Channel> {
    AdminClient::connect(format!("unix://{}", setup.grpc_socket().display()))
        .await
        .unwrap()
}

/// Writes `bytes` under `key` in the journal of `setup` (no daemon
/// running), then quarantines them as a start would; returns the journal's
/// id.
fn corrupt_and_quarantine(setup: &Setup, key: &str, bytes: &[u8]) -> String {
    use podvisor_state::Journal;
    // Called several times in a row: each open waits for the last to let go.
    let journal = setup.open_journal();
    journal.put_raw(key, bytes).unwrap();
    let quarantined = journal.load().unwrap().quarantined;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    journal.identity().id
}

/// ListQuarantined on the unix socket, sorted by id.
async fn quarantined(admin: &mut AdminClient<Channel>) -> Vec<admin::QuarantinedRecord> {
    let mut records = admin
        .list_quarantined(admin::ListQuarantinedRequest {})
        .await
        .unwrap()
        .into_inner()
        .records;
    records.sort_by(|a, b| a.id.cmp(&b.id));
    records
}

fn drop_request(id: &str) -> admin::DropQuarantinedRequest {
    admin::DropQuarantinedRequest { id: id.to_owned() }
}

/// A journal with corrupt records: the unix socket lists them whole and
/// drops them one by one, durably; --grpc-addr refuses both RPCs, saying
/// where to go; an unknown id is NOT_FOUND; the log names what was dropped
/// and never shows its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quarantine_is_listed_and_dropped_on_the_unix_socket_only() {
    let setup = Setup::new();
    // A truncated record that held a pod's initdata.
    let secret = "SECRET-INITDATA-0123456789";
    let broken =
        format!(r#"{{"schema_version":1,"sandbox_id":"broken-sandbox","initdata":"{secret}"#);
    corrupt_and_quarantine(&setup, "broken-sandbox", broken.as_bytes());
    // Two entries of one sandbox.
    corrupt_and_quarantine(&setup, "twice", b"not json");
    corrupt_and_quarantine(&setup, "twice", &[0xff, 0x00]);
    let mut daemon = setup.start().await;
    let mut unix = unix_admin(&setup).await;

    let listed = quarantined(&mut unix).await;
    let keys: Vec<_> = listed.iter().map(|q| q.key.as_str()).collect();
    assert_eq!(keys, ["broken-sandbox", "twice", "twice"], "{listed:?}");
    let entry = listed[0].clone();
    assert!(entry.id.starts_with("broken-sandbox@"), "{entry:?}");
    assert_eq!(entry.bytes, broken.as_bytes(), "the bytes, as stored");
    assert!(entry.reason.starts_with("Malformed record"), "{entry:?}");
    let now_ms = podvisor_state::now_millis();
    assert!(
        entry.quarantined_at_unix_ms > now_ms - 600_000 && entry.quarantined_at_unix_ms <= now_ms,
        "{entry:?}"
    );
    assert_ne!(listed[1].id, listed[2].id, "every entry has its own id");

    // Over TCP, which every local user reaches: refused, with the way.
    let mut tcp = AdminClient::connect(tcp_endpoint(&setup)).await.unwrap();
    let list = tcp
        .list_quarantined(admin::ListQuarantinedRequest {})
        .await
        .unwrap_err();
    let dropping = tcp
        .drop_quarantined(drop_request(&entry.id))
        .await
        .unwrap_err();
    let socket = format!("unix://{}", setup.grpc_socket().display());
    for (rpc, status) in [("ListQuarantined", &list), ("DropQuarantined", &dropping)] {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let message = status.message();
        assert!(
            message.starts_with(rpc)
                && message.contains("--grpc-socket")
                && message.contains(&socket),
            "{message}"
        );
        assert!(!message.contains(secret), "{message}");
    }
    assert_eq!(quarantined(&mut unix).await, listed, "TCP dropped nothing");

    // On the unix socket: dropped, whole, and the sandbox has no entry left.
    let dropped = unix
        .drop_quarantined(drop_request(&entry.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.record.as_ref(), Some(&entry));
    assert!(!dropped.sandbox_still_quarantined);
    assert_eq!(quarantined(&mut unix).await, listed[1..]);
    let again = unix
        .drop_quarantined(drop_request(&entry.id))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    assert!(
        again.message().contains(&format!("{:?}", entry.id))
            && again.message().contains("ListQuarantined"),
        "{again:?}"
    );
    let unknown = unix
        .drop_quarantined(drop_request("nope@1"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let empty = unix.drop_quarantined(drop_request("")).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument, "{empty:?}");

    // One of two entries of a sandbox: the other still spares it.
    let first = unix
        .drop_quarantined(drop_request(&listed[1].id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.record.as_ref(), Some(&listed[1]));
    assert!(first.sandbox_still_quarantined);

    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("dropped a quarantined journal record") && l.contains(&entry.id))
        .unwrap_or_else(|| panic!("no WARN line for the drop:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("broken-sandbox"),
        "{line}"
    );
    assert!(!log.contains(secret), "the bytes reached the log:\n{log}");

    // Dropped for good: a restart does not bring them back.
    daemon.kill9();
    drop(daemon);
    let _daemon = setup.start().await;
    let mut unix = unix_admin(&setup).await;
    assert_eq!(quarantined(&mut unix).await, listed[2..]);
}

/// Once its last quarantined record is dropped, a sandbox's instance that
/// the GC spared is an orphan like any other: the GC deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_drop_the_gc_no_longer_spares_the_sandbox() {
    use podvisor_providers::Provider;
    let mut setup = Setup::new();
    eager_gc(&mut setup);
    let mut fixture = podvisor_providers::conformance::Fixture::new(&setup.node);
    fixture.sandbox_id = "unreadable-sandbox".into();
    let provider = podvisor_providers::local::LocalProvider::new(
        setup.local_dir(),
        podvisor_podvm::testing::forwarder_binary().unwrap(),
        setup.forwarder_port,
    )
    .unwrap();
    let journal_id = corrupt_and_quarantine(&setup, "unreadable-sandbox", b"{\"schema_version\":1");
    // Tagged with this node's journal: only the quarantine spares it.
    let mut request = fixture.request(1);
    request
        .tags
        .insert(podvisor_providers::TAG_JOURNAL.into(), journal_id);
    let instance = provider.create_instance(&request).await.unwrap();
    let exists = || {
        setup
            .local_dir()
            .join("instances")
            .join(&instance.id)
            .exists()
    };
    let daemon = setup.start().await;
    let runs = daemon.metric("podvisor_gc_runs_total", &[]).await;
    eventually("two GC passes", Duration::from_secs(20), async || {
        (daemon.metric("podvisor_gc_runs_total", &[]).await >= runs + 2.0).then_some(())
    })
    .await;
    assert!(exists(), "the GC deleted a quarantined record's instance");

    let mut unix = unix_admin(&setup).await;
    let id = quarantined(&mut unix).await.remove(0).id;
    let dropped = unix
        .drop_quarantined(drop_request(&id))
        .await
        .unwrap()
        .into_inner();
    assert!(!dropped.sandbox_still_quarantined);
    eventually(
        "the GC deletes the instance",
        Duration::from_secs(20),
        async || (!exists()).then_some(()),
    )
    .await;
    assert_eq!(
        daemon.metric("podvisor_orphans_deleted_total", &[]).await,
        1.0
    );
    let _ = provider.delete_instance(&instance.id).await;
}
