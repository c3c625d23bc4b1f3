//! CreateVM's annotations: the pod's identity and what it asks of its VM.
//!
//! Both Kata shims always send the same nine keys, an unset one as `""`
//! (text) or `"0"` (numbers) (Kata `src/runtime/virtcontainers/remote.go`,
//! `CreateVM`; runtime-rs `crates/hypervisor/src/remote/inner.rs`,
//! `prepare_vm`). Every malformed value is an error that names the
//! annotation and the value; nothing is silently dropped.

use podvisor_podvm::initdata::{self, Initdata};
use podvisor_state::InstanceSpec;
use std::collections::HashMap;

pub use crate::kata_annotations::*;

/// Most vCPUs accepted (no cloud sells more).
const MAX_VCPUS: u64 = 4096;
/// Largest memory accepted, in MiB (64 TiB).
const MAX_MEMORY_MIB: u64 = 64 * 1024 * 1024;
/// Most GPUs accepted.
const MAX_GPUS: u64 = 1024;

/// What CreateVM's annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRequest {
    /// The pod's name.
    pub pod_name: String,
    /// The pod's namespace.
    pub pod_namespace: String,
    /// What the pod asks of its VM.
    pub spec: InstanceSpec,
    /// The pod's initdata, validated, in the form the pod VM receives
    /// (gzip + base64, see [`Initdata::encode`]).
    pub initdata: Option<String>,
}

/// Reads the pod's identity and resource requests.
///
/// # Errors
/// A message naming the annotation when the pod's name or namespace is
/// missing or not a valid Kubernetes name, a value has control characters,
/// a number is malformed or above its limit, or `cc_init_data` is not
/// valid initdata (see [`initdata_for_pod_vm`]).
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
        vcpus: number(annotations, DEFAULT_VCPUS, Rounding::Up, MAX_VCPUS)?.map(|v| v as u32),
        memory_mib: number(annotations, DEFAULT_MEMORY, Rounding::Up, MAX_MEMORY_MIB)?,
        gpus: number(annotations, DEFAULT_GPUS, Rounding::WholeOnly, MAX_GPUS)?.map(|v| v as u32),
        gpu_model: text(DEFAULT_GPU_MODEL)?,
        image: text(IMAGE)?,
    };
    let initdata = match annotations.get(CC_INIT_DATA) {
        Some(value) if !value.trim().is_empty() => Some(
            initdata_for_pod_vm(value)
                .map_err(|why| format!("annotation {CC_INIT_DATA}: {why}"))?,
        ),
        _ => None,
    };
    // Unknown hypervisor annotations are not errors (Kata passes many), but
    // they are worth a debug line for someone wondering why one had no effect.
    for key in annotations
        .keys()
        .filter(|k| k.starts_with(HYPERVISOR_PREFIX))
    {
        if !KNOWN.contains(&key.as_str()) {
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

/// The pod's name and namespace: containerd's annotations (with the pod
/// name cut out of a CRI-O sandbox name in them), else CRI-O's own
/// sandbox name.
fn pod_identity(annotations: &HashMap<String, String>) -> Result<(String, String), String> {
    let get = |k: &str| {
        annotations
            .get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    match (get(SANDBOX_NAME), get(SANDBOX_NAMESPACE)) {
        (Some(name), Some(ns)) => {
            let pod = match crio_sandbox_name(name) {
                Some((pod, crio_ns)) if crio_ns == ns => pod,
                _ => name,
            };
            check_pod_name(SANDBOX_NAME, pod)?;
            check_namespace(SANDBOX_NAMESPACE, ns)?;
            return Ok((pod.to_owned(), ns.to_owned()));
        }
        (Some(_), None) => {
            return Err(format!(
                "annotation {SANDBOX_NAMESPACE} is missing or empty"
            ));
        }
        (None, Some(_)) => return Err(format!("annotation {SANDBOX_NAME} is missing or empty")),
        (None, None) => {}
    }
    if let Some(crio) = get(CRIO_SANDBOX_NAME) {
        let (pod, ns) = crio_sandbox_name(crio).ok_or_else(|| {
            format!(
                "annotation {CRIO_SANDBOX_NAME} is {}, not k8s_<pod>_<namespace>_<uid>_<attempt>",
                shown(crio)
            )
        })?;
        check_pod_name(CRIO_SANDBOX_NAME, pod)?;
        check_namespace(CRIO_SANDBOX_NAME, ns)?;
        return Ok((pod.to_owned(), ns.to_owned()));
    }
    Err(format!(
        "annotations {SANDBOX_NAME} and {SANDBOX_NAMESPACE} are missing: the pod's name and namespace are required"
    ))
}

/// Longest pod name Kubernetes accepts (a DNS subdomain, RFC 1123).
const MAX_POD_NAME: usize = 253;
/// Longest namespace Kubernetes accepts (a DNS label, RFC 1123).
const MAX_NAMESPACE: usize = 63;

/// A value for an error message: quoted with its control characters
/// escaped (a newline in a pod name must not forge a log line) and cut to
/// 80 characters.
pub fn shown(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    if cut.len() < value.len() {
        format!("{cut:?}… ({} bytes)", value.len())
    } else {
        format!("{cut:?}")
    }
}

/// An RFC 1123 label: lower-case letters, digits and `-`, starting and
/// ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `pod` and `namespace` could name a Kubernetes pod: the checks
/// CreateVM makes of the pod name and namespace annotations.
pub fn is_pod_identity(pod: &str, namespace: &str) -> bool {
    check_pod_name("", pod).is_ok() && check_namespace("", namespace).is_ok()
}

/// A pod name as Kubernetes validates it (`metadata.name` of a Pod: a DNS
/// subdomain, RFC 1123: dot-separated labels, at most 253 characters).
fn check_pod_name(key: &str, pod: &str) -> Result<(), String> {
    if pod.len() <= MAX_POD_NAME && pod.split('.').all(is_dns_label) {
        return Ok(());
    }
    Err(format!(
        "annotation {key} names the pod {}, which is not a Kubernetes pod name (at most {MAX_POD_NAME} lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)",
        shown(pod)
    ))
}

/// A namespace as Kubernetes validates it (a DNS label, RFC 1123, at most
/// 63 characters).
fn check_namespace(key: &str, ns: &str) -> Result<(), String> {
    if ns.len() <= MAX_NAMESPACE && is_dns_label(ns) {
        return Ok(());
    }
    Err(format!(
        "annotation {key} names the namespace {}, which is not a Kubernetes namespace (at most {MAX_NAMESPACE} lower-case letters, digits and '-', starting and ending with a letter or digit)",
        shown(ns)
    ))
}

/// The pod name and namespace of a CRI-O sandbox name: exactly
/// `k8s_<pod>_<namespace>_<uid>_<attempt>` (CRI-O's `GenerateNameAndID`)
/// with every part non-empty and the attempt a number. Pod names,
/// namespaces and UIDs never hold `_`, so the split is unambiguous — and a
/// containerd pod name can never have this shape.
pub fn crio_sandbox_name(value: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = value.split('_').collect();
    match parts.as_slice() {
        ["k8s", pod, ns, uid, attempt]
            if !pod.is_empty()
                && !ns.is_empty()
                && !uid.is_empty()
                && !attempt.is_empty()
                && attempt.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some((pod, ns))
        }
        _ => None,
    }
}

/// How a number annotation treats a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    /// Rounded up to the next whole number (vCPUs, MiB).
    Up,
    /// A fraction is an error (GPUs).
    WholeOnly,
}

/// A non-negative decimal (as Rust's `f64` parser reads it: `"2"`, `"1.5"`,
/// `"2.0"`, `"1e3"`), made whole as `rounding` says, at most `max`. Absent,
/// empty and `0` (Kata's "unset") are `None` — except for GPUs, where 0 is
/// a count.
fn number(
    annotations: &HashMap<String, String>,
    key: &str,
    rounding: Rounding,
    max: u64,
) -> Result<Option<u64>, String> {
    let Some(raw) = annotations
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let value = match raw.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => f,
        _ => {
            let kind = match rounding {
                Rounding::Up => "not a non-negative number",
                Rounding::WholeOnly => "not a whole number",
            };
            return Err(format!("annotation {key} is '{raw}', {kind}"));
        }
    };
    if rounding == Rounding::WholeOnly && value.fract() != 0.0 {
        return Err(format!("annotation {key} is '{raw}', not a whole number"));
    }
    let whole = value.ceil();
    if whole > max as f64 {
        // 0 means "unset" where rounding up: the least real value is 1.
        let min = u8::from(rounding == Rounding::Up);
        return Err(format!("annotation {key} is {raw}, outside {min}..={max}"));
    }
    let whole = whole as u64;
    match (whole, rounding) {
        (0, Rounding::Up) => Ok(None),
        _ => Ok(Some(whole)),
    }
}

/// The pod's `cc_init_data` in the form its pod VM receives: the raw TOML
/// (or an already encoded value) checked as initdata, then gzip + base64
/// encoded as the reference does. The digest the pod VM computes covers the
/// exact TOML bytes, so nothing is trimmed or rewritten.
///
/// # Errors
/// A message giving the size and limit when `value` or its encoded form is
/// above [`initdata::MAX_ENCODED`] bytes, or the
/// [`InitdataError`](initdata::InitdataError) in words when it is not valid
/// initdata.
pub fn initdata_for_pod_vm(value: &str) -> Result<String, String> {
    if value.len() > initdata::MAX_ENCODED {
        return Err(format!(
            "{} bytes, above the limit of {}",
            value.len(),
            initdata::MAX_ENCODED
        ));
    }
    let encoded = Initdata::from_annotation(value)
        .map_err(|e| e.to_string())?
        .encode();
    if encoded.len() > initdata::MAX_ENCODED {
        return Err(format!(
            "{} bytes once gzip + base64 encoded for the pod VM, above the limit of {}",
            encoded.len(),
            initdata::MAX_ENCODED
        ));
    }
    Ok(encoded)
}

/// The daemon's `INITDATA` setting in the form pod VMs receive: it must be
/// gzip + base64 (as the reference requires; line-wrapped base64 is read as
/// Go's decoder reads it) and hold valid initdata.
///
/// # Errors
/// The [`InitdataError`](initdata::InitdataError) in words when `value`
/// does not decode or is not valid initdata; for a quoted (raw TOML) value
/// the message says INITDATA must be gzip + base64.
pub fn initdata_setting(value: &str) -> Result<String, String> {
    let document = Initdata::decode(value).map_err(|e| match e {
        initdata::InitdataError::NotBase64(_) if value.contains(['"', '\'']) => format!(
            "{e} (INITDATA takes initdata gzip-compressed and base64-encoded, as `gzip | base64` writes it)"
        ),
        e => e.to_string(),
    })?;
    Ok(document.encode())
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

    fn with(extra: (&str, &str)) -> Result<SandboxRequest, String> {
        let mut p: Vec<(&str, &str)> = base();
        p.push(extra);
        parse(&ann(&p))
    }

    /// Initdata TOML as Kata's runtime sends it (decoded from the pod's
    /// annotation), with a multi-line string.
    const INITDATA_TOML: &str = "algorithm = \"sha256\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs]\n'''\n";

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
            (CC_INIT_DATA, INITDATA_TOML),
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
        let sent = Initdata::decode(r.initdata.as_deref().unwrap()).unwrap();
        assert_eq!(sent.document, INITDATA_TOML);
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
    fn a_crio_sandbox_name_in_containerds_key_is_cut_to_the_pod_name() {
        // The Go shim under CRI-O.
        let name = "k8s_nginx_default_3f2a9c1b-5d7e-4c1a-9b8e-0a1b2c3d4e5f_0";
        let r = parse(&ann(&[
            (SANDBOX_NAME, name),
            (SANDBOX_NAMESPACE, "default"),
        ]))
        .unwrap();
        assert_eq!(r.pod_name, "nginx");
        // Only that exact shape, and only when its namespace is the pod's;
        // anything else is not cut — and, holding '_', is no pod name.
        for kept in [
            "k8s_nginx_other_3f2a_0",
            "k8s_nginx_default_3f2a_x",
            "k8s_nginx_default_3f2a",
            "k8s_nginx_default__0",
            "k8s__default_3f2a_0",
            "k8s_nginx_default_3f2a_0_1",
            "K8S_nginx_default_3f2a_0",
        ] {
            let e = parse(&ann(&[
                (SANDBOX_NAME, kept),
                (SANDBOX_NAMESPACE, "default"),
            ]))
            .unwrap_err();
            assert!(
                e.contains(&format!("{kept:?}")) && e.contains("not a Kubernetes pod name"),
                "{e}"
            );
        }
    }

    #[test]
    fn names_no_pod_can_have_are_refused_with_the_value_escaped() {
        for (name, ns, key) in [
            ("web\nINFO forged", "default", SANDBOX_NAME),
            ("Web", "default", SANDBOX_NAME),
            ("web_1", "default", SANDBOX_NAME),
            ("-web", "default", SANDBOX_NAME),
            ("web.", "default", SANDBOX_NAME),
            ("a..b", "default", SANDBOX_NAME),
            ("web", "de.fault", SANDBOX_NAMESPACE),
            ("web", "default-", SANDBOX_NAMESPACE),
        ] {
            let e = parse(&ann(&[(SANDBOX_NAME, name), (SANDBOX_NAMESPACE, ns)])).unwrap_err();
            assert!(e.starts_with(&format!("annotation {key} names the")), "{e}");
            assert!(!e.contains('\n'), "a raw newline in {e:?}");
        }
        let long = "a".repeat(1 << 20);
        let e = parse(&ann(&[(SANDBOX_NAME, &long), (SANDBOX_NAMESPACE, "ns")])).unwrap_err();
        assert!(e.len() < 500 && e.contains("1048576 bytes"), "{e:.200}");
        // The longest a pod name and a namespace may be.
        let longest = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        assert_eq!(longest.len(), 253);
        let ns = "n".repeat(63);
        assert!(parse(&ann(&[(SANDBOX_NAME, &longest), (SANDBOX_NAMESPACE, &ns)])).is_ok());
        let too_long = format!("{longest}c");
        assert!(
            parse(&ann(&[
                (SANDBOX_NAME, &too_long),
                (SANDBOX_NAMESPACE, "ns")
            ]))
            .is_err()
        );
        let ns_too_long = format!("{ns}n");
        assert!(
            parse(&ann(&[
                (SANDBOX_NAME, "web"),
                (SANDBOX_NAMESPACE, &ns_too_long)
            ]))
            .is_err()
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
            (DEFAULT_VCPUS, "two", "not a non-negative number"),
            (DEFAULT_VCPUS, "-1", "not a non-negative number"),
            (DEFAULT_VCPUS, "-0.5", "not a non-negative number"),
            (DEFAULT_VCPUS, "inf", "not a non-negative number"),
            (DEFAULT_VCPUS, "99999", "outside 1..=4096"),
            (DEFAULT_VCPUS, "4096.5", "outside 1..=4096"),
            (DEFAULT_MEMORY, "8Gi", "not a non-negative number"),
            (DEFAULT_GPUS, "NaN", "not a whole number"),
            (DEFAULT_GPUS, "1.5", "not a whole number"),
            (DEFAULT_GPUS, "1025", "outside 0..=1024"),
            (CC_INIT_DATA, "!!!", "not initdata TOML"),
            (CC_INIT_DATA, "YWJj", "not initdata TOML"),
            (CC_INIT_DATA, "a", "not base64"),
            (MACHINE_TYPE, "m6a\nlarge", "control characters"),
        ] {
            let e = with((key, value)).unwrap_err();
            assert!(e.contains(key) && e.contains(why), "{key}={value}: {e}");
        }
    }

    #[test]
    fn fractional_vcpus_round_up_to_whole_ones() {
        for (sent, vcpus) in [
            ("1.5", Some(2)),
            ("0.5", Some(1)),
            ("1", Some(1)),
            ("2.0", Some(2)),
            ("0.25", Some(1)),
            ("4095.01", Some(4096)),
            ("0", None),
            ("0.0", None),
            ("", None),
        ] {
            assert_eq!(
                with((DEFAULT_VCPUS, sent)).unwrap().spec.vcpus,
                vcpus,
                "{sent}"
            );
        }
        assert_eq!(
            with((DEFAULT_MEMORY, "1536.5")).unwrap().spec.memory_mib,
            Some(1537)
        );
    }

    #[test]
    fn unset_values_as_the_shims_send_them_mean_not_set() {
        let mut p = base();
        p.extend([
            (MACHINE_TYPE, ""),
            (IMAGE, ""),
            (DEFAULT_VCPUS, "0"),
            (DEFAULT_MEMORY, "0"),
            (DEFAULT_GPUS, "0"),
            (DEFAULT_GPU_MODEL, ""),
            (CC_INIT_DATA, ""),
        ]);
        let r = parse(&ann(&p)).unwrap();
        assert_eq!(
            r.spec,
            InstanceSpec {
                gpus: Some(0),
                ..InstanceSpec::default()
            }
        );
        assert_eq!(r.initdata, None);
    }

    #[test]
    fn initdata_keeps_its_exact_bytes_and_an_encoded_value_is_still_read() {
        // Leading blank lines and trailing spaces are part of the digest.
        let toml = format!("\n{INITDATA_TOML}  ");
        let r = with((CC_INIT_DATA, &toml)).unwrap();
        let sent = Initdata::decode(r.initdata.as_deref().unwrap()).unwrap();
        assert_eq!(sent.document, toml);
        let encoded = Initdata::parse(INITDATA_TOML.to_owned()).unwrap().encode();
        let r = with((CC_INIT_DATA, &encoded)).unwrap();
        assert_eq!(r.initdata.as_deref(), Some(encoded.as_str()));
    }

    #[test]
    fn the_initdata_setting_is_gzip_base64_and_may_be_line_wrapped() {
        let encoded = Initdata::parse(INITDATA_TOML.to_owned()).unwrap().encode();
        let wrapped: String = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\n", String::from_utf8_lossy(c)))
            .collect();
        assert_eq!(initdata_setting(&wrapped).unwrap(), encoded);
        let e = initdata_setting(INITDATA_TOML).unwrap_err();
        assert!(e.contains("gzip | base64"), "{e}");
    }
}
