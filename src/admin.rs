//! The admin HTTP endpoint: `/metrics`, `/livez`, `/readyz`, `/startup`,
//! `/v1/instances`, `/v1/instances/{sandbox_id}` and `/v1/status`; JSON,
//! with errors as `{"error": ...}`. [`server`] serves it, with time limits
//! on every connection.

pub mod server;

use crate::view::InstanceView;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use podvisor_state::InstanceRecord;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// What the admin endpoint serves from.
#[derive(Clone)]
pub struct AdminState {
    /// The durable view of every pod VM.
    pub view: Arc<InstanceView>,
    /// Each sandbox's tunnel as this run left it.
    pub tunnels: Arc<crate::network::status::TunnelStates>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// `/v1/status`: version, node, provider and its redacted configuration.
    pub status: Arc<Value>,
    /// Whether journal writes work: `/livez` fails while they do not.
    pub journal_health: Arc<crate::journal_health::JournalHealth>,
    /// The journal, for its identity and integrity (a doubt may be
    /// declared while the daemon runs).
    pub journal: Arc<dyn podvisor_state::Journal>,
    /// Whether the sandboxes of before the start are back, for `/startup`.
    pub startup: Arc<crate::startup::StartupGate>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("status", &self.status)
            .field("journal", &self.journal.identity())
            .finish_non_exhaustive()
    }
}

/// The journal's id and integrity, as `/readyz` and `/v1/status` show them.
fn journal_json(journal: &dyn podvisor_state::Journal) -> Value {
    json!({ "id": journal.identity().id, "integrity": journal.verdict() })
}

/// One pod VM, as the admin API shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct InstanceView1 {
    /// Kata's sandbox id.
    pub sandbox_id: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's namespace.
    pub pod_namespace: String,
    /// Lifecycle state, lower case.
    pub state: String,
    /// The provider's instance id, once known.
    pub instance_id: Option<String>,
    /// The instance name.
    pub instance_name: String,
    /// The instance's addresses.
    pub ips: Vec<String>,
    /// The pod's network namespace on this node (CreateVM's
    /// `networkNamespacePath`; empty if none was sent).
    pub network_namespace: String,
    /// The VNI of the pod's VXLAN tunnel (`None`: the pod has no tunnel);
    /// see docs/networking.md.
    pub vni: Option<u32>,
    /// The pod's tunnel as this run of the daemon left it: `state`
    /// (`pending`, `up`, `failed`, `down`, `unknown`), `error` (why it
    /// failed) and `since` (RFC 3339); `None` when the pod has no tunnel.
    pub tunnel: Option<crate::network::status::TunnelState>,
    /// What the pod asked for (instance type, vCPUs rounded up to whole
    /// ones, memory in MiB, GPUs, image), from CreateVM's annotations.
    pub spec: podvisor_state::InstanceSpec,
    /// Attempts of the current operation; for a failed pod VM, the
    /// creation attempts made.
    pub attempts: u32,
    /// The last error an operation met.
    pub last_error: Option<String>,
    /// Creation series.
    pub generation: u64,
    /// The idempotency token of the current generation.
    pub idempotency_token: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

fn rfc3339(millis: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(millis)).to_string()
}

impl From<&InstanceRecord> for InstanceView1 {
    fn from(r: &InstanceRecord) -> Self {
        Self {
            sandbox_id: r.sandbox_id.clone(),
            pod_name: r.pod_name.clone(),
            pod_namespace: r.pod_namespace.clone(),
            state: r.state.as_str().to_owned(),
            instance_id: r.instance.as_ref().map(|i| i.id.clone()),
            instance_name: r.instance_name.clone(),
            ips: r
                .instance
                .as_ref()
                .map(|i| i.ips.iter().map(std::string::ToString::to_string).collect())
                .unwrap_or_default(),
            network_namespace: r.network_namespace_path.clone(),
            vni: r.vni,
            tunnel: None,
            spec: r.spec.clone(),
            attempts: r.attempts,
            last_error: r.last_error.clone(),
            generation: r.generation,
            idempotency_token: r.token.clone(),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/startup", get(startup))
        .route("/v1/status", get(status))
        .route("/v1/instances", get(list))
        .route("/v1/instances/{sandbox_id}", get(one))
        .fallback(|uri: axum::http::Uri| async move {
            error(StatusCode::NOT_FOUND, format!("No such endpoint: {uri}"))
        })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "Only GET is supported")
        })
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// `200 ok` while the daemon can do its job; `503` with the reason while
/// journal writes fail (a restart reopens the journal, which sled needs
/// after an I/O error).
async fn livez(State(s): State<AdminState>) -> Response {
    match s.journal_health.failing() {
        None => "ok\n".into_response(),
        Some((for_how_long, why)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Journal writes have failed for {}s: {why}",
                for_how_long.as_secs()
            ),
        ),
    }
}

/// Only `/startup`, for `--probe-port` (reachable off the node: it tells
/// nothing but whether start-up is done).
pub fn probe_router(state: AdminState) -> Router {
    Router::new()
        .route("/startup", get(startup))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Only /startup is served here") })
        .with_state(state)
}

/// 200 once every sandbox `Creating` or `Running` at start-up is `Running`
/// again or ended; else 503 with how many are not back yet.
async fn startup(State(s): State<AdminState>) -> Response {
    use crate::startup::Startup;
    match s.startup.check(&s.view) {
        Startup::Done => (StatusCode::OK, axum::Json(json!({ "started": true }))).into_response(),
        Startup::Recovering => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "started": false, "error": "Start-up recovery is still running" })),
        )
            .into_response(),
        Startup::Waiting(n) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "started": false,
                "waiting_for": n,
                "error": format!("{n} sandboxes that were Creating or Running before the start are not Running yet"),
            })),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    // The journal's integrity rides along: a journal in doubt does not stop
    // the daemon serving pods, but an operator looking here must see it.
    let journal = journal_json(s.journal.as_ref());
    if s.view.is_ready() {
        (
            StatusCode::OK,
            axum::Json(json!({ "ready": true, "journal": journal })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                json!({ "ready": false, "error": "Start-up recovery is still running", "journal": journal }),
            ),
        )
            .into_response()
    }
}

async fn status(State(s): State<AdminState>) -> Response {
    let mut status = (*s.status).clone();
    status["journal"] = journal_json(s.journal.as_ref());
    status["ready"] = json!(s.view.is_ready());
    let mut counts = serde_json::Map::new();
    for r in s.view.list() {
        let n = counts.entry(r.state.as_str()).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    status["instances"] = Value::Object(counts);
    axum::Json(status).into_response()
}

/// A record as the admin API shows it, with its tunnel's state.
fn shown(s: &AdminState, r: &InstanceRecord) -> InstanceView1 {
    let mut view = InstanceView1::from(r);
    view.tunnel = s.tunnels.state_of(&r.sandbox_id, r.state, r.vni);
    view
}

async fn list(State(s): State<AdminState>) -> Response {
    let instances: Vec<InstanceView1> = s.view.list().iter().map(|r| shown(&s, r)).collect();
    axum::Json(json!({ "instances": instances })).into_response()
}

async fn one(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    match s.view.get(&id) {
        Some(r) => axum::Json(shown(&s, &r)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("Sandbox {id} is not known")),
    }
}
