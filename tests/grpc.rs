//! The gRPC endpoint: the same hypervisor semantics, and the admin API with
//! its watch stream.

mod common;

use common::*;
use podvisor::protocols::grpc::admin::admin_client::AdminClient;
use podvisor::protocols::grpc::admin::{self, instance_event::Kind};
use podvisor::protocols::grpc::hypervisor as hv;
use podvisor::protocols::grpc::hypervisor::hypervisor_client::HypervisorClient;
use std::time::Duration;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_drives_a_pod_vm_and_the_admin_api_watches_it() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let endpoint = format!("http://127.0.0.1:{}", setup.grpc_port);
    let mut hv = HypervisorClient::connect(endpoint.clone()).await.unwrap();
    let mut admin = AdminClient::connect(endpoint).await.unwrap();

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
