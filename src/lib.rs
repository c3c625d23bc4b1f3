//! podvisor: the peer-pods node daemon.
//!
//! The Kata runtime asks for a sandbox VM over ttrpc ([`api::ttrpc`]); the
//! [`actors::supervisor::Supervisor`] routes each sandbox to its
//! [`actors::pod_vm::PodVm`] actor, which runs the journaled lifecycle of
//! `podvisor_state` and calls the cloud through the
//! [`actors::provider::ProviderActor`]. Operators watch it through the admin
//! endpoint ([`admin`]), gRPC ([`api::grpc`]) and Prometheus ([`metrics`]).
//!
//! # Errors
//!
//! One rule across the workspace: **a typed error where a caller branches on
//! it; a `String` only where a message is just reported.**
//!
//! - Typed: one `thiserror` enum per module, each variant a sentence that
//!   names the thing and the cause, with the fields a caller needs to
//!   decide — [`actors::supervisor::SupervisorError`], which `api` maps to
//!   the wire's status codes; [`podvisor_state::JournalError`];
//!   [`podvisor_providers::ProviderError`], which keeps the cloud's own error
//!   code beside its class. An error that wraps a cause keeps it as its
//!   [`source`](std::error::Error::source) and does not repeat it in its
//!   message.
//! - Reported: a message that is only logged, stored as a record's last
//!   error or sent back as a status text may be a `String`.
//!   [`podvisor_state::report()`] turns a typed error and its causes into one
//!   line for it.
//! - Nothing matches on an error's text.

pub mod actors;
pub mod admin;
pub mod api;
pub mod cli;
pub mod client;
pub mod connections;
pub mod daemon;
pub mod failpoints;
pub mod gc;
pub mod journal_health;
pub mod kata_annotations;
pub mod kubernetes;
pub mod logging;
pub mod metered;
pub mod metrics;
pub mod network;
pub mod pod_dirs;
pub mod probe;
pub mod protocols;
pub mod proxy;
pub mod pull_secrets;
pub mod startup;
pub mod tls;
pub mod userdata;
pub mod view;
