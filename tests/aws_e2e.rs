//! `podvisor aws …` as a child process against moto's EC2 server on
//! loopback: the lifecycle through the Kata API, and a kill -9 restart with
//! Running and Deleting sandboxes, checked by listing the server's
//! instances — not only the daemon's view.
//!
//! The pod side: moto gives instances private IPs in the test subnet
//! (127.16.x.y), and [`PodVmSide`] starts a real `podvisor-forwarder` on
//! each live instance's address, as the pod VM image would, so the daemon's
//! readiness probe meets a real forwarder. Nothing connects outside
//! 127.0.0.0/8.

#![cfg(feature = "aws")]

mod common;
#[path = "common/podvm_side.rs"]
mod podvm_side;

use common::*;
use podvisor_providers::aws::testing::{
    AwsBed, Fault, MetadataStub, Moto, SECRET_ACCESS_KEY, client_for, ec2, node_metadata,
    private_ip,
};
use podvisor_providers::{TAG_NODE, TAG_SANDBOX};
use podvm_side::{Forwarders, apf_json, bench_n, lift_pacing, start_all};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A daemon setup on the bed's server, reached at `endpoint` (the server's
/// or a proxy's): every value given (no metadata service lookup), and the
/// metadata service pointed at a closed loopback port regardless.
fn aws_setup(bed: &AwsBed, endpoint: &str) -> Setup {
    let mut setup = Setup::new();
    setup.provider = Some(bed.flags(endpoint));
    setup.env = vec![
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
            "http://127.0.0.1:9".into(),
        ),
    ];
    setup.global.extend(["--cloud-config-verify".into()]);
    setup
}

/// A daemon setup on AWS given only its credentials and image: region,
/// subnet, groups and key are left to the metadata service `stub`.
fn metadata_setup(bed: &AwsBed, stub: &MetadataStub) -> Setup {
    let mut setup = aws_setup(bed, &bed.moto.endpoint());
    setup.provider = Some(bed.flags_without_network(&bed.moto.endpoint()));
    // Empty variables count as unset: nothing inherited may fill these.
    setup.env = [
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            stub.endpoint().as_str(),
        ),
        ("AWS_REGION", ""),
        ("AWS_SUBNET_ID", ""),
        ("AWS_SG_IDS", ""),
        ("SSH_KP_NAME", ""),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec();
    setup
}

/// The pod VMs' side: a forwarder on every live instance's address of one
/// node, stopped when its instance goes.
struct PodVmSide {
    /// Instance id → its forwarder.
    forwarders: Forwarders,
    /// The watcher.
    task: tokio::task::JoinHandle<()>,
}

impl PodVmSide {
    /// The pod VMs' side of the daemon `setup` on `moto`: forwarders on the
    /// daemon's forwarder port, relaying to an agent socket in its root.
    fn for_setup(moto: &Moto, setup: &Setup) -> Self {
        let forwarders = Forwarders::for_setup(setup);
        let shared = forwarders.clone();
        let ec2 = client_for(&moto.endpoint());
        let node = setup.node.clone();
        let task = tokio::spawn(async move {
            loop {
                let out = ec2
                    .describe_instances()
                    .filters(
                        ec2::types::Filter::builder()
                            .name(format!("tag:{TAG_NODE}"))
                            .values(&node)
                            .build(),
                    )
                    .send()
                    .await;
                if let Ok(out) = out {
                    let mut live = HashMap::new();
                    for i in out
                        .reservations()
                        .iter()
                        .flat_map(ec2::types::Reservation::instances)
                    {
                        let state = i
                            .state()
                            .and_then(|s| s.name())
                            .map(ec2::types::InstanceStateName::as_str);
                        if matches!(state, Some("pending" | "running"))
                            && let (Some(id), Some(ip)) = (i.instance_id(), private_ip(i))
                        {
                            assert!(ip.is_loopback(), "instance {id} got {ip}");
                            live.insert(id.to_owned(), ip);
                        }
                    }
                    for id in shared.keep_only(&live) {
                        // As a pod VM boots: its forwarder's settings (the
                        // TLS identity among them) come from its user data.
                        let apf = apf_json_of(&ec2, &id).await;
                        shared.spawn(id.clone(), &id, live[&id].into(), apf);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { forwarders, task }
    }

    /// Instances with a forwarder now.
    fn instances(&self) -> Vec<String> {
        self.forwarders.keys()
    }
}

/// The `apf.json` in instance `id`'s user data, as the server holds it.
async fn apf_json_of(ec2: &ec2::Client, id: &str) -> Option<String> {
    use base64::Engine as _;
    let out = ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .ok()?;
    let encoded = out.user_data()?.value()?;
    let text = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    apf_json(&String::from_utf8(text).ok()?)
}

impl Drop for PodVmSide {
    fn drop(&mut self) {
        self.task.abort();
        self.forwarders.kill_all();
    }
}

/// The server's word after the sandboxes' StopVM: each had exactly one
/// instance ever, now terminated, and no instance of `node` is alive.
async fn assert_one_instance_each_and_none_alive(moto: &Moto, node: &str, sandboxes: &[&str]) {
    for id in sandboxes {
        let states = instances_of(moto, id).await;
        assert_eq!(states.len(), 1, "one instance per sandbox: {states:?}");
        assert!(
            matches!(states[0].1.as_str(), "terminated" | "shutting-down"),
            "{states:?}"
        );
    }
    assert!(
        moto.live_instances(Some((TAG_NODE, node))).await.is_empty(),
        "nothing leaked"
    );
}

/// The daemon paces its mutating EC2 calls at `rate`/s with `burst`, and
/// reports the AWS provider's own default (2/s, burst 20) beside them.
async fn assert_call_limits(daemon: &Daemon, rate: f64, burst: u64) {
    let (_, status) = daemon.get("/v1/status").await.unwrap();
    let limits = &status["provider_call_limits"];
    assert_eq!(limits["rate_per_second"], rate, "{status}");
    assert_eq!(limits["burst"], burst, "{status}");
    assert_eq!(
        limits["provider_default"]["rate_per_second"], 2.0,
        "{status}"
    );
    assert_eq!(limits["provider_default"]["burst"], 20, "{status}");
    // Reads: the provider's own default, half EC2's non-mutating bucket.
    assert_eq!(
        limits["provider_default"]["read_rate_per_second"], 10.0,
        "{status}"
    );
    assert_eq!(limits["provider_default"]["read_burst"], 50, "{status}");
}

/// Every instance of `sandbox` the server has ever had, live or not, with
/// its state.
async fn instances_of(moto: &Moto, sandbox: &str) -> Vec<(String, String)> {
    let out = moto
        .client()
        .describe_instances()
        .filters(
            ec2::types::Filter::builder()
                .name(format!("tag:{TAG_SANDBOX}"))
                .values(sandbox)
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(ec2::types::Reservation::instances)
        .map(|i| {
            (
                i.instance_id().unwrap_or("").to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn assert_no_secret_in(log: &str) {
    assert!(
        !log.contains(SECRET_ACCESS_KEY),
        "the secret key is in the daemon's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_vm_lifecycle_on_ec2_creates_runs_and_terminates_one_instance() {
    let bed = AwsBed::start().await;
    // Through a proxy that counts the daemon's EC2 calls.
    let proxy = bed.proxy().await;
    let setup = aws_setup(&bed, &proxy.endpoint());
    let side = PodVmSide::for_setup(&bed.moto, &setup);
    let daemon = setup.start().await;
    // No --provider-rate or --provider-burst: the AWS provider's defaults.
    assert_call_limits(&daemon, 2.0, 20).await;
    // The orphan GC lists the node's instances once start-up recovery is
    // done: that listing belongs to the start-up, not to the pod.
    eventually(
        "the start-up GC's listing",
        Duration::from_secs(30),
        async || proxy.calls().get("DescribeInstances").map(|_| ()),
    )
    .await;
    let at_start = proxy.calls();
    eprintln!("EC2 calls at start-up (verify, recovery, GC): {at_start:?}");
    assert_eq!(at_start.get("DescribeImages"), Some(&1), "{at_start:?}");
    proxy.reset_calls();
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("web", "shop"))
        .await
        .unwrap();
    let started = Instant::now();
    client.start(&id).await.unwrap_or_else(|e| {
        panic!("StartVM: {e:?}\n{}", daemon.log_text());
    });
    eprintln!("create→Running against moto: {:?}", started.elapsed());

    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running");
    let instance_id = record["instance_id"].as_str().unwrap().to_owned();
    assert!(instance_id.starts_with("i-"), "{record}");
    let ip: std::net::IpAddr = record["ips"][0].as_str().unwrap().parse().unwrap();
    assert!(ip.is_loopback(), "{record}");
    assert_eq!(
        instances_of(&bed.moto, &id).await,
        [(instance_id.clone(), "running".to_owned())]
    );
    assert_eq!(side.instances(), std::slice::from_ref(&instance_id));
    assert_eq!(
        client.info("web", "shop", false, 5).await.unwrap(),
        instance_id
    );

    let stopping = Instant::now();
    client.stop(&id).await.unwrap();
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
    eprintln!("StopVM→terminated against moto: {:?}", stopping.elapsed());
    let calls = proxy.calls();
    eprintln!("EC2 calls of one pod lifecycle: {calls:?}");
    // CreateVM → StartVM → StopVM, first try: RunInstances (no token
    // lookup before a fresh token's create; the address is in its answer)
    // and TerminateInstances (no DescribeAddresses: never seen with an
    // Elastic IP), nothing else.
    let expected: HashMap<String, usize> = [("RunInstances", 1), ("TerminateInstances", 1)]
        .map(|(action, n)| (action.to_owned(), n))
        .into();
    assert_eq!(calls, expected);
    assert_one_instance_each_and_none_alive(&bed.moto, &setup.node, &[&id]).await;
    assert_no_secret_in(&daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_running_and_deleting_sandboxes_on_ec2_leaks_and_duplicates_nothing() {
    let bed = AwsBed::start().await;
    // The daemon talks through a proxy that can hang EC2's deletes.
    let proxy = bed.proxy().await;
    let mut setup = aws_setup(&bed, &proxy.endpoint());
    let side = PodVmSide::for_setup(&bed.moto, &setup);
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

    proxy.fault("TerminateInstances", Fault::Stall, None);
    client.stop(&deleting).await.unwrap();
    eventually(
        "the delete to reach EC2",
        Duration::from_secs(10),
        async || {
            proxy
                .calls()
                .get("TerminateInstances")
                .is_some_and(|n| *n >= 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        daemon.instance(&deleting).await.unwrap()["state"],
        "deleting"
    );
    assert_no_secret_in(&daemon.log_text());
    daemon.kill9();
    drop(daemon);

    // The cloud is well again; the daemon comes back on the same journal.
    proxy.clear_faults();
    setup.provider = Some(bed.flags(&proxy.endpoint()));
    let daemon = setup.start().await;
    let client = daemon.client().await;

    let record = daemon.instance(&running).await.unwrap();
    assert_eq!(record["state"], "running");
    assert_eq!(record["instance_id"], kept.as_str());
    client
        .start(&running)
        .await
        .expect("StartVM of the recovered sandbox succeeds");
    assert_eq!(daemon.recovered("verified").await, 1.0);
    eventually(
        "the Deleting sandbox to finish",
        Duration::from_secs(30),
        async || daemon.instance(&deleting).await.is_none().then_some(()),
    )
    .await;
    assert_eq!(daemon.recovered("resumed_delete").await, 1.0);

    client.stop(&running).await.unwrap();
    eventually(
        "the recovered sandbox to stop",
        Duration::from_secs(30),
        async || daemon.instance(&running).await.is_none().then_some(()),
    )
    .await;

    // The server's word: one instance per sandbox ever, none left alive.
    assert_one_instance_each_and_none_alive(&bed.moto, &setup.node, &[&running, &deleting]).await;
    eventually(
        "the pod side to follow",
        Duration::from_secs(5),
        async || side.instances().is_empty().then_some(()),
    )
    .await;
    assert_no_secret_in(&daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_is_lost_is_retried_into_the_same_instance() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let setup = aws_setup(&bed, &proxy.endpoint());
    let _side = PodVmSide::for_setup(&bed.moto, &setup);
    let daemon = setup.start().await;
    let client = daemon.client().await;
    // EC2 makes the instance; the answer never arrives (a timeout, a reset).
    proxy.fault("RunInstances", Fault::DropResponse, Some(1));
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, "lost", "ns").await;
    let states = instances_of(&bed.moto, &id).await;
    assert_eq!(
        states.len(),
        1,
        "one instance, adopted by token: {states:?}"
    );
    assert_eq!(
        daemon.instance(&id).await.unwrap()["instance_id"],
        states[0].0.as_str()
    );
    assert_eq!(proxy.calls().get("RunInstances"), Some(&1));
    client.stop(&id).await.unwrap();
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
    assert!(bed.moto.live_instances(None).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_run_and_terminate_instances_are_retried_by_the_daemon_into_one_instance() {
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let mut setup = aws_setup(&bed, &proxy.endpoint());
    // The rate from the environment; the burst stays the provider's.
    setup
        .env
        .push(("PODVISOR_PROVIDER_RATE".into(), "4".into()));
    let _side = PodVmSide::for_setup(&bed.moto, &setup);
    let daemon = setup.start().await;
    assert_call_limits(&daemon, 4.0, 20).await;

    // EC2 is over the account's request rate for the first two launches
    // and the first two terminations.
    proxy.reset_calls();
    proxy.fault("RunInstances", Fault::Throttle, Some(2));
    proxy.fault("TerminateInstances", Fault::Throttle, Some(2));
    let client = daemon.client().await;
    let id = sandbox_id();
    client
        .create(&id, pod_annotations("busy", "ns"))
        .await
        .unwrap();
    let started = Instant::now();
    client
        .start(&id)
        .await
        .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
    let start_took = started.elapsed();
    let calls = proxy.calls();
    eprintln!("EC2 requests of a start throttled twice ({start_took:?}): {calls:?}");
    assert_eq!(calls.get("RunInstances"), Some(&3), "{calls:?}");
    assert_eq!(proxy.faulted("RunInstances"), 2);
    // The daemon waited at least EC2's throttling back-off before each retry.
    assert!(start_took >= Duration::from_secs(2), "{start_took:?}");
    let record = daemon.instance(&id).await.unwrap();
    assert_eq!(record["state"], "running", "{record}");
    let instance_id = record["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(
        instances_of(&bed.moto, &id).await,
        [(instance_id.clone(), "running".to_owned())],
        "exactly one instance"
    );
    let aws_create = |outcome| {
        [
            ("provider", "aws"),
            ("operation", "create"),
            ("outcome", outcome),
        ]
    };
    let provider_requests = "podvisor_provider_requests_total";
    assert_eq!(
        daemon
            .metric(provider_requests, &aws_create("throttled"))
            .await,
        2.0
    );
    assert_eq!(
        daemon.metric(provider_requests, &aws_create("ok")).await,
        1.0
    );
    assert_eq!(
        daemon
            .metric(
                "podvisor_operation_retries_total",
                &[("operation", "create")]
            )
            .await,
        2.0
    );
    // AIMD: each throttle halved the pace of creates and deletes (4/s →
    // 1/s), the accepted create gave back a twentieth of 4/s.
    let rate = daemon
        .metric(
            "podvisor_provider_rate_per_second",
            &[("class", "mutating")],
        )
        .await;
    assert!((rate - 1.2).abs() < 1e-9, "{rate}");

    let stopping = Instant::now();
    client.stop(&id).await.unwrap();
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
    let stop_took = stopping.elapsed();
    let calls = proxy.calls();
    eprintln!(
        "EC2 requests of a lifecycle, start and stop throttled twice each (stop {stop_took:?}): {calls:?}"
    );
    assert_eq!(calls.get("TerminateInstances"), Some(&3), "{calls:?}");
    assert_eq!(proxy.faulted("TerminateInstances"), 2);
    assert_eq!(calls.get("RunInstances"), Some(&3), "{calls:?}");
    let aws_delete = |outcome| {
        [
            ("provider", "aws"),
            ("operation", "delete"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(
        daemon
            .metric(provider_requests, &aws_delete("throttled"))
            .await,
        2.0
    );
    assert_eq!(
        daemon.metric(provider_requests, &aws_delete("ok")).await,
        1.0
    );
    let log = daemon.log_text();
    let retries = log
        .lines()
        .filter(|l| l.contains("retrying provider call") && l.contains("RequestLimitExceeded"))
        .count();
    assert_eq!(
        retries, 4,
        "the daemon's provider actor retried each throttled call"
    );

    // The server's word: one instance ever, terminated; none left alive.
    assert_one_instance_each_and_none_alive(&bed.moto, &setup.node, &[&id]).await;
    assert_no_secret_in(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_subnet_groups_and_key_come_from_the_metadata_service_when_not_given() {
    let bed = AwsBed::start().await;
    let stub = MetadataStub::start(node_metadata(&bed.net)).await;
    let setup = metadata_setup(&bed, &stub);
    let _side = PodVmSide::for_setup(&bed.moto, &setup);
    let daemon = setup.start().await;
    let asked = stub.requests();
    assert!(
        asked.contains(&"GET /latest/meta-data/placement/region".to_owned()),
        "{asked:?}"
    );
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, "imds", "ns").await;
    let live = bed.moto.live_instances(Some((TAG_SANDBOX, &id))).await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].subnet_id(), Some(bed.net.subnet_id.as_str()));
    assert_eq!(live[0].key_name(), Some(bed.net.key_name.as_str()));
    assert!(
        live[0]
            .security_groups()
            .iter()
            .any(|g| g.group_id() == Some(bed.net.security_group_id.as_str())),
        "{:?}",
        live[0].security_groups()
    );
    client.stop(&id).await.unwrap();
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
}

/// p50, p99 and max of `samples`, in milliseconds.
/// Measures create→Running and StopVM→deleted (the record is removed once
/// EC2 accepted the terminate) for `PODVISOR_AWS_BENCH_N` sandboxes at once
/// (default 100) against moto, with the provider's rate limit lifted
/// (`PODVISOR_AWS_BENCH_PACED=1` keeps the defaults). A measurement, not a
/// check: `cargo test --test aws_e2e -- --ignored --nocapture`.
#[ignore]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_concurrent_lifecycles_on_moto() {
    let n = bench_n("PODVISOR_AWS_BENCH_N", 100);
    let paced = std::env::var("PODVISOR_AWS_BENCH_PACED").is_ok_and(|v| v == "1");
    let bed = AwsBed::start().await;
    let proxy = bed.proxy().await;
    let mut setup = aws_setup(&bed, &proxy.endpoint());
    setup
        .global
        .extend(["--peerpods-limit-per-node".into(), "0".into()]);
    if !paced {
        lift_pacing(&mut setup);
    }
    let _side = PodVmSide::for_setup(&bed.moto, &setup);
    let daemon = setup.start().await;
    proxy.reset_calls();
    let client = Arc::new(daemon.client().await);
    let ids: Vec<String> = (0..n).map(|_| sandbox_id()).collect();
    let begun = Instant::now();
    let mut running = start_all(&client, &ids).await;
    let all_running = begun.elapsed();
    assert_eq!(bed.moto.live_instances(None).await.len(), n);

    let stopping = Instant::now();
    let mut tasks = Vec::new();
    for id in &ids {
        let (client, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            client.stop(&id).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut deleted = Vec::new();
    let mut left: std::collections::HashSet<String> = ids.iter().cloned().collect();
    while !left.is_empty() {
        let (_, body) = daemon.get("/v1/instances").await.unwrap();
        let present: std::collections::HashSet<String> = body["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r["sandbox_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        left.retain(|id| {
            let gone = !present.contains(id);
            if gone {
                deleted.push(stopping.elapsed());
            }
            !gone
        });
        assert!(
            stopping.elapsed() < Duration::from_secs(300),
            "deletes hang"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bed.moto.live_instances(None).await.is_empty());
    let log = daemon.log_text();
    let retries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("retrying provider call"))
        .collect();
    eprintln!(
        "provider call retries: {}{}",
        retries.len(),
        retries
            .iter()
            .take(3)
            .map(|l| format!("\n  {l}"))
            .collect::<String>()
    );
    let (r50, r99, rmax) = percentiles(&mut running);
    let (d50, d99, dmax) = percentiles(&mut deleted);
    eprintln!(
        "{n} sandboxes at once against moto ({}): create→Running p50 {r50:.0} ms, p99 {r99:.0} ms, max {rmax:.0} ms (all Running after {:.2} s); \
         StopVM→deleted p50 {d50:.0} ms, p99 {d99:.0} ms, max {dmax:.0} ms; EC2 calls: {:?}",
        if paced {
            "default provider pacing"
        } else {
            "pacing lifted"
        },
        all_running.as_secs_f64(),
        proxy.calls()
    );
}

/// With `CLOUD_CONFIG_VERIFY=true`, no subnet given and none from the
/// metadata service, start-up fails naming `AWS_SUBNET_ID`/`AWS_SG_IDS`;
/// without it the daemon starts, warns, and `/v1/status` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_subnet_anywhere_verify_refuses_to_start_and_otherwise_status_says_so() {
    let bed = AwsBed::start().await;
    // A node whose metadata names its region but no network interface.
    let mut metadata = node_metadata(&bed.net);
    metadata.retain(|path, _| path.ends_with("/placement/region"));
    let stub = MetadataStub::start(metadata).await;
    let mut setup = metadata_setup(&bed, &stub);

    let out = setup.command().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started blind:\n{stderr}");
    assert!(
        stderr.contains("--subnetid (AWS_SUBNET_ID)") && stderr.contains("AWS_SG_IDS"),
        "{stderr}"
    );

    setup.global.retain(|flag| flag != "--cloud-config-verify");
    let daemon = setup.start().await;
    let (_, status) = daemon.get("/v1/status").await.unwrap();
    let problem = status["provider_config_problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains("AWS_SUBNET_ID"), "{status}");
    assert!(
        daemon.log_text().contains("does not verify"),
        "{}",
        daemon.log_text()
    );
}

/// On EC2 too, a journal that lost records deletes no instance: three pod
/// VMs run, the daemon stops, its database is damaged (deleted — what sled
/// turns into a fresh journal —, 64 bytes flipped, or cut in half), and a
/// daemon whose GC would delete an orphan after one second runs several
/// passes: every instance is still running at the server, and a loss is
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_journal_on_ec2_deletes_no_instance() {
    let bed = AwsBed::start().await;
    for how in [Damage::DeleteDb, Damage::FlipBytes(7), Damage::Truncate] {
        let mut setup = aws_setup(&bed, &bed.moto.endpoint());
        eager_gc(&mut setup);
        let _side = PodVmSide::for_setup(&bed.moto, &setup);
        let mut daemon = setup.start().await;
        let ids: Vec<String> = run_pods(&daemon, 3)
            .await
            .into_iter()
            .map(|(sandbox, _)| sandbox)
            .collect();
        assert!(daemon.sigterm().success());
        damage(&setup.state_dir(), how);

        match setup.try_start().await {
            Ok(daemon) => {
                let runs = daemon.metric("podvisor_gc_runs_total", &[]).await;
                eventually("four GC passes", Duration::from_secs(30), async || {
                    (daemon.metric("podvisor_gc_runs_total", &[]).await >= runs + 4.0).then_some(())
                })
                .await;
                let (_, all) = daemon.get("/v1/instances").await.unwrap();
                if all["instances"].as_array().map_or(0, Vec::len) < ids.len() {
                    assert_eq!(
                        daemon.metric("podvisor_journal_in_doubt", &[]).await,
                        1.0,
                        "{how:?}: records lost, and nobody was told"
                    );
                }
                assert_eq!(
                    daemon.metric("podvisor_orphans_deleted_total", &[]).await,
                    0.0,
                    "{how:?}"
                );
            }
            Err(log) => assert!(log.contains("journal"), "{how:?}: {log}"),
        }
        for id in &ids {
            let states: Vec<String> = instances_of(&bed.moto, id)
                .await
                .into_iter()
                .map(|(_, state)| state)
                .collect();
            assert_eq!(states, ["running"], "{how:?}: sandbox {id}");
        }
    }
}

/// The first line of `log` that holds `secret`, cut short, with the secret
/// replaced: enough to tell which target printed it, without printing it.
fn line_with(log: &str, secret: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains(secret))
        .map(|l| l.replace(secret, "<SECRET>").chars().take(400).collect())
}

/// The first line of `log` with a SigV4 signature (`Signature=` and 64 hex
/// digits), the signature replaced.
fn line_with_signature(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        l.match_indices("Signature=").find_map(|(at, _)| {
            let sig = l.get(at + 10..at + 74)?;
            sig.bytes()
                .all(|b| b.is_ascii_hexdigit())
                .then(|| line_with(l, sig).unwrap_or_default())
        })
    })
}

/// No log level prints a credential: at `--log-level trace` — with the
/// signing and HTTP crates named at trace too — through a whole pod VM
/// lifecycle on temporary static credentials, the daemon's log holds neither
/// the session token (the `x-amz-security-token` header's value), nor the
/// secret key, nor a request's signature, nor the user data (the pod VM's TLS
/// key and registry credentials travel in it); while podvisor's own trace
/// lines are there, so trace was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_prints_no_aws_credential_through_a_pod_vm_lifecycle() {
    let bed = AwsBed::start().await;
    let mut setup = aws_setup(&bed, &bed.moto.endpoint());
    // Distinctive, so that any copy of it in the log is found.
    let session_token = format!(
        "PodvisorTestSessionToken{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    if let Some(provider) = setup.provider.as_mut() {
        provider.extend(["--aws-session-token".to_owned(), session_token.clone()]);
    }
    setup.global.extend(
        [
            "--log-level",
            "trace,aws_sigv4=trace,aws_smithy_runtime::client::orchestrator=trace,ureq_proto=trace",
        ]
        .map(String::from),
    );
    let _side = PodVmSide::for_setup(&bed.moto, &setup);
    let mut daemon = setup.start().await;
    let client = daemon.client().await;
    let id = sandbox_id();
    daemon.create_and_start(&client, &id, "web", "shop").await;
    client.stop(&id).await.unwrap();
    eventually(
        "the sandbox to be deleted",
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
    drop(client);
    assert!(daemon.sigterm().success());

    let log = daemon.log_text();
    for (what, secret) in [
        ("the session token", session_token.as_str()),
        ("the secret access key", SECRET_ACCESS_KEY),
        ("RunInstances' user data", "UserData="),
    ] {
        if let Some(line) = line_with(&log, secret) {
            panic!("{what} is in the daemon's log: {line}");
        }
    }
    if let Some(line) = line_with_signature(&log) {
        panic!("a request signature is in the daemon's log: {line}");
    }
    // A line is `<time> <LEVEL> <spans>: <target>: …`.
    let any_line = |level: &str, target: &str| {
        log.lines()
            .any(|l| l.contains(&format!(" {level} ")) && l.contains(&format!(" {target}::")))
    };
    assert!(
        any_line("TRACE", "podvisor"),
        "no trace line from podvisor: was trace on?"
    );
    // The SDK's own lines down to the cap still come through.
    assert!(
        any_line("DEBUG", "aws_smithy_runtime"),
        "no debug line from the AWS SDK"
    );
}
