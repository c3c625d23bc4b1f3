//! The IBM Cloud test server (feature `conformance`): one HTTPS listener on
//! 127.0.0.1 that answers IBM Cloud's wire protocol for what the `ibmcloud`
//! provider calls — IAM tokens, VPC instances (and the images, profiles and
//! subnet they name), Global Tagging and Global Search — all on one base URL,
//! with a throwaway CA whose PEM is [`IbmCloudServer::ca_file`].
//!
//! The bodies are the real services' shapes: every property IBM's Python
//! SDK (`ibm-vpc`, `ibm-platform-services`) requires of a model is present,
//! which `providers/tests/ibmcloud_sdk.py` checks with the SDK's own
//! `from_dict`. What the real cloud does over time is scriptable: instances
//! stay `pending` for a number of reads ([`IbmCloudServer::set_pending_polls`]),
//! `deleting` after a delete ([`IbmCloudServer::set_deleting_polls`]), tags
//! reach the search index late ([`IbmCloudServer::set_search_lag`]), tokens
//! expire ([`IbmCloudServer::set_token_ttl`]), and any route can be made to
//! fail ([`IbmCloudServer::fault`]).
//!
//! Nothing here connects anywhere: the server only listens, on 127.0.0.1,
//! and hands out primary addresses from a pool of loopback addresses.

use crate::https_test_server::{TestServer, TestServerThread};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// The valid API key (IAM's `apikey` grant); tests grep logs for it.
pub const TEST_API_KEY: &str = "ibm-test-apikey-never-logged";
/// The valid trusted profile id (IAM's `cr-token` grant).
pub const TEST_PROFILE_ID: &str = "Profile-0d2c4a1e-7b3f-4c1d-9e2a-5f6b7c8d9e0f";
/// The valid compute-resource token (IAM's `cr-token` grant), shaped as a
/// JWT as the real projected service account token is.
pub const TEST_CR_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50Iiwic3ViIjoic3lzdGVtOnNlcnZpY2VhY2NvdW50OmNvbmZpZGVudGlhbC1jb250YWluZXJzLXN5c3RlbTpwb2R2aXNvciJ9.c2lnbmF0dXJlLW5vdC1jaGVja2Vk";
/// The account every CRN of the server names.
pub const TEST_ACCOUNT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
/// The region of the default zone.
const DEFAULT_REGION: &str = "us-south";

/// An instance profile the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Its name, such as `bx2-2x8`.
    pub name: String,
    /// Virtual CPUs.
    pub vcpu: u32,
    /// Memory, GiB.
    pub memory_gib: u32,
    /// `amd64` or `s390x`.
    pub architecture: String,
    /// GPUs (0 for none).
    pub gpu: u32,
}

impl Profile {
    /// A profile named `name`.
    pub fn new(name: &str, vcpu: u32, memory_gib: u32, architecture: &str, gpu: u32) -> Self {
        Self {
            name: name.into(),
            vcpu,
            memory_gib,
            architecture: architecture.into(),
            gpu,
        }
    }
}

/// What the server holds at start.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The primary addresses handed out to instances, in order (tests pass
    /// loopback ones, so a pod VM's forwarder can bind them).
    pub addresses: Vec<Ipv4Addr>,
    /// The instance profiles.
    pub profiles: Vec<Profile>,
    /// The images: (id, architecture).
    pub images: Vec<(String, String)>,
    /// The one zone, such as `us-south-1`.
    pub zone: String,
    /// The one VPC.
    pub vpc_id: String,
    /// The one subnet (in the zone and the VPC).
    pub subnet_id: String,
    /// The security groups that exist.
    pub security_group_ids: Vec<String>,
    /// The SSH keys that exist.
    pub key_ids: Vec<String>,
    /// The resource group of everything.
    pub resource_group_id: String,
    /// Dedicated hosts: (id, zone). Instances may be placed on those in
    /// the server's zone.
    pub dedicated_hosts: Vec<(String, String)>,
    /// Dedicated host groups: (id, zone).
    pub dedicated_host_groups: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            addresses: (2..=250).map(|n| Ipv4Addr::new(127, 19, 0, n)).collect(),
            profiles: vec![
                Profile::new("bx2-2x8", 2, 8, "amd64", 0),
                Profile::new("bx2-4x16", 4, 16, "amd64", 0),
                Profile::new("cx2-2x4", 2, 4, "amd64", 0),
                Profile::new("bz2-2x8", 2, 8, "s390x", 0),
                Profile::new("gx2-8x64x1v100", 8, 64, "amd64", 1),
            ],
            images: vec![
                ("r006-image-amd64".into(), "amd64".into()),
                ("r006-image-s390x".into(), "s390x".into()),
            ],
            zone: "us-south-1".into(),
            vpc_id: "r006-vpc-test".into(),
            subnet_id: "0717-subnet-test".into(),
            security_group_ids: vec!["r006-sg-test".into()],
            key_ids: vec!["r006-key-test".into()],
            resource_group_id: "rg-test-0123456789abcdef".into(),
            dedicated_hosts: vec![
                ("0727-host-south-2".into(), "us-south-2".into()),
                ("0717-host-1".into(), "us-south-1".into()),
            ],
            dedicated_host_groups: vec![("0717-group-1".into(), "us-south-1".into())],
        }
    }
}

/// A route of the server, for faults and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// `POST /identity/token` (IAM).
    Token,
    /// `POST /v1/instances`.
    CreateInstance,
    /// `GET /v1/instances/{id}`.
    GetInstance,
    /// `GET /v1/instances`.
    ListInstances,
    /// `DELETE /v1/instances/{id}`.
    DeleteInstance,
    /// `GET /v1/images/{id}`.
    GetImage,
    /// `GET /v1/instance/profiles/{name}`.
    GetProfile,
    /// `GET /v1/instance/profiles`.
    ListProfiles,
    /// `GET /v1/subnets/{id}`.
    GetSubnet,
    /// `GET /v1/dedicated_hosts/{id}`.
    GetDedicatedHost,
    /// `GET /v1/dedicated_host/groups/{id}`.
    GetDedicatedHostGroup,
    /// `POST /v3/tags/attach` (Global Tagging).
    AttachTags,
    /// `GET /v3/tags` (Global Tagging).
    ListTags,
    /// `POST /v3/resources/search` (Global Search).
    Search,
    /// Anything else (answered 404).
    Other,
}

/// A scripted failure of a route ([`IbmCloudServer::fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with the route's service's error body carrying
    /// `code`, and `Retry-After: retry_after` (seconds) when given.
    Status {
        /// The HTTP status.
        status: u16,
        /// The error code in the body (IAM: `errorCode`).
        code: String,
        /// The `Retry-After` header, seconds.
        retry_after: Option<u64>,
    },
    /// Do the work (create the instance, attach the tags…), then answer 502
    /// with an empty body: an answer lost on the way.
    DropAnswer,
    /// Close the connection without an answer and without doing the work.
    Close,
}

/// An instance as the server holds it (for tests' assertions).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInstance {
    /// Its id (`0717_…`).
    pub id: String,
    /// Its CRN.
    pub crn: String,
    /// Its name.
    pub name: String,
    /// `pending`, `running` or `deleting` (what the next read would show
    /// before counting that read).
    pub status: String,
    /// Its primary address once it answers `running`; `None` while pending.
    pub address: Option<Ipv4Addr>,
    /// Its boot volume's name.
    pub boot_volume_name: String,
    /// Its profile's name.
    pub profile: String,
    /// Its image's id.
    pub image_id: String,
    /// Its zone.
    pub zone: String,
    /// The user data it was created with.
    pub user_data: Option<String>,
    /// The `confidential_compute_mode` asked for at create.
    pub confidential_compute_mode: Option<String>,
    /// The `enable_secure_boot` asked for at create.
    pub enable_secure_boot: Option<bool>,
    /// The `placement_target` asked for at create.
    pub placement_target: Option<Value>,
    /// Its user tags (lowercased, as IBM stores them).
    pub tags: Vec<String>,
    /// Whether the metadata service was enabled at create.
    pub metadata_service_enabled: bool,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// One instance and what drives its state.
#[derive(Debug, Clone)]
struct Held {
    view: ServerInstance,
    /// The address it gets (shown once running).
    reserved: Ipv4Addr,
    /// Reads left answering `pending`.
    pending_left: u32,
    /// Reads left answering `deleting`, once deleted.
    deleting_left: Option<u32>,
    /// Tags with the search count after which the index shows them.
    indexed: Vec<(String, u64)>,
    nic_id: String,
    boot_volume_id: String,
    boot_attachment_id: String,
    vni_id: Option<String>,
    ip_id: String,
    seq: u64,
}

/// A search cursor: the query it pages and where the next page starts.
#[derive(Debug, Clone)]
struct Cursor {
    query: String,
    fields: Vec<String>,
    offset: usize,
}

/// Everything the server holds, under one lock.
#[derive(Debug)]
struct State {
    instances: BTreeMap<String, Held>,
    next_seq: u64,
    free_addresses: Vec<Ipv4Addr>,
    tokens: HashMap<String, SystemTime>,
    tokens_issued: usize,
    token_ttl: Duration,
    pending_polls: u32,
    deleting_polls: u32,
    search_lag: u32,
    max_page: usize,
    searches: u64,
    faults: HashMap<Route, (Fault, usize)>,
    counts: BTreeMap<Route, usize>,
    create_bodies: Vec<Value>,
    cursors: HashMap<String, Cursor>,
}

/// What the connection tasks share.
#[derive(Debug)]
struct Shared {
    options: ServerOptions,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The IBM Cloud test server: IAM, VPC, Global Tagging and Global Search
/// on one HTTPS base URL on 127.0.0.1. It runs on its own thread with its
/// own Tokio runtime, so sync and async tests (and daemons the test spawns)
/// can use it; dropping it stops it.
pub struct IbmCloudServer {
    shared: Arc<Shared>,
    server: TestServerThread,
}

impl fmt::Debug for IbmCloudServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IbmCloudServer")
            .field("url", &self.url())
            .field("ca_file", &self.ca_file())
            .field("instances", &self.shared.lock().instances.len())
            .finish_non_exhaustive()
    }
}

impl IbmCloudServer {
    /// The `podvisor ibmcloud` command line of a provider on this server:
    /// the subcommand, then every value a test setup needs (the test API
    /// key, the four endpoints, the CA, the default options' zone, VPC,
    /// subnet, both images, profile `bx2-2x8`, and a 100 ms poll interval).
    /// A test adds or replaces flags after it.
    pub fn flags(&self) -> Vec<String> {
        let o = &self.shared.options;
        let url = self.url();
        let mut args: Vec<String> = vec!["ibmcloud".into()];
        for (flag, value) in [
            ("--api-key", TEST_API_KEY.to_owned()),
            ("--iam-service-url", format!("{url}/identity/token")),
            ("--vpc-service-url", format!("{url}/v1")),
            ("--tagging-service-url", url.clone()),
            ("--search-service-url", url.clone()),
            ("--ca-bundle", self.ca_file().display().to_string()),
            ("--zone-name", o.zone.clone()),
            ("--vpc-id", o.vpc_id.clone()),
            ("--primary-subnet-id", o.subnet_id.clone()),
            ("--image-id", "r006-image-amd64,r006-image-s390x".into()),
            ("--profile-name", "bx2-2x8".into()),
            ("--poll-interval", "100ms".into()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        args
    }

    /// Starts a server holding `options`' resources, on a free port of
    /// 127.0.0.1, with a new CA. Panics (a test helper) when it cannot.
    pub fn start(options: ServerOptions) -> Self {
        let bound = TestServer::bind("podvisor IBM Cloud test CA");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                instances: BTreeMap::new(),
                next_seq: 0,
                free_addresses: options.addresses.clone(),
                tokens: HashMap::new(),
                tokens_issued: 0,
                token_ttl: Duration::from_secs(3600),
                pending_polls: 0,
                deleting_polls: 0,
                search_lag: 0,
                max_page: usize::MAX,
                searches: 0,
                faults: HashMap::new(),
                counts: BTreeMap::new(),
                create_bodies: Vec::new(),
                cursors: HashMap::new(),
            }),
            options,
        });
        let serving = shared.clone();
        let server = bound.spawn("ibmcloud-test-server", move |request, close| {
            handle(serving.clone(), close, request)
        });
        Self { shared, server }
    }

    /// The base URL of every service: `https://127.0.0.1:PORT`. IAM is
    /// `{url}/identity/token`, VPC `{url}/v1`, Global Tagging `{url}/v3/tags`,
    /// Global Search `{url}/v3/resources/search`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The PEM of the CA the server's certificate is issued by.
    pub fn ca_file(&self) -> PathBuf {
        self.server.ca_file()
    }

    /// The next `times` requests to `route` get `fault` (before any other
    /// handling, authentication included). Replaces the route's earlier
    /// fault.
    pub fn fault(&self, route: Route, fault: Fault, times: usize) {
        self.shared.lock().faults.insert(route, (fault, times));
    }

    /// Requests to `route` so far (faulted ones included).
    pub fn count(&self, route: Route) -> usize {
        self.shared.lock().counts.get(&route).copied().unwrap_or(0)
    }

    /// Requests so far, by route.
    pub fn counts(&self) -> BTreeMap<Route, usize> {
        self.shared.lock().counts.clone()
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        self.shared.lock().counts.clear();
    }

    /// Every instance not yet gone (`deleting` ones included), oldest first.
    pub fn instances(&self) -> Vec<ServerInstance> {
        let state = self.shared.lock();
        let mut held: Vec<&Held> = state.instances.values().collect();
        held.sort_by_key(|h| h.seq);
        held.iter().map(|h| h.view.clone()).collect()
    }

    /// The JSON bodies of the accepted `POST /v1/instances`, in order.
    pub fn create_bodies(&self) -> Vec<Value> {
        self.shared.lock().create_bodies.clone()
    }

    /// The lifetime (`expires_in`) of tokens issued from now on; a token
    /// past it is answered 401.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.shared.lock().token_ttl = ttl;
    }

    /// Instances created from now on answer `pending` with primary address
    /// `0.0.0.0` for their first `n` reads (single or list), then `running`
    /// with their address.
    pub fn set_pending_polls(&self, n: u32) {
        self.shared.lock().pending_polls = n;
    }

    /// Instances deleted from now on answer `deleting` for `n` reads, then
    /// 404 (0: gone at once); those being deleted now for at most `n` more.
    pub fn set_deleting_polls(&self, n: u32) {
        let mut state = self.shared.lock();
        state.deleting_polls = n;
        for held in state.instances.values_mut() {
            if let Some(left) = held.deleting_left.as_mut() {
                *left = (*left).min(n);
            }
        }
    }

    /// Pages of the VPC instance listing and of Global Search hold at most
    /// `n` items whatever `limit` asks (as a server under load may), so a
    /// client's paging is exercised with a few instances.
    pub fn set_max_page(&self, n: usize) {
        self.shared.lock().max_page = n.max(1);
    }

    /// A tag attached from now on shows in Global Search only after this
    /// many more search requests.
    pub fn set_search_lag(&self, polls: u32) {
        self.shared.lock().search_lag = polls;
    }

    /// Tokens IAM has issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.shared.lock().tokens_issued
    }
}

/// Which service a route belongs to: its error bodies differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Iam,
    Vpc,
    Tagging,
    Search,
}

impl Route {
    fn service(self) -> Service {
        match self {
            Self::Token => Service::Iam,
            Self::AttachTags | Self::ListTags => Service::Tagging,
            Self::Search => Service::Search,
            _ => Service::Vpc,
        }
    }
}

/// The route of `method` `path`.
fn route_of(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["identity", "token"]) => Route::Token,
        ("POST", ["v1", "instances"]) => Route::CreateInstance,
        ("GET", ["v1", "instances"]) => Route::ListInstances,
        ("GET", ["v1", "instances", _]) => Route::GetInstance,
        ("DELETE", ["v1", "instances", _]) => Route::DeleteInstance,
        ("GET", ["v1", "images", _]) => Route::GetImage,
        ("GET", ["v1", "instance", "profiles"]) => Route::ListProfiles,
        ("GET", ["v1", "instance", "profiles", _]) => Route::GetProfile,
        ("GET", ["v1", "subnets", _]) => Route::GetSubnet,
        ("GET", ["v1", "dedicated_hosts", _]) => Route::GetDedicatedHost,
        ("GET", ["v1", "dedicated_host", "groups", _]) => Route::GetDedicatedHostGroup,
        ("POST", ["v3", "tags", "attach"]) => Route::AttachTags,
        ("GET", ["v3", "tags"]) => Route::ListTags,
        ("POST", ["v3", "resources", "search"]) => Route::Search,
        _ => Route::Other,
    }
}

/// An answer, before it becomes a hyper response.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Option<Value>,
    retry_after: Option<u64>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            retry_after: None,
        }
    }

    fn empty(status: u16) -> Self {
        Self {
            status,
            body: None,
            retry_after: None,
        }
    }
}

/// A request, read whole.
#[derive(Debug)]
struct Call {
    route: Route,
    path: String,
    query: Vec<(String, String)>,
    authorization: Option<String>,
    body: Bytes,
}

impl Call {
    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The last path segment.
    fn last_segment(&self) -> &str {
        self.path.trim_matches('/').rsplit('/').next().unwrap_or("")
    }
}

async fn handle(
    shared: Arc<Shared>,
    close: Arc<Notify>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let route = route_of(request.method(), request.uri().path());
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(parse_form).unwrap_or_default();
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let call = Call {
        route,
        path,
        query,
        authorization,
        body,
    };
    let fault = {
        let mut state = shared.lock();
        *state.counts.entry(route).or_insert(0) += 1;
        match state.faults.get_mut(&route) {
            Some((fault, times)) if *times > 0 => {
                *times -= 1;
                Some(fault.clone())
            }
            _ => None,
        }
    };
    let answer = match fault {
        Some(Fault::Close) => {
            close.notify_one();
            std::future::pending::<()>().await;
            unreachable!("the connection is dropped")
        }
        Some(Fault::Status {
            status,
            code,
            retry_after,
        }) => {
            let mut answer = error(
                route.service(),
                status,
                &code,
                &format!("injected fault {code}"),
                None,
            );
            answer.retry_after = retry_after;
            answer
        }
        Some(Fault::DropAnswer) => {
            let _ = respond(&shared, &call);
            Answer::empty(502)
        }
        None => respond(&shared, &call),
    };
    Ok(into_response(answer))
}

fn into_response(answer: Answer) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if let Some(secs) = answer.retry_after {
        builder = builder.header(hyper::header::RETRY_AFTER, secs.to_string());
    }
    let body = match answer.body {
        Some(value) => {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(value.to_string())
        }
        None => Bytes::new(),
    };
    builder
        .header("x-request-id", uuid())
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The error body of `service`.
fn error(
    service: Service,
    status: u16,
    code: &str,
    message: &str,
    target: Option<(&str, &str)>,
) -> Answer {
    let trace = uuid();
    let body = match service {
        Service::Iam => json!({
            "errorCode": code,
            "errorMessage": message,
            "context": {
                "requestId": trace,
                "requestType": "incoming.OIDC_Token",
                "userAgent": "podvisor-test",
                "url": "https://iam.cloud.ibm.com",
                "instanceId": "iamid-test",
                "threadId": "1",
                "host": "iamid-test",
                "startTime": "01.01.2026 00:00:00:000 UTC",
                "endTime": "01.01.2026 00:00:00:001 UTC",
                "elapsedTime": "1",
                "locale": "en_US",
                "clusterName": "iam-id-test"
            }
        }),
        Service::Vpc => {
            let mut error = json!({
                "code": code,
                "message": message,
                "more_info": format!("https://cloud.ibm.com/docs/vpc?topic=vpc-rias-error-messages#{code}"),
            });
            if let Some((name, kind)) = target {
                error["target"] = json!({"name": name, "type": kind});
            }
            json!({"errors": [error], "trace": trace, "status_code": status})
        }
        Service::Tagging | Service::Search => json!({
            "errors": [{"code": code, "message": message, "level": "error"}],
            "trace": trace,
            "status_code": status,
        }),
    };
    Answer::json(status, body)
}

/// The answer to a request that passed the faults.
fn respond(shared: &Shared, call: &Call) -> Answer {
    let service = call.route.service();
    if call.route == Route::Token {
        return token(shared, call);
    }
    if call.route == Route::Other {
        return error(
            Service::Vpc,
            404,
            "not_found",
            "The requested URL was not found",
            None,
        );
    }
    let now = SystemTime::now();
    let live = call
        .authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Bearer "))
        .and_then(|t| shared.lock().tokens.get(t).copied())
        .is_some_and(|expiry| expiry > now);
    if !live {
        let code = if service == Service::Vpc {
            "not_authorized"
        } else {
            "unauthorized"
        };
        return error(
            service,
            401,
            code,
            "The request is not authorized: a valid IAM token is required",
            None,
        );
    }
    if service == Service::Vpc
        && let Some(problem) = version_problem(call)
    {
        return problem;
    }
    let mut state = shared.lock();
    let opts = &shared.options;
    match call.route {
        Route::CreateInstance => create_instance(opts, &mut state, call),
        Route::GetInstance => {
            let id = call.last_segment();
            match read_instance(opts, &mut state, id) {
                Some(body) => Answer::json(200, body),
                None => instance_not_found(id),
            }
        }
        Route::ListInstances => list_instances(opts, &mut state, call),
        Route::DeleteInstance => {
            let id = call.last_segment().to_owned();
            let polls = state.deleting_polls;
            match state.instances.get_mut(&id) {
                Some(held) if held.deleting_left.is_none() => {
                    if polls == 0 {
                        remove(&mut state, &id);
                    } else {
                        held.deleting_left = Some(polls);
                        held.view.status = "deleting".into();
                    }
                    Answer::empty(204)
                }
                // Deleting an instance being deleted is accepted again.
                Some(_) => Answer::empty(204),
                None => instance_not_found(&id),
            }
        }
        Route::GetImage => {
            let id = call.last_segment();
            match opts.images.iter().find(|(i, _)| i == id) {
                Some((id, arch)) => Answer::json(200, image_body(opts, id, arch)),
                None => error(
                    Service::Vpc,
                    404,
                    "image_not_found",
                    &format!("Image not found: {id}"),
                    Some(("id", "parameter")),
                ),
            }
        }
        Route::GetProfile => {
            let name = call.last_segment();
            match opts.profiles.iter().find(|p| p.name == name) {
                Some(p) => Answer::json(200, profile_body(opts, p)),
                None => error(
                    Service::Vpc,
                    404,
                    "instance_profile_not_found",
                    &format!("Instance profile not found: {name}"),
                    Some(("name", "parameter")),
                ),
            }
        }
        Route::ListProfiles => {
            let profiles: Vec<Value> = opts
                .profiles
                .iter()
                .map(|p| profile_body(opts, p))
                .collect();
            Answer::json(
                200,
                json!({
                    "first": {"href": format!("{BASE_HREF}/instance/profiles?limit=50")},
                    "limit": 50,
                    "total_count": profiles.len(),
                    "profiles": profiles,
                }),
            )
        }
        Route::GetSubnet => {
            let id = call.last_segment();
            if id == opts.subnet_id {
                Answer::json(200, subnet_body(opts, &state))
            } else {
                error(
                    Service::Vpc,
                    404,
                    "subnet_not_found",
                    &format!("Subnet not found: {id}"),
                    Some(("id", "parameter")),
                )
            }
        }
        Route::GetDedicatedHost | Route::GetDedicatedHostGroup => {
            let id = call.last_segment();
            let (known, kind) = if call.route == Route::GetDedicatedHost {
                (&opts.dedicated_hosts, "dedicated_host")
            } else {
                (&opts.dedicated_host_groups, "dedicated_host_group")
            };
            match known.iter().find(|(h, _)| h == id) {
                Some((id, zone)) if kind == "dedicated_host" => {
                    Answer::json(200, dedicated_host_body(opts, id, zone))
                }
                Some((id, zone)) => Answer::json(200, dedicated_host_group_body(opts, id, zone)),
                None => error(
                    Service::Vpc,
                    404,
                    &format!("{kind}_not_found"),
                    &format!("Dedicated host or group not found: {id}"),
                    Some(("id", "parameter")),
                ),
            }
        }
        Route::AttachTags => attach_tags(&mut state, call),
        Route::ListTags => list_tags(&state, call),
        Route::Search => search(opts, &mut state, call),
        Route::Token | Route::Other => unreachable!("answered above"),
    }
}

/// The `version` and `generation` query parameters every VPC call needs.
fn version_problem(call: &Call) -> Option<Answer> {
    let version_ok = call.query("version").is_some_and(|v| {
        let b = v.as_bytes();
        b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    });
    if !version_ok {
        return Some(error(
            Service::Vpc,
            400,
            "bad_request",
            "The version query parameter is required and must be a date (YYYY-MM-DD)",
            Some(("version", "parameter")),
        ));
    }
    if call.query("generation") != Some("2") {
        return Some(error(
            Service::Vpc,
            400,
            "bad_request",
            "The generation query parameter is required and must be 2",
            Some(("generation", "parameter")),
        ));
    }
    None
}

/// `POST /identity/token`.
fn token(shared: &Shared, call: &Call) -> Answer {
    let form = parse_form(&String::from_utf8_lossy(&call.body));
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let valid = match get("grant_type") {
        Some("urn:ibm:params:oauth:grant-type:apikey") => match get("apikey") {
            Some(TEST_API_KEY) => true,
            Some(_) => {
                return error(
                    Service::Iam,
                    400,
                    "BXNIM0415E",
                    "Provided API key could not be found.",
                    None,
                );
            }
            None => {
                return error(
                    Service::Iam,
                    400,
                    "BXNIM0109E",
                    "Property missing or empty. Details: apikey",
                    None,
                );
            }
        },
        Some("urn:ibm:params:oauth:grant-type:cr-token") => {
            match (get("cr_token"), get("profile_id")) {
                (Some(TEST_CR_TOKEN), Some(TEST_PROFILE_ID)) => true,
                (None, _) => {
                    return error(
                        Service::Iam,
                        400,
                        "BXNIM0109E",
                        "Property missing or empty. Details: cr_token",
                        None,
                    );
                }
                (Some(TEST_CR_TOKEN), _) => {
                    return error(
                        Service::Iam,
                        400,
                        "BXNIM0415E",
                        "Provided trusted profile could not be found.",
                        None,
                    );
                }
                (Some(_), _) => {
                    return error(
                        Service::Iam,
                        400,
                        "BXNIM0415E",
                        "Provided compute resource token could not be validated.",
                        None,
                    );
                }
            }
        }
        _ => false,
    };
    if !valid {
        return error(
            Service::Iam,
            400,
            "BXNIM0109E",
            "Property missing or empty. Details: grant_type",
            None,
        );
    }
    let mut state = shared.lock();
    let ttl = state.token_ttl;
    let now = SystemTime::now();
    let iat = unix(now);
    let exp = unix(now + ttl);
    let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"20260101","alg":"RS256"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({
            "iam_id": "iam-ServiceId-podvisor-test",
            "id": "iam-ServiceId-podvisor-test",
            "realmid": "iam",
            "jti": uuid(),
            "identifier": "ServiceId-podvisor-test",
            "sub": "ServiceId-podvisor-test",
            "sub_type": "ServiceId",
            "account": {"valid": true, "bss": TEST_ACCOUNT},
            "iat": iat,
            "exp": exp,
            "iss": "https://iam.cloud.ibm.com/identity",
            "grant_type": get("grant_type"),
            "scope": "ibm openid",
            "client_id": "default",
            "acr": 1,
            "amr": ["pwd"],
        })
        .to_string(),
    );
    let signature = URL_SAFE_NO_PAD.encode(format!("podvisor-test-signature-{}", uuid()));
    let access_token = format!("{header}.{payload}.{signature}");
    state.tokens.insert(access_token.clone(), now + ttl);
    state.tokens_issued += 1;
    Answer::json(
        200,
        json!({
            "access_token": access_token,
            "refresh_token": "not_supported",
            "ims_user_id": 1_234_567,
            "token_type": "Bearer",
            "expires_in": ttl.as_secs(),
            "expiration": exp,
            "scope": "ibm openid",
        }),
    )
}

/// The href prefix of VPC resources.
const BASE_HREF: &str = "https://us-south.iaas.cloud.ibm.com/v1";

fn instance_not_found(id: &str) -> Answer {
    error(
        Service::Vpc,
        404,
        "not_found",
        &format!("Instance not found: {id}"),
        Some(("id", "parameter")),
    )
}

/// The region of a zone (`us-south-1` → `us-south`).
fn region(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(DEFAULT_REGION, |(r, _)| r)
}

fn crn(zone_or_region: &str, kind: &str, id: &str) -> String {
    format!("crn:v1:bluemix:public:is:{zone_or_region}:a/{TEST_ACCOUNT}::{kind}:{id}")
}

fn zone_ref(zone: &str) -> Value {
    json!({"href": format!("{BASE_HREF}/regions/{}/zones/{zone}", region(zone)), "name": zone})
}

fn resource_group_ref(id: &str) -> Value {
    json!({"href": format!("https://resource-controller.cloud.ibm.com/v2/resource_groups/{id}"), "id": id, "name": "Default"})
}

fn vpc_ref(opts: &ServerOptions) -> Value {
    let id = &opts.vpc_id;
    json!({
        "crn": crn(region(&opts.zone), "vpc", id),
        "href": format!("{BASE_HREF}/vpcs/{id}"),
        "id": id,
        "name": "podvisor-test-vpc",
        "resource_type": "vpc",
    })
}

fn subnet_ref(opts: &ServerOptions) -> Value {
    let id = &opts.subnet_id;
    json!({
        "crn": crn(&opts.zone, "subnet", id),
        "href": format!("{BASE_HREF}/subnets/{id}"),
        "id": id,
        "name": "podvisor-test-subnet",
        "resource_type": "subnet",
    })
}

fn dedicated_host_group_ref(id: &str, zone: &str) -> Value {
    json!({
        "crn": crn(zone, "dedicated-host-group", id),
        "href": format!("{BASE_HREF}/dedicated_host/groups/{id}"),
        "id": id,
        "name": format!("group-{id}"),
        "resource_type": "dedicated_host_group",
    })
}

fn supported_profiles(opts: &ServerOptions) -> Vec<Value> {
    opts.profiles
        .iter()
        .map(|p| json!({"href": format!("{BASE_HREF}/instance/profiles/{}", p.name), "name": p.name, "resource_type": "instance_profile"}))
        .collect()
}

/// A dedicated host, as `GET /dedicated_hosts/{id}` answers it.
fn dedicated_host_body(opts: &ServerOptions, id: &str, zone: &str) -> Value {
    let vcpu = json!({"architecture": "amd64", "count": 64, "manufacturer": "intel"});
    let group = opts
        .dedicated_host_groups
        .iter()
        .find(|(_, z)| z == zone)
        .map_or("0717-group-none", |(g, _)| g.as_str());
    json!({
        "available_memory": 512,
        "available_vcpu": vcpu,
        "created_at": "2026-01-01T00:00:00Z",
        "crn": crn(zone, "dedicated-host", id),
        "disks": [],
        "group": dedicated_host_group_ref(group, zone),
        "href": format!("{BASE_HREF}/dedicated_hosts/{id}"),
        "id": id,
        "instance_placement_enabled": true,
        "instances": [],
        "lifecycle_state": "stable",
        "memory": 512,
        "name": format!("host-{id}"),
        "numa": {"count": 1, "nodes": [{"available_vcpu": 64, "vcpu": 64}]},
        "profile": {"href": format!("{BASE_HREF}/dedicated_host/profiles/bx2d-host-152x608"), "name": "bx2d-host-152x608"},
        "provisionable": true,
        "resource_group": resource_group_ref(&opts.resource_group_id),
        "resource_type": "dedicated_host",
        "socket_count": 2,
        "state": "available",
        "supported_instance_profiles": supported_profiles(opts),
        "vcpu": vcpu,
        "zone": zone_ref(zone),
    })
}

/// A dedicated host group, as `GET /dedicated_host/groups/{id}` answers it.
fn dedicated_host_group_body(opts: &ServerOptions, id: &str, zone: &str) -> Value {
    json!({
        "class": "bx2d",
        "created_at": "2026-01-01T00:00:00Z",
        "crn": crn(zone, "dedicated-host-group", id),
        "dedicated_hosts": [],
        "family": "balanced",
        "href": format!("{BASE_HREF}/dedicated_host/groups/{id}"),
        "id": id,
        "name": format!("group-{id}"),
        "resource_group": resource_group_ref(&opts.resource_group_id),
        "resource_type": "dedicated_host_group",
        "supported_instance_profiles": supported_profiles(opts),
        "zone": zone_ref(zone),
    })
}

fn fixed(value: u64) -> Value {
    json!({"type": "fixed", "value": value})
}

fn enumeration(default: &Value, values: &[Value]) -> Value {
    json!({"type": "enum", "default": default, "values": values})
}

fn image_body(opts: &ServerOptions, id: &str, arch: &str) -> Value {
    let region = region(&opts.zone);
    json!({
        "allowed_use": {"api_version": "2025-12-01", "bare_metal_server": "true", "instance": "true"},
        "catalog_offering": {"managed": false},
        "created_at": "2026-01-01T00:00:00Z",
        "crn": crn(region, "image", id),
        "encryption": "none",
        "file": {"size": 10},
        "href": format!("{BASE_HREF}/images/{id}"),
        "id": id,
        "minimum_provisioned_size": 100,
        "name": format!("podvisor-podvm-{arch}"),
        "operating_system": {
            "allow_user_image_creation": true,
            "architecture": arch,
            "dedicated_host_only": false,
            "display_name": format!("Ubuntu Linux 24.04 LTS Noble Numbat ({arch})"),
            "family": "Ubuntu Linux",
            "href": format!("{BASE_HREF}/operating_systems/ubuntu-24-04-{arch}"),
            "name": format!("ubuntu-24-04-{arch}"),
            "user_data_format": "cloud_init",
            "vendor": "Canonical",
            "version": "24.04 LTS Noble Numbat",
        },
        "resource_group": resource_group_ref(&opts.resource_group_id),
        "resource_type": "image",
        "status": "available",
        "status_reasons": [],
        "user_data_format": "cloud_init",
        "visibility": "private",
        "zones": [zone_ref(&opts.zone)],
    })
}

fn profile_body(opts: &ServerOptions, p: &Profile) -> Value {
    let family = match p.name.split('-').next().unwrap_or("") {
        f if f.starts_with('c') => "compute",
        f if f.starts_with('g') => "gpu",
        _ => "balanced",
    };
    let mut body = json!({
        "availability_class": enumeration(&json!("standard"), &[json!("standard")]),
        "bandwidth": fixed(u64::from(p.vcpu) * 2000),
        "cluster_network_attachment_count": enumeration(&json!(0), &[json!(0)]),
        "confidential_compute_modes": enumeration(
            &json!("disabled"),
            &if p.architecture == "amd64" { vec![json!("disabled"), json!("sgx"), json!("tdx")] } else { vec![json!("disabled")] },
        ),
        "disks": [],
        "family": family,
        "href": format!("{BASE_HREF}/instance/profiles/{}", p.name),
        "memory": fixed(u64::from(p.memory_gib)),
        "name": p.name,
        "network_attachment_count": {"type": "range", "min": 1, "max": 5},
        "network_bandwidth_mode": fixed(0),
        "network_interface_count": {"type": "range", "min": 1, "max": 5},
        "os_architecture": enumeration(&json!(p.architecture), &[json!(p.architecture)]),
        "port_speed": fixed(16000),
        "reservation_terms": {"type": "enum", "values": ["one_year", "three_year"]},
        "resource_type": "instance_profile",
        "secure_boot_modes": enumeration(&json!(false), &[json!(false), json!(true)]),
        "status": "current",
        "supported_cluster_network_profiles": [],
        "threads_per_core": enumeration(&json!(2), &[json!(1), json!(2)]),
        "total_volume_bandwidth": {"type": "range", "default": 1000, "max": 8000, "min": 500, "step": 1},
        "vcpu_architecture": {"type": "fixed", "value": p.architecture},
        "vcpu_burst_limit": fixed(0),
        "vcpu_count": fixed(u64::from(p.vcpu)),
        "vcpu_manufacturer": {"type": "fixed", "value": if p.architecture == "s390x" { "ibm" } else { "intel" }},
        "vcpu_percentage": enumeration(&json!(100), &[json!(100)]),
        "volume_bandwidth_qos_modes": enumeration(&json!("pooled"), &[json!("pooled")]),
        "zones": [zone_ref(&opts.zone)],
    });
    // The real network_bandwidth_mode is an enum of modes.
    body["network_bandwidth_mode"] = enumeration(&json!("pooled"), &[json!("pooled")]);
    if p.gpu > 0 {
        body["gpu_count"] = fixed(u64::from(p.gpu));
        body["gpu_manufacturer"] = enumeration(&json!("nvidia"), &[json!("nvidia")]);
        body["gpu_model"] = enumeration(&json!("Tesla V100"), &[json!("Tesla V100")]);
        body["gpu_memory"] = fixed(16);
    }
    body
}

fn subnet_body(opts: &ServerOptions, state: &State) -> Value {
    let id = &opts.subnet_id;
    let total = 256;
    let used = opts.addresses.len() - state.free_addresses.len();
    json!({
        "available_ipv4_address_count": total - 5 - used,
        "created_at": "2026-01-01T00:00:00Z",
        "crn": crn(&opts.zone, "subnet", id),
        "href": format!("{BASE_HREF}/subnets/{id}"),
        "id": id,
        "ip_version": "ipv4",
        "ipv4_cidr_block": "127.19.0.0/24",
        "name": "podvisor-test-subnet",
        "network_acl": {
            "crn": crn(region(&opts.zone), "network-acl", "r006-acl-test"),
            "href": format!("{BASE_HREF}/network_acls/r006-acl-test"),
            "id": "r006-acl-test",
            "name": "podvisor-test-acl",
        },
        "resource_group": resource_group_ref(&opts.resource_group_id),
        "resource_type": "subnet",
        "routing_table": {
            "crn": crn(region(&opts.zone), "routing-table", "r006-rt-test"),
            "href": format!("{BASE_HREF}/vpcs/{}/routing_tables/r006-rt-test", opts.vpc_id),
            "id": "r006-rt-test",
            "name": "podvisor-test-routing-table",
            "resource_type": "routing_table",
        },
        "status": "available",
        "total_ipv4_address_count": total,
        "vpc": vpc_ref(opts),
        "zone": zone_ref(&opts.zone),
    })
}

/// A field of the prototype, by JSON pointer, as a string.
fn text<'a>(body: &'a Value, pointer: &str) -> Option<&'a str> {
    body.pointer(pointer).and_then(Value::as_str)
}

/// `POST /v1/instances`.
fn create_instance(opts: &ServerOptions, state: &mut State, call: &Call) -> Answer {
    let invalid = |message: &str, field: &str| {
        error(
            Service::Vpc,
            400,
            "validation_invalid_argument",
            message,
            Some((field, "field")),
        )
    };
    let Ok(body) = serde_json::from_slice::<Value>(&call.body) else {
        return error(
            Service::Vpc,
            400,
            "bad_request",
            "The request body is not valid JSON",
            None,
        );
    };
    if !body.is_object() {
        return invalid(
            "The instance prototype must be an object",
            "instance_prototype",
        );
    }
    let Some(image_id) = text(&body, "/image/id") else {
        return error(
            Service::Vpc,
            400,
            "validation_required_field_missing",
            "image is required (only creating by image is supported here)",
            Some(("image", "field")),
        );
    };
    let Some((_, image_arch)) = opts.images.iter().find(|(i, _)| i == image_id) else {
        return error(
            Service::Vpc,
            404,
            "image_not_found",
            &format!("Image not found: {image_id}"),
            Some(("image.id", "field")),
        );
    };
    let Some(profile_name) = text(&body, "/profile/name") else {
        return error(
            Service::Vpc,
            400,
            "validation_required_field_missing",
            "profile is required",
            Some(("profile", "field")),
        );
    };
    let Some(profile) = opts.profiles.iter().find(|p| p.name == profile_name) else {
        return error(
            Service::Vpc,
            404,
            "instance_profile_not_found",
            &format!("Instance profile not found: {profile_name}"),
            Some(("profile.name", "field")),
        );
    };
    if &profile.architecture != image_arch {
        return error(
            Service::Vpc,
            400,
            "validation_image_os_architecture_mismatch",
            &format!(
                "Image {image_id} ({image_arch}) does not support profile {profile_name} ({})",
                profile.architecture
            ),
            Some(("image.id", "field")),
        );
    }
    let Some(zone) = text(&body, "/zone/name") else {
        return error(
            Service::Vpc,
            400,
            "validation_required_field_missing",
            "zone is required",
            Some(("zone", "field")),
        );
    };
    if zone != opts.zone {
        return error(
            Service::Vpc,
            400,
            "invalid_zone",
            &format!("Zone not found or not in the region: {zone}"),
            Some(("zone.name", "field")),
        );
    }
    if let Some(target) = text(&body, "/placement_target/id") {
        let placeable = opts
            .dedicated_hosts
            .iter()
            .chain(&opts.dedicated_host_groups)
            .any(|(id, z)| id == target && z == zone);
        if !placeable {
            return error(
                Service::Vpc,
                404,
                "dedicated_host_not_found",
                &format!("Dedicated host or group {target} not found in zone {zone}"),
                Some(("placement_target.id", "field")),
            );
        }
    }
    if let Some(vpc) = text(&body, "/vpc/id")
        && vpc != opts.vpc_id
    {
        return error(
            Service::Vpc,
            404,
            "vpc_not_found",
            &format!("VPC not found: {vpc}"),
            Some(("vpc.id", "field")),
        );
    }
    let interface = body
        .get("primary_network_interface")
        .or_else(|| body.pointer("/primary_network_attachment/virtual_network_interface"));
    let Some(interface) = interface else {
        return error(
            Service::Vpc,
            400,
            "validation_required_field_missing",
            "primary_network_interface or primary_network_attachment is required",
            Some(("primary_network_interface", "field")),
        );
    };
    let Some(subnet) = text(interface, "/subnet/id") else {
        return error(
            Service::Vpc,
            400,
            "validation_required_field_missing",
            "subnet is required",
            Some(("primary_network_interface.subnet", "field")),
        );
    };
    if subnet != opts.subnet_id {
        return error(
            Service::Vpc,
            404,
            "subnet_not_found",
            &format!("Subnet not found: {subnet}"),
            Some(("primary_network_interface.subnet.id", "field")),
        );
    }
    for group in interface
        .get("security_groups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = text(group, "/id").unwrap_or("");
        if !opts.security_group_ids.iter().any(|g| g == id) {
            return error(
                Service::Vpc,
                404,
                "security_group_not_found",
                &format!("Security group not found: {id}"),
                Some(("primary_network_interface.security_groups", "field")),
            );
        }
    }
    for key in body
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = text(key, "/id").unwrap_or("");
        if !opts.key_ids.iter().any(|k| k == id) {
            return error(
                Service::Vpc,
                404,
                "key_not_found",
                &format!("Key not found: {id}"),
                Some(("keys", "field")),
            );
        }
    }
    if let Some(group) = text(&body, "/resource_group/id")
        && group != opts.resource_group_id
    {
        return error(
            Service::Vpc,
            400,
            "resource_group_not_found",
            &format!("Resource group not found: {group}"),
            Some(("resource_group.id", "field")),
        );
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && !n.ends_with('-')
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    let seq = state.next_seq;
    let id = format!(
        "0717_{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        seq & 0xfff,
        fastrand::u16(..0xfff),
        fastrand::u64(..1 << 48)
    );
    let name = match text(&body, "/name") {
        Some(n) if name_ok(n) => n.to_owned(),
        Some(n) => {
            return invalid(
                &format!(
                    "Invalid instance name '{n}': lowercase letters, digits and hyphens, starting with a letter, at most 63"
                ),
                "name",
            );
        }
        None => format!("podvisor-generated-{seq}"),
    };
    let boot_volume_name = match text(&body, "/boot_volume_attachment/volume/name") {
        Some(n) if name_ok(n) => n.to_owned(),
        Some(n) => {
            return invalid(
                &format!("Invalid volume name '{n}'"),
                "boot_volume_attachment.volume.name",
            );
        }
        None => format!("{name}-boot-{seq}"),
    };
    if state.instances.values().any(|h| h.view.name == name) {
        return error(
            Service::Vpc,
            400,
            "validation_unique_failed",
            &format!("Provided Name ({name}) is not unique"),
            Some(("name", "field")),
        );
    }
    if state
        .instances
        .values()
        .any(|h| h.view.boot_volume_name == boot_volume_name)
    {
        return error(
            Service::Vpc,
            400,
            "validation_unique_failed",
            &format!("Provided Name ({boot_volume_name}) is not unique"),
            Some(("boot_volume_attachment.volume.name", "field")),
        );
    }
    if state.free_addresses.is_empty() {
        return error(
            Service::Vpc,
            400,
            "subnet_insufficient_addresses",
            "The subnet has no free address",
            Some(("primary_network_interface.subnet.id", "field")),
        );
    }
    let reserved = state.free_addresses.remove(0);
    state.next_seq += 1;
    let user_data = text(&body, "/user_data").map(str::to_owned);
    let held = Held {
        view: ServerInstance {
            crn: crn(zone, "instance", &id),
            id: id.clone(),
            name,
            status: if state.pending_polls > 0 {
                "pending"
            } else {
                "running"
            }
            .into(),
            address: (state.pending_polls == 0).then_some(reserved),
            boot_volume_name,
            profile: profile.name.clone(),
            image_id: image_id.to_owned(),
            zone: zone.to_owned(),
            user_data,
            confidential_compute_mode: text(&body, "/confidential_compute_mode").map(str::to_owned),
            enable_secure_boot: body.get("enable_secure_boot").and_then(Value::as_bool),
            placement_target: body.get("placement_target").cloned(),
            tags: Vec::new(),
            metadata_service_enabled: body
                .pointer("/metadata_service/enabled")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            created_at: rfc3339(SystemTime::now()),
        },
        reserved,
        pending_left: state.pending_polls,
        deleting_left: None,
        indexed: Vec::new(),
        nic_id: format!("0717-nic-{seq:06}"),
        boot_volume_id: format!("r006-vol-{seq:06}"),
        boot_attachment_id: format!("0717-att-{seq:06}"),
        vni_id: body
            .get("primary_network_attachment")
            .map(|_| format!("0717-vni-{seq:06}")),
        ip_id: format!("0717-ip-{seq:06}"),
        seq,
    };
    // The create answers what it made, still pending (the reads count).
    let mut answer = instance_body(opts, &held, true);
    if held.pending_left == 0 {
        answer = instance_body(opts, &held, false);
    }
    state.create_bodies.push(body);
    state.instances.insert(id, held);
    Answer::json(201, answer)
}

/// One read of instance `id`: counts the read, then its body; `None` when
/// it is unknown or gone.
fn read_instance(opts: &ServerOptions, state: &mut State, id: &str) -> Option<Value> {
    let held = state.instances.get_mut(id)?;
    if let Some(left) = held.deleting_left {
        if left == 0 {
            remove(state, id);
            return None;
        }
        held.deleting_left = Some(left - 1);
        return Some(instance_body(opts, held, false));
    }
    if held.pending_left > 0 {
        held.pending_left -= 1;
        return Some(instance_body(opts, held, true));
    }
    held.view.status = "running".into();
    held.view.address = Some(held.reserved);
    Some(instance_body(opts, held, false))
}

/// Forgets instance `id`, freeing its address.
fn remove(state: &mut State, id: &str) {
    if let Some(held) = state.instances.remove(id) {
        state.free_addresses.push(held.reserved);
        state.free_addresses.sort_unstable();
    }
}

/// The full Instance body.
fn instance_body(opts: &ServerOptions, held: &Held, pending: bool) -> Value {
    let v = &held.view;
    let profile = opts
        .profiles
        .iter()
        .find(|p| p.name == v.profile)
        .cloned()
        .unwrap_or_else(|| Profile::new(&v.profile, 2, 8, "amd64", 0));
    let status = if held.deleting_left.is_some() {
        "deleting"
    } else if pending {
        "pending"
    } else {
        "running"
    };
    let address = if pending {
        Ipv4Addr::UNSPECIFIED
    } else {
        held.reserved
    };
    let href = format!("{BASE_HREF}/instances/{}", v.id);
    let primary_ip = json!({
        "address": address.to_string(),
        "href": format!("{BASE_HREF}/subnets/{}/reserved_ips/{}", opts.subnet_id, held.ip_id),
        "id": held.ip_id,
        "name": format!("{}-ip", v.name),
        "resource_type": "subnet_reserved_ip",
    });
    let nic = json!({
        "href": format!("{href}/network_interfaces/{}", held.nic_id),
        "id": held.nic_id,
        "name": "eth0",
        "primary_ip": primary_ip,
        "resource_type": "network_interface",
        "subnet": subnet_ref(opts),
    });
    let boot = json!({
        "device": {"id": format!("{}-vda", held.boot_attachment_id)},
        "href": format!("{href}/volume_attachments/{}", held.boot_attachment_id),
        "id": held.boot_attachment_id,
        "name": format!("{}-boot", v.name),
        "volume": {
            "crn": crn(&v.zone, "volume", &held.boot_volume_id),
            "href": format!("{BASE_HREF}/volumes/{}", held.boot_volume_id),
            "id": held.boot_volume_id,
            "name": v.boot_volume_name,
            "resource_type": "volume",
        },
    });
    let (lifecycle_state, health_state) = match status {
        "pending" => ("pending", "inapplicable"),
        "deleting" => ("deleting", "inapplicable"),
        _ => ("stable", "ok"),
    };
    let mut body = json!({
        "availability": {"class": "standard"},
        "availability_policy": {"host_failure": "restart", "preemption": "stop"},
        "bandwidth": profile.vcpu * 2000,
        "boot_volume_attachment": boot,
        "cluster_network_attachments": [],
        "confidential_compute_mode": v.confidential_compute_mode.as_deref().unwrap_or("disabled"),
        "created_at": v.created_at,
        "crn": v.crn,
        "disks": [],
        "enable_secure_boot": v.enable_secure_boot.unwrap_or(false),
        "health_reasons": [],
        "health_state": health_state,
        "href": href,
        "id": v.id,
        "image": {
            "crn": crn(region(&v.zone), "image", &v.image_id),
            "href": format!("{BASE_HREF}/images/{}", v.image_id),
            "id": v.image_id,
            "name": format!("podvisor-podvm-{}", profile.architecture),
            "resource_type": "image",
        },
        "lifecycle_reasons": [],
        "lifecycle_state": lifecycle_state,
        "memory": profile.memory_gib,
        "metadata_service": {
            "enabled": v.metadata_service_enabled,
            "protocol": "http",
            "response_hop_limit": 1,
        },
        "name": v.name,
        "network_attachments": [],
        "network_interfaces": [nic],
        "primary_network_interface": nic,
        "profile": {
            "href": format!("{BASE_HREF}/instance/profiles/{}", profile.name),
            "name": profile.name,
            "resource_type": "instance_profile",
        },
        "reservation_affinity": {"policy": "disabled", "pool": []},
        "resource_group": resource_group_ref(&opts.resource_group_id),
        "resource_type": "instance",
        "software_attachments": [],
        "startable": true,
        "status": status,
        "status_reasons": [],
        "threads_per_core": 2,
        "total_network_bandwidth": profile.vcpu * 2000,
        "total_volume_bandwidth": 1000,
        "vcpu": {
            "architecture": profile.architecture,
            "count": profile.vcpu,
            "manufacturer": if profile.architecture == "s390x" { "ibm" } else { "intel" },
            "percentage": 100,
        },
        "volume_attachments": [boot],
        "volume_bandwidth_qos_mode": "pooled",
        "vpc": vpc_ref(opts),
        "zone": zone_ref(&v.zone),
    });
    if let Some(vni) = &held.vni_id {
        let attachment = json!({
            "href": format!("{href}/network_attachments/{}", held.nic_id),
            "id": held.nic_id,
            "name": "eth0",
            "primary_ip": primary_ip,
            "resource_type": "instance_network_attachment",
            "subnet": subnet_ref(opts),
            "virtual_network_interface": {
                "crn": crn(&v.zone, "virtual-network-interface", vni),
                "href": format!("{BASE_HREF}/virtual_network_interfaces/{vni}"),
                "id": vni,
                "name": format!("{}-vni", v.name),
                "resource_type": "virtual_network_interface",
            },
        });
        body["network_attachments"] = json!([attachment]);
        body["primary_network_attachment"] = attachment;
    }
    if profile.gpu > 0 {
        body["gpu"] = json!({"count": profile.gpu, "manufacturer": "nvidia", "memory": 16, "model": "Tesla V100"});
    }
    if let Some(target) = &v.placement_target {
        body["placement_target"] = target.clone();
    }
    body
}

/// `GET /v1/instances` with `name`, `vpc.id`, `resource_group.id`, `limit`
/// and `start`.
fn list_instances(opts: &ServerOptions, state: &mut State, call: &Call) -> Answer {
    let limit = match call.query("limit").map(str::parse::<usize>) {
        None => 50.min(state.max_page),
        Some(Ok(n)) if (1..=100).contains(&n) => n.min(state.max_page),
        Some(_) => {
            return error(
                Service::Vpc,
                400,
                "validation_invalid_argument",
                "limit must be between 1 and 100",
                Some(("limit", "parameter")),
            );
        }
    };
    let mut held: Vec<(u64, String)> = state
        .instances
        .values()
        .filter(|h| call.query("name").is_none_or(|n| n == h.view.name))
        .filter(|_| call.query("vpc.id").is_none_or(|v| v == opts.vpc_id))
        .filter(|_| {
            call.query("resource_group.id")
                .is_none_or(|g| g == opts.resource_group_id)
        })
        .map(|h| (h.seq, h.view.id.clone()))
        .collect();
    held.sort_unstable();
    let total = held.len();
    // `start` is the id of the first instance of the page.
    let first = match call.query("start") {
        None => 0,
        Some(start) => match held.iter().position(|(_, id)| id == start) {
            Some(i) => i,
            None => {
                return error(
                    Service::Vpc,
                    400,
                    "validation_invalid_argument",
                    &format!("Invalid start token: {start}"),
                    Some(("start", "parameter")),
                );
            }
        },
    };
    let page: Vec<String> = held
        .iter()
        .skip(first)
        .take(limit)
        .map(|(_, id)| id.clone())
        .collect();
    let next = held.get(first + limit).map(|(_, id)| id.clone());
    let mut instances = Vec::new();
    for id in &page {
        if let Some(body) = read_instance(opts, state, id) {
            instances.push(body);
        }
    }
    let mut filters = String::new();
    for key in ["name", "vpc.id", "resource_group.id"] {
        if let Some(v) = call.query(key) {
            filters.push_str(&format!("&{key}={}", encode(v)));
        }
    }
    let mut body = json!({
        "first": {"href": format!("{BASE_HREF}/instances?limit={limit}{filters}")},
        "instances": instances,
        "limit": limit,
        "total_count": total,
    });
    if let Some(start) = next {
        body["next"] =
            json!({"href": format!("{BASE_HREF}/instances?limit={limit}{filters}&start={start}")});
    }
    Answer::json(200, body)
}

/// Whether `tag` is a tag IBM accepts: at most 128 characters of letters,
/// digits, spaces, `_ . - :`.
fn valid_tag(tag: &str) -> bool {
    !tag.trim().is_empty()
        && tag.chars().count() <= 128
        && tag
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '.' | '-' | ':'))
}

/// `POST /v3/tags/attach`.
fn attach_tags(state: &mut State, call: &Call) -> Answer {
    if call.query("tag_type").is_some_and(|t| t != "user") {
        return error(
            Service::Tagging,
            400,
            "invalid_tag_type",
            "Only user tags are supported here",
            None,
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&call.body) else {
        return error(
            Service::Tagging,
            400,
            "bad_request",
            "The request body is not valid JSON",
            None,
        );
    };
    let mut names: Vec<String> = body
        .get("tag_names")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    if let Some(one) = text(&body, "/tag_name") {
        names.push(one.to_owned());
    }
    if names.is_empty() {
        return error(
            Service::Tagging,
            400,
            "bad_request",
            "tag_names is required",
            None,
        );
    }
    if let Some(bad) = names.iter().find(|t| !valid_tag(t)) {
        return error(
            Service::Tagging,
            400,
            "invalid_tag_name",
            &format!(
                "The tag name '{bad}' is not valid: at most 128 characters of letters, digits, spaces, '_', '.', '-' and ':'"
            ),
            None,
        );
    }
    let Some(resources) = body.get("resources").and_then(Value::as_array) else {
        return error(
            Service::Tagging,
            400,
            "bad_request",
            "resources is required",
            None,
        );
    };
    let visible_after = state.searches + u64::from(state.search_lag);
    let mut results = Vec::new();
    for resource in resources {
        let crn = text(resource, "/resource_id").unwrap_or("").to_owned();
        let held = state
            .instances
            .values_mut()
            .find(|h| h.view.crn == crn && h.deleting_left.is_none());
        match held {
            Some(held) => {
                for name in &names {
                    let name = name.trim().to_lowercase();
                    if !held.view.tags.contains(&name) {
                        held.view.tags.push(name.clone());
                        held.indexed.push((name, visible_after));
                    }
                }
                results.push(json!({"resource_id": crn, "is_error": false}));
            }
            None => results.push(json!({
                "resource_id": crn,
                "is_error": true,
                "message": format!("The resource {crn} cannot be found or you are not authorized to tag it."),
                "code": "not_found",
            })),
        }
    }
    Answer::json(200, json!({"results": results}))
}

/// `GET /v3/tags?attached_to=`.
fn list_tags(state: &State, call: &Call) -> Answer {
    let offset: usize = call
        .query("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    let limit: usize = call
        .query("limit")
        .and_then(|o| o.parse().ok())
        .unwrap_or(100);
    let mut tags: Vec<String> = match call.query("attached_to") {
        Some(crn) => state
            .instances
            .values()
            .find(|h| h.view.crn == crn)
            .map(|h| h.view.tags.clone())
            .unwrap_or_default(),
        None => state
            .instances
            .values()
            .flat_map(|h| h.view.tags.clone())
            .collect(),
    };
    tags.sort();
    tags.dedup();
    let total = tags.len();
    let items: Vec<Value> = tags
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|name| json!({"name": name}))
        .collect();
    Answer::json(
        200,
        json!({"total_count": total, "offset": offset, "limit": limit, "items": items}),
    )
}

/// One term of a search query.
#[derive(Debug)]
enum Term {
    Type(String),
    Tag(String),
    Name(String),
    Crn(String),
}

/// Parses the Lucene subset `field:value [AND field:value]…` (values
/// optionally quoted) over `type`, `tags`, `name` and `crn`.
fn parse_query(query: &str) -> Result<Vec<Term>, String> {
    let mut terms = Vec::new();
    let query = query.trim();
    if query.is_empty() || query == "*" {
        return Ok(terms);
    }
    for part in query.split(" AND ") {
        let part = part.trim();
        let (field, value) = part
            .split_once(':')
            .ok_or_else(|| format!("unsupported query term '{part}'"))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value)
            .replace("\\\"", "\"")
            .replace("\\:", ":");
        terms.push(match field.trim() {
            "type" => Term::Type(value),
            "tags" => Term::Tag(value.to_lowercase()),
            "name" => Term::Name(value),
            "crn" => Term::Crn(value),
            other => return Err(format!("unsupported query field '{other}'")),
        });
    }
    Ok(terms)
}

/// `POST /v3/resources/search`.
fn search(opts: &ServerOptions, state: &mut State, call: &Call) -> Answer {
    state.searches += 1;
    let searches = state.searches;
    let limit = match call.query("limit").map(str::parse::<usize>) {
        None => 10.min(state.max_page),
        Some(Ok(n)) if (1..=1000).contains(&n) => n.min(state.max_page),
        Some(_) => {
            return error(
                Service::Search,
                400,
                "bad_request",
                "limit must be between 1 and 1000",
                None,
            );
        }
    };
    let Ok(body) = serde_json::from_slice::<Value>(&call.body) else {
        return error(
            Service::Search,
            400,
            "bad_request",
            "The request body is not valid JSON",
            None,
        );
    };
    let cursor = match text(&body, "/search_cursor") {
        Some(c) => match state.cursors.get(c) {
            Some(cursor) => cursor.clone(),
            None => {
                return error(
                    Service::Search,
                    400,
                    "bad_request",
                    "The search cursor is not valid or has expired",
                    None,
                );
            }
        },
        None => Cursor {
            query: text(&body, "/query").unwrap_or("*").to_owned(),
            fields: body
                .get("fields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            offset: 0,
        },
    };
    let terms = match parse_query(&cursor.query) {
        Ok(t) => t,
        Err(e) => {
            return error(
                Service::Search,
                400,
                "bad_request",
                &format!("Invalid query: {e}"),
                None,
            );
        }
    };
    let mut held: Vec<&Held> = state.instances.values().collect();
    held.sort_by_key(|h| h.seq);
    let matching: Vec<Value> = held
        .into_iter()
        .filter_map(|h| {
            let tags: Vec<&str> = h
                .indexed
                .iter()
                .filter(|(_, after)| searches > *after)
                .map(|(t, _)| t.as_str())
                .collect();
            let hit = terms.iter().all(|term| match term {
                Term::Type(t) => t == "instance" || t == "*",
                Term::Tag(t) => tags.contains(&t.as_str()),
                Term::Name(n) => *n == h.view.name,
                Term::Crn(c) => *c == h.view.crn,
            });
            hit.then(|| search_item(opts, h, &tags, &cursor.fields))
        })
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip(cursor.offset)
        .take(limit)
        .cloned()
        .collect();
    let mut answer = json!({"limit": limit, "items": items});
    if items.len() == limit {
        let token = URL_SAFE_NO_PAD.encode(format!("cursor-{}", uuid()));
        state.cursors.insert(
            token.clone(),
            Cursor {
                offset: cursor.offset + limit,
                ..cursor
            },
        );
        answer["search_cursor"] = json!(token);
    }
    Answer::json(200, answer)
}

/// A search hit with `fields` (`crn` always; `*` for all).
fn search_item(opts: &ServerOptions, held: &Held, tags: &[&str], fields: &[String]) -> Value {
    let v = &held.view;
    let all = json!({
        "crn": v.crn,
        "name": v.name,
        "tags": tags,
        "type": "instance",
        "family": "is",
        "service_name": "is",
        "region": region(&v.zone),
        "account_id": TEST_ACCOUNT,
        "resource_group_id": opts.resource_group_id,
        "doc": {"status": v.status, "zone": v.zone, "profile": {"name": v.profile}},
    });
    let want = |f: &str| fields.iter().any(|w| w == f || w == "*");
    let mut item = serde_json::Map::new();
    item.insert("crn".into(), all["crn"].clone());
    let wanted: Vec<&str> = if fields.is_empty() {
        vec!["account_id"]
    } else {
        Vec::new()
    };
    if let Value::Object(map) = &all {
        for (key, value) in map {
            if want(key) || wanted.contains(&key.as_str()) {
                item.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(item)
}

/// Percent-decodes a form or query string into pairs.
fn parse_form(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A random UUID (v4-shaped).
fn uuid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        0x8000 | fastrand::u16(..0x4000),
        fastrand::u64(..1 << 48)
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` as RFC 3339 in UTC, to the second.
fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_decoding() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 3661)),
            "2026-01-01T01:01:01Z"
        );
        assert_eq!(decode("a%3Ab+c%"), "a:b c%");
        assert_eq!(
            parse_form("x=1&y=%2F"),
            vec![("x".into(), "1".into()), ("y".into(), "/".into())]
        );
        assert!(valid_tag("coco-pod-vm:cluster_1.a b"));
        assert!(!valid_tag("bad/tag"));
        assert!(!valid_tag(&"a".repeat(129)));
    }

    #[test]
    fn queries() {
        let terms = parse_query(r#"type:instance AND tags:"podvisor-node:n1" AND name:x"#).unwrap();
        assert_eq!(terms.len(), 3);
        assert!(matches!(&terms[1], Term::Tag(t) if t == "podvisor-node:n1"));
        assert!(parse_query("region:us-south").is_err());
    }
}
