//! Instance type selection, in the reference's order: the pod's
//! `machine_type` annotation, then a GPU request, then the smallest type that
//! fits the requested vCPUs and memory, then the default — always inside the
//! allow-list.
//!
//! The reference sorts the types by (GPUs, memory, vCPUs) and binary-searches
//! for a fit, which is not monotone in that order: with
//! `[(4 GiB, 8 vCPU), (8 GiB, 2 vCPU)]` a request for (4 GiB, 4 vCPU) finds
//! nothing. This scans the sorted list linearly instead.

use podvisor_state::InstanceSpec;

/// The size of one instance type, as `DescribeInstanceTypes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSize {
    /// The type's name (`m6a.large`).
    pub name: String,
    /// Default vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// GPUs (all models).
    pub gpus: u32,
}

/// Picks the instance type for `spec`.
///
/// `allowed` is the allow-list (`--instance-types`); empty means "only the
/// default", and then sizing requests do not change the type (as in the
/// reference: there is nothing to choose from). `sizes` holds what is known
/// of the allowed types; a type missing from it cannot be fitted.
///
/// # Errors
/// A message listing the allowed types when the pod's own type
/// (`machine_type` annotation) is not allowed, or no allowed type of known
/// size has the GPUs, vCPUs and memory asked for.
pub fn select_instance_type(
    spec: &InstanceSpec,
    default: &str,
    allowed: &[String],
    sizes: &[TypeSize],
) -> Result<String, String> {
    let allow_list = || {
        if allowed.is_empty() {
            format!("only the default {default}")
        } else {
            allowed.join(", ")
        }
    };
    let is_allowed = |t: &str| {
        if allowed.is_empty() {
            t == default
        } else {
            allowed.iter().any(|a| a == t)
        }
    };

    // (1) The pod named its type.
    if let Some(wanted) = spec.instance_type.as_deref().filter(|t| !t.is_empty()) {
        return if is_allowed(wanted) {
            Ok(wanted.to_owned())
        } else {
            Err(format!(
                "Instance type {wanted} (the pod's machine_type annotation) is not allowed; allowed: {}",
                allow_list()
            ))
        };
    }
    if allowed.is_empty() {
        return Ok(default.to_owned());
    }

    let vcpus = spec.vcpus.unwrap_or(0);
    let memory = spec.memory_mib.unwrap_or(0);
    let gpus = spec.gpus.unwrap_or(0);
    let mut candidates: Vec<&TypeSize> = sizes.iter().filter(|s| is_allowed(&s.name)).collect();
    // Smallest first: fewest GPUs, then least memory, then fewest vCPUs.
    candidates.sort_by(|a, b| {
        (a.gpus, a.memory_mib, a.vcpus, &a.name).cmp(&(b.gpus, b.memory_mib, b.vcpus, &b.name))
    });
    let fits = |s: &&&TypeSize| s.vcpus >= vcpus && s.memory_mib >= memory;
    let request = || {
        let mut parts = Vec::new();
        if gpus > 0 {
            parts.push(format!("{gpus} GPUs"));
        }
        if vcpus > 0 {
            parts.push(format!("{vcpus} vCPUs"));
        }
        if memory > 0 {
            parts.push(format!("{memory} MiB"));
        }
        parts.join(", ")
    };

    // (2) GPUs: the smallest type with enough of them (and of the rest).
    if gpus > 0 {
        return candidates
            .iter()
            .filter(|s| s.gpus >= gpus)
            .find(fits)
            .map(|s| s.name.clone())
            .ok_or_else(|| {
                format!(
                    "No allowed instance type has {}; allowed: {}",
                    request(),
                    allow_list()
                )
            });
    }

    // (3) vCPUs and memory: the smallest type without GPUs that fits.
    if vcpus > 0 || memory > 0 {
        return candidates
            .iter()
            .filter(|s| s.gpus == 0)
            .find(fits)
            .map(|s| s.name.clone())
            .ok_or_else(|| {
                format!(
                    "No allowed instance type has {}; allowed: {}",
                    request(),
                    allow_list()
                )
            });
    }

    // (4) Nothing asked for.
    Ok(default.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(name: &str, vcpus: u32, memory_gib: u64, gpus: u32) -> TypeSize {
        TypeSize {
            name: name.into(),
            vcpus,
            memory_mib: memory_gib * 1024,
            gpus,
        }
    }

    fn spec(
        instance_type: Option<&str>,
        vcpus: Option<u32>,
        memory_gib: Option<u64>,
        gpus: Option<u32>,
    ) -> InstanceSpec {
        InstanceSpec {
            instance_type: instance_type.map(Into::into),
            vcpus,
            memory_mib: memory_gib.map(|g| g * 1024),
            gpus,
            ..Default::default()
        }
    }

    #[test]
    fn types_are_selected_in_the_reference_order_inside_the_allow_list() {
        let sizes = [
            size("m6a.large", 2, 8, 0),
            size("m6a.xlarge", 4, 16, 0),
            size("m6a.2xlarge", 8, 32, 0),
            size("c6a.2xlarge", 8, 16, 0),
            size("g5.xlarge", 4, 16, 1),
            size("g5.12xlarge", 48, 192, 4),
            // The pair the reference's binary search gets wrong.
            size("x.cpu", 8, 4, 0),
            size("x.mem", 2, 8, 0),
        ];
        let all: Vec<String> = sizes.iter().map(|s| s.name.clone()).collect();
        let list = |names: &[&str]| {
            names
                .iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>()
        };
        let default = "m6a.large";
        /// What, the request, the allow-list, and the type (or a part of the error).
        type Case<'a> = (&'a str, InstanceSpec, Vec<String>, Result<&'a str, &'a str>);
        let cases: Vec<Case> = vec![
            (
                "nothing asked: the default",
                spec(None, None, None, None),
                all.clone(),
                Ok("m6a.large"),
            ),
            (
                "the annotation wins over sizes",
                spec(Some("m6a.2xlarge"), Some(1), Some(1), None),
                all.clone(),
                Ok("m6a.2xlarge"),
            ),
            (
                "the annotation wins over GPUs",
                spec(Some("m6a.xlarge"), None, None, Some(1)),
                all.clone(),
                Ok("m6a.xlarge"),
            ),
            (
                "an annotation outside the list",
                spec(Some("m6a.48xlarge"), None, None, None),
                all.clone(),
                Err("m6a.48xlarge (the pod's machine_type annotation) is not allowed"),
            ),
            (
                "an empty list allows only the default",
                spec(Some("m6a.xlarge"), None, None, None),
                vec![],
                Err("allowed: only the default m6a.large"),
            ),
            (
                "an empty list: the default, whatever the size",
                spec(None, Some(64), Some(256), None),
                vec![],
                Ok("m6a.large"),
            ),
            (
                "an empty annotation counts as none",
                spec(Some(""), None, None, None),
                all.clone(),
                Ok("m6a.large"),
            ),
            (
                "one GPU: the smallest GPU type",
                spec(None, None, None, Some(1)),
                all.clone(),
                Ok("g5.xlarge"),
            ),
            (
                "GPUs and vCPUs together",
                spec(None, Some(8), None, Some(1)),
                all.clone(),
                Ok("g5.12xlarge"),
            ),
            (
                "more GPUs than any type",
                spec(None, None, None, Some(8)),
                all.clone(),
                Err("No allowed instance type has 8 GPUs"),
            ),
            (
                "GPUs but none allowed",
                spec(None, None, None, Some(1)),
                list(&["m6a.large", "m6a.xlarge"]),
                Err("allowed: m6a.large, m6a.xlarge"),
            ),
            (
                "vCPUs and memory: the smallest fit",
                spec(None, Some(4), Some(12), None),
                all.clone(),
                Ok("m6a.xlarge"),
            ),
            (
                "exact fit",
                spec(None, Some(2), Some(8), None),
                list(&["m6a.xlarge", "m6a.large"]),
                Ok("m6a.large"),
            ),
            (
                "less memory first",
                spec(None, Some(8), Some(16), None),
                all.clone(),
                Ok("c6a.2xlarge"),
            ),
            (
                "vCPUs only",
                spec(None, Some(6), None, None),
                all.clone(),
                Ok("x.cpu"),
            ),
            (
                "memory only",
                spec(None, None, Some(20), None),
                all.clone(),
                Ok("m6a.2xlarge"),
            ),
            (
                "never a GPU type for a CPU request",
                spec(None, Some(48), Some(100), None),
                all.clone(),
                Err("No allowed instance type has 48 vCPUs, 102400 MiB"),
            ),
            (
                "the reference's miss: (4 GiB, 4 vCPU) over [(4 GiB, 8), (8 GiB, 2)]",
                spec(None, Some(4), Some(4), None),
                list(&["x.cpu", "x.mem"]),
                Ok("x.cpu"),
            ),
            (
                "a type without known size cannot be fitted",
                spec(None, Some(1), None, None),
                list(&["m6a.large", "unknown.type"]),
                Ok("m6a.large"),
            ),
            (
                "too big for the list",
                spec(None, Some(16), Some(8), None),
                list(&["m6a.large", "m6a.xlarge"]),
                Err(
                    "No allowed instance type has 16 vCPUs, 8192 MiB; allowed: m6a.large, m6a.xlarge",
                ),
            ),
        ];
        for (what, spec, allowed, want) in cases {
            let got = select_instance_type(&spec, default, &allowed, &sizes);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{what}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{what}: {g}"),
                _ => panic!("{what}: wanted {want:?}, got {got:?}"),
            }
        }
    }
}
