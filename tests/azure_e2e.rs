//! `podvisor azure …` as a child process against the Azure test server
//! (Entra ID and ARM over HTTPS on loopback, its answers checked against
//! Microsoft's own Python SDK in `providers/tests/azure_fake.rs`): the
//! lifecycle through the Kata API, a kill -9 restart with Running and
//! Deleting sandboxes, and crashes between the create and the journal
//! write of its result and between ARM's acceptance of the VM's PUT and
//! the following of its operation — checked against the server's VMs,
//! NICs, disks and public IPs, not only the daemon's view.
//!
//! The pod side: the server hands out loopback NIC addresses
//! (127.23.0.x), and [`PodVmSide`] starts a real `podvisor-forwarder` on
//! each live VM's private address with the `apf.json` of its user data (sent
//! base64, as ARM takes it), as the pod VM image would. Nothing connects
//! outside 127.0.0.0/8.

#![cfg(feature = "azure")]

mod common;
#[path = "common/podvm_side.rs"]
mod podvm_side;

use base64::Engine;
use common::*;
use podvisor_providers::azure::testing::{
    AzureServer, Route, ServerOptions, ServerVm, TEST_CLIENT_SECRET, TEST_SUBSCRIPTION_ID,
};
use podvm_side::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn azure_setup(server: &AzureServer) -> Setup {
    let mut setup = Setup::new();
    setup.provider = Some(server.flags());
    setup.global.extend(["--cloud-config-verify".into()]);
    setup
}

/// A generation of a VM: its ARM id (the name is in it) and its NIC's
/// address. The next generation of a sandbox reuses the name, hence the
/// ARM id, but gets a new NIC.
fn vm_key(vm: &ServerVm) -> String {
    format!("{}@{}", vm.id, vm.private_ip)
}

/// The server's VMs with a NIC address and not being deleted, keyed by
/// [`vm_key`], their user data decoded from the base64 ARM holds.
fn live_vms(server: &AzureServer) -> Vec<LiveVm> {
    server
        .vms()
        .into_iter()
        .filter(|vm| vm.provisioning_state != "Deleting" && !vm.private_ip.is_unspecified())
        .map(|vm| LiveVm {
            key: vm_key(&vm),
            ip: vm.private_ip.into(),
            user_data: vm
                .user_data
                .as_deref()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|bytes| String::from_utf8(bytes).ok()),
            name: vm.name,
        })
        .collect()
}

/// The pod VMs' side of `setup`: a forwarder on every live VM's private
/// address, stopped when its VM goes (or starts going).
fn pod_vm_side(server: &Arc<AzureServer>, setup: &Setup) -> PodVmSide {
    let server = server.clone();
    PodVmSide::start(move || live_vms(&server), setup)
}

/// The server's VMs of `sandbox` (by its tag; `podvisor.io/sandbox` is
/// `podvisor.io_sandbox` in Azure).
fn vms_of(server: &AzureServer, sandbox: &str) -> Vec<ServerVm> {
    server
        .vms()
        .into_iter()
        .filter(|vm| vm.tags.get("podvisor.io_sandbox").map(String::as_str) == Some(sandbox))
        .collect()
}

/// Nothing of a pod VM is left on the server: no VM, NIC, disk or public
/// IP.
fn assert_nothing_left(server: &AzureServer) {
    assert!(server.vms().is_empty(), "VMs leaked: {:?}", server.vms());
    assert!(server.nics().is_empty(), "NICs leaked: {:?}", server.nics());
    assert!(
        server.disks().is_empty(),
        "disks leaked: {:?}",
        server.disks()
    );
    assert!(
        server.public_ips().is_empty(),
        "public IPs leaked: {:?}",
        server.public_ips()
    );
}

/// The first segment of every access token the server issues (the
/// base64url of its fixed JWT header): the server keeps the tokens to
/// itself, but a logged token would start with this.
fn access_token_prefix() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"typ":"JWT","alg":"RS256","kid":"podvisor-test"}"#)
}

fn assert_no_secret_in(log: &str) {
    for (what, secret) in [
        ("the client secret", TEST_CLIENT_SECRET),
        ("a bearer token", "Bearer "),
        ("a token request", "client_secret="),
        ("a token answer", "access_token"),
        ("an access token", &access_token_prefix()),
    ] {
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            let line: String = line.replace(secret, "<SECRET>").chars().take(400).collect();
            panic!("{what} is in the daemon's log: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_vm_lifecycle_on_azure_creates_runs_and_deletes_one_vm() {
    let server = Arc::new(AzureServer::start(ServerOptions::default()));
    server.set_provisioning(3, Duration::ZERO);
    server.set_deleting(3, Duration::ZERO);
    let setup = azure_setup(&server);
    let side = pod_vm_side(&server, &setup);
    let daemon = setup.start().await;
    // The start-up GC's listing belongs to the start-up, not to the pod.
    eventually(
        "the start-up GC's listing",
        Duration::from_secs(30),
        async || (server.count(Route::ListVms) > 0).then_some(()),
    )
    .await;
    eprintln!("ARM requests at start-up: {:?}", server.counts());
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
    let [on_server] = vms_of(&server, &id).try_into().unwrap();
    assert!(
        instance_id.starts_with(&format!("{}#", on_server.id)),
        "the instance id {instance_id} is the VM's ARM id {} and its vmId",
        on_server.id
    );
    assert_eq!(on_server.provisioning_state, "Succeeded");
    assert_eq!(side.keys(), [vm_key(&on_server)]);
    assert_eq!(
        on_server.tags.get("podvisor.io_node"),
        Some(&setup.node),
        "{:?}",
        on_server.tags
    );
    assert_eq!(server.nics(), std::slice::from_ref(&on_server.nic));
    assert_eq!(server.disks(), std::slice::from_ref(&on_server.os_disk));

    let stopping = Instant::now();
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    eprintln!("StopVM→deleted: {:?}", stopping.elapsed());
    let counts = server.counts();
    eprintln!("ARM requests of one pod lifecycle: {counts:?}");
    assert_eq!(counts.get(&Route::PutVm), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&Route::DeleteVm), Some(&1), "{counts:?}");
    assert_eq!(server.put_bodies().len(), 1, "one VM made");
    assert_nothing_left(&server);
    assert_no_secret_in(&daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_running_and_deleting_sandboxes_on_azure_leaks_and_duplicates_nothing() {
    let server = Arc::new(AzureServer::start(ServerOptions::default()));
    let mut setup = azure_setup(&server);
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
    // The delete's operation stays InProgress (the VM `Deleting`) for 4 s
    // after the DELETE: the daemon follows it, then waits for the 404, with
    // the record Deleting — and is killed meanwhile.
    server.set_deleting(1, Duration::from_secs(4));
    client.stop(&deleting).await.unwrap();
    eventually(
        "the delete to reach ARM",
        Duration::from_secs(10),
        async || (server.count(Route::DeleteVm) >= 1).then_some(()),
    )
    .await;
    assert_eq!(
        daemon.instance(&deleting).await.unwrap()["state"],
        "deleting"
    );
    let [in_flight] = vms_of(&server, &deleting).try_into().unwrap();
    assert_eq!(in_flight.provisioning_state, "Deleting");
    daemon.kill9();
    drop(daemon);

    server.set_deleting(1, Duration::ZERO);
    setup.provider = Some(server.flags());
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
        assert!(vms_of(&server, id).is_empty(), "{id} leaked");
    }
    assert_nothing_left(&server);
    assert_eq!(
        server.put_bodies().len(),
        2,
        "one VM made per sandbox, none repeated"
    );
    assert_eq!(
        server.count(Route::DeleteVm),
        2,
        "one DELETE per VM: the one in flight is followed, not sent again"
    );
    assert_no_secret_in(&daemon.log_text());
}

/// The daemon dies at `point` during a StartVM; a new daemon on the same
/// journal finds the VM by name and token and adopts it: one VM, tagged,
/// Running, then deleted with its NIC and disk.
#[cfg(feature = "failpoints")]
async fn crash_at_and_adopt(point: &str) {
    let server = Arc::new(AzureServer::start(ServerOptions::default()));
    let mut setup = azure_setup(&server);
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
    assert!(
        start.is_err(),
        "the daemon did not die at {point} during StartVM:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon
            .exited_within(Duration::from_secs(30))
            .await
            .is_some(),
        "the daemon died at {point}"
    );
    let [made] = server.vms().try_into().unwrap();
    eprintln!("at {point}: the VM {}", made.provisioning_state);
    if point == podvisor_providers::failpoints::AZURE_PUT_BEFORE_WAIT {
        assert_eq!(
            made.provisioning_state, "Creating",
            "the daemon died before following the create"
        );
    }
    drop(daemon);
    server.reset_counts();

    let daemon = setup.start().await;
    let client = daemon.client().await;
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM after the crash: {e:?}\n{}", daemon.log_text()));
    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running");
    let [on_server] = server.vms().try_into().unwrap();
    let instance_id = record["instance_id"].as_str().unwrap();
    assert!(
        instance_id.starts_with(&format!("{}#", on_server.id)),
        "adopted: {instance_id} is not of {}",
        on_server.id
    );
    assert_eq!(on_server.provisioning_state, "Succeeded");
    assert_eq!(
        on_server.tags.get("podvisor.io_sandbox"),
        Some(&id),
        "{:?}",
        on_server.tags
    );
    // A retry's PUT (If-None-Match: *) is refused with 412, so it is the
    // accepted PUTs that say how many VMs were ever made.
    assert_eq!(server.put_bodies().len(), 1, "never doubled");
    eprintln!(
        "ARM requests after the crash at {point}: {:?}",
        server.counts()
    );
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    assert_nothing_left(&server);
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_create_and_its_journal_write_adopts_the_vm() {
    crash_at_and_adopt("created-before-running").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_put_and_its_operation_adopts_the_vm() {
    crash_at_and_adopt(podvisor_providers::failpoints::AZURE_PUT_BEFORE_WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_stops_the_start_naming_the_variable() {
    let server = AzureServer::start(ServerOptions::default());
    let mut setup = azure_setup(&server);
    let mut flags = server.flags();
    let at = flags.iter().position(|a| a == "--imageid").unwrap();
    let missing = format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/{}/providers/Microsoft.Compute/images/no-such-image",
        server.options().resource_group
    );
    flags[at + 1].clone_from(&missing);
    setup.provider = Some(flags);
    let err = setup.try_start().await.err().unwrap_or_default();
    assert!(err.contains("--imageid (AZURE_IMAGE_ID)"), "{err}");
    assert!(err.contains(&missing), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(server.count(Route::PutVm), 0);
    assert_no_secret_in(&err);
}

/// No log level prints a credential: at `--log-level trace`, with the HTTP,
/// TLS and Azure SDK crates at trace too, through a whole pod VM
/// lifecycle, the daemon's log holds neither the client secret (nor a token
/// request carrying it), nor an access token (a bearer header, a token
/// answer, the token itself), nor the user data (the pod VM's TLS key
/// travels in it), as text or as the base64 ARM takes; while podvisor's own
/// trace lines are there, so trace was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_prints_no_azure_credential_through_a_pod_vm_lifecycle() {
    let server = Arc::new(AzureServer::start(ServerOptions::default()));
    let mut setup = azure_setup(&server);
    setup.global.extend(
        [
            "--log-level",
            "trace,reqwest=trace,hyper_util=trace,hyper=trace,rustls=trace,\
             azure_core=trace,azure_identity=trace,typespec_client_core=trace",
        ]
        .map(String::from),
    );
    let _side = pod_vm_side(&server, &setup);
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, "web", "shop").await;
    let [vm] = vms_of(&server, &id).try_into().unwrap();
    let user_data = vm.user_data.expect("the VM has user data");
    client.stop(&id).await.unwrap();
    wait_gone(&daemon, &id).await;
    drop(client);
    assert!(daemon.sigterm().success());
    let log = daemon.log_text();
    assert_no_secret_in(&log);
    // 64 base64 characters of the user data: the `#cloud-config` line and
    // the start of `write_files`, whatever the rest.
    let user_data_prefix: String = user_data.chars().take(64).collect();
    for (what, secret) in [
        ("the user data", "write_files"),
        ("the user data (base64)", user_data_prefix.as_str()),
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

/// Measures create→Running and StopVM→deleted for `PODVISOR_AZURE_BENCH_N`
/// sandboxes at once (default 50; run with 1 too) against the server, VMs
/// `Creating` for 2 s after their PUT (and at least one read), deletes at
/// the server's default (done at the first read), with the provider's
/// default pacing (`PODVISOR_AZURE_BENCH_UNPACED=1` lifts it). A
/// measurement, not a check:
/// `cargo test --test azure_e2e -- --ignored --nocapture`.
#[ignore]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_concurrent_lifecycles_on_the_azure_test_server() {
    let server = Arc::new(AzureServer::start(ServerOptions::default()));
    server.set_provisioning(1, Duration::from_secs(2));
    let mut m = measure_lifecycles(
        "PODVISOR_AZURE_BENCH",
        azure_setup(&server),
        |setup| pod_vm_side(&server, setup),
        || {
            server.reset_counts();
            server.tokens_issued()
        },
    )
    .await;
    assert_nothing_left(&server);
    let counts = server.counts();
    let requests: usize = counts
        .iter()
        .filter(|(route, _)| !matches!(route, Route::Token | Route::OpenIdConfiguration))
        .map(|(_, c)| c)
        .sum();
    let (r50, r99, _) = percentiles(&mut m.running);
    let (d50, d99, _) = percentiles(&mut m.deleted);
    eprintln!(
        "{} sandboxes at once on the Azure test server (VMs Creating 2 s, 50 ms polls; {}): \
         create→Running p50 {r50:.0} ms, p99 {r99:.0} ms; StopVM→deleted p50 {d50:.0} ms, \
         p99 {d99:.0} ms; ARM requests per lifecycle: {:.1}; requests: {counts:?}; \
         Entra tokens: {}",
        m.n,
        m.pacing(),
        requests as f64 / m.n as f64,
        server.tokens_issued() - m.settled
    );
}
