//! podvisor: the peer-pods node daemon.
//!
//! The Kata runtime asks for a sandbox VM over ttrpc ([`api::ttrpc`]); the
//! [`actors::supervisor::Supervisor`] routes each sandbox to its
//! [`actors::pod_vm::PodVm`] actor, which runs the journaled lifecycle of
//! `podvisor_state` and calls the cloud through the
//! [`actors::provider::ProviderActor`]. Operators watch it through the admin
//! endpoint ([`admin`]), gRPC ([`api::grpc`]) and Prometheus ([`metrics`]).

pub mod actors;
pub mod admin;
pub mod api;
pub mod cli;
pub mod connections;
pub mod daemon;
pub mod failpoints;
pub mod gc;
pub mod journal_health;
pub mod limits;
pub mod logging;
pub mod metered;
pub mod metrics;
pub mod probe;
pub mod protocols;
pub mod proxy;
pub mod pull_secrets;
pub mod tls;
pub mod userdata;
pub mod view;
