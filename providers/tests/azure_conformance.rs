//! The Azure provider against the ARM test server (HTTPS on loopback, an
//! Entra-style token endpoint + ARM Compute and Network; its answers are
//! checked against Microsoft's own Python SDK in `azure_fake.rs`), built
//! from its flags as the daemon builds it: the conformance suite,
//! idempotency by name (a lost answer, another token's VM), failed
//! long-running operations, throttling on every step, deletes that wait
//! for 404 and leave nothing behind, the GC's paged listing, size and
//! image selection, the create body, configuration checks, credentials,
//! and the requests a pod VM costs.

#![cfg(feature = "azure")]

use podvisor_providers::azure::AzureManager;
use podvisor_providers::azure::testing::{
    AzureServer, ErrorShape, Fault, Route, ServerOptions, TEST_CLIENT_SECRET, TEST_FEDERATED_TOKEN,
    TEST_SUBSCRIPTION_ID,
};
use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::pacing::{Pacer, RequestClass};
use podvisor_providers::{
    CallLimits, CloudManager, CreateRequest, ErrorClass, Provider, ProviderContext, TAG_NODE,
    TAG_TOKEN,
};
use std::sync::Arc;
use std::time::Duration;

/// The flags of a provider on `server`, then `extra` (a flag given again
/// replaces the first).
fn flags(server: &AzureServer, extra: &[&str]) -> Vec<String> {
    let mut args = server.flags();
    for pair in extra.chunks(2) {
        match args.iter().position(|a| a == pair[0]) {
            Some(at) if pair.len() == 2 && pair[0].starts_with("--") => {
                args[at + 1] = pair[1].to_owned();
            }
            _ => args.extend(pair.iter().map(|s| (*s).to_owned())),
        }
    }
    args
}

async fn provider_with(args: Vec<String>, pacer: Arc<Pacer>) -> Result<Arc<dyn Provider>, String> {
    let matches = AzureManager
        .command()
        .try_get_matches_from(args)
        .map_err(|e| e.to_string())?;
    let config = AzureManager.configure(&matches).map_err(|e| e.message)?;
    let context = ProviderContext {
        node_name: "node-a".into(),
        forwarder_port: 15150,
        state_dir: std::env::temp_dir(),
        pacer,
    };
    config.build(&context).await.map_err(|e| e.message)
}

async fn provider(server: &AzureServer, extra: &[&str]) -> Arc<dyn Provider> {
    provider_with(flags(server, extra), Arc::new(Pacer::unlimited()))
        .await
        .unwrap()
}

fn server() -> AzureServer {
    AzureServer::start(ServerOptions::default())
}

fn retry_of(request: &CreateRequest) -> CreateRequest {
    CreateRequest {
        earlier_attempt: true,
        ..request.clone()
    }
}

/// Nothing of any VM is left on the server: no VM, NIC, disk or public IP.
fn assert_nothing_left(server: &AzureServer) {
    assert!(server.vms().is_empty(), "VMs left: {:?}", server.vms());
    assert!(server.nics().is_empty(), "NICs left: {:?}", server.nics());
    assert!(
        server.disks().is_empty(),
        "disks left: {:?}",
        server.disks()
    );
    assert!(
        server.public_ips().is_empty(),
        "public IPs left: {:?}",
        server.public_ips()
    );
}

fn status_fault(status: u16, code: &str, retry_after: Option<u64>, shape: ErrorShape) -> Fault {
    Fault::Status {
        status,
        code: code.into(),
        retry_after,
        shape,
    }
}

#[tokio::test]
async fn azure_provider_passes_the_conformance_suite() {
    let server = server();
    server.set_provisioning(2, Duration::ZERO);
    server.set_deleting(2, Duration::ZERO);
    server.set_max_page(1);
    let provider = provider(&server, &["--use-public-ip", "true"]).await;
    provider.verify_config().await.unwrap();
    run(provider.as_ref(), &Fixture::new("node-a")).await;
    assert_nothing_left(&server);
}

#[tokio::test]
async fn a_create_is_one_put_tagged_named_and_shaped_as_the_reference_builds_it() {
    let server = server();
    let provider = provider(&server, &["--tags", "team=blue,cost center=42"]).await;
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    assert!(created.ips[0].is_loopback(), "{created:?}");
    let [vm] = server.vms().try_into().unwrap();
    assert_eq!(created.ips, vec![std::net::IpAddr::V4(vm.private_ip)]);
    assert_eq!(vm.name, request.instance_name);
    assert!(
        created.id.starts_with(&format!("{}#", vm.id)),
        "{}",
        created.id
    );
    assert_eq!(vm.size, "Standard_D2as_v5");
    assert_eq!(vm.provisioning_state, "Succeeded");
    assert_eq!(vm.nic, format!("{}-net", request.instance_name));
    assert_eq!(vm.os_disk, format!("{}-disk", request.instance_name));
    use base64::Engine;
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(vm.user_data.as_deref().unwrap())
        .unwrap();
    assert_eq!(user_data, request.user_data.as_bytes());
    for (key, value) in [
        ("team", "blue"),
        ("cost center", "42"),
        ("podvisor.io_node", "node-a"),
        ("podvisor.io_token", request.token.as_str()),
        ("podvisor.io_sandbox", request.sandbox_id.as_str()),
    ] {
        assert_eq!(
            vm.tags.get(key).map(String::as_str),
            Some(value),
            "{key}: {:?}",
            vm.tags
        );
    }
    let p = &vm.body["properties"];
    assert_eq!(p["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    let nic = &p["networkProfile"]["networkInterfaceConfigurations"][0];
    assert_eq!(nic["properties"]["deleteOption"], "Delete");
    assert_eq!(
        p["securityProfile"]["securityType"], "ConfidentialVM",
        "DISABLECVM defaults to false: {p}"
    );
    assert_eq!(p["securityProfile"]["uefiSettings"]["vTpmEnabled"], true);
    assert_eq!(p["osProfile"]["adminUsername"], "peerpod");
    let key = p["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"]
        .as_str()
        .unwrap();
    assert!(key.starts_with("ssh-ed25519 "), "a throw-away key: {key}");
    assert_eq!(created.tags.get(TAG_TOKEN), Some(&request.token));
    // A create costs one PUT.
    assert_eq!(server.count(Route::PutVm), 1);
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn cvm_off_secure_boot_public_ip_and_root_size_reach_the_body() {
    let server = server();
    let provider = provider(
        &server,
        &[
            "--disable-cvm",
            "true",
            "--enable-secure-boot",
            "true",
            "--use-public-ip",
            "true",
            "--root-volume-size",
            "40",
            "--securitygroupid",
            &server.options().nsg_ids[0],
        ],
    )
    .await;
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    let [vm] = server.vms().try_into().unwrap();
    let public = vm.public_ip.expect("a public IP");
    assert_eq!(
        created.ips,
        vec![
            std::net::IpAddr::V4(public),
            std::net::IpAddr::V4(vm.private_ip)
        ],
        "the public address first"
    );
    let p = &vm.body["properties"];
    assert_eq!(p["securityProfile"]["securityType"], "TrustedLaunch");
    assert_eq!(p["storageProfile"]["osDisk"]["diskSizeGB"], 40);
    let nic = &p["networkProfile"]["networkInterfaceConfigurations"][0]["properties"];
    assert_eq!(
        nic["networkSecurityGroup"]["id"],
        server.options().nsg_ids[0]
    );
    assert_eq!(server.public_ips().len(), 1);
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn a_put_whose_answer_is_lost_is_adopted_by_name_not_doubled() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    server.fault(Route::PutVm, Fault::DropAnswer, 1);
    let lost = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(lost.class, ErrorClass::Transient, "{lost}");
    assert_eq!(server.vms().len(), 1, "the server made it");
    let adopted = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(server.vms().len(), 1, "adopted, not doubled");
    assert_eq!(
        server.count(Route::PutVm),
        1,
        "a retry finds the VM by name before any PUT"
    );
    assert!(adopted.id.starts_with(&server.vms()[0].id));
    // Even a create that believes it is the first is refused 412 and adopts.
    let again = provider.create_instance(&request).await.unwrap();
    assert_eq!(again.id, adopted.id);
    assert_eq!(server.vms().len(), 1);
    assert_eq!(server.count(Route::PutVm), 2, "its PUT was refused 412");
    assert_eq!(server.put_bodies().len(), 1, "never a second PUT accepted");
}

#[tokio::test]
async fn a_vm_of_another_token_under_the_name_is_never_adopted_nor_rewritten() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let fixture = Fixture::new("node-a");
    let first = provider.create_instance(&fixture.request(1)).await.unwrap();
    let other = retry_of(&fixture.request(2));
    let err = provider.create_instance(&other).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    let none = provider
        .find_instance(&other.token, &other.instance_name)
        .await
        .unwrap();
    assert_eq!(none, None, "find answers only for its own token");
    // A first attempt of another token sends its PUT: If-None-Match makes
    // ARM refuse it (412) instead of rewriting the VM in place.
    let err = provider
        .create_instance(&fixture.request(3))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(server.count(Route::PutVm), 2, "{:?}", server.counts());
    assert_eq!(server.put_bodies().len(), 1, "only the first PUT was taken");
    let [vm] = server.vms().try_into().unwrap();
    assert_eq!(
        vm.tags.get("podvisor.io_token"),
        Some(&fixture.request(1).token),
        "the first VM is untouched"
    );
    provider.delete_instance(&first.id).await.unwrap();
}

#[tokio::test]
async fn a_replayed_delete_of_an_old_generation_spares_the_vm_that_took_its_name() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let fixture = Fixture::new("node-a");
    let first = provider.create_instance(&fixture.request(1)).await.unwrap();
    provider.delete_instance(&first.id).await.unwrap();
    let second = provider.create_instance(&fixture.request(2)).await.unwrap();
    assert_ne!(first.id, second.id);
    provider.delete_instance(&first.id).await.unwrap();
    assert_eq!(server.vms().len(), 1, "generation 2 survives");
    provider.delete_instance(&second.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn a_failed_operation_carries_its_error_and_leaves_no_vm() {
    let server = server();
    let provider = provider(&server, &[]).await;
    server.fail_next_creates(1, "AllocationFailed", "No capacity for Standard_D2as_v5");
    let request = Fixture::new("node-a").request(1);
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code(), Some("AllocationFailed"));
    assert!(err.message.contains("No capacity"), "{err}");
    // The failed VM was deleted; the retry makes it anew.
    let mut created = None;
    for _ in 0..50 {
        match provider.create_instance(&retry_of(&request)).await {
            Ok(instance) => {
                created = Some(instance);
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let created = created.expect("the retry made the VM");
    assert_eq!(server.vms().len(), 1);
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
    // A permanent failure is permanent.
    server.fail_next_creates(1, "InvalidParameter", "bad image");
    let err = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_nothing_left(&server);
}

#[tokio::test]
async fn a_vm_that_fails_after_a_lost_poll_is_deleted_and_made_again_by_the_retry() {
    let server = server();
    server.set_provisioning(2, Duration::ZERO);
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    server.fail_next_creates(1, "AllocationFailed", "No capacity");
    server.fault(
        Route::OperationStatus,
        status_fault(429, "TooManyRequests", Some(1), ErrorShape::Arm),
        1,
    );
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Throttled, "{err}");
    // The retry adopts by name, sees the provisioning fail, deletes the VM
    // and says so, retryably.
    let err = provider
        .create_instance(&retry_of(&request))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(err.message.contains("deleted, to be made again"), "{err}");
    assert_nothing_left(&server);
    let created = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(server.vms().len(), 1);
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn an_operation_url_that_answers_404_is_retried_not_taken_for_a_missing_vm() {
    let server = server();
    server.set_provisioning(1, Duration::ZERO);
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    server.fault(
        Route::OperationStatus,
        status_fault(404, "OperationNotFound", None, ErrorShape::Arm),
        1,
    );
    let err = provider.delete_instance(&created.id).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(server.vms().len(), 1, "not forgotten while it is there");
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn throttling_on_put_poll_and_delete_is_retried_to_one_vm_then_none() {
    let server = server();
    server.set_provisioning(2, Duration::ZERO);
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    for shape in [ErrorShape::Arm, ErrorShape::Bare] {
        server.fault(
            Route::PutVm,
            status_fault(429, "TooManyRequests", Some(7), shape),
            1,
        );
        let err = provider.create_instance(&request).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Throttled, "{err}");
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(err.code(), Some("TooManyRequests"));
        assert!(server.vms().is_empty());
    }
    server.fault(
        Route::OperationStatus,
        status_fault(429, "TooManyRequests", Some(1), ErrorShape::Arm),
        1,
    );
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Throttled, "{err}");
    let created = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(server.vms().len(), 1);
    server.fault(
        Route::DeleteVm,
        status_fault(429, "TooManyRequests", Some(2), ErrorShape::Bare),
        1,
    );
    let err = provider.delete_instance(&created.id).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Throttled, "{err}");
    server.fault(
        Route::DeleteVm,
        status_fault(409, "OperationNotAllowed", None, ErrorShape::Arm),
        1,
    );
    let err = provider.delete_instance(&created.id).await.unwrap_err();
    assert_eq!(
        err.class,
        ErrorClass::Transient,
        "a conflict is retried: {err}"
    );
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn deletes_wait_for_404_and_not_found_is_success() {
    let server = server();
    server.set_deleting(3, Duration::ZERO);
    let provider = provider(&server, &[]).await;
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    server.reset_counts();
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
    assert!(server.count(Route::OperationStatus) >= 3);
    assert!(server.count(Route::GetVm) >= 2, "{:?}", server.counts());
    // Gone, malformed, or never ours: done.
    provider.delete_instance(&created.id).await.unwrap();
    provider.delete_instance("i-0123").await.unwrap();
    provider
        .delete_instance("/subscriptions/../x#y")
        .await
        .unwrap();
    let ghost = format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg/providers/Microsoft.Compute/virtualMachines/podvm-ghost#0000"
    );
    provider.delete_instance(&ghost).await.unwrap();
}

#[tokio::test]
async fn the_gc_lists_every_page_and_only_its_node_s_live_vms() {
    let server = server();
    server.set_max_page(2);
    let provider = provider(&server, &[]).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(
            provider
                .create_instance(&Fixture::new("node-a").request(1))
                .await
                .unwrap(),
        );
    }
    let theirs = provider
        .create_instance(&Fixture::new("node-b").request(1))
        .await
        .unwrap();
    server.reset_counts();
    let listed = provider.list_instances(TAG_NODE, "node-a").await.unwrap();
    let mut ids: Vec<_> = listed.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    let mut want: Vec<_> = mine.iter().map(|i| i.id.clone()).collect();
    want.sort();
    assert_eq!(ids, want);
    assert!(
        listed
            .iter()
            .all(|i| i.tags.get(TAG_NODE).map(String::as_str) == Some("node-a"))
    );
    assert_eq!(server.count(Route::ListVms), 2, "two pages of two");
    for instance in mine.iter().chain([&theirs]) {
        provider.delete_instance(&instance.id).await.unwrap();
    }
    assert!(
        provider
            .list_instances(TAG_NODE, "node-a")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn sizes_are_chosen_by_fit_within_the_allow_list_and_the_annotation_wins() {
    let server = server();
    let provider = provider(
        &server,
        &[
            "--instance-sizes",
            "Standard_D2as_v5,Standard_D4as_v5,Standard_B1s",
        ],
    )
    .await;
    let fixture = Fixture::new("node-a");
    let mut request = fixture.request(1);
    request.spec.vcpus = Some(3);
    request.spec.memory_mib = Some(4096);
    let created = provider.create_instance(&request).await.unwrap();
    assert_eq!(server.vms()[0].size, "Standard_D4as_v5");
    provider.delete_instance(&created.id).await.unwrap();
    let mut request = fixture.request(2);
    request.spec.instance_type = Some("Standard_B1s".into());
    let created = provider.create_instance(&request).await.unwrap();
    assert_eq!(server.vms()[0].size, "Standard_B1s");
    provider.delete_instance(&created.id).await.unwrap();
    let mut request = fixture.request(3);
    request.spec.instance_type = Some("Standard_DC4as_v5".into());
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(server.count(Route::ListSizes), 1, "sizes are listed once");
}

#[tokio::test]
async fn the_image_annotation_wins_and_bad_user_data_is_refused_before_any_request() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let mut request = Fixture::new("node-a").request(1);
    request.spec.image = Some(server.options().images[1].clone());
    let created = provider.create_instance(&request).await.unwrap();
    assert_eq!(
        server.vms()[0].body["properties"]["storageProfile"]["imageReference"]["id"],
        server.options().images[1]
    );
    provider.delete_instance(&created.id).await.unwrap();
    server.reset_counts();
    let mut big = Fixture::new("node-a").request(1);
    big.user_data = "x".repeat(50_000);
    let err = provider.create_instance(&big).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("65536"), "{err}");
    let mut bad = Fixture::new("node-a").request(1);
    bad.spec.image = Some("../../x".into());
    let err = provider.create_instance(&bad).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(server.counts().is_empty(), "{:?}", server.counts());
}

#[tokio::test]
async fn verification_names_the_flag_to_fix() {
    let server = server();
    let rg = format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg");
    let missing_image = format!("{rg}/providers/Microsoft.Compute/images/nope");
    let missing_subnet =
        format!("{rg}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nope");
    for (extra, want) in [
        (
            vec!["--imageid", missing_image.as_str()],
            "--imageid (AZURE_IMAGE_ID)",
        ),
        (
            vec!["--subnetid", missing_subnet.as_str()],
            "--subnetid (AZURE_SUBNET_ID)",
        ),
        (
            vec!["--instance-size", "Standard_Nope"],
            "--instance-size (AZURE_INSTANCE_SIZE)",
        ),
    ] {
        let provider = provider(&server, &extra).await;
        let err = provider.verify_config().await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Config, "{err}");
        assert!(err.message.starts_with(want), "{want}: {err}");
    }
}

#[tokio::test]
async fn a_refused_secret_is_a_config_error_that_never_shows_a_secret() {
    let server = server();
    let secret = "azure-wrong-secret-never-logged";
    let provider = provider(&server, &["--secret", secret]).await;
    let err = provider.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert!(err.message.contains("refused the credentials"), "{err}");
    for text in [err.message.clone(), format!("{err:?}")] {
        assert!(
            !text.contains(secret) && !text.contains(TEST_CLIENT_SECRET),
            "{text}"
        );
    }
    // An unreachable ARM is transient, not a wrong flag.
    let dead = provider_with(
        flags(
            &server,
            &["--resource-manager-endpoint", "https://127.0.0.1:9"],
        ),
        Arc::new(Pacer::unlimited()),
    )
    .await
    .unwrap();
    let err = dead.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
}

#[tokio::test]
async fn workload_identity_exchanges_the_projected_token() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, TEST_FEDERATED_TOKEN).unwrap();
    let mut args = flags(&server, &[]);
    let at = args.iter().position(|a| a == "--secret").unwrap();
    args.drain(at..at + 2);
    args.extend(["--federated-token-file".into(), file.display().to_string()]);
    let provider = provider_with(args, Arc::new(Pacer::unlimited()))
        .await
        .unwrap();
    provider.verify_config().await.unwrap();
    assert_eq!(server.tokens_issued(), 1);
}

#[tokio::test]
async fn a_retry_after_on_the_operation_sets_the_poll_pace() {
    let server = server();
    server.set_provisioning(1, Duration::from_millis(1500));
    server.set_lro_retry_after(Some(1));
    let provider = provider(&server, &[]).await;
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    // At the 50 ms poll interval, 1.5 s would take about 30 polls; at
    // ARM's 1 s, two.
    let polls = server.count(Route::OperationStatus);
    assert!((1..=3).contains(&polls), "{polls} operation polls");
    provider.delete_instance(&created.id).await.unwrap();
}

#[tokio::test]
async fn low_ratelimit_remaining_headers_slow_the_bucket_before_a_429() {
    let server = server();
    server.set_ratelimit_remaining(Some(3));
    let limits = CallLimits {
        rate: 4.0,
        burst: 10,
        read_rate: 20.0,
        read_burst: 50,
    };
    let pacer = Arc::new(Pacer::new(limits));
    let provider = provider_with(flags(&server, &[]), pacer.clone())
        .await
        .unwrap();
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    assert!(
        pacer.bucket(RequestClass::Mutating).rate() < 4.0,
        "the mutating bucket slowed down"
    );
    assert!(pacer.bucket(RequestClass::Read).rate() < 20.0);
    server.set_ratelimit_remaining(Some(1199));
    provider.delete_instance(&created.id).await.unwrap();
}

/// The requests of one pod VM's lifecycle, counted at the server (for the
/// issue's measurements): printed, and bounded.
#[tokio::test]
async fn one_pod_vm_costs_a_handful_of_requests() {
    let server = server();
    server.set_provisioning(1, Duration::ZERO);
    server.set_deleting(1, Duration::ZERO);
    let provider = provider(&server, &[]).await;
    provider.verify_config().await.unwrap();
    server.reset_counts();
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    provider.delete_instance(&created.id).await.unwrap();
    let counts = server.counts();
    eprintln!("ARM requests per pod VM lifecycle: {counts:?}");
    assert_eq!(counts.get(&Route::PutVm), Some(&1));
    assert_eq!(counts.get(&Route::DeleteVm), Some(&1));
    assert_eq!(counts.get(&Route::GetNic), Some(&1));
    assert_eq!(
        counts.get(&Route::ListVms),
        None,
        "a first attempt lists nothing"
    );
    assert_eq!(counts.get(&Route::Token), None, "the cached token serves");
    let total: usize = counts.values().sum();
    assert_eq!(
        counts.get(&Route::GetVm),
        Some(&2),
        "no GET after the create: one before the delete, one 404 after"
    );
    assert!(total <= 9, "{total} requests: {counts:?}");
}

#[tokio::test]
async fn a_stopped_vm_of_the_token_is_found_stopped_and_started_by_the_create() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    server.set_power_state(&request.instance_name, "deallocated");
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .expect("found");
    assert_eq!(found.status, podvisor_providers::InstanceStatus::Stopped);
    assert!(found.ips.is_empty(), "no address for a stopped VM");
    // The daemon then creates again with the token: the VM is started,
    // not replaced.
    let started = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(started.id, created.id);
    assert_eq!(started.status, podvisor_providers::InstanceStatus::Running);
    assert_eq!(server.count(Route::StartVm), 1);
    assert_eq!(server.vms()[0].power_state.as_deref(), Some("running"));
    assert_eq!(server.put_bodies().len(), 1);
    provider.delete_instance(&created.id).await.unwrap();
    assert_nothing_left(&server);
}

#[tokio::test]
async fn without_azure_async_operation_the_location_and_the_provisioning_state_are_followed() {
    let server = server();
    server.set_provisioning(3, Duration::ZERO);
    server.set_deleting(3, Duration::ZERO);
    server.set_async_operation_header(false);
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    // The create's 201 has no operation header: the VM's provisioningState.
    let created = provider.create_instance(&request).await.unwrap();
    assert_eq!(server.vms()[0].provisioning_state, "Succeeded");
    assert_eq!(server.count(Route::OperationStatus), 0);
    assert!(server.count(Route::GetVm) >= 3, "{:?}", server.counts());
    // The delete's 202 has only Location: 202 until done.
    server.reset_counts();
    provider.delete_instance(&created.id).await.unwrap();
    assert!(
        server.count(Route::OperationResult) >= 3,
        "{:?}",
        server.counts()
    );
    assert_eq!(server.count(Route::OperationStatus), 0);
    assert_nothing_left(&server);
}
