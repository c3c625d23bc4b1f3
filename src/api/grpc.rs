//! The gRPC endpoint (tonic): `hypervisor.Hypervisor`, with the same
//! semantics as the ttrpc socket, and `podvisor.admin.v1.Admin`.

use super::{API_VERSION, ApiError, HypervisorApi};
use crate::protocols::grpc::admin::{self, admin_server};
use crate::protocols::grpc::hypervisor::{self as hv, hypervisor_server};
use crate::view::{InstanceView, ViewEvent};
use podvisor_state::InstanceRecord;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

fn status(e: ApiError) -> Status {
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

/// `hypervisor.Hypervisor` over gRPC.
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
            .map_err(status)
    }

    async fn start_vm(
        &self,
        req: Request<hv::StartVmRequest>,
    ) -> Result<Response<hv::StartVmResponse>, Status> {
        let r = self.api.start_vm(&req.into_inner().id).await;
        HypervisorApi::count("grpc", "StartVM", &r);
        r.map(|()| Response::new(hv::StartVmResponse {}))
            .map_err(status)
    }

    async fn stop_vm(
        &self,
        req: Request<hv::StopVmRequest>,
    ) -> Result<Response<hv::StopVmResponse>, Status> {
        let r = self.api.stop_vm(&req.into_inner().id).await;
        HypervisorApi::count("grpc", "StopVM", &r);
        r.map(|()| Response::new(hv::StopVmResponse {}))
            .map_err(status)
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
            .map(|i| i.ips.iter().map(|ip| ip.to_string()).collect())
            .unwrap_or_default(),
        attempts: r.attempts,
        last_error: r.last_error.clone().unwrap_or_default(),
        generation: r.generation,
        idempotency_token: r.token.clone().unwrap_or_default(),
        created_at_unix_ms: r.created_at,
        updated_at_unix_ms: r.updated_at,
    }
}

/// `podvisor.admin.v1.Admin`.
pub struct GrpcAdmin {
    /// The durable view.
    pub view: Arc<InstanceView>,
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
        Ok(Response::new(Box::pin(
            tokio_stream::iter(existing).chain(live),
        )))
    }
}
