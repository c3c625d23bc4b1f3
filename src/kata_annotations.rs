//! The annotation keys Kata's shims put on CreateVM, and the pod VM's
//! agent sees on CreateContainer: the wire names, in one place for the API
//! (which parses them) and the agent proxy (which adds some), neither of
//! which depends on the other.

/// Pod name: containerd's key, which both shims fill. Under CRI-O the Go
/// shim copies CRI-O's sandbox name into it, `k8s_<pod>_<namespace>_<uid>_<attempt>`
/// (Kata `sandbox.go`, `setHypervisorConfigAnnotations`), and the pod name
/// is cut out of it, as the reference's `GetPodName` does; runtime-rs copies
/// CRI-O's plain `KubeName`.
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Pod namespace (containerd's key; both shims copy CRI-O's into it).
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// CRI-O's own sandbox name, `k8s_<pod>_<namespace>_<uid>_<attempt>`, read
/// when a client sends CRI-O's annotations instead of containerd's.
pub const CRIO_SANDBOX_NAME: &str = "io.kubernetes.cri-o.SandboxName";
/// The prefix of Kata's hypervisor configuration annotations.
pub const HYPERVISOR_PREFIX: &str = "io.katacontainers.config.hypervisor.";
/// Explicit instance type.
pub const MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
/// vCPUs, a decimal: the Go shim sends whole vCPUs, runtime-rs its `f32`
/// sandbox size as written by Rust (`"1.5"`, `"0.5"`). Rounded up to whole
/// vCPUs.
pub const DEFAULT_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
/// Memory in MiB, a decimal (rounded up to whole MiB).
pub const DEFAULT_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
/// GPU count, a whole number.
pub const DEFAULT_GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";
/// GPU model.
pub const DEFAULT_GPU_MODEL: &str = "io.katacontainers.config.hypervisor.default_gpu_model";
/// Image override.
pub const IMAGE: &str = "io.katacontainers.config.hypervisor.image";
/// Initdata as the runtime sends it: raw TOML text (the runtime decodes the
/// pod's gzip + base64 annotation first). The encoded form is accepted too.
pub const CC_INIT_DATA: &str = "io.katacontainers.config.hypervisor.cc_init_data";

/// Every annotation [`crate::api::annotations::parse`] reads.
pub const KNOWN: [&str; 10] = [
    SANDBOX_NAME,
    SANDBOX_NAMESPACE,
    CRIO_SANDBOX_NAME,
    MACHINE_TYPE,
    DEFAULT_VCPUS,
    DEFAULT_MEMORY,
    DEFAULT_GPUS,
    DEFAULT_GPU_MODEL,
    IMAGE,
    CC_INIT_DATA,
];
