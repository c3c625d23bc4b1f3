//! CreateVM's annotations: the pod's identity and what it asks of its VM.
//!
//! Every malformed value is an error that names the annotation and the value;
//! nothing is silently dropped.

use podvisor_state::InstanceSpec;
use std::collections::HashMap;

/// Pod name (containerd).
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Pod namespace (containerd).
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// CRI-O's sandbox name, `k8s_<pod>_<namespace>_<uid>_<attempt>`.
pub const CRIO_SANDBOX_NAME: &str = "io.kubernetes.cri-o.SandboxName";
const HV: &str = "io.katacontainers.config.hypervisor.";
/// Explicit instance type.
pub const MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
/// vCPUs.
pub const DEFAULT_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
/// Memory in MiB.
pub const DEFAULT_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
/// GPU count.
pub const DEFAULT_GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";
/// GPU model.
pub const DEFAULT_GPU_MODEL: &str = "io.katacontainers.config.hypervisor.default_gpu_model";
/// Image override.
pub const IMAGE: &str = "io.katacontainers.config.hypervisor.image";
/// Initdata (base64 of gzip-compressed or plain TOML).
pub const CC_INIT_DATA: &str = "io.katacontainers.config.hypervisor.cc_init_data";

/// Longest vCPU count accepted (no cloud sells more).
const MAX_VCPUS: u32 = 4096;
/// Largest memory accepted, in MiB (64 TiB).
const MAX_MEMORY_MIB: u64 = 64 * 1024 * 1024;
/// Longest initdata annotation accepted (the reference caps user data near 64 KiB).
const MAX_INITDATA: usize = 64 * 1024;

/// What CreateVM's annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRequest {
    /// The pod's name.
    pub pod_name: String,
    /// The pod's namespace.
    pub pod_namespace: String,
    /// What the pod asks of its VM.
    pub spec: InstanceSpec,
    /// The initdata annotation, validated.
    pub initdata: Option<String>,
}

/// Reads the pod's identity and resource requests.
pub fn parse(annotations: &HashMap<String, String>) -> Result<SandboxRequest, String> {
    let (pod_name, pod_namespace) = pod_identity(annotations)?;
    let text = |key: &str| -> Result<Option<String>, String> {
        match annotations.get(key).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) if v.chars().any(char::is_control) => {
                Err(format!("annotation {key} has control characters"))
            }
            Some(v) => Ok(Some(v.to_owned())),
        }
    };
    let spec = InstanceSpec {
        instance_type: text(MACHINE_TYPE)?,
        vcpus: number(annotations, DEFAULT_VCPUS, 1, u64::from(MAX_VCPUS))?.map(|v| v as u32),
        memory_mib: number(annotations, DEFAULT_MEMORY, 1, MAX_MEMORY_MIB)?,
        gpus: number(annotations, DEFAULT_GPUS, 0, 1024)?.map(|v| v as u32),
        gpu_model: text(DEFAULT_GPU_MODEL)?,
        image: text(IMAGE)?,
    };
    let initdata = match text(CC_INIT_DATA)? {
        Some(data) => {
            validate_initdata(&data).map_err(|why| format!("annotation {CC_INIT_DATA}: {why}"))?;
            Some(data)
        }
        None => None,
    };
    // Unknown hypervisor annotations are not errors (Kata passes many), but
    // they are worth a debug line for someone wondering why one had no effect.
    for key in annotations.keys().filter(|k| k.starts_with(HV)) {
        if ![
            MACHINE_TYPE,
            DEFAULT_VCPUS,
            DEFAULT_MEMORY,
            DEFAULT_GPUS,
            DEFAULT_GPU_MODEL,
            IMAGE,
            CC_INIT_DATA,
        ]
        .contains(&key.as_str())
        {
            tracing::debug!(annotation = %key, "hypervisor annotation not used by podvisor");
        }
    }
    Ok(SandboxRequest {
        pod_name,
        pod_namespace,
        spec,
        initdata,
    })
}

/// The pod's name and namespace: containerd's annotations, else CRI-O's
/// `k8s_<pod>_<namespace>_<uid>_<attempt>` sandbox name.
fn pod_identity(annotations: &HashMap<String, String>) -> Result<(String, String), String> {
    let get = |k: &str| {
        annotations
            .get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    match (get(SANDBOX_NAME), get(SANDBOX_NAMESPACE)) {
        (Some(name), Some(ns)) => return Ok((name.to_owned(), ns.to_owned())),
        (Some(_), None) => {
            return Err(format!(
                "annotation {SANDBOX_NAMESPACE} is missing or empty"
            ));
        }
        (None, Some(_)) => return Err(format!("annotation {SANDBOX_NAME} is missing or empty")),
        (None, None) => {}
    }
    if let Some(crio) = get(CRIO_SANDBOX_NAME) {
        let parts: Vec<&str> = crio.split('_').collect();
        if parts.len() == 5 && parts[0] == "k8s" && !parts[1].is_empty() && !parts[2].is_empty() {
            return Ok((parts[1].to_owned(), parts[2].to_owned()));
        }
        return Err(format!(
            "annotation {CRIO_SANDBOX_NAME} is '{crio}', not k8s_<pod>_<namespace>_<uid>_<attempt>"
        ));
    }
    Err(format!(
        "annotations {SANDBOX_NAME} and {SANDBOX_NAMESPACE} are missing: the pod's name and namespace are required"
    ))
}

/// A whole number in `[min, max]`; Kata writes some as floats (`"2.0"`), which
/// are accepted when whole.
fn number(
    annotations: &HashMap<String, String>,
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, String> {
    let Some(raw) = annotations
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let value = match raw.parse::<u64>() {
        Ok(v) => v,
        // "2.0" (Kata writes floats for vCPUs), or a whole number too big
        // for u64: still a whole number, maybe out of range.
        Err(_) => match raw.parse::<f64>() {
            Ok(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 => {
                if f > max as f64 {
                    return Err(format!("annotation {key} is {raw}, outside {min}..={max}"));
                }
                f as u64
            }
            _ => return Err(format!("annotation {key} is '{raw}', not a whole number")),
        },
    };
    if value == 0 && min == 1 {
        // Kata's own default for "unset"; leave it to the provider.
        return Ok(None);
    }
    if value < min || value > max {
        return Err(format!(
            "annotation {key} is {value}, outside {min}..={max}"
        ));
    }
    Ok(Some(value))
}

/// Checks an initdata value: base64 (standard alphabet) of a gzip stream or
/// of plain TOML, within the size limit.
pub fn validate_initdata(data: &str) -> Result<(), String> {
    if data.len() > MAX_INITDATA {
        return Err(format!(
            "{} bytes, above the limit of {MAX_INITDATA}",
            data.len()
        ));
    }
    let decoded = base64_decode(data.trim()).ok_or("not valid base64")?;
    if decoded.is_empty() {
        return Err("empty after base64 decoding".into());
    }
    let gzip = decoded.starts_with(&[0x1f, 0x8b]);
    if !gzip && std::str::from_utf8(&decoded).is_err() {
        return Err("neither gzip nor UTF-8 text after base64 decoding".into());
    }
    Ok(())
}

/// Standard base64, padding optional (Kata and kubectl users write both).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![(SANDBOX_NAME, "web"), (SANDBOX_NAMESPACE, "default")]
    }

    fn with(extra: (&'static str, &'static str)) -> Result<SandboxRequest, String> {
        let mut p = base();
        p.push(extra);
        parse(&ann(&p))
    }

    #[test]
    fn identity_and_resources_are_read() {
        let mut p = base();
        p.extend([
            (MACHINE_TYPE, "m6a.xlarge"),
            (DEFAULT_VCPUS, "4"),
            (DEFAULT_MEMORY, "8192"),
            (DEFAULT_GPUS, "1"),
            (DEFAULT_GPU_MODEL, "a100"),
            (IMAGE, "ami-123"),
            (CC_INIT_DATA, "YWxnb3JpdGhtID0gInNoYTI1NiIK"),
        ]);
        let r = parse(&ann(&p)).unwrap();
        assert_eq!(
            (r.pod_name.as_str(), r.pod_namespace.as_str()),
            ("web", "default")
        );
        assert_eq!(r.spec.instance_type.as_deref(), Some("m6a.xlarge"));
        assert_eq!(r.spec.vcpus, Some(4));
        assert_eq!(r.spec.memory_mib, Some(8192));
        assert_eq!(r.spec.gpus, Some(1));
        assert_eq!(r.spec.gpu_model.as_deref(), Some("a100"));
        assert_eq!(r.spec.image.as_deref(), Some("ami-123"));
        assert!(r.initdata.is_some());
    }

    #[test]
    fn crio_sandbox_names_are_parsed() {
        let r = parse(&ann(&[(CRIO_SANDBOX_NAME, "k8s_nginx_prod_0b1c-uid_0")])).unwrap();
        assert_eq!(
            (r.pod_name.as_str(), r.pod_namespace.as_str()),
            ("nginx", "prod")
        );
        let e = parse(&ann(&[(CRIO_SANDBOX_NAME, "nginx")])).unwrap_err();
        assert!(
            e.contains("not k8s_<pod>_<namespace>_<uid>_<attempt>"),
            "{e}"
        );
    }

    #[test]
    fn missing_identity_names_the_annotation() {
        assert!(parse(&ann(&[])).unwrap_err().contains("are missing"));
        assert!(
            parse(&ann(&[(SANDBOX_NAME, "web")]))
                .unwrap_err()
                .contains(SANDBOX_NAMESPACE)
        );
        assert!(
            parse(&ann(&[(SANDBOX_NAMESPACE, "ns"), (SANDBOX_NAME, " ")]))
                .unwrap_err()
                .contains(SANDBOX_NAME)
        );
    }

    #[test]
    fn malformed_values_name_the_annotation_and_value() {
        for (key, value, why) in [
            (DEFAULT_VCPUS, "two", "not a whole number"),
            (DEFAULT_VCPUS, "1.5", "not a whole number"),
            (DEFAULT_VCPUS, "-1", "not a whole number"),
            (DEFAULT_VCPUS, "99999", "outside"),
            (DEFAULT_MEMORY, "8Gi", "not a whole number"),
            (DEFAULT_GPUS, "NaN", "not a whole number"),
            (CC_INIT_DATA, "!!!", "not valid base64"),
            (MACHINE_TYPE, "m6a\nlarge", "control characters"),
        ] {
            let e = with((key, value)).unwrap_err();
            assert!(e.contains(key) && e.contains(why), "{key}={value}: {e}");
        }
    }

    #[test]
    fn zero_and_whole_floats_follow_katas_conventions() {
        assert_eq!(with((DEFAULT_VCPUS, "0")).unwrap().spec.vcpus, None);
        assert_eq!(with((DEFAULT_VCPUS, "2.0")).unwrap().spec.vcpus, Some(2));
        assert_eq!(with((DEFAULT_GPUS, "0")).unwrap().spec.gpus, Some(0));
        assert_eq!(with((DEFAULT_MEMORY, "")).unwrap().spec.memory_mib, None);
    }

    #[test]
    fn base64_decoding_matches_known_vectors() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("H4sI").unwrap(), [0x1f, 0x8b, 0x08]);
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a-b_").is_none());
        assert!(validate_initdata("H4sIAAAAAAAA").is_ok());
        assert!(
            validate_initdata("/w==")
                .unwrap_err()
                .contains("neither gzip nor UTF-8")
        );
    }
}
