//! Bad input, fuzzed: property-based tests (proptest) of everything that
//! parses bytes or strings a peer hands the daemon, run on stable Rust.
//!
//! - CreateVM's annotation parser, `podvisor::api::annotations::parse`,
//!   checked against an independent model of what its docs promise;
//! - the sandbox id check, `podvisor::api::validate_sandbox_id`;
//! - the journal record decoder, `podvisor_state::InstanceRecord::decode`, on
//!   arbitrary bytes, arbitrary JSON and mutations of valid records, and its
//!   round trip with `encode`;
//! - the checked-in seed corpus in `tests/corpus/` (see [`corpus_replay`]).
//!
//! The number of generated cases per property is proptest's `PROPTEST_CASES`;
//! unset, each property runs the modest count given next to it, so the file
//! passes in a few seconds in a debug build (CI). The long run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release --test fuzz_inputs
//! ```
//!
//! A failing property prints its shrunk input; proptest also stores the seed
//! in `tests/fuzz_inputs.proptest-regressions`, which is worth checking in
//! with the fix (it is replayed first on every later run).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use podvisor::api::annotations::{
    CC_INIT_DATA, CRIO_SANDBOX_NAME, DEFAULT_GPU_MODEL, DEFAULT_GPUS, DEFAULT_MEMORY,
    DEFAULT_VCPUS, IMAGE, MACHINE_TYPE, SANDBOX_NAME, SANDBOX_NAMESPACE, SandboxRequest, parse,
};
use podvisor::api::{ApiError, validate_sandbox_id};
use podvisor_state::record::DecodeError;
use podvisor_state::{InstanceRecord, InstanceRef, InstanceSpec, SCHEMA_VERSION, State};
use proptest::collection::{hash_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// proptest's configuration with `ci_cases` cases, unless `PROPTEST_CASES`
/// says otherwise.
fn config(ci_cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = ci_cases;
    }
    c
}

// ---------------------------------------------------------------------------
// Annotations
// ---------------------------------------------------------------------------

/// Every annotation the parser reads.
const REAL_KEYS: [&str; 10] = [
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

/// Annotations containerd, CRI-O and Kata send that the parser ignores.
const NOISE_KEYS: [&str; 12] = [
    "io.kubernetes.cri.sandbox-uid",
    "io.kubernetes.cri.sandbox-id",
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri.sandbox-log-directory",
    "io.kubernetes.cri.sandbox-cpu-period",
    "io.kubernetes.cri-o.ContainerType",
    "io.kubernetes.cri-o.Annotations",
    "io.kubernetes.pod.name",
    "io.katacontainers.config.hypervisor.default_maxvcpus",
    "io.katacontainers.config.hypervisor.kernel_params",
    "io.katacontainers.config.runtime.disable_guest_seccomp",
    "kata.peerpods.io/vm",
];

/// Numbers as people, Kata and fuzzers write them.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..5000).prop_map(|n| n.to_string()),
        (0u64..(80 * 1024 * 1024)).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..5000).prop_map(|n| format!("{n}.0")),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<f32>().prop_map(|f| f.to_string()),
        select(vec![
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "+4",
            "-0",
            "-0.0",
            "0x10",
            "1e3",
            "1E3",
            "4.",
            ".5",
            "\u{0664}",
            "4 096",
            "4_096",
            "08",
            "0",
            "0.0",
            "1.5",
            "2.50",
            "4Gi",
            "8G",
            "18446744073709551615",
            "18446744073709551616",
            "1e308",
            "1e309",
            "4096.0000000000001",
            "4097.0",
            "5000.0",
            "+",
            "-",
            "",
            " ",
            "\t4\n",
        ])
        .prop_map(String::from),
        "[ \t\n]{0,2}[+-]?[0-9]{0,25}(\\.[0-9]{0,5})?([eE][+-]?[0-9]{1,3})?[ \t\n]{0,2}",
    ]
}

/// Base64 of content the initdata check accepts or refuses.
fn initdata_text() -> impl Strategy<Value = String> {
    let content = prop_oneof![
        "\\PC{0,60}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..60).prop_map(|mut b| {
            b.splice(0..0, [0x1f, 0x8b]);
            b
        }),
        vec(any::<u8>(), 0..60),
    ];
    prop_oneof![
        4 => (content, 0usize..3, "[ \t\n]{0,2}").prop_map(|(c, pads, ws)| {
            // Unpadded, then with up to two of the padding characters.
            let b64 = STANDARD_NO_PAD.encode(&c);
            let padding = STANDARD.encode(&c).len() - b64.len();
            format!("{ws}{b64}{}{ws}", "=".repeat(pads.min(padding)))
        }),
        1 => "[A-Za-z0-9+/=_ -]{0,40}",
        1 => select(vec!["=", "==", "====", "A", "AA", "AA==", "AA=", "YQ", "YR", "H4sI", "/w=="])
            .prop_map(String::from),
    ]
}

/// Any annotation value.
fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => number_text(),
        3 => any::<String>(),
        2 => "\\PC{0,30}",
        2 => initdata_text(),
        1 => "[a-z0-9]{1,8}[\u{0}-\u{1f}\u{7f}\u{85}][a-z]{0,4}",
        1 => select(vec!["", " ", "\t", "\u{a0}", "\u{2028}", "\u{feff}", "é", "m6a.large"])
            .prop_map(String::from),
        1 => (0usize..70_000, select(vec!["9", "A", "é", " "])).prop_map(|(n, s)| s.repeat(n)),
    ]
}

/// Any annotation key, mostly the ones the parser reads.
fn annotation_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => select(REAL_KEYS.to_vec()).prop_map(String::from),
        2 => select(NOISE_KEYS.to_vec()).prop_map(String::from),
        1 => "io\\.katacontainers\\.config\\.hypervisor\\.[a-z_]{1,20}",
        1 => any::<String>(),
        1 => (select(REAL_KEYS.to_vec()), select(vec![" ", "\n", "."]))
            .prop_map(|(k, s)| format!("{k}{s}")),
        1 => select(REAL_KEYS.to_vec()).prop_map(|k| k.to_uppercase()),
    ]
}

/// Arbitrary annotation maps; most carry a valid identity, so the parser
/// gets past it to the resource annotations.
fn annotation_map() -> impl Strategy<Value = HashMap<String, String>> {
    (
        option::weighted(0.7, ("[a-z0-9-]{1,20}", "[a-z0-9-]{1,20}")),
        hash_map(annotation_key(), annotation_value(), 0..10),
    )
        .prop_map(|(identity, extra)| {
            let mut m = HashMap::new();
            if let Some((name, ns)) = identity {
                m.insert(SANDBOX_NAME.to_owned(), name);
                m.insert(SANDBOX_NAMESPACE.to_owned(), ns);
            }
            m.extend(extra);
            m
        })
}

/// What the model says about a number annotation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NumberVerdict {
    /// Absent, empty, or Kata's 0 meaning "unset".
    Unset,
    /// Accepted.
    Value(u64),
    /// A whole, non-negative number outside the accepted range.
    OutOfRange,
    /// Negative, fractional, not finite, or not a number.
    NotWhole,
}

/// The model of a number annotation, from the parser's docs: a whole number
/// in `[min, max]`, written as an integer or as a whole float (`"2.0"`); 0
/// means unset where the minimum is 1.
fn model_number(m: &HashMap<String, String>, key: &str, min: u64, max: u64) -> NumberVerdict {
    let Some(raw) = m.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return NumberVerdict::Unset;
    };
    let value = if let Ok(v) = raw.parse::<u64>() {
        v
    } else {
        match raw.parse::<f64>() {
            Ok(f) if f.is_finite() && f.fract() == 0.0 && f >= 0.0 => {
                if f > max as f64 {
                    return NumberVerdict::OutOfRange;
                }
                f as u64
            }
            _ => return NumberVerdict::NotWhole,
        }
    };
    if value == 0 && min == 1 {
        NumberVerdict::Unset
    } else if value < min || value > max {
        NumberVerdict::OutOfRange
    } else {
        NumberVerdict::Value(value)
    }
}

/// The model of a free-text annotation: trimmed; empty is unset; control
/// characters are refused (`Err`).
fn model_text(m: &HashMap<String, String>, key: &str) -> Result<Option<String>, ()> {
    match m.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) if v.chars().any(char::is_control) => Err(()),
        Some(v) => Ok(Some(v.to_owned())),
    }
}

/// The model of initdata: at most 64 KiB of standard base64 that decodes
/// to a gzip stream or to UTF-8 text. Padding is optional, and so is part
/// of it: up to the canonical number of `=` may follow (`AA`, `AA=` and
/// `AA==` are the same byte).
fn model_initdata_ok(data: &str) -> bool {
    if data.len() > 64 * 1024 {
        return false;
    }
    let unpadded = data.trim_end_matches('=');
    if data.len() - unpadded.len() > (4 - unpadded.len() % 4) % 4 {
        return false;
    }
    let Ok(bytes) = STANDARD_NO_PAD.decode(unpadded) else {
        return false;
    };
    !bytes.is_empty() && (bytes.starts_with(&[0x1f, 0x8b]) || std::str::from_utf8(&bytes).is_ok())
}

/// The model's verdict on a whole annotation map.
#[derive(Debug)]
struct Model {
    /// Annotations with an invalid (or missing required) value: an error
    /// must name one of them; none means the map must parse.
    bad: Vec<&'static str>,
    /// Number annotations holding a whole number out of range.
    out_of_range: Vec<&'static str>,
    /// What the parser must return when `bad` is empty.
    expected: Option<SandboxRequest>,
}

fn model(m: &HashMap<String, String>) -> Model {
    let mut bad = Vec::new();
    let mut out_of_range = Vec::new();
    let get = |k: &str| m.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let identity = match (get(SANDBOX_NAME), get(SANDBOX_NAMESPACE)) {
        (Some(n), Some(ns)) => Some((n.to_owned(), ns.to_owned())),
        (Some(_), None) => {
            bad.push(SANDBOX_NAMESPACE);
            None
        }
        (None, Some(_)) => {
            bad.push(SANDBOX_NAME);
            None
        }
        (None, None) => match get(CRIO_SANDBOX_NAME) {
            Some(crio) => {
                let parts: Vec<&str> = crio.split('_').collect();
                if parts.len() == 5
                    && parts[0] == "k8s"
                    && !parts[1].is_empty()
                    && !parts[2].is_empty()
                {
                    Some((parts[1].to_owned(), parts[2].to_owned()))
                } else {
                    bad.push(CRIO_SANDBOX_NAME);
                    None
                }
            }
            None => {
                bad.extend([SANDBOX_NAME, SANDBOX_NAMESPACE]);
                None
            }
        },
    };
    let mut number = |key: &'static str, min: u64, max: u64| match model_number(m, key, min, max) {
        NumberVerdict::Unset => None,
        NumberVerdict::Value(v) => Some(v),
        NumberVerdict::OutOfRange => {
            bad.push(key);
            out_of_range.push(key);
            None
        }
        NumberVerdict::NotWhole => {
            bad.push(key);
            None
        }
    };
    let vcpus = number(DEFAULT_VCPUS, 1, 4096).map(|v| v as u32);
    let memory_mib = number(DEFAULT_MEMORY, 1, 64 * 1024 * 1024);
    let gpus = number(DEFAULT_GPUS, 0, 1024).map(|v| v as u32);
    let mut text = |key: &'static str| {
        model_text(m, key).unwrap_or_else(|()| {
            bad.push(key);
            None
        })
    };
    let spec = InstanceSpec {
        instance_type: text(MACHINE_TYPE),
        vcpus,
        memory_mib,
        gpus,
        gpu_model: text(DEFAULT_GPU_MODEL),
        image: text(IMAGE),
    };
    let initdata = text(CC_INIT_DATA);
    if let Some(data) = &initdata {
        if !model_initdata_ok(data) {
            bad.push(CC_INIT_DATA);
        }
    }
    let expected = match identity {
        Some((pod_name, pod_namespace)) if bad.is_empty() => Some(SandboxRequest {
            pod_name,
            pod_namespace,
            spec,
            initdata,
        }),
        _ => None,
    };
    Model {
        bad,
        out_of_range,
        expected,
    }
}

/// The annotation an error message is about: every parser error starts
/// with `annotation <key>` (or `annotations <key> and ...`).
fn named_key(msg: &str) -> Option<&'static str> {
    let rest = msg
        .strip_prefix("annotations ")
        .or_else(|| msg.strip_prefix("annotation "))?;
    REAL_KEYS
        .iter()
        .filter(|k| {
            rest.strip_prefix(**k)
                .is_some_and(|after| after.starts_with([' ', ':']))
        })
        .max_by_key(|k| k.len())
        .copied()
}

/// The parser's answer checked against the model.
fn check_parse(m: &HashMap<String, String>) -> Result<(), TestCaseError> {
    let model = model(m);
    match parse(m) {
        Ok(request) => {
            prop_assert!(
                model.bad.is_empty(),
                "accepted, but the model finds {:?} invalid: {request:?}",
                model.bad
            );
            prop_assert_eq!(Some(request), model.expected);
        }
        Err(msg) => {
            prop_assert!(
                !model.bad.is_empty(),
                "refused ({msg}), but the model accepts it as {:?}",
                model.expected
            );
            let key = named_key(&msg);
            prop_assert!(
                key.is_some_and(|k| model.bad.contains(&k)),
                "the error names {key:?}, not one of the invalid {:?}: {msg}",
                model.bad
            );
        }
    }
    Ok(())
}

/// A value rendered in one of the ways Kata and people write numbers.
fn render_number(n: u64, style: u8, pad: &str) -> String {
    let s = match style % 8 {
        0 => n.to_string(),
        1 => format!("{n}.0"),
        2 => format!("+{n}"),
        3 => format!("00{n}"),
        4 => format!("{n}."),
        5 => format!("{n}.000"),
        6 => format!("{n}e0"),
        _ => format!("{}", n as f64),
    };
    format!("{pad}{s}{pad}")
}

/// A valid annotation set and the request it must parse to.
fn valid_annotations() -> impl Strategy<Value = (HashMap<String, String>, SandboxRequest)> {
    let identity = prop_oneof![
        // containerd: any text, trimmed.
        ("\\PC{0,3}[^\\s_]\\PC{0,20}", "\\PC{0,3}[^\\s_]\\PC{0,20}")
            .prop_map(|(n, ns)| (n, ns, None)),
        // CRI-O: k8s_<pod>_<ns>_<uid>_<attempt>.
        (
            "[a-z0-9][a-z0-9.-]{0,30}",
            "[a-z0-9][a-z0-9-]{0,30}",
            "[0-9a-f-]{0,36}",
            "[0-9]{1,2}"
        )
            .prop_map(|(n, ns, uid, attempt)| {
                let crio = format!("k8s_{n}_{ns}_{uid}_{attempt}");
                (n, ns, Some(crio))
            }),
    ];
    let num = |max: u64| option::of((0..=max, any::<u8>(), select(vec!["", " ", "\t"])));
    let text = || option::of("[ ]{0,2}[^\\p{Cc}\\s][^\\p{Cc}]{0,40}");
    let initdata = option::of((
        prop_oneof![
            "\\PC{1,200}".prop_map(String::into_bytes),
            vec(any::<u8>(), 0..200).prop_map(|mut b| {
                b.splice(0..0, [0x1f, 0x8b, 0x08]);
                b
            }),
        ],
        any::<bool>(),
    ));
    let noise = hash_map(
        prop_oneof![
            select(NOISE_KEYS.to_vec()).prop_map(String::from),
            "io\\.katacontainers\\.config\\.hypervisor\\.[a-z_]{1,20}",
            any::<String>(),
        ]
        .prop_filter("not a key the parser reads", |k| {
            !REAL_KEYS.contains(&k.as_str())
        }),
        any::<String>(),
        0..6,
    );
    (
        identity,
        (num(4096), num(64 * 1024 * 1024), num(1024)),
        (text(), text(), text()),
        initdata,
        noise,
    )
        .prop_map(
            |(
                (name, ns, crio),
                (vcpus, memory, gpus),
                (machine, gpu_model, image),
                init,
                noise,
            )| {
                let mut m: HashMap<String, String> = noise;
                match crio {
                    Some(crio) => {
                        m.insert(CRIO_SANDBOX_NAME.into(), crio);
                    }
                    None => {
                        m.insert(SANDBOX_NAME.into(), name.clone());
                        m.insert(SANDBOX_NAMESPACE.into(), ns.clone());
                    }
                }
                let mut number = |key: &str, v: Option<(u64, u8, &str)>| {
                    let (n, style, pad) = v?;
                    m.insert(key.into(), render_number(n, style, pad));
                    Some(n)
                };
                let vcpus = number(DEFAULT_VCPUS, vcpus).filter(|n| *n > 0);
                let memory_mib = number(DEFAULT_MEMORY, memory).filter(|n| *n > 0);
                let gpus = number(DEFAULT_GPUS, gpus);
                let mut text = |key: &str, v: Option<String>| {
                    let v = v?;
                    m.insert(key.into(), v.clone());
                    Some(v.trim().to_owned())
                };
                let spec = InstanceSpec {
                    instance_type: text(MACHINE_TYPE, machine),
                    vcpus: vcpus.map(|n| n as u32),
                    memory_mib,
                    gpus: gpus.map(|n| n as u32),
                    gpu_model: text(DEFAULT_GPU_MODEL, gpu_model),
                    image: text(IMAGE, image),
                };
                let initdata = init.map(|(content, pad)| {
                    let b64 = if pad {
                        STANDARD.encode(content)
                    } else {
                        STANDARD_NO_PAD.encode(content)
                    };
                    m.insert(CC_INIT_DATA.into(), format!(" {b64}\n"));
                    b64
                });
                let request = SandboxRequest {
                    pod_name: name.trim().to_owned(),
                    pod_namespace: ns.trim().to_owned(),
                    spec,
                    initdata,
                };
                (m, request)
            },
        )
}

proptest! {
    #![proptest_config(config(1024))]

    /// Arbitrary maps never panic, parse exactly when the model says they
    /// are valid, to what the model says, and every error names an
    /// annotation whose value is invalid.
    #[test]
    fn annotation_maps_parse_as_documented(m in annotation_map()) {
        check_parse(&m)?;
    }

    /// Maps of nothing but the real keys with arbitrary values.
    #[test]
    fn real_keys_with_arbitrary_values(
        m in hash_map(select(REAL_KEYS.to_vec()).prop_map(String::from), annotation_value(), 0..10)
    ) {
        check_parse(&m)?;
    }

    /// Fully arbitrary string maps (almost always refused: no identity).
    #[test]
    fn arbitrary_string_maps_never_panic(m in hash_map(any::<String>(), any::<String>(), 0..8)) {
        check_parse(&m)?;
    }

    /// Valid annotation sets, however their numbers are written, parse to
    /// exactly the values they hold.
    #[test]
    fn valid_annotations_round_trip((m, expected) in valid_annotations()) {
        prop_assert_eq!(parse(&m), Ok(expected));
    }

    /// One number annotation at a time, over the whole range and past it:
    /// accepted exactly when whole and in range, and then as that value.
    #[test]
    fn numbers_are_read_as_documented(
        which in 0usize..3,
        raw in number_text(),
    ) {
        let key = [DEFAULT_VCPUS, DEFAULT_MEMORY, DEFAULT_GPUS][which];
        let m = HashMap::from([
            (SANDBOX_NAME.to_owned(), "web".to_owned()),
            (SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
            (key.to_owned(), raw),
        ]);
        check_parse(&m)?;
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// An error about a whole number out of range says so ("outside
    /// min..=max"), as it does for integers, rather than calling it "not a
    /// whole number".
    #[test]
    fn out_of_range_whole_numbers_are_called_out_of_range(
        which in 0usize..3,
        raw in number_text(),
    ) {
        let key = [DEFAULT_VCPUS, DEFAULT_MEMORY, DEFAULT_GPUS][which];
        let m = HashMap::from([
            (SANDBOX_NAME.to_owned(), "web".to_owned()),
            (SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
            (key.to_owned(), raw),
        ]);
        if model(&m).out_of_range.contains(&key) {
            let msg = parse(&m).unwrap_err();
            prop_assert!(msg.contains("outside"), "{msg}");
        }
    }
}

/// The bug above on one input (shrinking found '5000.'; '5000.0' is how
/// Kata writes numbers).
#[test]
fn whole_float_out_of_range_is_called_out_of_range() {
    let m = HashMap::from([
        (SANDBOX_NAME.to_owned(), "web".to_owned()),
        (SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
        (DEFAULT_VCPUS.to_owned(), "5000.0".to_owned()),
    ]);
    let msg = parse(&m).unwrap_err();
    assert!(msg.contains("outside 1..=4096"), "{msg}");
}

/// The boundaries the generators rarely hit exactly.
#[test]
fn annotation_boundaries() {
    let base = |k: &str, v: String| {
        HashMap::from([
            (SANDBOX_NAME.to_owned(), "web".to_owned()),
            (SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
            (k.to_owned(), v),
        ])
    };
    for (key, max) in [
        (DEFAULT_VCPUS, 4096u64),
        (DEFAULT_MEMORY, 64 * 1024 * 1024),
        (DEFAULT_GPUS, 1024),
    ] {
        for raw in [max.to_string(), format!("{max}.0"), (max + 1).to_string()] {
            check_parse(&base(key, raw)).unwrap();
        }
    }
    // Initdata: exactly at the 64 KiB limit, and one byte past it.
    let at_limit = STANDARD.encode(vec![b'a'; 64 * 1024 / 4 * 3]);
    assert_eq!(at_limit.len(), 64 * 1024);
    let r = parse(&base(CC_INIT_DATA, at_limit.clone())).unwrap();
    assert_eq!(r.initdata.as_deref(), Some(at_limit.as_str()));
    let past = format!("{at_limit}A");
    let e = parse(&base(CC_INIT_DATA, past)).unwrap_err();
    assert!(
        e.starts_with(&format!("annotation {CC_INIT_DATA}: 65537 bytes")),
        "{e}"
    );
    // A megabyte of anything, in every field.
    for key in REAL_KEYS {
        for fill in ["9", "A", "\u{e9}", " "] {
            check_parse(&base(key, fill.repeat(1 << 20))).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Sandbox ids
// ---------------------------------------------------------------------------

/// The model of a sandbox id, from `validate_sandbox_id`'s docs: a directory
/// name under the pods dir, of letters, digits, '-', '_' and '.', at most
/// 128 characters, not "." or "..".
fn model_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.chars().count() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn sandbox_id_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        3 => "[A-Za-z0-9._-]{0,140}",
        2 => "[0-9a-f]{64}",
        2 => ("[A-Za-z0-9._-]{0,130}", any::<char>(), 0usize..131).prop_map(|(s, c, at)| {
            let mut chars: Vec<char> = s.chars().collect();
            chars.insert(at.min(chars.len()), c);
            chars.into_iter().collect()
        }),
        1 => ".{0,300}",
        1 => select(vec!["", ".", "..", "...", "../x", "a/b", "/", "a b", " ", "\0", "ü", "-", "_", "a\n"])
            .prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(config(2048))]

    /// Never panics; accepts exactly what the docs say; refusals are
    /// InvalidArgument with a reason; an empty id is called empty.
    #[test]
    fn sandbox_ids_are_checked_as_documented(id in sandbox_id_strategy()) {
        let result = validate_sandbox_id(&id);
        prop_assert_eq!(result.is_ok(), model_sandbox_id(&id), "{:?}: {:?}", id, result);
        if let Err(e) = result {
            let ApiError::InvalidArgument(msg) = e else {
                return Err(TestCaseError::fail(format!("{id:?}: not InvalidArgument: {e:?}")));
            };
            prop_assert!(!msg.is_empty());
            prop_assert_eq!(
                id.is_empty(),
                msg == "The sandbox id is empty",
                "{:?}: {}", id, msg
            );
            if !id.is_empty() && id.chars().count() > 128 {
                prop_assert!(msg.contains("at most 128"), "{:?}: {}", id, msg);
            }
        }
    }

    /// A length error states the id's real length in characters, and is
    /// given only to ids that are too long.
    #[test]
    fn sandbox_id_length_errors_are_true(id in sandbox_id_strategy()) {
        if let Err(e) = validate_sandbox_id(&id) {
            let msg = e.to_string();
            if msg.contains("characters long") {
                let claimed = format!("is {} characters long", id.chars().count());
                prop_assert!(msg.contains(&claimed), "{:?}: {}", id, msg);
                prop_assert!(id.chars().count() > 128, "{:?}: {}", id, msg);
            }
        }
    }
}

/// The bug above on its smallest input: 128 characters, one of them two
/// bytes long (shrinking stops at a noisier 129-byte id).
#[test]
fn sandbox_id_length_is_counted_in_characters() {
    let id = format!("{}é", "a".repeat(127));
    assert_eq!(id.chars().count(), 128);
    let msg = validate_sandbox_id(&id).unwrap_err().to_string();
    assert!(!msg.contains("129 characters"), "{msg}");
}

// ---------------------------------------------------------------------------
// Journal records
// ---------------------------------------------------------------------------

fn opt_text() -> impl Strategy<Value = Option<String>> {
    option::of(any::<String>())
}

fn spec_strategy() -> impl Strategy<Value = InstanceSpec> {
    (
        opt_text(),
        option::of(any::<u32>()),
        option::of(any::<u64>()),
        option::of(any::<u32>()),
        opt_text(),
        opt_text(),
    )
        .prop_map(
            |(instance_type, vcpus, memory_mib, gpus, gpu_model, image)| InstanceSpec {
                instance_type,
                vcpus,
                memory_mib,
                gpus,
                gpu_model,
                image,
            },
        )
}

/// Any record this build writes: every field arbitrary, the state a stored
/// one, the schema version this build's or an older one.
fn record_strategy() -> impl Strategy<Value = InstanceRecord> {
    let instance = option::of(
        (any::<String>(), vec(any::<IpAddr>(), 0..4)).prop_map(|(id, ips)| InstanceRef { id, ips }),
    );
    (
        (
            0..=SCHEMA_VERSION,
            any::<String>(),
            any::<String>(),
            any::<String>(),
            any::<String>(),
            spec_strategy(),
            opt_text(),
        ),
        (
            select(State::STORED.to_vec()),
            any::<u64>(),
            opt_text(),
            instance,
            any::<bool>(),
            any::<u32>(),
            opt_text(),
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (schema_version, sandbox_id, pod_name, pod_namespace, netns, spec, initdata),
                (state, generation, token, instance, released, attempts, last_error, c, u),
            )| {
                let mut r =
                    InstanceRecord::pending(&sandbox_id, &pod_name, &pod_namespace, spec, c);
                r.schema_version = schema_version;
                r.network_namespace_path = netns;
                r.initdata = initdata;
                r.state = state;
                r.generation = generation;
                r.token = token;
                r.instance = instance;
                r.released = released;
                r.attempts = attempts;
                r.last_error = last_error;
                r.updated_at = u;
                r
            },
        )
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        select(State::ALL.to_vec()).prop_map(|s| Value::from(s.as_str())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            hash_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The record's fields (top level, and `spec.`/`instance.` nested), with
/// whether the field may be absent and whether `null` is a valid value.
const FIELDS: [(&str, bool, bool); 23] = [
    ("schema_version", false, false),
    ("sandbox_id", false, false),
    ("pod_name", false, false),
    ("pod_namespace", false, false),
    ("network_namespace_path", true, false),
    ("spec", true, false),
    ("initdata", true, true),
    ("state", false, false),
    ("generation", false, false),
    ("token", true, true),
    ("instance_name", false, false),
    ("instance", true, true),
    ("released", true, false),
    ("attempts", true, false),
    ("last_error", true, true),
    ("created_at", false, false),
    ("updated_at", false, false),
    ("spec.instance_type", true, true),
    ("spec.vcpus", true, true),
    ("spec.memory_mib", true, true),
    ("spec.gpus", true, true),
    ("spec.gpu_model", true, true),
    ("spec.image", true, true),
];

/// The object holding `path`'s last segment (created for `spec.`), and
/// that segment.
fn slot<'a>(v: &'a mut Value, path: &'a str) -> (&'a mut serde_json::Map<String, Value>, &'a str) {
    let (object, key) = match path.split_once('.') {
        Some((parent, key)) => {
            let parent = v
                .as_object_mut()
                .unwrap()
                .entry(parent)
                .or_insert_with(|| json!({}));
            (parent, key)
        }
        None => (v, path),
    };
    (object.as_object_mut().unwrap(), key)
}

/// A value of another JSON type than a field holds (or, for `state`, no
/// stored state).
fn wrong_value(field: &str) -> impl Strategy<Value = Value> + use<> {
    let numeric = matches!(
        field,
        "schema_version"
            | "generation"
            | "attempts"
            | "created_at"
            | "updated_at"
            | "spec.vcpus"
            | "spec.memory_mib"
            | "spec.gpus"
    );
    let candidates: Vec<Value> = if numeric {
        vec![
            json!("1"),
            json!(true),
            json!(-1),
            json!(1.5),
            json!([]),
            json!({}),
            json!(1e300),
        ]
    } else if field == "released" {
        vec![json!(1), json!("true"), json!([]), json!({})]
    } else if field == "state" {
        vec![
            json!(0),
            json!("removed"),
            json!("Running"),
            json!("zombie"),
            json!(["running"]),
        ]
    } else if field == "spec" || field == "instance" {
        // Not `[]`: serde reads a struct from an array too, positionally,
        // so `"spec": []` is a valid empty spec.
        vec![
            json!(1),
            json!("x"),
            json!(true),
            json!([1]),
            json!({"vcpus": "2", "id": 1}),
        ]
    } else {
        vec![json!(1), json!(true), json!([]), json!({}), json!(-0.5)]
    };
    let mut all = candidates;
    all.push(Value::Null);
    select(all)
}

/// One structural mutation of an encoded record, and whether the result
/// must still decode.
#[derive(Debug, Clone)]
enum Mutation {
    /// Remove a field.
    Delete(usize),
    /// Give a field a value of the wrong type.
    WrongType(usize, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..FIELDS.len()).prop_map(Mutation::Delete),
        (0..FIELDS.len()).prop_flat_map(
            |i| wrong_value(FIELDS[i].0).prop_map(move |v| Mutation::WrongType(i, v))
        ),
    ]
}

proptest! {
    #![proptest_config(config(384))]

    /// encode → decode gives the record back, whatever its contents.
    #[test]
    fn records_round_trip(r in record_strategy()) {
        prop_assert_eq!(InstanceRecord::decode(&r.encode()), Ok(r));
    }

    /// Arbitrary bytes never panic; whatever decodes is a record this build
    /// reads back the same.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        check_decoded(&bytes)?;
    }

    /// Arbitrary JSON never panics, nor does JSON shaped like a record with
    /// arbitrary values.
    #[test]
    fn arbitrary_json_never_panics(
        v in json_value(),
        fields in hash_map(select(FIELDS.iter().map(|f| f.0).collect::<Vec<_>>()), json_value(), 0..12),
    ) {
        check_decoded(&serde_json::to_vec(&v).unwrap())?;
        let shaped = Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        check_decoded(&serde_json::to_vec(&shaped).unwrap())?;
    }

    /// Every strict prefix of a valid record is Malformed.
    #[test]
    fn truncated_records_are_malformed(r in record_strategy(), cut in any::<prop::sample::Index>()) {
        let bytes = r.encode();
        let at = cut.index(bytes.len());
        prop_assert!(
            matches!(InstanceRecord::decode(&bytes[..at]), Err(DecodeError::Malformed(_))),
            "prefix of {} bytes", at
        );
    }

    /// Flipped and inserted bytes never panic.
    #[test]
    fn corrupted_records_never_panic(
        r in record_strategy(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = r.encode();
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] ^= byte | 1,
                1 => bytes.insert(i, byte),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        check_decoded(&bytes)?;
    }

    /// A deleted required field or a value of the wrong type is Malformed;
    /// a deleted optional field, or `null` for an optional one, decodes to
    /// the field's default.
    #[test]
    fn mutated_fields_decode_as_their_types_say(r in record_strategy(), m in mutation()) {
        let mut v: Value = serde_json::from_slice(&r.encode()).unwrap();
        let (field, optional, nullable, new) = match &m {
            Mutation::Delete(i) => (FIELDS[*i].0, FIELDS[*i].1, FIELDS[*i].2, None),
            Mutation::WrongType(i, value) => (FIELDS[*i].0, FIELDS[*i].1, FIELDS[*i].2, Some(value.clone())),
        };
        let (object, key) = slot(&mut v, field);
        let must_decode = match new {
            None => {
                object.remove(key);
                optional
            }
            Some(value) => {
                let null = value.is_null();
                object.insert(key.to_owned(), value);
                null && nullable
            }
        };
        let decoded = InstanceRecord::decode(&serde_json::to_vec(&v).unwrap());
        if must_decode {
            let mut expected = r.clone();
            match field {
                "network_namespace_path" => expected.network_namespace_path.clear(),
                "spec" => expected.spec = InstanceSpec::default(),
                "initdata" => expected.initdata = None,
                "token" => expected.token = None,
                "instance" => expected.instance = None,
                "released" => expected.released = false,
                "attempts" => expected.attempts = 0,
                "last_error" => expected.last_error = None,
                "spec.instance_type" => expected.spec.instance_type = None,
                "spec.vcpus" => expected.spec.vcpus = None,
                "spec.memory_mib" => expected.spec.memory_mib = None,
                "spec.gpus" => expected.spec.gpus = None,
                "spec.gpu_model" => expected.spec.gpu_model = None,
                "spec.image" => expected.spec.image = None,
                other => unreachable!("{other} is required"),
            }
            prop_assert_eq!(decoded, Ok(expected), "{:?}", m);
        } else {
            prop_assert!(matches!(decoded, Err(DecodeError::Malformed(_))), "{:?}: {:?}", m, decoded);
        }
    }

    /// A newer schema version is NewerSchema, whatever the rest of the
    /// record looks like: it must be quarantined, never misread.
    #[test]
    fn newer_schemas_are_refused_as_newer(
        r in record_strategy(),
        version in (SCHEMA_VERSION + 1)..=u32::MAX,
        junk in hash_map(select(FIELDS.iter().map(|f| f.0).collect::<Vec<_>>()), json_value(), 0..8),
        bare in any::<bool>(),
    ) {
        let mut v: Value = if bare { json!({}) } else { serde_json::from_slice(&r.encode()).unwrap() };
        for (k, value) in junk {
            if !k.contains('.') {
                v[k] = value;
            }
        }
        v["schema_version"] = version.into();
        prop_assert_eq!(
            InstanceRecord::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::NewerSchema { found: version, known: SCHEMA_VERSION })
        );
    }

    /// A stored record in the pseudo-state Removed is Malformed.
    #[test]
    fn removed_records_are_malformed(mut r in record_strategy()) {
        r.state = State::Removed;
        prop_assert!(matches!(InstanceRecord::decode(&r.encode()), Err(DecodeError::Malformed(_))));
    }
}

/// Whatever `decode` makes of `bytes` is sane: a record it returns is not
/// Removed and reads back the same after encoding; a NewerSchema error is
/// about a newer version.
fn check_decoded(bytes: &[u8]) -> Result<(), TestCaseError> {
    match InstanceRecord::decode(bytes) {
        Ok(r) => {
            prop_assert_ne!(r.state, State::Removed);
            prop_assert!(r.schema_version <= SCHEMA_VERSION);
            prop_assert_eq!(InstanceRecord::decode(&r.encode()), Ok(r));
        }
        Err(DecodeError::NewerSchema { found, known }) => {
            prop_assert_eq!(known, SCHEMA_VERSION);
            prop_assert!(found > known);
        }
        Err(DecodeError::Malformed(why)) => prop_assert!(!why.is_empty()),
    }
    Ok(())
}

/// Nesting far past serde_json's recursion limit is an error, not a stack
/// overflow, in a known field and in an unknown one.
#[test]
fn deep_nesting_is_malformed_not_a_crash() {
    for depth in [200, 100_000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        for text in [
            nested.clone(),
            format!(r#"{{"schema_version":1,"x":{nested}}}"#),
            format!(r#"{{"schema_version":1,"spec":{nested}}}"#),
        ] {
            assert!(matches!(
                InstanceRecord::decode(text.as_bytes()),
                Err(DecodeError::Malformed(_))
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// The seed corpus
// ---------------------------------------------------------------------------

fn corpus(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "expect"))
        .collect();
    files.sort();
    files
}

fn name(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

/// The sidecar `<name>.expect` of a corpus file, if any.
fn sidecar(path: &Path) -> Option<String> {
    std::fs::read_to_string(path.with_extension("expect"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_owned())
}

/// Replays every corpus file.
///
/// `tests/corpus/annotations/*.json` are annotation maps: `ok-*` must parse
/// (to the request in the sidecar `ok-*.expect`, as JSON, when there is
/// one); `err-*` must be refused, with an error that starts
/// `annotation <key>` for a key of the map (and contains the text of the
/// sidecar `err-*.expect`, when there is one).
///
/// `tests/corpus/records/*` are journal values: `ok-*` decode (and round
/// trip), `malformed-*` are Malformed, `newer-*` are NewerSchema.
#[test]
fn corpus_replay() {
    let annotations = corpus("annotations");
    assert!(
        annotations.len() >= 15,
        "{} annotation files",
        annotations.len()
    );
    for path in &annotations {
        let file = name(path);
        let m: HashMap<String, String> = serde_json::from_slice(&std::fs::read(path).unwrap())
            .unwrap_or_else(|e| {
                panic!("{file}: {e}");
            });
        let result = parse(&m);
        check_parse(&m).unwrap_or_else(|e| panic!("{file}: {e}"));
        match (file.split('-').next().unwrap(), result) {
            ("ok", Ok(r)) => {
                if let Some(expect) = sidecar(path) {
                    let want: Value = serde_json::from_str(&expect).unwrap();
                    let got = json!({
                        "pod_name": r.pod_name,
                        "pod_namespace": r.pod_namespace,
                        "spec": r.spec,
                        "initdata": r.initdata.is_some(),
                    });
                    assert_eq!(got, want, "{file}");
                }
            }
            ("err", Err(msg)) => {
                let key = named_key(&msg).unwrap_or_else(|| panic!("{file}: names no key: {msg}"));
                assert!(
                    m.contains_key(key) || key == SANDBOX_NAME || key == SANDBOX_NAMESPACE,
                    "{file}: {msg}"
                );
                if let Some(expect) = sidecar(path) {
                    assert!(msg.contains(&expect), "{file}: {msg:?} lacks {expect:?}");
                }
            }
            (kind, result) => panic!("{file}: expected {kind}, got {result:?}"),
        }
    }

    let records = corpus("records");
    assert!(records.len() >= 10, "{} record files", records.len());
    for path in &records {
        let file = name(path);
        let bytes = std::fs::read(path).unwrap();
        let result = InstanceRecord::decode(&bytes);
        check_decoded(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        match (file.split('-').next().unwrap(), &result) {
            ("ok", Ok(_)) | ("malformed", Err(DecodeError::Malformed(_))) => {}
            ("newer", Err(DecodeError::NewerSchema { known, .. })) => {
                assert_eq!(*known, SCHEMA_VERSION)
            }
            (kind, result) => panic!("{file}: expected {kind}, got {result:?}"),
        }
    }
}
