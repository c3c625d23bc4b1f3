//! The libvirt provider on libvirt's test driver (`test:///default`), through
//! the real `virt` bindings and the real libvirt library: the conformance
//! suite, and what the suite cannot know (volumes, metadata, adoption of a
//! stopped domain, no leaks on a failed create, refusing foreign domains).
//!
//! What the test driver is: an in-process libvirt with one pool
//! (`default-pool`), one network (`default`) and one foreign domain (`test`),
//! shared by every connection of this process while one stays open. It
//! parses and keeps domain and volume XML, fabricates interface addresses
//! (192.168.122.x, never dialed here), and has neither volume upload (so the
//! cidata bytes are checked by the ISO unit tests instead) nor DHCP leases.

#![cfg(feature = "libvirt")]

use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::libvirt::{LibvirtProvider, LibvirtSettings, uuid_for_token};
use podvisor_providers::{ErrorClass, InstanceStatus, Provider, TAG_NODE};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::storage_vol::StorageVol;

const URI: &str = "test:///default";
const POOL: &str = "default-pool";
const BASE: &str = "podvm-base.qcow2";
/// The base volume's size: larger than the configured root disk in
/// `settings()`, so the overlay must take the base's size.
const BASE_BYTES: u64 = 3 << 30;

/// A connection held for the test's length (the test driver's state lives
/// while one is open), with the base volume in the pool.
fn test_host() -> Connect {
    // libvirt prints every error to stderr by default; the tests check them.
    virt::error::clear_error_callback();
    let conn = Connect::open(Some(URI)).expect("libvirt's test driver opens");
    let pool = conn.lookup_storage_pool_by_name(POOL).unwrap();
    if pool.lookup_storage_vol_by_name(BASE).is_err() {
        let xml = format!(
            "<volume><name>{BASE}</name><capacity unit='bytes'>{BASE_BYTES}</capacity>\
             <target><format type='qcow2'/></target></volume>"
        );
        // Tests run in parallel: another may have made it first.
        if let Err(e) = StorageVol::create_xml(&pool, &xml, 0) {
            assert!(
                pool.lookup_storage_vol_by_name(BASE).is_ok(),
                "creating the base volume: {e}"
            );
        }
    }
    conn
}

fn settings() -> LibvirtSettings {
    let mut s = LibvirtSettings::new(URI);
    s.pool = POOL.into();
    s.base_volume = BASE.into();
    s.root_disk_bytes = 1 << 30;
    s.address_attempts = 5;
    s.address_interval = Duration::from_millis(50);
    s
}

fn volumes_named(conn: &Connect, prefix: &str) -> Vec<String> {
    let pool = conn.lookup_storage_pool_by_name(POOL).unwrap();
    let mut names: Vec<String> = pool
        .list_all_volumes(0)
        .unwrap()
        .iter()
        .map(|v| v.name().unwrap())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn libvirt_provider_passes_the_conformance_suite() {
    let conn = test_host();
    let fixture = Fixture::new("node-a");
    run(&LibvirtProvider::new(settings()), &fixture).await;
    let name = fixture.request(1).instance_name;
    assert!(
        volumes_named(&conn, &name).is_empty(),
        "the deletes left volumes: {:?}",
        volumes_named(&conn, &name)
    );
}

#[tokio::test]
async fn a_pod_vm_is_a_domain_with_its_volumes_metadata_and_requested_size() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let mut fixture = Fixture::new("node-b");
    fixture.spec.vcpus = Some(3);
    fixture.spec.memory_mib = Some(1536);
    let request = fixture.request(1);
    let made = p.create_instance(&request).await.unwrap();

    assert_eq!(
        made.id,
        uuid_for_token(&request.token),
        "UUID = instance id"
    );
    assert_eq!(made.status, InstanceStatus::Running);
    let dom = conn.lookup_domain_by_uuid_string(&made.id).unwrap();
    assert_eq!(dom.name().unwrap(), request.instance_name);
    assert!(dom.is_active().unwrap());
    let xml = dom.xml_desc(0).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let text = |tag: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(str::to_owned)
    };
    assert_eq!(text("vcpu").as_deref(), Some("3"));
    assert_eq!(
        text("memory").as_deref(),
        Some("1572864"),
        "1536 MiB in KiB"
    );
    let meta = doc
        .descendants()
        .find(|n| n.has_tag_name((podvisor_providers::libvirt::METADATA_NAMESPACE, "instance")))
        .expect("podvisor's metadata element, in its namespace");
    let field = |tag: &str| {
        meta.children()
            .find(|n| n.tag_name().name() == tag)
            .and_then(|n| n.text())
            .map(str::to_owned)
    };
    assert_eq!(field("token"), Some(request.token.clone()));
    assert_eq!(field("node").as_deref(), Some("node-b"));
    assert_eq!(field("sandbox"), Some(fixture.sandbox_id.clone()));

    let name = &request.instance_name;
    assert_eq!(
        volumes_named(&conn, name),
        [
            format!("{name}-cloudinit.iso"),
            format!("{name}-root.qcow2")
        ]
    );
    let pool = conn.lookup_storage_pool_by_name(POOL).unwrap();
    let root = pool
        .lookup_storage_vol_by_name(&format!("{name}-root.qcow2"))
        .unwrap();
    assert_eq!(
        root.info().unwrap().capacity,
        BASE_BYTES,
        "max(root disk size, base capacity)"
    );
    let root_xml = root.xml_desc(0).unwrap();
    assert!(
        root_xml.contains(&format!("<path>/{POOL}/{BASE}</path>")),
        "an overlay on the base volume: {root_xml}"
    );

    p.delete_instance(&made.id).await.unwrap();
    assert!(conn.lookup_domain_by_uuid_string(&made.id).is_err());
    assert!(volumes_named(&conn, name).is_empty());
}

#[tokio::test]
async fn the_image_annotation_picks_the_base_volume_and_a_missing_one_fails_cleanly() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let mut fixture = Fixture::new("node-c");
    fixture.spec.image = Some("no-such-image.qcow2".into());
    let request = fixture.request(1);
    let err = p.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("no-such-image.qcow2"), "{err}");
    assert!(volumes_named(&conn, &request.instance_name).is_empty());
    assert!(conn.lookup_domain_by_name(&request.instance_name).is_err());

    fixture.spec.image = Some("../etc/passwd".into());
    let err = p.create_instance(&fixture.request(1)).await.unwrap_err();
    assert!(err.message.contains("not a volume name"), "{err}");
}

#[tokio::test]
async fn instances_outlive_the_provider_object_and_are_found_by_a_new_one() {
    let _conn = test_host();
    let fixture = Fixture::new("node-d");
    let request = fixture.request(1);
    let first = LibvirtProvider::new(settings());
    let created = first.create_instance(&request).await.unwrap();
    first.teardown().await.unwrap();
    drop(first);

    let second = LibvirtProvider::new(settings());
    let found = second
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .expect("found by token");
    assert_eq!(found.id, created.id);
    assert_eq!(found.status, InstanceStatus::Running);
    assert_eq!(found.ips, created.ips);
    assert_eq!(found.created_at, created.created_at);
    let listed = second.list_instances(TAG_NODE, "node-d").await.unwrap();
    assert_eq!(listed.len(), 1);
    second.delete_instance(&created.id).await.unwrap();
    assert!(
        second
            .list_instances(TAG_NODE, "node-d")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_stopped_domain_is_started_by_the_retried_create_not_duplicated() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let request = Fixture::new("node-e").request(1);
    let made = p.create_instance(&request).await.unwrap();
    // The VM was shut down (or a crash fell between define and start).
    conn.lookup_domain_by_uuid_string(&made.id)
        .unwrap()
        .destroy()
        .unwrap();
    let found = p
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.status, InstanceStatus::Stopped);
    assert!(found.ips.is_empty());

    let again = p.create_instance(&request).await.unwrap();
    assert_eq!(again.id, made.id, "adopted with its UUID");
    assert_eq!(again.status, InstanceStatus::Running);
    assert!(!again.ips.is_empty());
    assert!(
        conn.lookup_domain_by_uuid_string(&made.id)
            .unwrap()
            .is_active()
            .unwrap()
    );
    assert_eq!(p.list_instances(TAG_NODE, "node-e").await.unwrap().len(), 1);
    p.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn a_create_that_fails_after_its_volumes_exist_deletes_them() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let request = Fixture::new("node-f").request(1);
    // A foreign domain already holds the UUID this token asks for: the
    // define fails after both volumes were made.
    let blocker = format!(
        "<domain type='test'><name>blocker-{}</name><uuid>{}</uuid><memory unit='MiB'>128</memory>\
         <os><type arch='x86_64'>hvm</type></os></domain>",
        &request.sandbox_id[..16],
        uuid_for_token(&request.token)
    );
    let blocker = conn.define_domain_xml(&blocker).unwrap();
    let err = p.create_instance(&request).await.unwrap_err();
    assert!(err.message.contains("Defining domain"), "{err}");
    assert!(
        volumes_named(&conn, &request.instance_name).is_empty(),
        "leaked: {:?}",
        volumes_named(&conn, &request.instance_name)
    );
    assert!(conn.lookup_domain_by_name(&request.instance_name).is_err());
    blocker.undefine().unwrap();

    // With the way clear, the same token creates it.
    let made = p.create_instance(&request).await.unwrap();
    p.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn volumes_left_by_a_create_cut_off_before_its_define_are_deleted_by_the_lookup() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let fixture = Fixture::new("node-k");
    let request = fixture.request(1);
    let name = request.instance_name.clone();
    let pool = conn.lookup_storage_pool_by_name(POOL).unwrap();
    let make = |volume: &str| {
        let xml = format!(
            "<volume><name>{volume}</name><capacity unit='bytes'>1048576</capacity></volume>"
        );
        StorageVol::create_xml(&pool, &xml, 0).unwrap();
    };
    // What a create killed between making its volumes and defining its
    // domain leaves behind; and a volume of another instance, which stays.
    make(&format!("{name}-root.qcow2"));
    make(&format!("{name}-cloudinit.iso"));
    let neighbour = format!("{name}x-root.qcow2");
    make(&neighbour);
    assert_eq!(volumes_named(&conn, &name).len(), 3);

    // The daemon looks the token up before a retried create and when it
    // stops a sandbox whose instance it never learned.
    let found = p.find_instance(&request.token, &name).await.unwrap();
    assert!(found.is_none());
    assert_eq!(volumes_named(&conn, &name), vec![neighbour.clone()]);

    // With a domain of that name, its volumes are its own: left alone.
    let made = p.create_instance(&request).await.unwrap();
    let next_generation = fixture.request(2);
    assert_eq!(next_generation.instance_name, name);
    assert!(
        p.find_instance(&next_generation.token, &name)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        volumes_named(&conn, &name).len(),
        3,
        "the domain's two + the neighbour"
    );
    p.delete_instance(&made.id).await.unwrap();
    pool.lookup_storage_vol_by_name(&neighbour)
        .unwrap()
        .delete(0)
        .unwrap();
    assert!(volumes_named(&conn, &name).is_empty());
}

#[tokio::test]
async fn a_create_replaces_the_volumes_a_create_cut_off_before_its_define_left() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let request = Fixture::new("node-r").request(1);
    let name = request.instance_name.clone();
    let pool = conn.lookup_storage_pool_by_name(POOL).unwrap();
    for volume in [
        format!("{name}-root.qcow2"),
        format!("{name}-cloudinit.iso"),
    ] {
        let xml =
            format!("<volume><name>{volume}</name><capacity unit='bytes'>4096</capacity></volume>");
        StorageVol::create_xml(&pool, &xml, 0).unwrap();
    }
    // Straight to the create (no lookup first): its volume creates meet
    // the leftovers, replace them, and the domain is defined.
    let made = p.create_instance(&request).await.unwrap();
    let root = pool
        .lookup_storage_vol_by_name(&format!("{name}-root.qcow2"))
        .unwrap();
    assert!(
        root.info().unwrap().capacity > 4096,
        "the root volume is the create's, not the leftover"
    );
    assert_eq!(volumes_named(&conn, &name).len(), 2);
    p.delete_instance(&made.id).await.unwrap();
    assert!(volumes_named(&conn, &name).is_empty());
}

#[tokio::test]
async fn domains_that_are_not_podvisors_are_never_listed_adopted_or_deleted() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    // The test driver's own domain `test`: no podvisor metadata.
    let foreign = conn.lookup_domain_by_name("test").unwrap();
    let foreign_id = foreign.uuid_string().unwrap();
    for instance in p.list_instances(TAG_NODE, "").await.unwrap() {
        assert_ne!(instance.id, foreign_id);
    }
    let err = p.delete_instance(&foreign_id).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(conn.lookup_domain_by_uuid_string(&foreign_id).is_ok());

    let mut request = Fixture::new("node-g").request(1);
    request.instance_name = "test".into();
    let err = p.create_instance(&request).await.unwrap_err();
    assert!(err.message.contains("not podvisor's"), "{err}");
    assert!(
        p.find_instance(&request.token, "test")
            .await
            .unwrap()
            .is_none()
    );

    // Missing and malformed ids are gone already.
    p.delete_instance(&uuid_for_token("never-created"))
        .await
        .unwrap();
    p.delete_instance("../../etc").await.unwrap();
}

#[tokio::test]
async fn another_sandboxs_domain_under_the_same_name_is_not_taken() {
    let _conn = test_host();
    let p = LibvirtProvider::new(settings());
    let first = Fixture::new("node-h");
    let made = p.create_instance(&first.request(1)).await.unwrap();
    // Generation 2 of the same sandbox while generation 1 still exists.
    let err = p.create_instance(&first.request(2)).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    // A different sandbox whose name collides.
    let mut other = Fixture::new("node-h").request(1);
    other.instance_name = first.request(1).instance_name;
    let err = p.create_instance(&other).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    p.delete_instance(&made.id).await.unwrap();
}

#[tokio::test]
async fn a_running_domain_without_an_address_is_waited_for_then_reported_starting() {
    let conn = test_host();
    let p = LibvirtProvider::new(settings());
    let request = Fixture::new("node-j").request(1);
    // A podvisor domain with no NIC: it never gets an address (as a VM whose
    // DHCP lease has not come yet).
    let xml = format!(
        "<domain type='test'><name>{}</name><uuid>{}</uuid><memory unit='MiB'>128</memory>\
         <metadata><p:instance xmlns:p='{}'><p:token>{}</p:token><p:node>node-j</p:node>\
         <p:sandbox>{}</p:sandbox></p:instance></metadata>\
         <os><type arch='x86_64'>hvm</type></os></domain>",
        request.instance_name,
        uuid_for_token(&request.token),
        podvisor_providers::libvirt::METADATA_NAMESPACE,
        request.token,
        request.sandbox_id
    );
    let dom = conn.define_domain_xml(&xml).unwrap();
    dom.create().unwrap();

    let t = Instant::now();
    let found = p
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.status,
        InstanceStatus::Starting,
        "not Running without an address"
    );
    assert!(found.ips.is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "looked for the address 5 times, 50 ms apart: {:?}",
        t.elapsed()
    );
    // The create adopts it, waits the same bounded time, and keeps it.
    let err = p.create_instance(&request).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(err.message.contains("no address"), "{err}");
    assert!(dom.is_active().unwrap(), "kept for the retry");
    p.delete_instance(&found.id).await.unwrap();
    assert!(conn.lookup_domain_by_name(&request.instance_name).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_token_leave_one_running_domain() {
    // The end state only: the test driver serializes its calls, so the
    // creates rarely interleave here. The claim that keeps them apart is
    // proven by `one_create_per_instance_name_at_a_time` (provider.rs).
    let conn = test_host();
    let p = std::sync::Arc::new(LibvirtProvider::new(settings()));
    let request = Fixture::new("node-i").request(1);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (p, r) = (p.clone(), request.clone());
            tokio::spawn(async move { p.create_instance(&r).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(instance) => ids.push(instance.id),
            Err(e) => assert_eq!(e.class, ErrorClass::Transient, "{e}"),
        }
    }
    assert!(!ids.is_empty(), "at least one create succeeds");
    ids.dedup();
    assert_eq!(ids, [uuid_for_token(&request.token)]);
    let dom = conn.lookup_domain_by_uuid_string(&ids[0]).unwrap();
    assert!(dom.is_active().unwrap(), "the domain runs");
    assert_eq!(
        volumes_named(&conn, &request.instance_name).len(),
        2,
        "one root and one cidata volume"
    );
    p.delete_instance(&ids[0]).await.unwrap();
}

#[tokio::test]
async fn verify_checks_the_connection_the_pool_the_base_volume_and_the_network() {
    let _conn = test_host();
    LibvirtProvider::new(settings())
        .verify_config()
        .await
        .unwrap();
    for (change, flag) in [
        (
            (|s: &mut LibvirtSettings| s.pool = "nope".into()) as fn(&mut LibvirtSettings),
            "--pool-name (LIBVIRT_POOL)",
        ),
        (
            |s| s.base_volume = "nope.qcow2".into(),
            "--vol-name (LIBVIRT_VOL_NAME)",
        ),
        (
            |s| s.network = "nope".into(),
            "--network-name (LIBVIRT_NET)",
        ),
        (
            |s| s.uri = "test:///nonexistent/file.xml".into(),
            "--uri (LIBVIRT_URI)",
        ),
    ] {
        let mut s = settings();
        change(&mut s);
        let err = LibvirtProvider::new(s).verify_config().await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Config, "{err}");
        assert!(err.message.starts_with(flag), "{flag}: {err}");
    }
}

#[tokio::test]
async fn provider_errors_carry_libvirts_error_number_name_as_their_code() {
    let _conn = test_host();
    for (change, code) in [
        (
            (|s: &mut LibvirtSettings| s.pool = "nope".into()) as fn(&mut LibvirtSettings),
            "VIR_ERR_NO_STORAGE_POOL",
        ),
        (
            |s| s.base_volume = "nope.qcow2".into(),
            "VIR_ERR_NO_STORAGE_VOL",
        ),
        (|s| s.network = "nope".into(), "VIR_ERR_NO_NETWORK"),
    ] {
        let mut s = settings();
        change(&mut s);
        let err = LibvirtProvider::new(s).verify_config().await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
    }
    // A create from a base volume the pool lacks fails with libvirt's code.
    let mut request = Fixture::new("node-e").request(1);
    request.spec.image = Some("no-such-base.qcow2".into());
    let err = LibvirtProvider::new(settings())
        .create_instance(&request)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code(), Some("VIR_ERR_NO_STORAGE_VOL"), "{err}");
}

#[tokio::test]
async fn a_password_in_the_uri_is_in_no_error_and_no_debug_output() {
    // Nothing listens on port 1 of loopback: the connection is refused.
    let mut s = settings();
    s.uri = "qemu+tcp://admin:s3cret@127.0.0.1:1/system".into();
    assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
    let p = LibvirtProvider::new(s);
    let verify = p.verify_config().await.unwrap_err();
    let create = p
        .create_instance(&Fixture::new("node-p").request(1))
        .await
        .unwrap_err();
    let find = p.find_instance("t", "n").await.unwrap_err();
    for err in [verify, create, find] {
        assert!(!err.message.contains("s3cret"), "{err}");
        assert!(
            err.message.contains("admin:<redacted>@127.0.0.1:1"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn timings_of_create_and_delete_on_the_test_driver() {
    let _conn = test_host();
    let p = LibvirtProvider::new(settings());
    let n = 20;
    let (mut create, mut delete) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let request = Fixture::new("node-t").request(1);
        let t = Instant::now();
        let made = p.create_instance(&request).await.unwrap();
        create += t.elapsed();
        let t = Instant::now();
        p.delete_instance(&made.id).await.unwrap();
        delete += t.elapsed();
    }
    eprintln!(
        "test driver, mean of {n}: create (volumes + define + start + address) {:?}, delete {:?}",
        create / n,
        delete / n
    );
    // Generous: these are in-process calls; seconds would mean a stray wait.
    assert!(create / n < Duration::from_secs(1), "{:?}", create / n);
}
