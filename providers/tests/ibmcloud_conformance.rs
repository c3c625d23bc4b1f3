//! The IBM Cloud provider against the IBM Cloud test server (HTTPS on
//! loopback, IAM + VPC + Global Tagging + Global Search; its answers are
//! checked against IBM's own Python SDK in `ibmcloud_fake.rs`), built from
//! its flags as the daemon builds it: the conformance suite, idempotency by
//! name and boot volume (a lost answer, another token's instance),
//! tagging failures, token expiry, throttling, the GC's listing by tag,
//! profile and image selection, the create body, configuration checks, and
//! the requests a pod VM costs.

#![cfg(feature = "ibmcloud")]

use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::ibmcloud::IbmCloudManager;
use podvisor_providers::ibmcloud::testing::{
    Fault, IbmCloudServer, Route, ServerOptions, TEST_API_KEY, TEST_CR_TOKEN, TEST_PROFILE_ID,
};
use podvisor_providers::pacing::Pacer;
use podvisor_providers::{
    CloudManager, CreateRequest, ErrorClass, Provider, ProviderContext, TAG_JOURNAL, TAG_NODE,
    TAG_SANDBOX, TAG_TOKEN,
};
use std::sync::Arc;
use std::time::Duration;

/// The flags of a provider on `server` (polls 20 ms apart, a cluster id),
/// then `extra`.
fn flags(server: &IbmCloudServer, extra: &[&str]) -> Vec<String> {
    let mut args = server.flags();
    let ours = ["--poll-interval", "20ms", "--cluster-id", "cluster-1"];
    // A flag given later replaces the one before.
    for pair in ours.chunks(2).chain(extra.chunks(2)) {
        match args.iter().position(|a| a == pair[0]) {
            Some(at) if pair.len() == 2 && pair[0].starts_with("--") => {
                args[at + 1] = pair[1].to_owned();
            }
            _ => args.extend(pair.iter().map(|s| (*s).to_owned())),
        }
    }
    args
}

async fn provider_from(args: Vec<String>) -> Result<Arc<dyn Provider>, String> {
    let matches = IbmCloudManager
        .command()
        .try_get_matches_from(args)
        .map_err(|e| e.to_string())?;
    let config = IbmCloudManager.configure(&matches).map_err(|e| e.message)?;
    let context = ProviderContext {
        node_name: "node-a".into(),
        forwarder_port: 15150,
        state_dir: std::env::temp_dir(),
        pacer: Arc::new(Pacer::unlimited()),
    };
    config.build(&context).await.map_err(|e| e.message)
}

async fn provider(server: &IbmCloudServer, extra: &[&str]) -> Arc<dyn Provider> {
    provider_from(flags(server, extra)).await.unwrap()
}

fn server() -> IbmCloudServer {
    IbmCloudServer::start(ServerOptions::default())
}

fn retry_of(request: &CreateRequest) -> CreateRequest {
    CreateRequest {
        earlier_attempt: true,
        ..request.clone()
    }
}

#[tokio::test]
async fn ibmcloud_provider_passes_the_conformance_suite() {
    let server = server();
    server.set_pending_polls(2);
    server.set_deleting_polls(2);
    let provider = provider(&server, &[]).await;
    provider.verify_config().await.unwrap();
    run(provider.as_ref(), &Fixture::new("node-a")).await;
    assert!(
        server.instances().is_empty(),
        "the suite leaves nothing behind"
    );
}

#[tokio::test]
async fn a_create_is_tagged_named_and_shaped_as_configured() {
    let server = server();
    let provider = provider(&server, &["--tags", "team=blue"]).await;
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    assert!(
        !created.ips.is_empty() && created.ips[0].is_loopback(),
        "{created:?}"
    );
    let [on_server] = server.instances().try_into().unwrap();
    assert_eq!(on_server.name, request.instance_name);
    assert_eq!(on_server.boot_volume_name, request.token);
    assert_eq!(on_server.profile, "bx2-2x8");
    assert_eq!(on_server.image_id, "r006-image-amd64");
    assert_eq!(
        on_server.user_data.as_deref(),
        Some(request.user_data.as_str())
    );
    assert!(on_server.metadata_service_enabled);
    assert_eq!(
        on_server.confidential_compute_mode, None,
        "DISABLECVM defaults to true"
    );
    let tags = &on_server.tags;
    for want in [
        "coco-pod-vm:cluster-1".to_owned(),
        "team:blue".to_owned(),
        format!("podvisor.io_node:{}", "node-a"),
        format!("podvisor.io_token:{}", request.token),
        format!("podvisor.io_sandbox:{}", request.sandbox_id),
    ] {
        assert!(tags.contains(&want), "{want} not in {tags:?}");
    }
    provider.delete_instance(&created.id).await.unwrap();
}

#[tokio::test]
async fn confidential_vms_and_dedicated_hosts_reach_the_create_body() {
    let server = server();
    let provider = provider(
        &server,
        &[
            "--disable-cvm",
            "false",
            "--dedicated-host-ids",
            "0727-host-south-2,0717-host-1",
        ],
    )
    .await;
    let request = Fixture::new("node-a").request(1);
    provider.create_instance(&request).await.unwrap();
    let [body] = server.create_bodies().try_into().unwrap();
    assert_eq!(body["confidential_compute_mode"], "tdx", "{body}");
    assert_eq!(body["enable_secure_boot"], true, "{body}");
    assert_eq!(body["placement_target"]["id"], "0717-host-1", "{body}");
    assert_eq!(body["metadata_service"]["enabled"], true, "{body}");
    assert_eq!(
        body["boot_volume_attachment"]["volume"]["name"],
        request.token.as_str()
    );
    assert_eq!(
        body["boot_volume_attachment"]["delete_volume_on_instance_delete"],
        true
    );
}

#[tokio::test]
async fn a_create_the_dedicated_host_refuses_falls_back_to_the_host_group() {
    let server = server();
    let on_host = provider(
        &server,
        &[
            "--dedicated-host-ids",
            "0717-host-1",
            "--dedicated-host-group-ids",
            "0717-group-1",
        ],
    )
    .await;
    server.fault(
        Route::CreateInstance,
        Fault::Status {
            status: 400,
            code: "dedicated_host_insufficient_capacity".into(),
            retry_after: None,
        },
        1,
    );
    on_host
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    assert_eq!(server.count(Route::CreateInstance), 2);
    let [on_server] = server.instances().try_into().unwrap();
    assert_eq!(
        on_server.placement_target.as_ref().map(|t| t["id"].clone()),
        Some("0717-group-1".into())
    );
    // A host list with none in the zone is a configuration error.
    let elsewhere = provider(&server, &["--dedicated-host-ids", "0727-host-south-2"]).await;
    let err = elsewhere.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert!(
        err.message
            .starts_with("--dedicated-host-ids (IBMCLOUD_DEDICATED_HOST_IDS): none of 0727-host-south-2 is in zone us-south-1"),
        "{err}"
    );
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_is_adopted_by_name_not_doubled() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    server.fault(Route::CreateInstance, Fault::DropAnswer, 1);
    let lost = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(lost.class, ErrorClass::Transient, "{lost}");
    assert_eq!(server.instances().len(), 1, "the server made it");
    // The daemon's retry: an earlier attempt may have reached the cloud.
    let adopted = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(server.instances().len(), 1, "adopted, not doubled");
    assert_eq!(server.instances()[0].id, adopted.id);
    assert!(
        server.instances()[0]
            .tags
            .contains(&format!("podvisor.io_token:{}", request.token)),
        "the adopted instance got its tags"
    );
    // Even a retry that believes it is the first sees the name refused and
    // adopts.
    let again = provider.create_instance(&request).await.unwrap();
    assert_eq!(again.id, adopted.id);
    assert_eq!(server.instances().len(), 1);
}

#[tokio::test]
async fn an_instance_of_another_token_under_the_name_is_never_adopted() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let fixture = Fixture::new("node-a");
    let first = provider.create_instance(&fixture.request(1)).await.unwrap();
    let other = retry_of(&fixture.request(2));
    let err = provider.create_instance(&other).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains(&first.id), "{err}");
    let none = provider
        .find_instance(&other.token, &other.instance_name)
        .await
        .unwrap();
    assert_eq!(none, None, "find answers only for its own token");
    assert_eq!(server.instances().len(), 1);
}

#[tokio::test]
async fn a_tagging_failure_leaves_no_vm() {
    let server = server();
    let provider = provider(&server, &[]).await;
    server.fault(
        Route::AttachTags,
        Fault::Status {
            status: 500,
            code: "internal_error".into(),
            retry_after: None,
        },
        3,
    );
    let err = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(err.message.contains("tags could not be attached"), "{err}");
    assert_eq!(server.count(Route::AttachTags), 3, "tagging was retried");
    assert!(server.instances().is_empty(), "the untagged VM was deleted");
}

#[tokio::test]
async fn a_tagging_refusal_no_retry_cures_fails_the_create_once_not_in_a_loop() {
    let server = server();
    let provider = provider(&server, &[]).await;
    server.fault(
        Route::AttachTags,
        Fault::Status {
            status: 403,
            code: "not_authorized".into(),
            retry_after: None,
        },
        100,
    );
    let err = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap_err();
    // Config: the daemon does not retry it (each retry would make and
    // delete a billed VM).
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert_eq!(server.count(Route::AttachTags), 1, "not retried");
    assert_eq!(server.count(Route::CreateInstance), 1);
    assert!(server.instances().is_empty(), "the untagged VM was deleted");
    // The configuration check reaches Global Tagging: no access at all is
    // found before any pod (the right to attach, a write, shows only at
    // the first create, which then fails once, as above).
    server.fault(
        Route::ListTags,
        Fault::Status {
            status: 403,
            code: "not_authorized".into(),
            retry_after: None,
        },
        1,
    );
    let err = provider.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert!(err.message.contains("cannot use Global Tagging"), "{err}");
}

#[tokio::test]
async fn a_tagging_failure_that_passes_on_retry_keeps_the_vm() {
    let server = server();
    let provider = provider(&server, &[]).await;
    server.fault(Route::AttachTags, Fault::Close, 1);
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    assert_eq!(server.instances().len(), 1);
    assert_eq!(server.instances()[0].id, created.id);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_mid_run() {
    let server = server();
    server.set_token_ttl(Duration::from_secs(1));
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    let issued = server.tokens_issued();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap();
    assert_eq!(found.map(|f| f.id), Some(created.id.clone()));
    assert!(server.tokens_issued() > issued, "a new token was fetched");
    provider.delete_instance(&created.id).await.unwrap();
}

#[tokio::test]
async fn a_failed_token_refresh_is_a_clear_transient_error_and_recovers() {
    let server = server();
    server.set_token_ttl(Duration::from_secs(1));
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    provider.create_instance(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.fault(
        Route::Token,
        Fault::Status {
            status: 503,
            code: "service_unavailable".into(),
            retry_after: None,
        },
        1,
    );
    let err = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(
        err.message
            .starts_with("IBM Cloud IAM token request: HTTP 503"),
        "{err}"
    );
    assert!(!err.message.contains(TEST_API_KEY), "{err}");
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap();
    assert!(found.is_some(), "the next call gets a token");
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let request = Fixture::new("node-a").request(1);
    provider.create_instance(&request).await.unwrap();
    let issued = server.tokens_issued();
    server.fault(
        Route::ListInstances,
        Fault::Status {
            status: 401,
            code: "not_authorized".into(),
            retry_after: None,
        },
        1,
    );
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap();
    assert!(found.is_some());
    assert_eq!(server.tokens_issued(), issued + 1);
}

#[tokio::test]
async fn throttling_and_conflicts_are_classified_for_the_retry() {
    let server = server();
    let provider = provider(&server, &[]).await;
    server.fault(
        Route::CreateInstance,
        Fault::Status {
            status: 429,
            code: "rate_limit_exceeded".into(),
            retry_after: Some(3),
        },
        1,
    );
    let request = Fixture::new("node-a").request(1);
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Throttled, "{err}");
    assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
    assert!(server.instances().is_empty());
    let created = provider.create_instance(&retry_of(&request)).await.unwrap();
    server.fault(
        Route::DeleteInstance,
        Fault::Status {
            status: 409,
            code: "cannot_delete_pending".into(),
            retry_after: None,
        },
        1,
    );
    let err = provider.delete_instance(&created.id).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code(), Some("cannot_delete_pending"));
    provider.delete_instance(&created.id).await.unwrap();
    assert!(server.instances().is_empty());
}

#[tokio::test]
async fn deletes_wait_until_the_instance_is_gone_and_not_found_is_success() {
    let server = server();
    server.set_deleting_polls(3);
    let provider = provider(&server, &[]).await;
    let created = provider
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap();
    provider.delete_instance(&created.id).await.unwrap();
    assert!(
        server.instances().is_empty(),
        "gone (404) before the delete returned"
    );
    provider.delete_instance(&created.id).await.unwrap();
    provider
        .delete_instance("0717_no-such-instance")
        .await
        .unwrap();
    let deletes = server.count(Route::DeleteInstance);
    provider.delete_instance("../../etc/passwd").await.unwrap();
    assert_eq!(
        (
            server.count(Route::DeleteInstance),
            server.count(Route::Other)
        ),
        (deletes, 0),
        "an id that cannot exist never reaches a URL"
    );
}

#[tokio::test]
async fn the_gc_lists_by_tag_only_what_search_has_indexed_and_vpc_still_has() {
    let server = server();
    // One result per page: the listing follows Global Search's cursor.
    server.set_max_page(1);
    let provider = provider(&server, &[]).await;
    let a = Fixture::new("node-a");
    let b = Fixture::new("node-b");
    let mut request = a.request(1);
    request.tags.insert(
        TAG_JOURNAL.into(),
        "0123456789abcdef0123456789abcdef".into(),
    );
    let on_a = provider.create_instance(&request).await.unwrap();
    provider.create_instance(&b.request(1)).await.unwrap();
    let listed = provider.list_instances(TAG_NODE, "node-a").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, on_a.id);
    let tags = &listed[0].tags;
    assert_eq!(tags.get(TAG_NODE).map(String::as_str), Some("node-a"));
    assert_eq!(tags.get(TAG_TOKEN), Some(&request.token));
    assert_eq!(tags.get(TAG_SANDBOX), Some(&request.sandbox_id));
    assert_eq!(
        tags.get(TAG_JOURNAL).map(String::as_str),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert!(listed[0].created_at.is_some());

    // A VM whose tags the index has not caught up with is not listed (so
    // never collected); it is, once indexed.
    server.set_search_lag(2);
    let c = Fixture::new("node-a");
    let fresh = provider.create_instance(&c.request(1)).await.unwrap();
    let first = provider.list_instances(TAG_NODE, "node-a").await.unwrap();
    assert!(
        !first.iter().any(|i| i.id == fresh.id),
        "not indexed yet: {first:?}"
    );
    let mut seen = false;
    for _ in 0..3 {
        let now = provider.list_instances(TAG_NODE, "node-a").await.unwrap();
        seen |= now.iter().any(|i| i.id == fresh.id);
    }
    assert!(seen, "listed once indexed");

    // A deleted VM the index still has is not listed.
    provider.delete_instance(&on_a.id).await.unwrap();
    let after = provider.list_instances(TAG_NODE, "node-a").await.unwrap();
    assert!(!after.iter().any(|i| i.id == on_a.id), "{after:?}");
}

#[tokio::test]
async fn profiles_are_chosen_by_size_and_images_by_the_profile_s_architecture() {
    let server = server();
    let provider = provider(
        &server,
        &["--profile-list", "bx2-2x8,bx2-4x16,bz2-2x8,cx2-2x4"],
    )
    .await;
    let mut fixture = Fixture::new("node-a");
    fixture.spec.vcpus = Some(4);
    fixture.spec.memory_mib = Some(12 * 1024);
    provider.create_instance(&fixture.request(1)).await.unwrap();
    let mut s390x = Fixture::new("node-a");
    s390x.spec.instance_type = Some("bz2-2x8".into());
    provider.create_instance(&s390x.request(1)).await.unwrap();
    // The pod's own image wins: a provider with only an s390x image makes
    // an amd64 pod VM from the image the pod names.
    let s390x_only = provider_from(flags(&server, &["--image-id", "r006-image-s390x"]))
        .await
        .unwrap();
    let mut own_image = Fixture::new("node-a");
    own_image.spec.image = Some("r006-image-amd64".into());
    s390x_only
        .create_instance(&own_image.request(1))
        .await
        .unwrap();
    let without = s390x_only
        .create_instance(&Fixture::new("node-a").request(1))
        .await
        .unwrap_err();
    assert_eq!(without.class, ErrorClass::Config, "{without}");
    assert!(
        without.message.contains("no image of architecture amd64"),
        "{without}"
    );
    let bodies = server.create_bodies();
    let picked: Vec<(String, String)> = bodies
        .iter()
        .map(|b| {
            (
                b["profile"]["name"].as_str().unwrap_or_default().to_owned(),
                b["image"]["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        picked,
        [
            ("bx2-4x16".to_owned(), "r006-image-amd64".to_owned()),
            ("bz2-2x8".to_owned(), "r006-image-s390x".to_owned()),
            ("bx2-2x8".to_owned(), "r006-image-amd64".to_owned()),
        ]
    );
    let mut not_allowed = Fixture::new("node-a");
    not_allowed.spec.instance_type = Some("gx2-8x64x1v100".into());
    let err = provider
        .create_instance(&not_allowed.request(1))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
}

#[tokio::test]
async fn user_data_over_the_limit_is_refused_before_any_request() {
    let server = server();
    let provider = provider(&server, &[]).await;
    let mut request = Fixture::new("node-a").request(1);
    request.user_data = "#cloud-config\n".to_owned() + &"x".repeat(64 * 1024);
    let err = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(err.message.contains("65536"), "{err}");
    assert_eq!(server.count(Route::CreateInstance), 0);
}

#[tokio::test]
async fn verification_names_the_flag_to_fix() {
    let server = server();
    let bad_image = provider(&server, &["--image-id", "r006-no-such-image"]).await;
    let err = bad_image.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert!(
        err.message
            .starts_with("--image-id (IBMCLOUD_PODVM_IMAGE_ID)"),
        "{err}"
    );
    let bad_profile = provider(&server, &["--profile-name", "nx9-1x1"]).await;
    let err = bad_profile.verify_config().await.unwrap_err();
    assert!(err.message.starts_with("--profile-name"), "{err}");
    let bad_subnet = provider(&server, &["--primary-subnet-id", "0717-nope"]).await;
    let err = bad_subnet.verify_config().await.unwrap_err();
    assert!(
        err.message
            .starts_with("--primary-subnet-id (IBMCLOUD_VPC_SUBNET_ID)"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_api_key_is_a_config_error_that_never_shows_the_key() {
    let server = server();
    let secret = "ibm-wrong-key-never-logged";
    let provider = provider(&server, &["--api-key", secret]).await;
    let err = provider.verify_config().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Config, "{err}");
    assert!(
        err.message.starts_with("--api-key (IBMCLOUD_API_KEY)"),
        "{err}"
    );
    for text in [err.message.clone(), format!("{err:?}")] {
        assert!(
            !text.contains(secret) && !text.contains(TEST_API_KEY),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_trusted_profile_gets_its_token_from_the_compute_resource_token_file() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cr-token");
    std::fs::write(&file, TEST_CR_TOKEN).unwrap();
    let mut args: Vec<String> = flags(&server, &[]);
    let at = args.iter().position(|a| a == "--api-key").unwrap();
    args.drain(at..at + 2);
    args.extend([
        "--iam-profile-id".into(),
        TEST_PROFILE_ID.into(),
        "--iam-cr-token-file".into(),
        file.display().to_string(),
    ]);
    let provider = provider_from(args).await.unwrap();
    provider.verify_config().await.unwrap();
    assert_eq!(server.tokens_issued(), 1);
}

/// The requests of one pod VM's lifecycle, counted at the server (for the
/// issue's measurements): printed, and bounded.
#[tokio::test]
async fn one_pod_vm_costs_a_handful_of_requests() {
    let server = server();
    server.set_pending_polls(1);
    server.set_deleting_polls(1);
    let provider = provider(&server, &[]).await;
    provider.verify_config().await.unwrap();
    server.reset_counts();
    let request = Fixture::new("node-a").request(1);
    let created = provider.create_instance(&request).await.unwrap();
    provider.delete_instance(&created.id).await.unwrap();
    let counts = server.counts();
    eprintln!("requests per pod VM lifecycle: {counts:?}");
    assert_eq!(counts.get(&Route::CreateInstance), Some(&1));
    assert_eq!(counts.get(&Route::AttachTags), Some(&1));
    assert_eq!(counts.get(&Route::DeleteInstance), Some(&1));
    assert_eq!(
        counts.get(&Route::ListInstances),
        None,
        "a first attempt looks nothing up"
    );
    assert_eq!(counts.get(&Route::Token), None, "the cached token serves");
}
