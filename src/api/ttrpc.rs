//! The Kata-facing socket: `hypervisor.Hypervisor` and `podvminfo.PodVMInfo`
//! over ttrpc, byte-compatible with Kata's shims.

use super::{API_VERSION, ApiError, HypervisorApi};
use crate::connections::{Gate, Gated};
use crate::protocols::ttrpc::{hypervisor, hypervisor_ttrpc, podvminfo, podvminfo_ttrpc};
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ttrpc::Code;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::{Server, TtrpcContext};

/// The Hypervisor service's wire name (`proto/hypervisor.proto`; Kata's
/// shims call `/hypervisor.Hypervisor/<method>`).
pub const HYPERVISOR: &str = "hypervisor.Hypervisor";
/// The PodVMInfo service's wire name (`proto/podvminfo.proto`; the
/// reference's Go clients call `/podvminfo.PodVMInfo/GetInfo`). build.rs
/// restores it in the generated code, where ttrpc-codegen camel-cases it.
pub const POD_VM_INFO: &str = "podvminfo.PodVMInfo";
/// The camel-cased name ttrpc-codegen makes of [`POD_VM_INFO`], still
/// answered as an alias.
pub const POD_VM_INFO_CAMEL_CASED: &str = "podvminfo.PodVmInfo";

/// The ttrpc status of an API error: its gRPC code and its message.
impl From<ApiError> for ttrpc::Error {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ApiError::NotFound(_) => Code::NOT_FOUND,
            ApiError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ApiError::ResourceExhausted(_) => Code::RESOURCE_EXHAUSTED,
            ApiError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ApiError::Unavailable(_) => Code::UNAVAILABLE,
            ApiError::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            ApiError::Internal(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// The caller's deadline, if it sent one.
fn deadline(ctx: &TtrpcContext) -> Option<Duration> {
    u64::try_from(ctx.timeout_nano)
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_nanos)
}

struct Service {
    api: HypervisorApi,
}

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for Service {
    async fn create_vm(
        &self,
        _ctx: &TtrpcContext,
        req: hypervisor::CreateVMRequest,
    ) -> ttrpc::Result<hypervisor::CreateVMResponse> {
        let r = self
            .api
            .create_vm(&req.id, &req.annotations, &req.networkNamespacePath)
            .await;
        HypervisorApi::count("ttrpc", "CreateVM", &r);
        r.map(|path| hypervisor::CreateVMResponse {
            agentSocketPath: path,
            ..Default::default()
        })
        .map_err(ttrpc::Error::from)
    }

    async fn start_vm(
        &self,
        _ctx: &TtrpcContext,
        req: hypervisor::StartVMRequest,
    ) -> ttrpc::Result<hypervisor::StartVMResponse> {
        let r = self.api.start_vm(&req.id).await;
        HypervisorApi::count("ttrpc", "StartVM", &r);
        r.map(|()| hypervisor::StartVMResponse::default())
            .map_err(ttrpc::Error::from)
    }

    async fn stop_vm(
        &self,
        _ctx: &TtrpcContext,
        req: hypervisor::StopVMRequest,
    ) -> ttrpc::Result<hypervisor::StopVMResponse> {
        let r = self.api.stop_vm(&req.id).await;
        HypervisorApi::count("ttrpc", "StopVM", &r);
        r.map(|()| hypervisor::StopVMResponse::default())
            .map_err(ttrpc::Error::from)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: hypervisor::VersionRequest,
    ) -> ttrpc::Result<hypervisor::VersionResponse> {
        HypervisorApi::count::<()>("ttrpc", "Version", &Ok(()));
        Ok(hypervisor::VersionResponse {
            version: API_VERSION.to_owned(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl podvminfo_ttrpc::PodVmInfo for Service {
    async fn get_info(
        &self,
        ctx: &TtrpcContext,
        req: podvminfo::GetInfoRequest,
    ) -> ttrpc::Result<podvminfo::GetInfoResponse> {
        let r = self
            .api
            .get_info(&req.PodName, &req.PodNamespace, req.Wait, deadline(ctx))
            .await;
        HypervisorApi::count("ttrpc", "GetInfo", &r);
        r.map(|id| podvminfo::GetInfoResponse {
            VMID: id,
            ..Default::default()
        })
        .map_err(ttrpc::Error::from)
    }
}

/// The Kata socket's mode: owner and group may connect, as containerd's
/// own socket (`0660`); who is in the group is the operator's choice
/// (`--socket-group`).
pub const SOCKET_MODE: u32 = 0o660;

/// A group by name or number, for `--socket-group`.
///
/// # Errors
/// "no group is called …" for an unknown name, or the lookup's own error
/// when the group database cannot be read.
pub fn resolve_group(group: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no group is called '{group}'")),
        Err(e) => Err(format!("cannot look up group '{group}': {e}")),
    }
}

/// The Kata socket's flag and variable, as its errors name them.
pub const SOCKET_FLAG: &str = "--socket (REMOTE_HYPERVISOR_ENDPOINT)";

/// Binds the socket (replacing a stale file), gives it [`SOCKET_MODE`] and
/// `group`, and starts serving at most `max_connections` connections at
/// once.
///
/// # Errors
/// Those of [`super::bind_control_socket`], starting with
/// `--socket (REMOTE_HYPERVISOR_ENDPOINT)` and the path; the same prefix
/// with ttrpc's reason when the server does not start.
pub async fn serve(
    path: &Path,
    group: Option<nix::unistd::Gid>,
    api: HypervisorApi,
    max_connections: u32,
) -> Result<Server, String> {
    let fail = |why: String| format!("{SOCKET_FLAG} {}: {why}", path.display());
    let listener = super::bind_control_socket(path, group, SOCKET_FLAG)?;
    let service = Arc::new(Service { api });
    // Earlier podvisor builds answered under the name Rust's codegen made up;
    // a client built against them keeps working.
    let mut camel_cased = podvminfo_ttrpc::create_pod_vm_info(service.clone());
    if let Some(info) = camel_cased.remove(POD_VM_INFO) {
        camel_cased.insert(POD_VM_INFO_CAMEL_CASED.to_owned(), info);
    }
    // Accepted here, not by ttrpc's own loop: that one retries a failed
    // accept at once and logs each failure, so out of file descriptors it
    // spins a core and floods the log. The gate pauses, logs sparingly and
    // caps the connections; ttrpc serves what it admits.
    let gate = Gate::new(
        crate::connections::TTRPC,
        path.display().to_string(),
        max_connections,
    );
    let mut server = Server::new()
        .add_listener(Listener::new(Gated::new(gate, listener)))
        .register_service(hypervisor_ttrpc::create_hypervisor(service.clone()))
        .register_service(podvminfo_ttrpc::create_pod_vm_info(service))
        .register_service(camel_cased);
    server.start().await.map_err(|e| fail(e.to_string()))?;
    Ok(server)
}
