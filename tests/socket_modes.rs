//! Who may reach the daemon's sockets does not depend on the umask it was
//! started with: the Kata socket, the gRPC socket and every agent socket
//! are `0660` (group: `--socket-group`), pod directories `0700`. Alone in
//! its test binary, because it sets the umask of the whole test process
//! (which the daemon inherits).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_and_pod_dirs_get_their_modes_whatever_the_umask() {
    // The worst case seen on nodes: umask 000 and a pre-existing, world-
    // readable /run/peerpod (a hostPath).
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let mut setup = Setup::new();
    let run_peerpod = setup.root.path().join("run-peerpod");
    std::fs::create_dir(&run_peerpod).unwrap();
    std::fs::set_permissions(&run_peerpod, std::fs::Permissions::from_mode(0o755)).unwrap();
    setup.shared_socket = Some(run_peerpod.join("hypervisor.sock"));
    // A group the node has: the test's own primary group is not enough to
    // tell "set" from "left alone", so take another one.
    let group = another_group();
    setup
        .global
        .extend(["--socket-group".to_owned(), group.name.clone()]);
    let daemon = setup.start().await;

    let socket = setup.socket();
    assert_eq!(mode(&socket), 0o660, "the Kata socket");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().gid(),
        group.gid.as_raw(),
        "the Kata socket's group"
    );
    // The gRPC socket drives pod VMs as the Kata socket does: the same
    // mode and group.
    let grpc_socket = setup.grpc_socket();
    assert_eq!(mode(&grpc_socket), 0o660, "the gRPC socket");
    assert_eq!(
        std::fs::metadata(&grpc_socket).unwrap().gid(),
        group.gid.as_raw(),
        "the gRPC socket's group"
    );

    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("modes", "ns"))
        .await
        .unwrap();
    let pod_dir = setup.pods_dir().join(&id);
    assert_eq!(mode(&pod_dir), 0o700, "the pod directory");
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
    assert_eq!(
        mode(&pod_dir.join("agent.ttrpc")),
        0o660,
        "the agent socket"
    );
    assert_eq!(mode(&setup.state_dir()), 0o700, "the state directory");
    assert_eq!(
        mode(&run_peerpod),
        0o755,
        "a directory it did not make is left alone"
    );
}
