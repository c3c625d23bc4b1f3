//! The hypervisor API's semantics, shared by the Kata-facing ttrpc socket
//! and the gRPC endpoint; each transport only maps requests and errors.

pub mod annotations;
pub mod grpc;
pub mod ttrpc;

use crate::actors::supervisor::{CreateVm, StartVm, StopVm, Supervisor, SupervisorError};
use crate::metrics;
use crate::view::{InstanceView, ViewEvent};
use actix::Addr;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The version string Version answers, as the reference does.
pub const API_VERSION: &str = "0.0.0";

/// Longest unix socket path the kernel binds (`sun_path` holds 108 bytes
/// with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why an API call failed; each transport maps it to its status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The sandbox (or pod) is not known.
    #[error("{0}")]
    NotFound(String),
    /// The sandbox exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The sandbox is in a state where this call makes no sense.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something failed that may pass (cloud, journal).
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or a dead actor.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC-style code name, for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::NotFound(_) => "not_found",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::ResourceExhausted(_) => "resource_exhausted",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<SupervisorError> for ApiError {
    /// The wire code of each domain error; the message is the error's own.
    fn from(e: SupervisorError) -> Self {
        let message = e.to_string();
        match e {
            SupervisorError::AlreadyExists { .. } | SupervisorError::BeingCreated { .. } => {
                ApiError::AlreadyExists(message)
            }
            SupervisorError::LimitReached { .. } | SupervisorError::NoVni { .. } => {
                ApiError::ResourceExhausted(message)
            }
            SupervisorError::NotKnown { .. } | SupervisorError::Lost { .. } => {
                ApiError::NotFound(message)
            }
            SupervisorError::Stopping { .. } => ApiError::FailedPrecondition(message),
            SupervisorError::CreateNotJournaled { .. }
            | SupervisorError::CreationFailed { .. }
            | SupervisorError::StartNotJournaled { .. }
            | SupervisorError::StopNotJournaled { .. } => ApiError::Unavailable(message),
            SupervisorError::ActorStopped { .. } => ApiError::Internal(message),
        }
    }
}

fn mailbox(e: actix::MailboxError) -> ApiError {
    ApiError::Internal(format!("The supervisor did not answer: {e}"))
}

/// Checks a sandbox id: it names a directory under the pods dir.
///
/// # Errors
/// [`ApiError::InvalidArgument`] when the id is empty, longer than 128
/// characters, `.` or `..`, or holds anything but letters, digits, `-`,
/// `_` and `.`.
pub fn validate_sandbox_id(id: &str) -> Result<(), ApiError> {
    crate::pod_dirs::check_sandbox_id(id).map_err(ApiError::InvalidArgument)
}

/// Refuses a control socket at `path` that something answers on: another
/// daemon serves it. [`bind_control_socket`] checks this again at bind
/// time; start-up checks it first, so a second daemon stops before it
/// writes a journal or keys of its own.
///
/// # Errors
/// A message starting with `flag` and the path, naming the flags a second
/// daemon on this host needs.
pub fn refuse_if_served(path: &std::path::Path, flag: &str) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{flag} {}: another process is serving on it: another podvisor? A second daemon on this host needs its own --socket, --grpc-socket, --state-dir, --pods-dir, --admin-addr and --grpc-addr",
            path.display()
        ));
    }
    Ok(())
}

/// Binds a control socket (the Kata socket, the gRPC socket) at `path`:
/// its directory is made, a stale file is replaced, a socket something
/// still answers on is refused (taking it over would cut its clients off
/// from a running daemon), and the socket gets [`ttrpc::SOCKET_MODE`] and
/// `group`, whatever the umask. Errors start with `flag` (`--socket
/// (REMOTE_HYPERVISOR_ENDPOINT)`) and the path. Must run inside Tokio.
///
/// # Errors
/// A message starting with `flag` and the path when the directory cannot
/// be created, another process serves on the socket, the stale file
/// cannot be removed, or binding, `chown` to `group` or `chmod` fails.
pub fn bind_control_socket(
    path: &std::path::Path,
    group: Option<nix::unistd::Gid>,
    flag: &str,
) -> Result<tokio::net::UnixListener, String> {
    let fail = |why: String| format!("{flag} {}: {why}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
    }
    refuse_if_served(path, flag)?;
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot remove the old socket: {e}"))),
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| fail(format!("cannot bind it: {e}")))?;
    // Bound under the daemon's umask (077): owner-only until widened here.
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| fail(format!("cannot give it group {gid}: {e}")))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(ttrpc::SOCKET_MODE))
            .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
    }
    Ok(listener)
}

/// The hypervisor API.
#[derive(Debug, Clone)]
pub struct HypervisorApi {
    /// Where calls go.
    supervisor: Addr<Supervisor>,
    /// For GetInfo.
    view: Arc<InstanceView>,
    /// `<pods-dir>/<id>/agent.ttrpc` is CreateVM's answer.
    pods_dir: PathBuf,
    /// The longest a `GetInfo(wait)` waits without a deadline of its own.
    max_wait: Duration,
}

impl HypervisorApi {
    /// The API over `supervisor`.
    pub fn new(
        supervisor: Addr<Supervisor>,
        view: Arc<InstanceView>,
        pods_dir: PathBuf,
        max_wait: Duration,
    ) -> Self {
        Self {
            supervisor,
            view,
            pods_dir,
            max_wait,
        }
    }

    /// Counts a call by method and outcome.
    pub fn count<T>(api: &'static str, method: &'static str, result: &Result<T, ApiError>) {
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::counter!(metrics::API_REQUESTS, "api" => api, "method" => method, "code" => code)
            .increment(1);
    }

    /// CreateVM: records the sandbox (no cloud call) and returns the agent
    /// socket path the shim will use.
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] for a bad sandbox id or annotations;
    /// [`ApiError::FailedPrecondition`] when the agent socket path would be
    /// too long for a unix socket; [`ApiError::Unavailable`] when the record
    /// cannot be journaled, or the pod directory cannot be created (the
    /// record stays `Pending` for a retry);
    /// [`ApiError::AlreadyExists`] or [`ApiError::ResourceExhausted`] from
    /// the supervisor (see its [`SupervisorError`] mapping);
    /// [`ApiError::Internal`] when the supervisor does not answer.
    pub async fn create_vm(
        &self,
        sandbox_id: &str,
        annotations: &HashMap<String, String>,
        netns: &str,
    ) -> Result<String, ApiError> {
        validate_sandbox_id(sandbox_id)?;
        let request = annotations::parse(annotations)
            .map_err(|why| ApiError::InvalidArgument(format!("Sandbox {sandbox_id}: {why}")))?;
        let pod_dir = self.pods_dir.join(sandbox_id);
        // A unix socket path holds at most 107 bytes (sun_path): a longer
        // one could never be bound, and the shim would wait for nothing.
        let socket_path = pod_dir.join("agent.ttrpc");
        let length = socket_path.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            return Err(ApiError::FailedPrecondition(format!(
                "Sandbox {sandbox_id}: its agent socket {} would be {length} bytes, above the {MAX_SOCKET_PATH} a unix socket path may have: shorten --pods-dir (PODS_DIR)",
                socket_path.display()
            )));
        }
        let (pod, ns) = (request.pod_name.clone(), request.pod_namespace.clone());
        self.supervisor
            .send(CreateVm {
                sandbox_id: sandbox_id.to_owned(),
                pod_name: request.pod_name,
                pod_namespace: request.pod_namespace,
                spec: request.spec,
                initdata: request.initdata,
                netns: netns.to_owned(),
            })
            .await
            .map_err(mailbox)??;
        // Only for a sandbox the supervisor accepted: a refused one leaves
        // nothing behind. Should this fail, the record stays `Pending`, and
        // the shim's retried CreateVM comes back here.
        // Owner-only whatever the umask: it holds the agent socket.
        let mut dirs = tokio::fs::DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        dirs.create(&pod_dir).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "Sandbox {sandbox_id}: cannot create its pod directory {}: {e}",
                pod_dir.display()
            ))
        })?;
        tracing::info!(sandbox = %sandbox_id, pod = %format!("{ns}/{pod}"), "sandbox created");
        Ok(socket_path.to_string_lossy().into_owned())
    }

    /// StartVM: returns once the pod VM runs and its agent endpoint answers.
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] for a bad sandbox id;
    /// [`ApiError::NotFound`] for a sandbox never created (or stopped);
    /// [`ApiError::FailedPrecondition`] while it is being stopped;
    /// [`ApiError::Unavailable`] when the create failed or the start cannot
    /// be journaled; [`ApiError::Internal`] when an actor does not answer.
    pub async fn start_vm(&self, sandbox_id: &str) -> Result<(), ApiError> {
        validate_sandbox_id(sandbox_id)?;
        self.supervisor
            .send(StartVm(sandbox_id.to_owned()))
            .await
            .map_err(mailbox)?
            .map_err(ApiError::from)
    }

    /// StopVM: acknowledges once the stop is journaled; deletion continues
    /// in the background. An unknown sandbox is already stopped.
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] for a bad sandbox id;
    /// [`ApiError::Unavailable`] when the stop cannot be journaled;
    /// [`ApiError::Internal`] when an actor does not answer.
    pub async fn stop_vm(&self, sandbox_id: &str) -> Result<(), ApiError> {
        validate_sandbox_id(sandbox_id)?;
        self.supervisor
            .send(StopVm(sandbox_id.to_owned()))
            .await
            .map_err(mailbox)?
            .map_err(ApiError::from)
    }

    /// The pod's instance id; with `wait`, waits until StartVM has one (up
    /// to `deadline`, else the configured maximum).
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] when the name or namespace is empty or
    /// not a Kubernetes name; without `wait`, [`ApiError::NotFound`] for an
    /// unknown pod and [`ApiError::FailedPrecondition`] for one without an
    /// instance yet; with it, [`ApiError::DeadlineExceeded`] when none comes
    /// in time and [`ApiError::Unavailable`] when the daemon shuts down.
    pub async fn get_info(
        &self,
        pod_name: &str,
        pod_namespace: &str,
        wait: bool,
        deadline: Option<Duration>,
    ) -> Result<String, ApiError> {
        if pod_name.is_empty() || pod_namespace.is_empty() {
            return Err(ApiError::InvalidArgument(
                "GetInfo needs PodName and PodNamespace".into(),
            ));
        }
        // Names that no pod can have are refused before they reach a log
        // line or an error message.
        if !annotations::is_pod_identity(pod_name, pod_namespace) {
            return Err(ApiError::InvalidArgument(format!(
                "GetInfo's PodName {} and PodNamespace {} are not a Kubernetes pod name and namespace",
                annotations::shown(pod_name),
                annotations::shown(pod_namespace)
            )));
        }
        let instance_of =
            |r: &podvisor_state::InstanceRecord| r.instance.as_ref().map(|i| i.id.clone());
        // Subscribe before looking, so a change in between is not missed.
        let mut events = self.view.subscribe();
        match self.view.find_pod(pod_name, pod_namespace) {
            Some(r) if instance_of(&r).is_some() => return Ok(instance_of(&r).unwrap_or_default()),
            Some(_) if !wait => {
                return Err(ApiError::FailedPrecondition(format!(
                    "Pod {pod_namespace}/{pod_name} has no instance yet"
                )));
            }
            None if !wait => {
                return Err(ApiError::NotFound(format!(
                    "Pod {pod_namespace}/{pod_name} is not known"
                )));
            }
            _ => {}
        }
        let limit = deadline.unwrap_or(self.max_wait).min(self.max_wait);
        let waiting = async {
            loop {
                match events.recv().await {
                    Ok(ViewEvent::Updated(r))
                        if r.pod_name == pod_name && r.pod_namespace == pod_namespace =>
                    {
                        if let Some(id) = instance_of(&r) {
                            return Ok(id);
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(id) = self
                            .view
                            .find_pod(pod_name, pod_namespace)
                            .as_ref()
                            .and_then(instance_of)
                        {
                            return Ok(id);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(ApiError::Unavailable("The daemon is shutting down".into()));
                    }
                }
            }
        };
        tokio::time::timeout(limit, waiting)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::DeadlineExceeded(format!(
                    "Pod {pod_namespace}/{pod_name} got no instance within {limit:?}"
                )))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_supervisor_error_keeps_its_message_and_gets_its_wire_code() {
        let id = || "sb1".to_owned();
        for (error, code) in [
            (
                SupervisorError::AlreadyExists {
                    sandbox_id: id(),
                    pod_namespace: "default".into(),
                    pod_name: "web".into(),
                    state: podvisor_state::State::Running,
                },
                "already_exists",
            ),
            (
                SupervisorError::BeingCreated { sandbox_id: id() },
                "already_exists",
            ),
            (
                SupervisorError::LimitReached { live: 2, limit: 2 },
                "resource_exhausted",
            ),
            (SupervisorError::NotKnown { sandbox_id: id() }, "not_found"),
            (SupervisorError::Lost { sandbox_id: id() }, "not_found"),
            (
                SupervisorError::CreateNotJournaled {
                    sandbox_id: id(),
                    reason: "disk full".into(),
                },
                "unavailable",
            ),
            (
                SupervisorError::ActorStopped { sandbox_id: id() },
                "internal",
            ),
            (
                SupervisorError::CreationFailed {
                    sandbox_id: id(),
                    reason: "no capacity".into(),
                },
                "unavailable",
            ),
            (
                SupervisorError::Stopping { sandbox_id: id() },
                "failed_precondition",
            ),
            (
                SupervisorError::StartNotJournaled {
                    sandbox_id: id(),
                    reason: "disk full".into(),
                },
                "unavailable",
            ),
            (
                SupervisorError::StopNotJournaled {
                    sandbox_id: id(),
                    reason: "Could not journal the stop: disk full".into(),
                },
                "unavailable",
            ),
        ] {
            let message = error.to_string();
            assert!(
                message.contains("sb1") || code == "resource_exhausted",
                "{message}"
            );
            let api = ApiError::from(error);
            assert_eq!(api.code(), code, "{message}");
            assert_eq!(api.to_string(), message);
        }
    }

    #[test]
    fn sandbox_ids_are_checked_with_reasons() {
        assert!(validate_sandbox_id(&"a1".repeat(32)).is_ok());
        assert!(validate_sandbox_id("sandbox_1.x-y").is_ok());
        for (bad, why) in [
            ("", "empty"),
            (".", "the pods dir itself"),
            ("..", "the pods dir's parent"),
            ("a/b", "may only hold"),
            ("a b", "may only hold"),
            ("ü", "may only hold"),
        ] {
            let e = validate_sandbox_id(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = validate_sandbox_id(&"a".repeat(129))
            .unwrap_err()
            .to_string();
        assert!(e.contains("129 characters"), "{e}");
    }
}
