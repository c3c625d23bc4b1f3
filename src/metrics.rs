//! Prometheus metrics: names, descriptions, buckets and the recorder.
//!
//! Base units, `_total` counters, the `podvisor_` prefix, and no per-sandbox
//! labels (label values are states, operations, outcomes and actions).

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
pub use ::metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: pod VMs per lifecycle state (`state`).
pub const INSTANCES: &str = "podvisor_instances";
/// Counter: lifecycle transitions (`from`, `to`).
pub const STATE_TRANSITIONS: &str = "podvisor_state_transitions_total";
/// Counter: lifecycle transitions the table forbids, refused (`from`, `to`).
/// Always 0 unless the state machine has a bug.
pub const ILLEGAL_TRANSITIONS: &str = "podvisor_illegal_transitions_total";
/// Counter: provider calls (`provider`, `operation`, `outcome`: `ok`, an
/// error class, or `cancelled` when the call's time limit cut it off).
pub const PROVIDER_REQUESTS: &str = "podvisor_provider_requests_total";
/// Histogram: provider call latency (`provider`, `operation`).
pub const PROVIDER_REQUEST_DURATION: &str = "podvisor_provider_request_duration_seconds";
/// Gauge: the rate (per second) mutating provider calls are paced at now:
/// `--provider-rate`, halved at each throttle, climbing back after.
pub const PROVIDER_RATE: &str = "podvisor_provider_rate_per_second";
/// Histogram: StartVM to Running.
pub const VM_START_DURATION: &str = "podvisor_vm_start_duration_seconds";
/// Counter: records recovered at start-up (`action`).
pub const RECOVERED_INSTANCES: &str = "podvisor_recovered_instances_total";
/// Counter: orphan instances the GC deleted.
pub const ORPHANS_DELETED: &str = "podvisor_orphans_deleted_total";
/// Counter: orphan GC passes (`outcome`).
pub const GC_RUNS: &str = "podvisor_gc_runs_total";
/// Histogram: journal flush latency.
pub const JOURNAL_FLUSH_DURATION: &str = "podvisor_journal_flush_duration_seconds";
/// Counter: journal writes that failed.
pub const JOURNAL_ERRORS: &str = "podvisor_journal_errors_total";
/// Counter: journal records moved to quarantine.
pub const JOURNAL_QUARANTINED: &str = "podvisor_journal_quarantined_records_total";
/// Counter: retried operations (`operation`).
pub const OPERATION_RETRIES: &str = "podvisor_operation_retries_total";
/// Counter: Hypervisor and PodVMInfo calls over ttrpc and gRPC (`api` is
/// `ttrpc` or `grpc`, `method`, `code`). Admin reads are not counted.
pub const API_REQUESTS: &str = "podvisor_api_requests_total";
/// Gauge: 1 once start-up recovery has finished.
pub const READY: &str = "podvisor_ready";
/// Gauge: 1 while the journal may have lost records (the orphan GC then
/// deletes nothing), else 0.
pub const JOURNAL_IN_DOUBT: &str = "podvisor_journal_in_doubt";
/// Gauge: instances tagged with this node that no record owns and that the
/// GC left alone at its last pass (`reason`: `journal_in_doubt`,
/// `other_journal`, `untagged`, `within_grace`).
pub const UNOWNED_INSTANCES: &str = "podvisor_unowned_instances";
/// Gauge: always 1, labelled with the build's `version`.
pub const BUILD_INFO: &str = "podvisor_build_info";
/// Gauge: when each TLS certificate of the agent proxy expires (its
/// notAfter), Unix seconds (`certificate`: `ca`, `client`).
pub const TLS_CERTIFICATE_EXPIRY: &str = "podvisor_tls_certificate_expiry_timestamp_seconds";
/// Counter: connections closed as soon as they were accepted because their
/// endpoint already had `--max-connections-per-endpoint` open (`endpoint`:
/// `ttrpc`, `grpc_tcp`, `grpc_unix`, `admin`, `agent_proxy`).
pub const CONNECTIONS_REFUSED: &str = "podvisor_connections_refused_total";
/// Counter: accepts that failed on an endpoint (`endpoint`), e.g. with
/// `EMFILE` when the daemon is out of file descriptors; each is followed by
/// a pause.
pub const CONNECTION_ACCEPT_ERRORS: &str = "podvisor_connection_accept_errors_total";
/// Gauge: connections open on each endpoint (`endpoint`; the agent sockets
/// summed).
pub const CONNECTIONS_OPEN: &str = "podvisor_connections_open";

/// Counter: Kubernetes API requests (`verb`: `get`, `list`, `patch`,
/// `create`, `update`, `delete`; `outcome`: `ok`, `not_found`, `error`).
pub const KUBE_API_REQUESTS: &str = "podvisor_kube_api_requests_total";
/// Counter: pod network steps (`op`: `describe` — the pod's netns read
/// for the pod VM at create, `setup` — the worker's end of the tunnel,
/// `teardown`; `outcome`: `ok`, `error`).
pub const TUNNEL_OPERATIONS: &str = "podvisor_tunnel_operations_total";
/// Histogram: time to set the worker's end of a pod's tunnel up (seconds).
pub const TUNNEL_SETUP_DURATION: &str = "podvisor_tunnel_setup_duration_seconds";
/// Histogram: time to tear the worker's end of a pod's tunnel down
/// (seconds).
pub const TUNNEL_TEARDOWN_DURATION: &str = "podvisor_tunnel_teardown_duration_seconds";
/// Counter: pod network steps that failed (`op` as in
/// [`TUNNEL_OPERATIONS`]; `cause`: see `PodNetworkError::cause`).
pub const TUNNEL_FAILURES: &str = "podvisor_tunnel_failures_total";
/// Gauge: sandboxes whose tunnel's worker end is up.
pub const TUNNELS_UP: &str = "podvisor_tunnels_up";
/// Counter: sandboxes stopped because their pod was gone from the node for
/// longer than `--stale-sandbox-grace`.
pub const STALE_SANDBOXES_STOPPED: &str = "podvisor_stale_sandboxes_stopped_total";
/// Counter: pod VMs deleted because the node they were made for has been
/// gone from the cluster for longer than `--node-gone-grace`.
pub const NODE_GONE_INSTANCES_DELETED: &str = "podvisor_node_gone_instances_deleted_total";
/// Gauge: 1 while this daemon holds the node-gone Lease (it collects the
/// pod VMs of deleted nodes), else 0.
pub const NODE_GONE_LEASE_HELD: &str = "podvisor_node_gone_lease_held";
/// Counter: PeerPod objects written (`action`: `apply`, `remove`;
/// `outcome`: `ok`, `no_pod` (no pod of that name: nothing written),
/// `absent` (nothing to remove), `no_crd`, `error`).
pub const PEERPOD_WRITES: &str = "podvisor_peerpod_writes_total";
/// Gauge: 1 once every sandbox that was `Creating` or `Running` at
/// start-up is `Running` again (or ended), as `/startup` answers.
pub const STARTED: &str = "podvisor_started";
/// Latency buckets for cloud calls and VM starts: 10 ms to 20 min.
const SLOW_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0,
];
/// Latency buckets for journal flushes: 100 µs to 5 s.
const FLUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The recorder, once installed: a process has one.
static INSTALLED: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the global recorder and describes every metric; later calls (a
/// benchmark serving twice in one process) get the same recorder.
///
/// # Errors
/// "metric buckets: …" when a histogram's buckets are refused (empty), or
/// "metrics recorder: …" when another global recorder is installed.
pub fn install() -> Result<PrometheusHandle, String> {
    if let Some(handle) = INSTALLED.get() {
        return Ok(handle.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(PROVIDER_REQUEST_DURATION.into()),
            SLOW_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(VM_START_DURATION.into()), SLOW_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(JOURNAL_FLUSH_DURATION.into()), FLUSH_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(TUNNEL_SETUP_DURATION.into()), FLUSH_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(TUNNEL_TEARDOWN_DURATION.into()),
                FLUSH_BUCKETS,
            )
        })
        .map_err(|e| format!("metric buckets: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("metrics recorder: {e}"))?;
    describe();
    Ok(INSTALLED.get_or_init(|| handle).clone())
}

fn describe() {
    describe_gauge!(
        INSTANCES,
        Unit::Count,
        "Pod VMs known to this daemon, by lifecycle state."
    );
    describe_counter!(
        STATE_TRANSITIONS,
        Unit::Count,
        "Journaled lifecycle transitions, by from and to state."
    );
    describe_counter!(
        ILLEGAL_TRANSITIONS,
        Unit::Count,
        "Lifecycle transitions the table forbids, refused and logged as errors, by from and to state (a bug if ever above 0)."
    );
    describe_counter!(
        PROVIDER_REQUESTS,
        Unit::Count,
        "Cloud provider calls, by provider, operation and outcome (ok, an error class, or cancelled by the call time limit)."
    );
    describe_gauge!(
        PROVIDER_RATE,
        "Rate (per second) mutating provider calls are paced at now: --provider-rate, halved at each throttle of the cloud and climbing back by a twentieth of it at each accepted call."
    );
    describe_histogram!(
        PROVIDER_REQUEST_DURATION,
        Unit::Seconds,
        "Latency of cloud provider calls."
    );
    describe_histogram!(
        VM_START_DURATION,
        Unit::Seconds,
        "Time from StartVM to a Running pod VM whose agent endpoint answers."
    );
    describe_counter!(
        RECOVERED_INSTANCES,
        Unit::Count,
        "Journal records recovered at start-up, by what recovery did."
    );
    describe_counter!(
        ORPHANS_DELETED,
        Unit::Count,
        "Instances tagged with this node that no record owned, deleted by the GC."
    );
    describe_counter!(GC_RUNS, Unit::Count, "Orphan GC passes, by outcome.");
    describe_histogram!(
        JOURNAL_FLUSH_DURATION,
        Unit::Seconds,
        "Latency of journal writes made durable."
    );
    describe_counter!(JOURNAL_ERRORS, Unit::Count, "Journal writes that failed.");
    describe_counter!(
        JOURNAL_QUARANTINED,
        Unit::Count,
        "Journal records that did not decode and were moved to quarantine."
    );
    describe_counter!(
        OPERATION_RETRIES,
        Unit::Count,
        "Operations retried after a failure, by operation."
    );
    describe_counter!(
        API_REQUESTS,
        Unit::Count,
        "Hypervisor and PodVMInfo API calls (ttrpc and gRPC), by API, method and result code."
    );
    describe_gauge!(
        READY,
        Unit::Count,
        "1 once start-up recovery has finished, else 0."
    );
    describe_gauge!(
        STARTED,
        Unit::Count,
        "1 once every sandbox Creating or Running at start-up is Running again or ended, else 0."
    );
    describe_counter!(
        KUBE_API_REQUESTS,
        Unit::Count,
        "Kubernetes API requests, by verb and outcome."
    );
    describe_counter!(
        TUNNEL_OPERATIONS,
        Unit::Count,
        "Pod network steps (describe the pod's netns, set up or tear down the worker's end of its VXLAN tunnel), by op and outcome."
    );
    describe_histogram!(
        TUNNEL_SETUP_DURATION,
        Unit::Seconds,
        "Time to set up the worker's end of a pod's VXLAN tunnel."
    );
    describe_histogram!(
        TUNNEL_TEARDOWN_DURATION,
        Unit::Seconds,
        "Time to tear down the worker's end of a pod's VXLAN tunnel."
    );
    describe_counter!(
        TUNNEL_FAILURES,
        Unit::Count,
        "Pod network steps that failed, by op and cause."
    );
    describe_gauge!(
        TUNNELS_UP,
        Unit::Count,
        "Sandboxes whose VXLAN tunnel's worker end is up."
    );
    describe_counter!(
        STALE_SANDBOXES_STOPPED,
        Unit::Count,
        "Sandboxes stopped because their pod was gone from the node for longer than the grace period."
    );
    describe_counter!(
        NODE_GONE_INSTANCES_DELETED,
        Unit::Count,
        "Pod VMs deleted because their node was gone from the cluster for longer than the grace period."
    );
    describe_gauge!(
        NODE_GONE_LEASE_HELD,
        Unit::Count,
        "1 while this daemon holds the node-gone Lease and collects the pod VMs of deleted nodes, else 0."
    );
    describe_counter!(
        PEERPOD_WRITES,
        Unit::Count,
        "PeerPod objects applied and removed, by action and outcome (ok, no_pod, absent, no_crd, error)."
    );
    describe_gauge!(
        JOURNAL_IN_DOUBT,
        Unit::Count,
        "1 while the journal may have lost records (the orphan GC deletes nothing), else 0."
    );
    describe_gauge!(
        UNOWNED_INSTANCES,
        Unit::Count,
        "Instances tagged with this node that no record owns and the GC left alone at its last pass, by reason."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; the version label names the build."
    );
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY,
        Unit::Seconds,
        "When each TLS certificate of the agent proxy expires (notAfter), in Unix seconds, by certificate: ca or client."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        Unit::Count,
        "Connections closed at once because their endpoint already had --max-connections-per-endpoint open, by endpoint."
    );
    describe_counter!(
        CONNECTION_ACCEPT_ERRORS,
        Unit::Count,
        "Failed accepts (e.g. EMFILE: out of file descriptors), each followed by a pause, by endpoint."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        Unit::Count,
        "Connections open, by endpoint (the agent sockets summed)."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(READY).set(0.0);
    gauge!(JOURNAL_IN_DOUBT).set(0.0);
    for s in podvisor_state::State::STORED {
        gauge!(INSTANCES, "state" => s.as_str()).set(0.0);
    }
}
