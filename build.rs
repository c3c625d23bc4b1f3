//! Generates the API code: ttrpc (rust-protobuf) for the Kata-facing socket,
//! tonic (prost) for gRPC. Both from the same `.proto` files.

use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for proto in [
        "proto/hypervisor.proto",
        "proto/podvminfo.proto",
        "proto/admin.proto",
        "proto/kata/agent.proto",
        "proto/kata/health.proto",
        "proto/kata/oci.proto",
        "proto/kata/csi.proto",
        "proto/kata/types.proto",
    ] {
        println!("cargo:rerun-if-changed={proto}");
    }
    ttrpc(&out.join("ttrpc"));
    grpc(&out.join("grpc"));
}

/// ttrpc-codegen's pure-Rust parser needs no protoc.
fn ttrpc(dir: &Path) {
    generate_ttrpc(
        dir,
        &["proto/hypervisor.proto", "proto/podvminfo.proto"],
        "proto",
        &[
            "hypervisor",
            "hypervisor_ttrpc",
            "podvminfo",
            "podvminfo_ttrpc",
        ],
    );
    // The Kata agent protocol, as Kata defines it (proto/kata/README.md):
    // the agent proxy decodes CreateContainer, the tests' fake agent serves
    // it all.
    generate_ttrpc(
        &dir.join("kata"),
        &[
            "proto/kata/agent.proto",
            "proto/kata/health.proto",
            "proto/kata/oci.proto",
            "proto/kata/csi.proto",
            "proto/kata/types.proto",
        ],
        "proto/kata",
        &[
            "agent",
            "agent_ttrpc",
            "health",
            "health_ttrpc",
            "oci",
            "csi",
            "types",
        ],
    );
}

/// Generates `inputs` into `dir`, with a `mod.rs` declaring `names`.
fn generate_ttrpc(dir: &Path, inputs: &[&str], include: &str, names: &[&str]) {
    fs::create_dir_all(dir).expect("create the ttrpc output directory");
    ttrpc_codegen::Codegen::new()
        .out_dir(dir)
        .inputs(inputs)
        .include(include)
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            gen_mod: false,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc code generation failed");
    restore_service_names(dir, inputs);
    // The generated files open with inner attributes, which `include!`
    // refuses: move them onto wrapper modules.
    let mut modules = String::new();
    for name in names {
        let path = dir.join(format!("{name}.rs"));
        let text = fs::read_to_string(&path).expect("read generated code");
        let (mut attrs, mut body) = (String::new(), String::new());
        for line in text.lines() {
            let t = line.trim_start();
            if let Some(inner) = t.strip_prefix("#![") {
                // The generated code has no `unsafe`, so the workspace's
                // `forbid(unsafe_code)` holds for it too: a forbid cannot be
                // relaxed, and the generator's blanket allow would not compile.
                if !inner.contains("rustfmt") && !inner.contains("unsafe_code") {
                    attrs.push_str(&format!("#[{inner}\n"));
                }
            } else if !t.starts_with("//!") {
                body.push_str(line);
                body.push('\n');
            }
        }
        fs::write(&path, body).expect("write generated code");
        // Generated code is not ours to document or restyle: the workspace's
        // pedantic lints and its Debug rule do not apply to it.
        modules.push_str(&format!(
            "{attrs}#[allow(clippy::all, clippy::pedantic, missing_docs, missing_debug_implementations, unused_qualifications)]\npub mod {name} {{ include!({path:?}); }}\n"
        ));
    }
    fs::write(dir.join("mod.rs"), modules).expect("write the ttrpc module index");
}

/// ttrpc-codegen camel-cases service names (`PodVMInfo` becomes
/// `PodVmInfo`), but a ttrpc method path is `/<package>.<service as in the
/// .proto>/<method>` — what Go's generated clients call. Put each service's
/// own name back into the generated servers and clients.
fn restore_service_names(dir: &Path, inputs: &[&str]) {
    for proto in inputs {
        let text = fs::read_to_string(proto).expect("read a .proto");
        let words = |prefix: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(prefix))
                .filter_map(|rest| {
                    rest.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                        .find(|w| !w.is_empty())
                        .map(str::to_owned)
                })
                .collect()
        };
        let Some(package) = words("package ").into_iter().next() else {
            continue;
        };
        let stem = Path::new(proto)
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a .proto file name");
        let generated = dir.join(format!("{stem}_ttrpc.rs"));
        let Ok(mut code) = fs::read_to_string(&generated) else {
            continue; // no services in this file
        };
        for service in words("service ") {
            let wire = format!("\"{package}.{service}\"");
            let mut fixed = String::with_capacity(code.len());
            let mut rest = code.as_str();
            let opening = format!("\"{package}.");
            while let Some(at) = rest.find(&opening) {
                fixed.push_str(&rest[..at]);
                let after = &rest[at + opening.len()..];
                let end = after.find('"').map_or(after.len(), |e| e + 1);
                let quoted = &rest[at..at + opening.len() + end];
                if quoted.eq_ignore_ascii_case(&wire) {
                    fixed.push_str(&wire);
                } else {
                    fixed.push_str(quoted);
                }
                rest = &rest[at + quoted.len()..];
            }
            fixed.push_str(rest);
            code = fixed;
        }
        fs::write(&generated, code).expect("write generated code");
    }
}

/// tonic + prost; protoc comes from protoc-bin-vendored.
fn grpc(dir: &Path) {
    fs::create_dir_all(dir).expect("create the gRPC output directory");
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .expect("protoc-bin-vendored has a protoc for this platform");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .out_dir(dir)
        .compile_with_config(
            config,
            &["proto/hypervisor.proto", "proto/admin.proto"],
            &["proto"],
        )
        .expect("gRPC code generation failed");
}
