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
    // Generated code: not ours to document or restyle.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod hypervisor {
        include!(concat!(env!("OUT_DIR"), "/grpc/hypervisor.rs"));
    }
    /// `podvisor.admin.v1.Admin`.
    // Generated code: not ours to document or restyle.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod admin {
        include!(concat!(env!("OUT_DIR"), "/grpc/podvisor.admin.v1.rs"));
    }
}

#[cfg(test)]
mod tests {
    /// Every service the daemon serves or calls over ttrpc is named on the
    /// wire exactly as its `.proto` names it — `/<package>.<Service>/` —
    /// in the generated servers and clients, not as ttrpc-codegen
    /// camel-cases it (`PodVMInfo` became `PodVmInfo`, which no Go client
    /// calls).
    #[test]
    fn generated_ttrpc_code_uses_each_proto_s_own_service_names() {
        let generated = [
            (
                include_str!("../proto/podvminfo.proto"),
                include_str!(concat!(env!("OUT_DIR"), "/ttrpc/podvminfo_ttrpc.rs")),
            ),
            (
                include_str!("../proto/hypervisor.proto"),
                include_str!(concat!(env!("OUT_DIR"), "/ttrpc/hypervisor_ttrpc.rs")),
            ),
            (
                include_str!("../proto/kata/agent.proto"),
                include_str!(concat!(env!("OUT_DIR"), "/ttrpc/kata/agent_ttrpc.rs")),
            ),
            (
                include_str!("../proto/kata/health.proto"),
                include_str!(concat!(env!("OUT_DIR"), "/ttrpc/kata/health_ttrpc.rs")),
            ),
        ];
        let word = |proto: &str, prefix: &str| -> Vec<String> {
            proto
                .lines()
                .filter_map(|l| l.trim().strip_prefix(prefix))
                .filter_map(|rest| {
                    rest.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                        .next()
                        .map(str::to_owned)
                })
                .collect()
        };
        let mut checked = Vec::new();
        for (proto, code) in generated {
            let package = word(proto, "package ").remove(0);
            for service in word(proto, "service ") {
                let wire = format!("\"{package}.{service}\"");
                assert!(code.contains(&wire), "{wire} is not in the generated code");
                let quoted: Vec<&str> = code
                    .match_indices(&format!("\"{package}."))
                    .filter_map(|(at, _)| code[at + 1..].split('"').next())
                    .collect();
                for name in quoted {
                    assert!(
                        !name.eq_ignore_ascii_case(&wire[1..wire.len() - 1])
                            || name == &wire[1..wire.len() - 1],
                        "the generated code calls {name}, not {wire}"
                    );
                }
                checked.push(wire);
            }
        }
        assert_eq!(
            checked,
            [
                "\"podvminfo.PodVMInfo\"",
                "\"hypervisor.Hypervisor\"",
                "\"grpc.AgentService\"",
                "\"grpc.Health\""
            ]
        );
    }
}
