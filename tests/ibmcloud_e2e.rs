//! `podvisor ibmcloud …` as a child process against the IBM Cloud test
//! server (HTTPS on loopback, its answers checked against IBM's own Python
//! SDK in `providers/tests/ibmcloud_fake.rs`): the lifecycle through the
//! Kata API, a kill -9 restart with Running and Deleting sandboxes, and
//! crashes between the create and the journal write of its result and
//! between the create and its tags — checked against the server's
//! instances, not only the daemon's view.
//!
//! The pod side: the server hands out loopback addresses (127.19.0.x), and
//! [`PodVmSide`] starts a real `podvisor-forwarder` on each live instance's
//! address with the `apf.json` of its user data, as the pod VM image
//! would. Nothing connects outside 127.0.0.0/8.

#![cfg(feature = "ibmcloud")]

mod common;
#[path = "common/podvm_side.rs"]
mod podvm_side;

use common::*;
use podvisor_providers::ibmcloud::testing::{
    IbmCloudServer, Route, ServerInstance, ServerOptions, TEST_API_KEY,
};
use podvm_side::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The provider's flags for `server` (every value given).
fn ibm_flags(server: &IbmCloudServer) -> Vec<String> {
    server.flags()
}

fn ibm_setup(server: &IbmCloudServer) -> Setup {
    let mut setup = Setup::new();
    setup.provider = Some(ibm_flags(server));
    setup.global.extend(["--cloud-config-verify".into()]);
    setup
}

/// The server's instances with an address and not being deleted, keyed by
/// their id.
fn live_instances(server: &IbmCloudServer) -> Vec<LiveVm> {
    server
        .instances()
        .into_iter()
        .filter(|i| i.status != "deleting")
        .filter_map(|i| {
            Some(LiveVm {
                ip: i.address?.into(),
                key: i.id.clone(),
                name: i.id,
                user_data: i.user_data,
            })
        })
        .collect()
}

/// The pod VMs' side of `setup`: a forwarder on every live instance's
/// address, stopped when its instance goes.
fn pod_vm_side(server: &Arc<IbmCloudServer>, setup: &Setup) -> PodVmSide {
    let server = server.clone();
    PodVmSide::start(move || live_instances(&server), setup)
}

/// The server's instances of `sandbox` (by its tag).
fn instances_of(server: &IbmCloudServer, sandbox: &str) -> Vec<ServerInstance> {
    let tag = format!("podvisor.io_sandbox:{sandbox}");
    server
        .instances()
        .into_iter()
        .filter(|i| i.tags.contains(&tag))
        .collect()
}

fn assert_no_secret_in(log: &str) {
    assert!(
        !log.contains(TEST_API_KEY),
        "the API key is in the daemon's log"
    );
    assert!(
        !log.contains("Bearer "),
        "a bearer token is in the daemon's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_vm_lifecycle_on_ibm_cloud_creates_runs_and_deletes_one_instance() {
    let server = Arc::new(IbmCloudServer::start(ServerOptions::default()));
    server.set_pending_polls(3);
    server.set_deleting_polls(3);
    let setup = ibm_setup(&server);
    let side = pod_vm_side(&server, &setup);
    let daemon = setup.start().await;
    // The start-up GC's listing belongs to the start-up, not to the pod.
    eventually(
        "the start-up GC's search",
        Duration::from_secs(30),
        async || (server.count(Route::Search) > 0).then_some(()),
    )
    .await;
    eprintln!("IBM Cloud requests at start-up: {:?}", server.counts());
    server.reset_counts();
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("web", "shop"))
        .await
        .unwrap();
    let started = Instant::now();
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
    eprintln!("create→Running: {:?}", started.elapsed());
    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running");
    let instance_id = record["instance_id"].as_str().unwrap().to_owned();
    let [on_server] = instances_of(&server, &id).try_into().unwrap();
    assert_eq!(on_server.id, instance_id);
    assert_eq!(side.keys(), std::slice::from_ref(&instance_id));
    assert!(
        on_server
            .tags
            .contains(&format!("podvisor.io_node:{}", setup.node)),
        "{:?}",
        on_server.tags
    );

    let stopping = Instant::now();
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    eprintln!("StopVM→deleted: {:?}", stopping.elapsed());
    let counts = server.counts();
    eprintln!("IBM Cloud requests of one pod lifecycle: {counts:?}");
    assert_eq!(counts.get(&Route::CreateInstance), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&Route::AttachTags), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&Route::DeleteInstance), Some(&1), "{counts:?}");
    assert!(server.instances().is_empty(), "nothing leaked");
    assert_no_secret_in(&daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_running_and_deleting_sandboxes_on_ibm_cloud_leaks_and_duplicates_nothing() {
    let server = Arc::new(IbmCloudServer::start(ServerOptions::default()));
    let mut setup = ibm_setup(&server);
    let _side = pod_vm_side(&server, &setup);
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let (running, deleting) = (sandbox_id(), sandbox_id());
    for (id, pod) in [(&running, "keeps"), (&deleting, "goes")] {
        daemon.create_and_start(&client, id, pod, "ns").await;
    }
    let kept = daemon.instance(&running).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The instance stays `deleting` long after the DELETE: the daemon
    // waits for the 404 with the record Deleting.
    server.set_deleting_polls(10_000);
    client.stop(&deleting).await.unwrap();
    eventually(
        "the delete to reach VPC",
        Duration::from_secs(10),
        async || (server.count(Route::DeleteInstance) >= 1).then_some(()),
    )
    .await;
    assert_eq!(
        daemon.instance(&deleting).await.unwrap()["state"],
        "deleting"
    );
    daemon.kill9();
    drop(daemon);

    server.set_deleting_polls(2);
    setup.provider = Some(ibm_flags(&server));
    let daemon = setup.start().await;
    let client = daemon.client().await;
    let record = daemon.instance(&running).await.unwrap();
    assert_eq!(record["state"], "running");
    assert_eq!(record["instance_id"], kept.as_str());
    client
        .start(&running)
        .await
        .expect("StartVM of the recovered sandbox succeeds");
    wait_gone(&daemon, &deleting).await;
    client.stop(&running).await.unwrap();
    wait_gone(&daemon, &running).await;
    for id in [&running, &deleting] {
        assert!(instances_of(&server, id).is_empty(), "{id} leaked");
    }
    assert!(server.instances().is_empty(), "nothing leaked");
    assert_eq!(
        server.create_bodies().len(),
        2,
        "one create per sandbox, none repeated"
    );
    assert_no_secret_in(&daemon.log_text());
}

/// The daemon dies at `point` during a StartVM; a new daemon on the same
/// journal finds the instance by name and token and adopts it: one
/// instance, tagged, Running, then deleted.
async fn crash_at_and_adopt(point: &str) {
    let server = Arc::new(IbmCloudServer::start(ServerOptions::default()));
    let mut setup = ibm_setup(&server);
    let _side = pod_vm_side(&server, &setup);
    setup
        .env
        .push(("FAILPOINTS".into(), format!("{point}=return")));
    let mut daemon = setup.start().await;
    setup.env.clear();
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("cut", "ns"))
        .await
        .unwrap();
    let start = client.start(&id).await;
    assert!(start.is_err(), "the daemon died during StartVM");
    assert!(
        daemon
            .exited_within(Duration::from_secs(30))
            .await
            .is_some(),
        "the daemon died at {point}"
    );
    assert_eq!(server.instances().len(), 1, "VPC made the instance");
    drop(daemon);

    let daemon = setup.start().await;
    let client = daemon.client().await;
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM after the crash: {e:?}\n{}", daemon.log_text()));
    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running");
    let [on_server] = server.instances().try_into().unwrap();
    assert_eq!(record["instance_id"], on_server.id.as_str(), "adopted");
    assert!(
        on_server
            .tags
            .contains(&format!("podvisor.io_sandbox:{id}")),
        "tagged after all: {:?}",
        on_server.tags
    );
    assert_eq!(server.count(Route::CreateInstance), 1, "never doubled");
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    assert!(server.instances().is_empty(), "nothing leaked");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_create_and_its_journal_write_adopts_the_instance() {
    crash_at_and_adopt("created-before-running").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_create_and_its_tags_adopts_and_tags_the_instance() {
    crash_at_and_adopt(podvisor_providers::failpoints::IBMCLOUD_CREATED_BEFORE_TAGS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_stops_the_start_naming_the_variable() {
    let server = IbmCloudServer::start(ServerOptions::default());
    let mut setup = ibm_setup(&server);
    let mut flags = ibm_flags(&server);
    let at = flags.iter().position(|a| a == "--image-id").unwrap();
    flags[at + 1] = "r006-no-such-image".into();
    setup.provider = Some(flags);
    let err = setup.try_start().await.err().unwrap_or_default();
    assert!(err.contains("IBMCLOUD_PODVM_IMAGE_ID"), "{err}");
    assert_no_secret_in(&err);
}

/// No log level prints a credential: at `--log-level trace`, with the HTTP
/// and TLS crates at trace too, through a whole pod VM lifecycle, the
/// daemon's log holds neither the API key, nor an IAM access token (a
/// bearer header), nor the user data (the pod VM's TLS key travels in it);
/// while podvisor's own trace lines are there, so trace was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_prints_no_ibm_credential_through_a_pod_vm_lifecycle() {
    let server = Arc::new(IbmCloudServer::start(ServerOptions::default()));
    let mut setup = ibm_setup(&server);
    setup.global.extend(
        [
            "--log-level",
            "trace,reqwest=trace,hyper_util=trace,hyper=trace,rustls=trace",
        ]
        .map(String::from),
    );
    let _side = pod_vm_side(&server, &setup);
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, "web", "shop").await;
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    drop(client);
    assert!(daemon.sigterm().success());
    let log = daemon.log_text();
    for (what, secret) in [
        ("the API key", TEST_API_KEY),
        ("a bearer token", "Bearer "),
        ("an access token", "eyJ"),
        ("the user data", "write_files"),
    ] {
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            let line: String = line.replace(secret, "<SECRET>").chars().take(400).collect();
            panic!("{what} is in the daemon's log: {line}");
        }
    }
    assert!(
        log.lines()
            .any(|l| l.contains(" TRACE ") && l.contains(" podvisor")),
        "no trace line from podvisor: was trace on?"
    );
}

/// Measures create→Running and StopVM→deleted for `PODVISOR_IBM_BENCH_N`
/// sandboxes at once (default 50; run with 1 too) against the server,
/// instances `pending` for 5 polls (0.5 s at the 100 ms poll interval), with
/// the provider's default pacing (`PODVISOR_IBM_BENCH_UNPACED=1` lifts it).
/// A measurement, not a check:
/// `cargo test --features ibmcloud --test ibmcloud_e2e -- --ignored --nocapture`.
#[ignore]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_concurrent_lifecycles_on_the_ibm_test_server() {
    let server = Arc::new(IbmCloudServer::start(ServerOptions::default()));
    server.set_pending_polls(5);
    server.set_deleting_polls(5);
    let mut m = measure_lifecycles(
        "PODVISOR_IBM_BENCH",
        ibm_setup(&server),
        |setup| pod_vm_side(&server, setup),
        || {
            server.reset_counts();
            server.tokens_issued()
        },
    )
    .await;
    assert!(server.instances().is_empty());
    let (r50, r99, _) = percentiles(&mut m.running);
    let (d50, d99, _) = percentiles(&mut m.deleted);
    eprintln!(
        "{} sandboxes at once on the IBM Cloud test server (5 pending polls, 100 ms apart; {}): \
         create→Running p50 {r50:.0} ms, p99 {r99:.0} ms; StopVM→deleted p50 {d50:.0} ms, \
         p99 {d99:.0} ms; requests: {:?}; IAM tokens: {}",
        m.n,
        m.pacing(),
        server.counts(),
        server.tokens_issued() - m.settled
    );
}
