//! Generated protocol code.

/// ttrpc (rust-protobuf) for the Kata-facing socket: messages and services of
/// `hypervisor` and `podvminfo`, with async servers and clients.
pub mod ttrpc {
    include!(concat!(env!("OUT_DIR"), "/ttrpc/mod.rs"));

    /// The Kata agent protocol (`grpc.AgentService`, `grpc.Health`), from
    /// Kata's own definitions (`proto/kata/`): what the agent proxy decodes
    /// and what a kata agent serves.
    pub mod kata {
        include!(concat!(env!("OUT_DIR"), "/ttrpc/kata/mod.rs"));
    }
}

/// tonic (prost) for the gRPC endpoint.
pub mod grpc {
    /// `hypervisor.Hypervisor`, as on the ttrpc socket.
    #[allow(missing_docs, clippy::all)]
    pub mod hypervisor {
        include!(concat!(env!("OUT_DIR"), "/grpc/hypervisor.rs"));
    }
    /// `podvisor.admin.v1.Admin`.
    #[allow(missing_docs, clippy::all)]
    pub mod admin {
        include!(concat!(env!("OUT_DIR"), "/grpc/podvisor.admin.v1.rs"));
    }
}
