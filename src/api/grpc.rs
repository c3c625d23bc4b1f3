//! The gRPC endpoint (tonic): `hypervisor.Hypervisor`, with the same
//! semantics as the ttrpc socket, and `podvisor.admin.v1.Admin`.
//!
//! Who may call what: on the unix socket (`--grpc-socket`, mode 0660 and
//! `--socket-group`, as the Kata socket) both services, the Admin's
//! operator RPCs (the journal's quarantine) included; on TCP
//! (`--grpc-addr`) the read-only Admin (the operator RPCs answer
//! `PERMISSION_DENIED`), and `hypervisor.Hypervisor` only with a bearer
//! token (`--grpc-token-file`) — any local user and any hostNetwork pod can
//! reach a loopback port, and StopVM of another pod's sandbox, a pod's
//! initdata in a quarantined record or dropping one must not be theirs.

use super::{API_VERSION, ApiError, HypervisorApi};
use crate::actors::supervisor::{QuarantineDropped, Supervisor};
use crate::protocols::grpc::admin::{self, admin_server};
use crate::protocols::grpc::hypervisor::{self as hv, hypervisor_server};
use crate::view::{InstanceView, ViewEvent};
use actix::Addr;
use podvisor_state::{InstanceRecord, Journal, JournalError, QuarantinedRecord};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Shortest bearer token accepted: anything shorter can be guessed by a
/// local user with time on their hands.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token that `hypervisor.Hypervisor` over TCP requires
/// (`--grpc-token-file`). It is a secret: `Debug` redacts it and nothing
/// else shows it, so it cannot reach a log line or an error.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// Reads the token: the content of the file at `path` without the
    /// whitespace around it (a trailing newline from `echo` is not part of
    /// it). The error names the path and the cause, never the content.
    ///
    /// # Errors
    /// A message naming the path when the file cannot be read, is empty
    /// (after trimming), holds anything but visible ASCII, or is shorter
    /// than the least token length.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|why| format!("{}: {why}", path.display()))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let token = bytes.trim_ascii();
        if token.is_empty() {
            return Err(
                "is empty; put a random token in it (e.g. `head -c 32 /dev/urandom | base64`)"
                    .into(),
            );
        }
        // It travels in an HTTP/2 header, which holds visible ASCII only: a
        // token no client can send would lock everyone out in silence.
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(
                "holds characters other than visible ASCII (a header cannot carry them); use e.g. base64"
                    .into(),
            );
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "holds a token of {} characters; at least {MIN_TOKEN_LEN} are needed",
                token.len()
            ));
        }
        Ok(Self(token.into()))
    }

    /// True if `presented` is the token. Constant time in the content, so
    /// timing does not tell a caller how many leading bytes were right.
    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_ref().ct_eq(presented).into()
    }
}

/// Lets a call through only with `authorization: Bearer <token>`; anything
/// else is `UNAUTHENTICATED`, with a message that says what is missing and
/// never echoes what was sent.
#[derive(Clone, Debug)]
pub struct RequireBearer {
    token: BearerToken,
}

impl RequireBearer {
    /// Requires `token`.
    pub fn new(token: BearerToken) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for RequireBearer {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let refuse = |why: &str| {
            tracing::warn!(
                reason = why,
                "gRPC call to hypervisor.Hypervisor over TCP refused"
            );
            Err(Status::unauthenticated(format!(
                "hypervisor.Hypervisor over TCP needs the header `authorization: Bearer <token>` with the token of the daemon's --grpc-token-file: {why}"
            )))
        };
        let Some(value) = req.metadata().get("authorization") else {
            return refuse("the call has no authorization header");
        };
        let value = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110); the token is not.
        let token = match value.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
            _ => return refuse("the authorization header is not `Bearer <token>`"),
        };
        if !self.token.matches(token) {
            return refuse("the bearer token is not the daemon's");
        }
        Ok(req)
    }
}

/// True if `addr` is reachable only from this host.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The gRPC socket's flag and variable, as its errors name them.
pub const SOCKET_FLAG: &str = "--grpc-socket (PODVISOR_GRPC_SOCKET)";

/// Binds the gRPC unix socket at `path` for [`tonic`]'s
/// `serve_with_incoming`, as [`super::bind_control_socket`] binds every
/// control socket: exactly who may drive pod VMs through Kata may drive
/// them here. Must run inside Tokio.
///
/// # Errors
/// Those of [`super::bind_control_socket`], starting with
/// `--grpc-socket (PODVISOR_GRPC_SOCKET)` and the path.
pub fn bind_unix(
    path: &Path,
    group: Option<nix::unistd::Gid>,
) -> Result<tokio::net::UnixListener, String> {
    super::bind_control_socket(path, group, SOCKET_FLAG)
}

/// The gRPC status of an API error: its code and its message.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            ApiError::Internal(_) => Status::internal(message),
        }
    }
}

/// `hypervisor.Hypervisor` over gRPC.
#[derive(Debug)]
pub struct GrpcHypervisor {
    /// The shared semantics.
    pub api: HypervisorApi,
}

#[tonic::async_trait]
impl hypervisor_server::Hypervisor for GrpcHypervisor {
    async fn create_vm(
        &self,
        req: Request<hv::CreateVmRequest>,
    ) -> Result<Response<hv::CreateVmResponse>, Status> {
        let req = req.into_inner();
        let r = self
            .api
            .create_vm(&req.id, &req.annotations, &req.network_namespace_path)
            .await;
        HypervisorApi::count("grpc", "CreateVM", &r);
        r.map(|agent_socket_path| Response::new(hv::CreateVmResponse { agent_socket_path }))
            .map_err(Status::from)
    }

    async fn start_vm(
        &self,
        req: Request<hv::StartVmRequest>,
    ) -> Result<Response<hv::StartVmResponse>, Status> {
        let r = self.api.start_vm(&req.into_inner().id).await;
        HypervisorApi::count("grpc", "StartVM", &r);
        r.map(|()| Response::new(hv::StartVmResponse {}))
            .map_err(Status::from)
    }

    async fn stop_vm(
        &self,
        req: Request<hv::StopVmRequest>,
    ) -> Result<Response<hv::StopVmResponse>, Status> {
        let r = self.api.stop_vm(&req.into_inner().id).await;
        HypervisorApi::count("grpc", "StopVM", &r);
        r.map(|()| Response::new(hv::StopVmResponse {}))
            .map_err(Status::from)
    }

    async fn version(
        &self,
        _: Request<hv::VersionRequest>,
    ) -> Result<Response<hv::VersionResponse>, Status> {
        HypervisorApi::count::<()>("grpc", "Version", &Ok(()));
        Ok(Response::new(hv::VersionResponse {
            version: API_VERSION.to_owned(),
        }))
    }
}

/// Converts a record to its admin message.
pub fn instance_message(r: &InstanceRecord) -> admin::Instance {
    admin::Instance {
        sandbox_id: r.sandbox_id.clone(),
        pod_name: r.pod_name.clone(),
        pod_namespace: r.pod_namespace.clone(),
        state: r.state.as_str().to_owned(),
        instance_id: r
            .instance
            .as_ref()
            .map(|i| i.id.clone())
            .unwrap_or_default(),
        instance_name: r.instance_name.clone(),
        ips: r
            .instance
            .as_ref()
            .map(|i| i.ips.iter().map(std::string::ToString::to_string).collect())
            .unwrap_or_default(),
        attempts: r.attempts,
        last_error: r.last_error.clone().unwrap_or_default(),
        generation: r.generation,
        idempotency_token: r.token.clone().unwrap_or_default(),
        created_at_unix_ms: r.created_at,
        updated_at_unix_ms: r.updated_at,
    }
}

/// Converts a quarantine entry to its admin message (the bytes as stored).
pub fn quarantined_message(r: QuarantinedRecord) -> admin::QuarantinedRecord {
    admin::QuarantinedRecord {
        id: r.id,
        key: r.key,
        reason: r.reason,
        quarantined_at_unix_ms: r.quarantined_at,
        bytes: r.bytes,
    }
}

/// Which Admin RPCs an endpoint serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAccess {
    /// All of them: the unix socket (`--grpc-socket`, mode 0660), which only
    /// its owner and `--socket-group` reach.
    Operator,
    /// The read-only ones: TCP (`--grpc-addr`), which every local user
    /// reaches. The operator RPCs (ListQuarantined, DropQuarantined) answer
    /// `PERMISSION_DENIED`, naming the unix socket to use instead.
    ReadOnly {
        /// The daemon's `--grpc-socket`.
        grpc_socket: PathBuf,
    },
}

/// `podvisor.admin.v1.Admin`.
pub struct GrpcAdmin {
    /// The durable view.
    pub view: Arc<InstanceView>,
    /// Turns `true` at shutdown: every watch stream ends then, since the
    /// server's graceful stop waits for the streams open on it.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The journal, for its quarantine.
    pub journal: Arc<dyn Journal>,
    /// Told when a quarantined record is dropped: the GC spares the
    /// instances of quarantined sandboxes.
    pub supervisor: Addr<Supervisor>,
    /// What this endpoint may serve.
    pub access: AdminAccess,
}

impl std::fmt::Debug for GrpcAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAdmin")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl GrpcAdmin {
    /// `Ok` if this endpoint serves the operator RPC `rpc`; otherwise
    /// `PERMISSION_DENIED`, saying where to call it.
    fn require_operator(&self, rpc: &str) -> Result<(), Status> {
        match &self.access {
            AdminAccess::Operator => Ok(()),
            AdminAccess::ReadOnly { grpc_socket } => {
                tracing::info!(rpc, "operator RPC over --grpc-addr refused");
                Err(Status::permission_denied(operator_only(rpc, grpc_socket)))
            }
        }
    }
}

/// Why `rpc` is refused on `--grpc-addr`, and where to call it instead.
fn operator_only(rpc: &str, grpc_socket: &Path) -> String {
    format!(
        "{rpc} is an operator RPC: the journal's quarantine holds pods' initdata, so it is served only on the daemon's unix socket (--grpc-socket, mode 0660: root and the --socket-group), not on --grpc-addr, which every local user can reach; call it on unix://{}",
        grpc_socket.display()
    )
}

/// The status of a journal error met while doing `action` to the
/// quarantine: its whole cause chain, and what to do.
fn journal_status(action: &str, e: &JournalError) -> Status {
    let message = format!(
        "Cannot {action} the journal's quarantine: {}; retry, and if it keeps failing see /livez and the daemon's log (a full or failing disk under --state-dir)",
        podvisor_state::report(e)
    );
    match e.cause() {
        JournalError::Io { .. } | JournalError::Integrity(_) => Status::unavailable(message),
        JournalError::Open { .. } | JournalError::Shared(_) => Status::internal(message),
    }
}

/// The status of a blocking journal task that did not finish.
fn unfinished(action: &str, e: &tokio::task::JoinError) -> Status {
    Status::internal(format!(
        "The task to {action} the journal's quarantine did not finish ({e}); retry, and see the daemon's log"
    ))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<admin::InstanceEvent, Status>> + Send>>;

fn event(kind: admin::instance_event::Kind, r: &InstanceRecord) -> admin::InstanceEvent {
    admin::InstanceEvent {
        kind: kind as i32,
        instance: Some(instance_message(r)),
    }
}

#[tonic::async_trait]
impl admin_server::Admin for GrpcAdmin {
    async fn list_instances(
        &self,
        _: Request<admin::ListInstancesRequest>,
    ) -> Result<Response<admin::ListInstancesResponse>, Status> {
        let instances = self.view.list().iter().map(instance_message).collect();
        Ok(Response::new(admin::ListInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        req: Request<admin::GetInstanceRequest>,
    ) -> Result<Response<admin::Instance>, Status> {
        let id = req.into_inner().sandbox_id;
        self.view
            .get(&id)
            .map(|r| Response::new(instance_message(&r)))
            .ok_or_else(|| Status::not_found(format!("Sandbox {id} is not known")))
    }

    type WatchInstancesStream = EventStream;

    async fn watch_instances(
        &self,
        req: Request<admin::WatchInstancesRequest>,
    ) -> Result<Response<Self::WatchInstancesStream>, Status> {
        use admin::instance_event::Kind;
        // Subscribe first so nothing between the snapshot and the stream is lost.
        let updates = tokio_stream::wrappers::BroadcastStream::new(self.view.subscribe());
        let existing: Vec<_> = if req.into_inner().include_existing {
            self.view
                .list()
                .iter()
                .map(|r| Ok(event(Kind::Updated, r)))
                .collect()
        } else {
            Vec::new()
        };
        let live = updates.map(|item| match item {
            Ok(ViewEvent::Updated(r)) => Ok(event(Kind::Updated, &r)),
            Ok(ViewEvent::Removed(r)) => Ok(event(Kind::Removed, &r)),
            Err(e) => Err(Status::data_loss(format!(
                "The watcher fell behind and missed events: {e}"
            ))),
        });
        // `None` once shutdown begins: the stream ends there, with an OK
        // status, instead of holding the server's stop up.
        let shutdown = tokio_stream::wrappers::WatchStream::new(self.stop.clone())
            .filter(|stop| *stop)
            .map(|_| None);
        let events = tokio_stream::iter(existing)
            .chain(live)
            .map(Some)
            .merge(shutdown)
            .take_while(Option::is_some)
            .filter_map(|event| event);
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_quarantined(
        &self,
        _: Request<admin::ListQuarantinedRequest>,
    ) -> Result<Response<admin::ListQuarantinedResponse>, Status> {
        self.require_operator("ListQuarantined")?;
        let journal = self.journal.clone();
        let entries = tokio::task::spawn_blocking(move || journal.quarantined())
            .await
            .map_err(|e| unfinished("read", &e))?
            .map_err(|e| journal_status("read", &e))?;
        let records = entries.into_iter().map(quarantined_message).collect();
        Ok(Response::new(admin::ListQuarantinedResponse { records }))
    }

    async fn drop_quarantined(
        &self,
        req: Request<admin::DropQuarantinedRequest>,
    ) -> Result<Response<admin::DropQuarantinedResponse>, Status> {
        self.require_operator("DropQuarantined")?;
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "DropQuarantined needs the id of a quarantined record: ListQuarantined shows them",
            ));
        }
        let journal = self.journal.clone();
        let wanted = id.clone();
        let dropped = tokio::task::spawn_blocking(move || journal.drop_quarantined(&wanted))
            .await
            .map_err(|e| unfinished("drop a record from", &e))?
            .map_err(|e| journal_status("drop a record from", &e))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "No quarantined record has the id {id:?}: ListQuarantined shows the ids there are (was it dropped already?)"
                ))
            })?;
        // The supervisor re-reads the quarantine: the GC stops sparing the
        // sandbox's instance once no entry of it is left.
        let still = match self
            .supervisor
            .send(QuarantineDropped {
                sandbox_id: dropped.key.clone(),
            })
            .await
        {
            Ok(still) => still,
            // Shutting down: no GC runs; say what the journal holds.
            Err(_) => {
                let journal = self.journal.clone();
                let key = dropped.key.clone();
                tokio::task::spawn_blocking(move || journal.quarantined())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .is_none_or(|entries| entries.iter().any(|e| e.key == key))
            }
        };
        tracing::warn!(
            id = %dropped.id,
            key = %dropped.key,
            reason = %dropped.reason,
            sandbox_still_quarantined = still,
            "an operator dropped a quarantined journal record (DropQuarantined); its bytes are gone"
        );
        Ok(Response::new(admin::DropQuarantinedResponse {
            record: Some(quarantined_message(dropped)),
            sandbox_still_quarantined: still,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    const TOKEN: &str = "s3cr3t-t0ken-0123456789";

    fn call(auth: Option<&str>) -> Result<(), Status> {
        let token = BearerToken::from_bytes(format!("{TOKEN}\n").as_bytes()).unwrap();
        let mut req = Request::new(());
        if let Some(value) = auth {
            req.metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        RequireBearer::new(token).call(req).map(drop)
    }

    #[test]
    fn only_the_configured_bearer_token_is_let_through() {
        assert!(call(Some(&format!("Bearer {TOKEN}"))).is_ok());
        assert!(call(Some(&format!("bearer {TOKEN}"))).is_ok());
        for bad in [
            None,
            Some(TOKEN.to_owned()),
            Some(format!("Basic {TOKEN}")),
            Some(format!("Bearer {TOKEN}x")),
            Some(format!("Bearer {}", &TOKEN[1..])),
            Some("Bearer".to_owned()),
            Some(String::new()),
        ] {
            let status = call(bad.as_deref()).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
            assert!(status.message().contains("--grpc-token-file"), "{status:?}");
            assert!(!status.message().contains(TOKEN), "{status:?}");
        }
    }

    #[test]
    fn a_token_file_that_no_client_could_use_is_refused() {
        assert!(
            BearerToken::from_bytes(b" \n")
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            BearerToken::from_bytes(b"short")
                .unwrap_err()
                .contains("at least")
        );
        assert!(
            BearerToken::from_bytes("ünïcode-token-0123456789".as_bytes())
                .unwrap_err()
                .contains("visible ASCII")
        );
        let err = BearerToken::from_file(Path::new("/nonexistent/token")).unwrap_err();
        assert!(err.contains("/nonexistent/token"), "{err}");
    }

    #[test]
    fn the_token_is_never_shown() {
        let token = BearerToken::from_bytes(TOKEN.as_bytes()).unwrap();
        assert!(!format!("{token:?}").contains(TOKEN));
        assert!(!format!("{:?}", RequireBearer::new(token)).contains(TOKEN));
    }

    #[test]
    fn journal_errors_are_unavailable_and_say_what_to_do() {
        let e = JournalError::Io {
            operation: "flush",
            source: sled::Error::Io(std::io::Error::from_raw_os_error(28)),
        };
        let status = journal_status("drop a record from", &e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let message = status.message();
        assert!(
            message.starts_with(
                "Cannot drop a record from the journal's quarantine: Journal flush failed: "
            ) && message.contains("No space left")
                && message.contains("retry"),
            "{message}"
        );
        let refused = operator_only("DropQuarantined", Path::new("/run/podvisor/grpc.sock"));
        assert!(
            refused.starts_with("DropQuarantined is an operator RPC")
                && refused.ends_with("call it on unix:///run/podvisor/grpc.sock"),
            "{refused}"
        );
    }

    #[test]
    fn only_loopback_addresses_count_as_loopback() {
        for addr in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&addr.parse().unwrap()), "{addr}");
        }
        for addr in ["0.0.0.0:1", "[::]:1", "10.0.0.1:1", "[::ffff:10.0.0.1]:1"] {
            assert!(!is_loopback(&addr.parse().unwrap()), "{addr}");
        }
    }
}
