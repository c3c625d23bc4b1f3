//! The AWS provider against moto's EC2 server on loopback, through the real
//! SDK: the conformance suite, idempotency (a repeated token, a lost
//! response), tags and user data as the server stores them, paging, Elastic
//! IPs, verification, instance type selection, and the EC2 requests a pod
//! VM costs.

#![cfg(feature = "aws")]

use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use base64::Engine;
use podvisor_providers::aws::AwsProvider;
use podvisor_providers::aws::testing::{
    AwsBed, Ec2Proxy, Fault, Moto, SECRET_ACCESS_KEY, TestNetwork, client_for,
};
use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::pacing::{Pacer, RequestClass};
use podvisor_providers::{CreateRequest, ErrorClass, Provider, TAG_NODE, TAG_SANDBOX, TAG_TOKEN};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn aws_provider_passes_the_conformance_suite() {
    let bed = AwsBed::start().await;
    let provider = bed.provider_from_flags(&bed.moto.endpoint(), &[]).await;
    provider.verify_config().await.unwrap();
    run(provider.as_ref(), &Fixture::new("node-a")).await;
    assert!(
        bed.moto.live_instances(None).await.is_empty(),
        "the suite leaves nothing behind"
    );
}

#[tokio::test]
async fn the_same_token_twice_makes_one_instance() {
    let bed = AwsBed::start().await;
    let provider = bed.provider(&bed.moto.endpoint(), bed.settings());
    let request = Fixture::new("node-a").request(1);
    let first = provider.create_instance(&request).await.unwrap();
    let second = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(first.id, second.id);
    let live = bed
        .moto
        .live_instances(Some((TAG_TOKEN, request.token.as_str())))
        .await;
    assert_eq!(live.len(), 1, "one instance per token on the server");
    assert_eq!(bed.moto.live_instances(None).await.len(), 1);
}

/// `request` as the daemon sends it again: an earlier create with its
/// token may have reached the server.
fn retry_of(request: &CreateRequest) -> CreateRequest {
    CreateRequest {
        earlier_attempt: true,
        ..request.clone()
    }
}

#[tokio::test]
async fn a_create_whose_response_is_lost_is_adopted_on_retry_not_duplicated() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), bed.settings());
    let request = Fixture::new("node-a").request(1);

    proxy.fault("RunInstances", Fault::DropResponse, Some(1));
    let lost = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(lost.class, ErrorClass::Transient, "{lost:?}");
    assert_eq!(
        bed.moto.live_instances(None).await.len(),
        1,
        "the server made the instance although the answer was lost"
    );

    // The daemon's lookup before a retry finds it by its token.
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .expect("the instance of the lost response is found by its token");
    // And the retried create (an earlier attempt may have reached the
    // server) returns that same instance, on moto too, which ignores
    // ClientToken: it looks the token up instead of running another.
    proxy.reset_calls();
    let again = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(again.id, found.id);
    assert_eq!(bed.moto.live_instances(None).await.len(), 1, "no duplicate");
    let calls = proxy.calls();
    assert_eq!(calls.get("RunInstances"), None, "{calls:?}");
    assert_eq!(calls.get("DescribeInstances"), Some(&1), "{calls:?}");
}

#[tokio::test]
async fn a_create_retried_after_its_answer_was_lost_leaves_exactly_one_instance() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), bed.settings());
    let request = Fixture::new("node-r").request(1);

    // The first try's RunInstances reaches the server; its answer is lost.
    proxy.fault("RunInstances", Fault::DropResponse, Some(1));
    let lost = provider.create_instance(&request).await.unwrap_err();
    assert!(lost.is_retryable(), "{lost:?}");
    // The retry, straight away (no find in between), says so.
    let made = provider.create_instance(&retry_of(&request)).await.unwrap();
    let live = bed.moto.live_instances(None).await;
    assert_eq!(live.len(), 1, "exactly one instance: {live:?}");
    assert_eq!(live[0].instance_id(), Some(made.id.as_str()));
    let calls = proxy.calls();
    eprintln!("EC2 requests of a create retried after a lost answer: {calls:?}");
    assert_eq!(calls.get("RunInstances"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("DescribeInstances"), Some(&1), "{calls:?}");
    provider.delete_instance(&made.id).await.unwrap();
    assert!(bed.moto.live_instances(None).await.is_empty());
}

/// Calls `call` until it succeeds, as the daemon's provider actor retries a
/// throttled call; every failure must be EC2's throttling, classified so.
/// Returns the value and the number of tries.
async fn retry_throttled<T, F, Fut>(proxy: &Ec2Proxy, action: &str, mut call: F) -> (T, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, podvisor_providers::ProviderError>>,
{
    for tries in 1..=5 {
        match call().await {
            Ok(value) => return (value, tries),
            Err(e) => {
                assert_eq!(e.class, ErrorClass::Throttled, "{e:?}");
                assert!(e.message.contains("RequestLimitExceeded"), "{e}");
                assert!(
                    e.retry_after.is_some_and(|d| d >= Duration::from_secs(1)),
                    "a throttled call says to wait: {e:?}"
                );
                // One request per try: the SDK did not retry on its own.
                assert_eq!(
                    proxy.calls().get(action),
                    Some(&tries),
                    "{action} requests after {tries} tries"
                );
            }
        }
    }
    panic!("{action} still failing after 5 tries");
}

#[tokio::test]
async fn throttled_creates_and_deletes_are_classified_throttled_and_retries_make_one_instance() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    // The provider as `podvisor aws` builds it, SDK retry settings included.
    let provider = bed.provider_from_flags(&proxy.endpoint(), &[]).await;
    let request = Fixture::new("node-t").request(1);

    proxy.fault("RunInstances", Fault::Throttle, Some(2));
    let (made, tries) = retry_throttled(&proxy, "RunInstances", || {
        provider.create_instance(&request)
    })
    .await;
    let calls = proxy.calls();
    eprintln!("EC2 requests of a create throttled twice: {calls:?}");
    assert_eq!(tries, 3);
    assert_eq!(calls.get("RunInstances"), Some(&3), "{calls:?}");
    assert_eq!(proxy.faulted("RunInstances"), 2);
    let live = bed.moto.live_instances(None).await;
    assert_eq!(live.len(), 1, "exactly one instance on the server");
    assert_eq!(live[0].instance_id(), Some(made.id.as_str()));
    assert_eq!(
        bed.moto
            .live_instances(Some((TAG_TOKEN, request.token.as_str())))
            .await
            .len(),
        1
    );

    proxy.reset_calls();
    proxy.fault("TerminateInstances", Fault::Throttle, Some(2));
    let ((), tries) = retry_throttled(&proxy, "TerminateInstances", || {
        provider.delete_instance(&made.id)
    })
    .await;
    let calls = proxy.calls();
    eprintln!("EC2 requests of a delete throttled twice: {calls:?}");
    assert_eq!(tries, 3);
    assert_eq!(calls.get("TerminateInstances"), Some(&3), "{calls:?}");
    assert_eq!(proxy.faulted("TerminateInstances"), 2);
    assert!(
        bed.moto.live_instances(None).await.is_empty(),
        "the instance is terminated"
    );
}

#[tokio::test]
async fn tags_user_data_and_launch_settings_are_what_the_server_stores() {
    let bed = AwsBed::start().await;
    let provider = bed
        .provider_from_flags(&bed.moto.endpoint(), &["--tags", "team=peerpods,env=test"])
        .await;
    let mut request = Fixture::new("node-t").request(1);
    request.user_data =
        "#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: '{}'\n".into();
    let made = provider.create_instance(&request).await.unwrap();
    assert!(
        made.ips[0].is_loopback(),
        "the test subnet hands out loopback addresses: {:?}",
        made.ips
    );

    let ec2 = bed.moto.client();
    let out = ec2
        .describe_instances()
        .instance_ids(&made.id)
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    let tags: std::collections::BTreeMap<_, _> = instance
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags["Name"], request.instance_name);
    assert_eq!(tags[TAG_NODE], "node-t");
    assert_eq!(tags[TAG_SANDBOX], request.sandbox_id);
    assert_eq!(tags[TAG_TOKEN], request.token);
    assert_eq!(tags["team"], "peerpods");
    assert_eq!(tags["env"], "test");
    assert_eq!(
        instance
            .instance_type()
            .map(aws_sdk_ec2::types::InstanceType::as_str),
        Some("m6a.large")
    );
    assert_eq!(instance.image_id(), Some(bed.net.image_id.as_str()));
    assert_eq!(instance.subnet_id(), Some(bed.net.subnet_id.as_str()));
    assert_eq!(instance.key_name(), Some(bed.net.key_name.as_str()));
    assert!(
        instance
            .security_groups()
            .iter()
            .any(|g| g.group_id() == Some(bed.net.security_group_id.as_str())),
        "{:?}",
        instance.security_groups()
    );
    assert_eq!(instance.client_token(), Some(request.token.as_str()));

    let attribute = ec2
        .describe_instance_attribute()
        .instance_id(&made.id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = attribute
        .user_data()
        .and_then(|u| u.value())
        .expect("user data stored");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), request.user_data);

    // The root volume: at least --root-volume-size, tagged like the instance.
    let volumes = ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(&made.id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let root = volumes.volumes().first().expect("a root volume");
    assert!(root.size().unwrap_or(0) >= 30, "{root:?}");
    assert!(
        root.tags()
            .iter()
            .any(|t| t.key() == Some(TAG_TOKEN) && t.value() == Some(request.token.as_str())),
        "volume tags: {:?}",
        root.tags()
    );
    provider.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn listing_pages_through_the_server_and_filters_by_tag_there() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed
        .provider(&proxy.endpoint(), bed.settings())
        .with_page_size(5);
    let mut mine = Vec::new();
    for _ in 0..12 {
        mine.push(
            provider
                .create_instance(&Fixture::new("node-p").request(1))
                .await
                .unwrap()
                .id,
        );
    }
    for _ in 0..3 {
        provider
            .create_instance(&Fixture::new("node-q").request(1))
            .await
            .unwrap();
    }
    proxy.reset_calls();
    let mut listed: Vec<String> = provider
        .list_instances(TAG_NODE, "node-p")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    listed.sort();
    mine.sort();
    assert_eq!(listed, mine);
    assert_eq!(
        proxy.calls().get("DescribeInstances"),
        Some(&3),
        "12 instances in pages of 5"
    );
}

#[tokio::test]
async fn instances_outlive_the_provider_object_and_are_found_by_a_new_one() {
    let bed = AwsBed::start().await;
    let request = Fixture::new("node-b").request(1);
    let first = bed.provider(&bed.moto.endpoint(), bed.settings());
    let made = first.create_instance(&request).await.unwrap();
    first.teardown().await.unwrap();
    let err = first.create_instance(&request).await.unwrap_err();
    assert!(err.message.contains("torn down"), "{err:?}");
    drop(first);

    let second = bed.provider(&bed.moto.endpoint(), bed.settings());
    let found = second
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, made.id);
    assert_eq!(found.ips, made.ips);
    assert_eq!(found.name, request.instance_name);
    assert!(found.created_at.is_some());
    second.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn terminated_instances_count_as_gone_and_deleting_them_is_fine() {
    let bed = AwsBed::start().await;
    let provider = bed.provider(&bed.moto.endpoint(), bed.settings());
    let request = Fixture::new("node-g").request(1);
    let made = provider.create_instance(&request).await.unwrap();
    bed.moto
        .client()
        .terminate_instances()
        .instance_ids(&made.id)
        .send()
        .await
        .unwrap();
    assert!(
        provider
            .find_instance(&request.token, &request.instance_name)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        provider
            .list_instances(TAG_NODE, "node-g")
            .await
            .unwrap()
            .is_empty()
    );
    provider.delete_instance(&made.id).await.unwrap();
    provider
        .delete_instance("i-0123456789abcdef0")
        .await
        .expect("an instance EC2 never had is already gone");
    provider
        .delete_instance("not-an-instance")
        .await
        .expect("a malformed id cannot exist");
}

/// Allocates an Elastic IP and attaches it to instance `id`, behind
/// podvisor's back; its allocation id.
async fn attach_elastic_ip(moto: &Moto, id: &str) -> String {
    let ec2 = moto.client();
    let address = ec2.allocate_address().send().await.unwrap();
    let allocation = address.allocation_id().unwrap().to_owned();
    ec2.associate_address()
        .allocation_id(&allocation)
        .instance_id(id)
        .send()
        .await
        .unwrap();
    allocation
}

/// Whether the account still holds the Elastic IP `allocation`.
async fn allocated(moto: &Moto, allocation: &str) -> bool {
    let left = moto.client().describe_addresses().send().await.unwrap();
    left.addresses()
        .iter()
        .any(|a| a.allocation_id() == Some(allocation))
}

#[tokio::test]
async fn delete_releases_the_elastic_ips_of_an_instance_seen_with_one() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), bed.settings());
    let made = provider
        .create_instance(&Fixture::new("node-e").request(1))
        .await
        .unwrap();
    let allocation = attach_elastic_ip(&bed.moto, &made.id).await;
    // The orphan GC's listing by node tag reads the instance, and with it
    // the address's owner.
    let listed = provider.list_instances(TAG_NODE, "node-e").await.unwrap();
    assert_eq!(listed.len(), 1);
    proxy.reset_calls();
    provider.delete_instance(&made.id).await.unwrap();
    assert!(
        !allocated(&bed.moto, &allocation).await,
        "the Elastic IP is released"
    );
    assert!(bed.moto.live_instances(None).await.is_empty());
    let calls = proxy.calls();
    assert_eq!(calls.get("DescribeAddresses"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("ReleaseAddress"), Some(&1), "{calls:?}");
    assert_eq!(calls.get("TerminateInstances"), Some(&1), "{calls:?}");
}

/// Every EC2 request the provider makes waits for a token of its class
/// from the daemon's pacer — not one per provider call: a create, the
/// lookups and listings (each page), and a delete that also releases an
/// Elastic IP all count, read or mutating as EC2's buckets count them.
#[tokio::test]
async fn every_ec2_request_draws_a_token_of_its_class() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let pacer = Arc::new(Pacer::unlimited());
    let provider = bed
        .net
        .provider_from_flags_paced(&proxy.endpoint(), &[], pacer.clone())
        .await;
    assert!(provider.paces_requests());
    // What building cost (the credentials check, by the SDK's own client)
    // is not the EC2 client's.
    proxy.reset_calls();
    let taken = |class| pacer.bucket(class).taken();
    assert_eq!(
        (taken(RequestClass::Read), taken(RequestClass::Mutating)),
        (0, 0)
    );

    let fixture = Fixture::new("node-p");
    let request = fixture.request(1);
    let made = provider.create_instance(&request).await.unwrap();
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap();
    assert_eq!(found.map(|i| i.id), Some(made.id.clone()));
    let allocation = attach_elastic_ip(&bed.moto, &made.id).await;
    assert_eq!(
        provider
            .list_instances(TAG_NODE, "node-p")
            .await
            .unwrap()
            .len(),
        1
    );
    provider.delete_instance(&made.id).await.unwrap();
    assert!(!allocated(&bed.moto, &allocation).await);

    let calls = proxy.calls();
    let count = |read: bool| -> u64 {
        calls
            .iter()
            .filter(|(action, _)| {
                (action.starts_with("Describe") || action.starts_with("Get")) == read
            })
            .map(|(_, n)| *n as u64)
            .sum()
    };
    eprintln!("EC2 requests: {calls:?}");
    assert!(calls.contains_key("ReleaseAddress"), "{calls:?}");
    assert_eq!(taken(RequestClass::Read), count(true), "{calls:?}");
    assert_eq!(taken(RequestClass::Mutating), count(false), "{calls:?}");
    assert!(count(false) >= 3, "run, release, terminate: {calls:?}");

    // EC2's throttling answer halves the bucket of the request's class,
    // and only that one; an accepted request gives a twentieth back.
    let pacer = Arc::new(Pacer::new(podvisor_providers::CallLimits {
        rate: 4.0,
        burst: 100,
        read_rate: 8.0,
        read_burst: 100,
    }));
    let provider = bed
        .net
        .provider_from_flags_paced(&proxy.endpoint(), &[], pacer.clone())
        .await;
    let rate = |class| pacer.bucket(class).rate();
    proxy.fault("RunInstances", Fault::Throttle, Some(1));
    let request = fixture.request(2);
    let e = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Throttled, "{e}");
    assert_eq!(
        (rate(RequestClass::Mutating), rate(RequestClass::Read)),
        (2.0, 8.0)
    );
    let made = provider.create_instance(&request).await.unwrap();
    assert!((rate(RequestClass::Mutating) - 2.2).abs() < 1e-9);
    provider.delete_instance(&made.id).await.unwrap();
}

/// The trade-off of not asking EC2 for addresses at every delete: an
/// Elastic IP attached after the provider last read the instance is left
/// to its owner (EC2 disassociates it at termination; it stays allocated).
#[tokio::test]
async fn an_elastic_ip_attached_since_the_instance_was_last_read_is_not_released() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), bed.settings());
    let made = provider
        .create_instance(&Fixture::new("node-f").request(1))
        .await
        .unwrap();
    let allocation = attach_elastic_ip(&bed.moto, &made.id).await;
    proxy.reset_calls();
    provider.delete_instance(&made.id).await.unwrap();
    assert!(bed.moto.live_instances(None).await.is_empty());
    assert!(
        allocated(&bed.moto, &allocation).await,
        "the address stays the account's"
    );
    let calls = proxy.calls();
    assert_eq!(calls.get("DescribeAddresses"), None, "{calls:?}");
}

#[tokio::test]
async fn verification_names_the_flag_of_a_missing_image_or_type() {
    let bed = AwsBed::start().await;
    let good = bed
        .provider_from_flags(
            &bed.moto.endpoint(),
            &["--instance-types", "m6a.large,m6a.xlarge"],
        )
        .await;
    good.verify_config().await.unwrap();

    let mut bad_image = bed.net.clone();
    bad_image.image_id = "ami-0123456789abcdef0".into();
    let e = bad_image
        .provider_from_flags(&bed.moto.endpoint(), &[])
        .await
        .verify_config()
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Config);
    assert!(
        e.message.starts_with("--imageid (PODVM_AMI_ID):")
            && e.message.contains("ami-0123456789abcdef0"),
        "{}",
        e.message
    );

    let e = bed
        .provider_from_flags(
            &bed.moto.endpoint(),
            &["--instance-types", "m6a.large,m6a.notatype"],
        )
        .await
        .verify_config()
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Config);
    assert!(
        e.message
            .contains("--instance-types (PODVM_INSTANCE_TYPES)")
            && e.message.contains("m6a.notatype"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_sized_request_gets_the_smallest_allowed_type_that_fits() {
    let bed = AwsBed::start().await;
    let mut s = bed.settings();
    s.instance_types = ["m6a.large", "m6a.xlarge", "m6a.2xlarge", "g4dn.xlarge"]
        .map(String::from)
        .to_vec();
    let provider = bed.provider(&bed.moto.endpoint(), s);
    let ec2 = bed.moto.client();
    let type_of = async |id: &str| {
        let out = ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        out.reservations()[0].instances()[0]
            .instance_type()
            .unwrap()
            .as_str()
            .to_owned()
    };
    let cases = [
        ((Some(4), Some(12 * 1024), None), Ok("m6a.xlarge")),
        ((Some(1), None, None), Ok("m6a.large")),
        ((None, None, Some(1)), Ok("g4dn.xlarge")),
        (
            (Some(64), None, None),
            Err("No allowed instance type has 64 vCPUs"),
        ),
    ];
    for ((vcpus, memory_mib, gpus), want) in cases {
        let mut request = Fixture::new("node-s").request(1);
        request.spec.vcpus = vcpus;
        request.spec.memory_mib = memory_mib;
        request.spec.gpus = gpus;
        match (provider.create_instance(&request).await, want) {
            (Ok(made), Ok(want)) => assert_eq!(type_of(&made.id).await, want),
            (Err(e), Err(want)) => {
                assert_eq!(e.class, ErrorClass::Permanent);
                assert!(e.message.contains(want), "{}", e.message);
            }
            (got, want) => panic!("{vcpus:?} {memory_mib:?} {gpus:?}: {got:?}, wanted {want:?}"),
        }
    }
}

#[tokio::test]
async fn a_first_try_pod_lifecycle_makes_exactly_run_instances_and_terminate_instances() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), bed.settings());
    provider.verify_config().await.unwrap();
    proxy.reset_calls();
    let request = Fixture::new("node-c").request(1);
    assert!(!request.earlier_attempt, "the token's first create");
    let made = provider.create_instance(&request).await.unwrap();
    assert!(
        !made.ips.is_empty(),
        "RunInstances's answer has the address"
    );
    provider.delete_instance(&made.id).await.unwrap();
    let calls = proxy.calls();
    eprintln!("EC2 calls of one create + delete: {calls:?}");
    // No token lookup (nothing can carry a fresh token), no address wait
    // (RunInstances answers with the private address), no
    // DescribeAddresses (never seen with an Elastic IP); the image and
    // types were read by verify.
    let expected: HashMap<String, usize> = [("RunInstances", 1), ("TerminateInstances", 1)]
        .map(|(a, n)| (a.to_owned(), n))
        .into();
    assert_eq!(calls, expected);
    assert!(bed.moto.live_instances(None).await.is_empty());
}

#[tokio::test]
async fn amd_sev_snp_is_asked_for_unless_disabled_and_the_client_token_is_sent() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let cvm = bed.provider(&proxy.endpoint(), bed.settings());
    let request = Fixture::new("node-v").request(1);
    cvm.create_instance(&request).await.unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(body.contains("CpuOptions.AmdSevSnp=enabled"), "{body}");
    assert!(
        body.contains(&format!("ClientToken={}", request.token)),
        "{body}"
    );
    assert!(
        body.contains("MinCount=1") && body.contains("MaxCount=1"),
        "{body}"
    );

    let mut s = bed.settings();
    s.disable_cvm = true;
    let plain = bed.provider(&proxy.endpoint(), s);
    plain
        .create_instance(&Fixture::new("node-v").request(1))
        .await
        .unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(!body.contains("AmdSevSnp"), "{body}");
}

#[tokio::test]
async fn a_launch_template_decides_image_type_and_network() {
    use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
    let bed = AwsBed::start().await;
    let ec2 = bed.moto.client();
    ec2.create_launch_template()
        .launch_template_name("kata")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(&bed.net.image_id)
                .instance_type(InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut s = bed.settings();
    s.launch_template = Some("kata".into());
    s.image_id = None;
    s.instance_types = vec!["m6a.large".into()];
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), s);
    provider.verify_config().await.unwrap();
    let request = Fixture::new("node-l").request(1);
    let made = provider.create_instance(&request).await.unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(
        body.contains("LaunchTemplate.LaunchTemplateName=kata"),
        "{body}"
    );
    for absent in [
        "ImageId",
        "InstanceType",
        "SubnetId",
        "SecurityGroupId",
        "KeyName",
    ] {
        assert!(
            !body.contains(absent),
            "{absent} sent with a template: {body}"
        );
    }
    let out = ec2
        .describe_instances()
        .instance_ids(&made.id)
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    assert_eq!(instance.instance_type(), Some(&InstanceType::T3Micro));
    assert!(
        instance
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_TOKEN) && t.value() == Some(request.token.as_str()))
    );
    provider.delete_instance(&made.id).await.unwrap();

    // What the pod itself asks for overrides the template (the reference
    // dropped it).
    let mut request = Fixture::new("node-l").request(1);
    request.spec.instance_type = Some("m6a.large".into());
    let made = provider.create_instance(&request).await.unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(body.contains("InstanceType=m6a.large"), "{body}");
    let out = ec2
        .describe_instances()
        .instance_ids(&made.id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.reservations()[0].instances()[0].instance_type(),
        Some(&InstanceType::M6aLarge)
    );
    provider.delete_instance(&made.id).await.unwrap();
}

/// The bed, a proxy in front of it and a provider in public-IP mode.
async fn public_ip_mode() -> (AwsBed, Ec2Proxy, AwsProvider) {
    let bed = AwsBed::start().await;
    let mut s = bed.settings();
    s.use_public_ip = true;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), s);
    (bed, proxy, provider)
}

/// The public and private addresses EC2 holds for instance `id`.
async fn addresses_of(moto: &Moto, id: &str) -> (std::net::IpAddr, std::net::IpAddr) {
    let out = moto
        .client()
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    let parse = |a: Option<&str>| a.expect("an address").parse().unwrap();
    (
        parse(instance.public_ip_address()),
        parse(instance.private_ip_address()),
    )
}

#[tokio::test]
async fn in_public_ip_mode_the_public_address_comes_first_once_running() {
    let (bed, proxy, provider) = public_ip_mode().await;
    let request = Fixture::new("node-i").request(1);
    // Nothing here connects to the public address: it is only read back.
    let made = provider.create_instance(&request).await.unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(
        body.contains("NetworkInterface.1.AssociatePublicIpAddress=true"),
        "{body}"
    );
    let (public, private) = addresses_of(&bed.moto, &made.id).await;
    assert_eq!(made.ips, [public, private]);
    assert_eq!(made.status, podvisor_providers::InstanceStatus::Running);
    provider.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn in_public_ip_mode_a_stopped_instance_of_the_token_is_started_and_waited_for() {
    let (bed, proxy, provider) = public_ip_mode().await;
    let request = Fixture::new("node-i").request(1);
    let made = provider.create_instance(&request).await.unwrap();
    // Stopped behind podvisor's back (or a create torn by a crash).
    bed.moto
        .client()
        .stop_instances()
        .instance_ids(&made.id)
        .send()
        .await
        .unwrap();
    proxy.reset_calls();
    let again = provider.create_instance(&retry_of(&request)).await.unwrap();
    assert_eq!(again.id, made.id, "the token's instance, not another");
    let calls = proxy.calls();
    assert_eq!(calls.get("RunInstances"), None, "{calls:?}");
    assert_eq!(calls.get("StartInstances"), Some(&1), "{calls:?}");
    assert_eq!(
        again.status,
        podvisor_providers::InstanceStatus::Running,
        "handed back once running, as a fresh create"
    );
    let (public, _) = addresses_of(&bed.moto, &made.id).await;
    assert_eq!(again.ips.first(), Some(&public), "{:?}", again.ips);
    provider.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn lookups_of_many_sandboxes_at_once_share_one_describe_call() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    // A window wide enough for 20 tasks to queue even on a loaded machine.
    let provider = Arc::new(
        bed.provider(&proxy.endpoint(), bed.settings())
            .with_lookup_window(Duration::from_millis(300)),
    );
    let requests: Vec<_> = (0..20).map(|_| Fixture::new("node-k").request(1)).collect();
    let mut made = Vec::new();
    for r in &requests[..10] {
        made.push(provider.create_instance(r).await.unwrap().id);
    }
    proxy.reset_calls();
    let mut lookups = Vec::new();
    for r in requests.clone() {
        let p = provider.clone();
        lookups.push(tokio::spawn(async move {
            p.find_instance(&r.token, &r.instance_name).await.unwrap()
        }));
    }
    let mut found = Vec::new();
    for l in lookups {
        found.push(l.await.unwrap().map(|i| i.id));
    }
    assert_eq!(
        found[..10].iter().flatten().cloned().collect::<Vec<_>>(),
        made,
        "each lookup gets its own sandbox's instance"
    );
    assert!(found[10..].iter().all(Option::is_none), "{found:?}");
    assert_eq!(
        proxy.calls().get("DescribeInstances"),
        Some(&1),
        "20 lookups at once, one call"
    );
}

#[tokio::test]
async fn a_root_volume_smaller_than_the_image_is_raised_to_the_image_size() {
    let bed = AwsBed::start().await;
    let ec2 = bed.moto.client();
    let image = ec2
        .describe_images()
        .image_ids(&bed.net.image_id)
        .send()
        .await
        .unwrap();
    let image = &image.images()[0];
    let root_device = image.root_device_name().unwrap().to_owned();
    let image_gib = image
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(root_device.as_str()))
        .and_then(|m| m.ebs())
        .and_then(aws_sdk_ec2::types::EbsBlockDevice::volume_size)
        .expect("moto's image has a root snapshot size");
    assert!(image_gib > 1);
    let mut s = bed.settings();
    s.root_volume_gib = 1;
    let proxy = bed.proxy().await;
    let provider = bed.provider(&proxy.endpoint(), s);
    provider
        .create_instance(&Fixture::new("node-r").request(1))
        .await
        .unwrap();
    let body = proxy.bodies("RunInstances").pop().unwrap();
    assert!(
        body.contains(&format!("BlockDeviceMapping.1.DeviceName={root_device}"))
            && body.contains(&format!("BlockDeviceMapping.1.Ebs.VolumeSize={image_gib}"))
            && body.contains("BlockDeviceMapping.1.Ebs.DeleteOnTermination=true"),
        "{body}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient_not_a_configuration_error() {
    // A closed loopback port: nothing listens, the connection is refused.
    let closed = format!(
        "http://127.0.0.1:{}",
        podvisor_providers::aws::testing::free_port()
    );
    let net = TestNetwork {
        vpc_id: "vpc-01234567".into(),
        subnet_id: "subnet-01234567".into(),
        security_group_id: "sg-01234567".into(),
        key_name: "k".into(),
        image_id: "ami-01234567".into(),
    };
    let provider = AwsProvider::new(client_for(&closed), net.settings());
    let e = provider.verify_config().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e:?}");
    assert!(e.message.contains("cannot reach the endpoint"), "{e:?}");
    let e = provider
        .create_instance(&Fixture::new("node-x").request(1))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e:?}");
    assert!(!e.message.contains(SECRET_ACCESS_KEY));
}

#[tokio::test]
async fn ec2s_error_codes_reach_the_caller_beside_the_class() {
    let bed = AwsBed::start().await;
    let provider = bed.provider(&bed.moto.endpoint(), bed.settings());
    let mut request = Fixture::new("node-x").request(1);
    request.spec.image = Some("ami-0123456789abcdef0".into());
    let e = provider.create_instance(&request).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(e.code(), Some("InvalidAMIID.NotFound"), "{e}");

    // Made a configuration error naming the flag, it keeps EC2's code.
    let mut s = bed.settings();
    s.instance_types = vec!["m6a.large".into(), "m6a.notatype".into()];
    let e = bed
        .provider(&bed.moto.endpoint(), s)
        .verify_config()
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Config, "{e}");
    assert_eq!(e.code(), Some("InvalidInstanceType"), "{e}");
}
