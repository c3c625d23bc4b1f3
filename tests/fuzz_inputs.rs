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
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
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
use std::io::{Read, Write};
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
const REAL_KEYS: [&str; 10] = podvisor::api::annotations::KNOWN;

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
        // Fractions, as runtime-rs writes its f32 sandbox size.
        (0u32..5000, 1u32..1000).prop_map(|(n, f)| format!("{n}.{f}")),
        (0u32..5000).prop_map(|n| (n as f32 / 4.0).to_string()),
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
            "-0.5",
            "-1e-300",
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
            "0.5",
            "1.5",
            "2.50",
            "1e-300",
            "5e-324",
            "4Gi",
            "8G",
            "18446744073709551615",
            "18446744073709551616",
            "1e308",
            "1e309",
            "4095.5",
            "4096.0000000000001",
            "4096.001",
            "4097.0",
            "5000.0",
            "1023.5",
            "1024.5",
            "67108863.5",
            "67108864.5",
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

/// The digest algorithms initdata may name.
const ALGORITHMS: [&str; 3] = ["sha256", "sha384", "sha512"];
/// The most bytes `cc_init_data` may hold, and its canonical encoding.
const INITDATA_LIMIT: usize = 64 * 1024;
/// The most bytes an encoded `cc_init_data` may decode to.
const INITDATA_DOCUMENT_LIMIT: usize = 1 << 20;

/// `s` (no control characters but `\n`) as a TOML string in the form
/// `form` picks: basic, literal, multi-line literal or multi-line basic.
/// A form that cannot hold `s` falls back to a basic string.
fn toml_string(s: &str, form: u8) -> String {
    match form % 4 {
        1 if !s.contains(['\'', '\n']) => format!("'{s}'"),
        2 if !s.contains('\'') => format!("'''\n{s}'''"),
        3 if !s.contains(['"', '\\']) => format!("\"\"\"\n{s}\"\"\""),
        _ => {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("\"{escaped}\"")
        }
    }
}

/// A `[data]` key: bare when it can be, else quoted (`"aa.toml"`).
fn toml_key(k: &str, quote: bool) -> String {
    let bare = k
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare && !quote {
        k.to_owned()
    } else {
        toml_string(k, 0)
    }
}

/// The entries of a `[data]` table of strings (file name → content, some
/// of them multi-line), each key once, one entry a line.
fn initdata_entries() -> impl Strategy<Value = String> {
    vec(
        (
            "[A-Za-z0-9_.-]{1,16}",
            any::<bool>(),
            "(\\PC{0,20}\n){0,3}\\PC{0,20}",
            any::<u8>(),
        ),
        0..5,
    )
    .prop_map(|entries| {
        let mut seen = std::collections::HashSet::new();
        entries
            .into_iter()
            .filter(|(k, ..)| seen.insert(k.clone()))
            .map(|(k, quote, v, form)| {
                format!("{} = {}\n", toml_key(&k, quote), toml_string(&v, form))
            })
            .collect()
    })
}

/// An initdata-like TOML document: `algorithm` and `version` (given as
/// TOML values, in either order), then the `[data]` section (none when
/// `None`), with leading blank lines, a comment, CRLF line ends or
/// trailing spaces now and then — all of them part of the exact bytes.
fn initdata_with(
    algorithm: impl Strategy<Value = String>,
    version: impl Strategy<Value = String>,
    data: impl Strategy<Value = Option<String>>,
) -> impl Strategy<Value = String> {
    (
        (algorithm, version, data),
        any::<bool>(),
        select(vec!["", "\n", "\n\n", " \n", "\r\n", "# initdata\n"]),
        select(vec!["\n", "\n", "\r\n"]),
        select(vec!["", "", "\n", "  ", "  \n", "\n\n", "# end"]),
    )
        .prop_map(
            |((algorithm, version, data), version_first, leading, eol, trailing)| {
                let algorithm = format!("algorithm = {algorithm}{eol}");
                let version = format!("version = {version}{eol}");
                let (first, second) = if version_first {
                    (version, algorithm)
                } else {
                    (algorithm, version)
                };
                let data = data.map_or(String::new(), |entries| {
                    format!("{eol}[data]{eol}{entries}")
                });
                format!("{leading}{first}{second}{data}{trailing}")
            },
        )
}

/// A valid initdata document.
fn initdata_document() -> impl Strategy<Value = String> {
    initdata_with(
        (select(ALGORITHMS.to_vec()), any::<u8>()).prop_map(|(a, form)| toml_string(a, form)),
        ("[0-9][0-9a-z.+ -]{0,10}", any::<u8>()).prop_map(|(v, form)| toml_string(&v, form)),
        initdata_entries().prop_map(Some),
    )
}

/// Documents that are valid initdata, or just miss: another algorithm, an
/// empty version, no or a bad `[data]` table, values of the wrong type,
/// cut short, or with a stray byte.
fn initdata_near_miss() -> impl Strategy<Value = String> {
    let algorithm = prop_oneof![
        3 => select(ALGORITHMS.to_vec()).prop_map(|a| toml_string(a, 0)),
        1 => select(vec!["md5", "SHA256", "sha256 ", "sha-256", ""]).prop_map(|a| toml_string(a, 0)),
        1 => select(vec!["256", "true", "[\"sha256\"]", "sha256"]).prop_map(String::from),
    ];
    let version = prop_oneof![
        3 => "[0-9][0-9a-z.]{0,6}".prop_map(|v| toml_string(&v, 0)),
        1 => select(vec!["\"\"", "\" \"", "'\t'", "0.1", "1", "1979-05-27", "\"\"\"\n\"\"\""])
            .prop_map(String::from),
    ];
    let data = prop_oneof![
        4 => initdata_entries().prop_map(Some),
        1 => Just(None),
        1 => select(vec!["x = 1\n", "[data.sub]\nx = \"y\"\n", "x = [\"y\"]\n", "x = \"a\"\nx = \"b\"\n"])
            .prop_map(|s| Some(s.to_owned())),
    ];
    let document = initdata_with(algorithm, version, data).boxed();
    prop_oneof![
        4 => document.clone(),
        1 => (document.clone(), any::<prop::sample::Index>()).prop_map(|(d, at)| {
            let mut cut = at.index(d.len() + 1);
            while !d.is_char_boundary(cut) {
                cut -= 1;
            }
            d[..cut].to_owned()
        }),
        1 => (document, any::<prop::sample::Index>(), any::<char>()).prop_map(|(mut d, at, c)| {
            let mut i = at.index(d.len() + 1);
            while !d.is_char_boundary(i) {
                i -= 1;
            }
            d.insert(i, c);
            d
        }),
    ]
}

/// How a document is put into `cc_init_data`.
#[derive(Debug, Clone)]
enum InitdataForm {
    /// As Kata's runtime sends it: the raw TOML, byte for byte.
    Raw,
    /// Encoded: base64 (padded or not) of the document, or of its gzip at
    /// `gzip` level; wrapped at 76 columns with `wrap`, as `base64` writes
    /// it; `around` before and after.
    Encoded {
        gzip: Option<u32>,
        pad: bool,
        wrap: Option<&'static str>,
        around: &'static str,
    },
}

fn initdata_form() -> impl Strategy<Value = InitdataForm> {
    prop_oneof![
        2 => Just(InitdataForm::Raw),
        3 => (
            option::of(0u32..=9),
            any::<bool>(),
            option::of(select(vec!["\n", "\r\n"])),
            select(vec!["", "", " ", "\n", " \n\t"]),
        )
            .prop_map(|(gzip, pad, wrap, around)| InitdataForm::Encoded { gzip, pad, wrap, around }),
    ]
}

/// `document` as `cc_init_data` in `form`.
fn initdata_value(document: &str, form: &InitdataForm) -> String {
    let InitdataForm::Encoded {
        gzip,
        pad,
        wrap,
        around,
    } = form
    else {
        return document.to_owned();
    };
    let bytes = match gzip {
        Some(level) => {
            let mut gz = GzEncoder::new(Vec::new(), Compression::new(*level));
            gz.write_all(document.as_bytes()).unwrap();
            gz.finish().unwrap()
        }
        None => document.as_bytes().to_vec(),
    };
    let b64 = if *pad {
        STANDARD.encode(bytes)
    } else {
        STANDARD_NO_PAD.encode(bytes)
    };
    let body = match wrap {
        Some(eol) => b64
            .as_bytes()
            .chunks(76)
            .map(|line| format!("{}{eol}", std::str::from_utf8(line).unwrap()))
            .collect(),
        None => b64,
    };
    format!("{around}{body}{around}")
}

/// `cc_init_data` values the initdata check accepts or refuses.
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
        4 => (initdata_near_miss(), initdata_form()).prop_map(|(d, form)| initdata_value(&d, &form)),
        3 => (content, 0usize..3, "[ \t\n]{0,2}").prop_map(|(c, pads, ws)| {
            // Unpadded, then with up to two of the padding characters.
            let b64 = STANDARD_NO_PAD.encode(&c);
            let padding = STANDARD.encode(&c).len() - b64.len();
            format!("{ws}{b64}{}{ws}", "=".repeat(pads.min(padding)))
        }),
        1 => "[A-Za-z0-9+/=_ -]{0,40}",
        1 => select(vec!["=", "==", "====", "A", "AA", "AA==", "AA=", "YQ", "YR", "H4sI", "/w==", "a\nb", "\"\"\"", "[data]"])
            .prop_map(String::from),
    ]
}

/// Any annotation value.
fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => number_text(),
        3 => any::<String>(),
        2 => "\\PC{0,30}",
        3 => initdata_text(),
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
        1 => select(REAL_KEYS.to_vec()).prop_map(str::to_uppercase),
    ]
}

/// A CRI-O sandbox name's parts: pod, namespace, uid, attempt.
fn crio_parts() -> impl Strategy<Value = (String, String, String, String)> {
    (
        pod_name_text(),
        namespace_text(),
        "[0-9a-f-]{1,36}",
        "[0-9]{1,2}",
    )
}

/// A valid pod name: one to three RFC 1123 labels joined by dots.
fn pod_name_text() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4).prop_map(|l| l.join("."))
}

/// A valid namespace: an RFC 1123 label.
fn namespace_text() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

/// Arbitrary annotation maps; most carry a valid identity (some of them a
/// CRI-O sandbox name in containerd's key, as the Go shim sends under
/// CRI-O), so the parser gets past it to the resource annotations.
fn annotation_map() -> impl Strategy<Value = HashMap<String, String>> {
    let identity = prop_oneof![
        3 => ("[a-z0-9-]{1,20}", "[a-z0-9-]{1,20}"),
        1 => (crio_parts(), "[a-z0-9-]{1,3}", any::<bool>()).prop_map(|((pod, ns, uid, attempt), other, same)| {
            let namespace = if same { ns.clone() } else { other };
            (format!("k8s_{pod}_{ns}_{uid}_{attempt}"), namespace)
        }),
        // Near misses of CRI-O's shape in containerd's key: not cut, and
        // no pod name.
        1 => (crio_parts(), 0u8..5).prop_map(|((pod, ns, uid, attempt), shape)| {
            let name = match shape {
                0 => format!("K8s_{pod}_{ns}_{uid}_{attempt}"),
                1 => format!("k8s_{pod}_{ns}_{uid}_{attempt}x"),
                2 => format!("k8s_{pod}_{ns}__{attempt}"),
                3 => format!("k8s_{pod}_{ns}_{uid}_{attempt}_1"),
                _ => format!("k8s_{pod}_{ns}_{uid}"),
            };
            (name, ns)
        }),
        // Kubernetes-shaped and not: upper case, dots, long, unicode.
        1 => (pod_name_text(), namespace_text(), 0u8..6).prop_map(|(pod, ns, how)| match how {
            0 => (pod.to_uppercase(), ns),
            1 => (pod, format!("{ns}.x")),
            2 => (format!("{pod}-"), ns),
            3 => ("a".repeat(254), ns),
            4 => (pod, "n".repeat(64)),
            _ => (format!("{pod}\u{e9}"), ns),
        }),
    ];
    (
        option::weighted(0.7, identity),
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
    /// Absent, empty, or (vCPUs, memory) 0 after rounding: Kata's "unset".
    Unset,
    /// Accepted as this whole number.
    Value(u64),
    /// A non-negative number that (rounded) is above the maximum.
    OutOfRange,
    /// Negative, not finite or not a number — or, for GPUs, a fraction.
    Invalid,
}

/// How a number annotation is made whole.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Whole {
    /// vCPUs and memory: rounded up; 0 means unset; at least 1.
    RoundUp,
    /// GPUs: a fraction is invalid; 0 is a count.
    Only,
}

/// The model of a number annotation, from the parser's docs: a finite,
/// non-negative decimal as Rust's `f64` parser reads it (after trimming),
/// made whole as `whole` says, at most `max`. Alongside, the exact error
/// message the docs give for an invalid one.
fn model_number(
    m: &HashMap<String, String>,
    key: &str,
    whole: Whole,
    max: u64,
) -> (NumberVerdict, Option<String>) {
    let Some(raw) = m.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return (NumberVerdict::Unset, None);
    };
    let invalid = |why: &str| {
        (
            NumberVerdict::Invalid,
            Some(format!("annotation {key} is '{raw}', {why}")),
        )
    };
    let f = match raw.parse::<f64>() {
        // `-0` is not below 0: it reads as 0.
        Ok(f) if f.is_finite() && f >= 0.0 => f,
        _ if whole == Whole::Only => return invalid("not a whole number"),
        _ => return invalid("not a non-negative number"),
    };
    if whole == Whole::Only && f.fract() != 0.0 {
        return invalid("not a whole number");
    }
    let n = f.ceil();
    let min = match whole {
        Whole::RoundUp => 1,
        Whole::Only => 0,
    };
    if n > max as f64 {
        let msg = format!("annotation {key} is {raw}, outside {min}..={max}");
        return (NumberVerdict::OutOfRange, Some(msg));
    }
    match n as u64 {
        0 if whole == Whole::RoundUp => (NumberVerdict::Unset, None),
        n => (NumberVerdict::Value(n), None),
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

/// The model of standard base64 with optional padding: up to the
/// canonical number of `=` may follow (`AA`, `AA=` and `AA==` are the same
/// byte), and unused bits must be zero.
fn model_base64(data: &str) -> Option<Vec<u8>> {
    let unpadded = data.trim_end_matches('=');
    if data.len() - unpadded.len() > (4 - unpadded.len() % 4) % 4 {
        return None;
    }
    STANDARD_NO_PAD.decode(unpadded).ok()
}

/// Whether `document` is valid initdata, judged with the `toml` crate's
/// own table: `algorithm` a string naming sha256, sha384 or sha512,
/// `version` a string that is not blank, and a `data` table whose values
/// are strings. Other keys are allowed.
fn model_initdata_toml(document: &str) -> bool {
    let Ok(table) = document.parse::<toml::Table>() else {
        return false;
    };
    let algorithm = matches!(
        table.get("algorithm"),
        Some(toml::Value::String(a)) if ALGORITHMS.contains(&a.as_str())
    );
    let version = matches!(
        table.get("version"),
        Some(toml::Value::String(v)) if !v.trim().is_empty()
    );
    let data = matches!(
        table.get("data"),
        Some(toml::Value::Table(d)) if d.values().all(toml::Value::is_str)
    );
    algorithm && version && data
}

/// The length of the canonical encoding the pod VM receives: gzip (at
/// the default level), then padded standard base64.
fn canonical_encoded_len(document: &str) -> usize {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(document.as_bytes()).unwrap();
    gz.finish().unwrap().len().div_ceil(3) * 4
}

/// The model of `cc_init_data`: `Ok(None)` when absent or blank,
/// `Ok(Some(document))` with the exact TOML the pod VM must receive, or
/// `Err` with the exact message when the docs give one.
///
/// The value holds at most 64 KiB. Trimmed, if it is nothing but base64
/// characters and line breaks it is the encoded form: without its line
/// breaks, standard base64 (padding optional) of gzip (when it starts
/// 1f 8b) or of the plain document, which is UTF-8 and at most 1 MiB.
/// Otherwise the value itself, untrimmed, is the document. Either way the
/// document is valid initdata, and its canonical encoding fits in 64 KiB.
fn model_initdata(m: &HashMap<String, String>) -> Result<Option<String>, Option<String>> {
    let Some(value) = m.get(CC_INIT_DATA) else {
        return Ok(None);
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if value.len() > INITDATA_LIMIT {
        return Err(Some(format!(
            "annotation {CC_INIT_DATA}: {} bytes, above the limit of {INITDATA_LIMIT}",
            value.len()
        )));
    }
    let encoded = trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(&b));
    let document = if encoded {
        let joined: String = trimmed
            .chars()
            .filter(|c| !matches!(c, '\r' | '\n'))
            .collect();
        let bytes = model_base64(&joined).ok_or(None)?;
        let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            GzDecoder::new(bytes.as_slice())
                .take(INITDATA_DOCUMENT_LIMIT as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| None)?;
            out
        } else {
            bytes
        };
        if bytes.len() > INITDATA_DOCUMENT_LIMIT {
            return Err(None);
        }
        String::from_utf8(bytes).map_err(|_| None)?
    } else {
        value.clone()
    };
    if !model_initdata_toml(&document) || canonical_encoded_len(&document) > INITDATA_LIMIT {
        return Err(None);
    }
    Ok(Some(document))
}

/// The reasons the docs give for an invalid `cc_init_data`, each the start
/// of what follows `annotation <key>: `.
const INITDATA_REASONS: [&str; 8] = [
    "it is not base64: ",
    "it is not initdata TOML: ",
    "its algorithm '",
    "it has no [data] table",
    "its version is empty",
    "it is not UTF-8 text",
    "it is not a gzip stream",
    "it is empty",
];

/// A request as the model sees it: the initdata is the TOML document
/// itself, not its encoding.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    pod_name: String,
    pod_namespace: String,
    spec: InstanceSpec,
    initdata: Option<String>,
}

/// What a parsed request holds, its initdata decoded: the pod VM receives
/// initdata as the canonical encoding — gzip, then padded standard base64
/// on one line, at most 64 KiB — of the exact document the pod sent.
fn received(r: &SandboxRequest) -> Result<Expected, String> {
    let initdata = match r.initdata.as_deref() {
        None => None,
        Some(encoded) => {
            if encoded.len() > INITDATA_LIMIT {
                return Err(format!("initdata is {} bytes encoded", encoded.len()));
            }
            let gzip = STANDARD
                .decode(encoded)
                .map_err(|e| format!("initdata {encoded:.60} is not padded base64: {e}"))?;
            if !gzip.starts_with(&[0x1f, 0x8b]) {
                return Err(format!("initdata {encoded:.60} is not gzip"));
            }
            let mut document = String::new();
            GzDecoder::new(gzip.as_slice())
                .read_to_string(&mut document)
                .map_err(|e| format!("initdata {encoded:.60} does not gunzip to text: {e}"))?;
            Some(document)
        }
    };
    Ok(Expected {
        pod_name: r.pod_name.clone(),
        pod_namespace: r.pod_namespace.clone(),
        spec: r.spec.clone(),
        initdata,
    })
}

/// The model of a CRI-O sandbox name: exactly
/// `k8s_<pod>_<namespace>_<uid>_<attempt>`, every part non-empty, the
/// attempt ASCII digits. Its pod and namespace.
fn model_crio_name(name: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = name.split('_').collect();
    let [k8s, pod, ns, uid, attempt] = parts.as_slice() else {
        return None;
    };
    let ok = *k8s == "k8s"
        && [pod, ns, uid, attempt].iter().all(|p| !p.is_empty())
        && attempt.bytes().all(|b| b.is_ascii_digit());
    ok.then_some((*pod, *ns))
}

/// Kubernetes' RFC 1123 label, written from its documentation: 1 to 63
/// characters of `[a-z0-9-]`, starting and ending with `[a-z0-9]`.
fn model_dns_label(s: &str, max: usize) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=max).contains(&s.len())
        && s.chars().all(|c| alnum(c) || c == '-')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// A pod name: an RFC 1123 subdomain as Kubernetes validates it
/// (apimachinery's `IsDNS1123Subdomain`: at most 253 characters matching
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`).
/// Unlike DNS, no dot-separated part is held to 63 characters.
fn model_pod_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|part| model_dns_label(part, 253))
}

/// The model's verdict on a whole annotation map.
#[derive(Debug)]
struct Model {
    /// Annotations with an invalid (or missing required) value: an error
    /// must name one of them; none means the map must parse.
    bad: Vec<&'static str>,
    /// Number annotations holding a number out of range.
    out_of_range: Vec<&'static str>,
    /// The exact error message for a bad annotation, where the docs give one.
    messages: HashMap<&'static str, String>,
    /// What the parser must return when `bad` is empty.
    expected: Option<Expected>,
}

fn model(m: &HashMap<String, String>) -> Model {
    let mut bad = Vec::new();
    let mut out_of_range = Vec::new();
    let mut messages = HashMap::new();
    let get = |k: &str| m.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    // Names Kubernetes would refuse are refused, naming the key they came in.
    let valid = |pod: &str, ns: &str, pod_key, ns_key, bad: &mut Vec<&'static str>| {
        let ok_pod = model_pod_name(pod);
        let ok_ns = model_dns_label(ns, 63);
        if !ok_pod {
            bad.push(pod_key);
        }
        if !ok_ns {
            bad.push(ns_key);
        }
        (ok_pod && ok_ns).then(|| (pod.to_owned(), ns.to_owned()))
    };
    let identity = match (get(SANDBOX_NAME), get(SANDBOX_NAMESPACE)) {
        // The Go shim under CRI-O puts CRI-O's sandbox name here: the pod
        // name is cut out of it when its namespace is the pod's.
        (Some(n), Some(ns)) => match model_crio_name(n) {
            Some((pod, crio_ns)) if crio_ns == ns => {
                valid(pod, ns, SANDBOX_NAME, SANDBOX_NAMESPACE, &mut bad)
            }
            _ => valid(n, ns, SANDBOX_NAME, SANDBOX_NAMESPACE, &mut bad),
        },
        (Some(_), None) => {
            bad.push(SANDBOX_NAMESPACE);
            None
        }
        (None, Some(_)) => {
            bad.push(SANDBOX_NAME);
            None
        }
        (None, None) => match get(CRIO_SANDBOX_NAME) {
            Some(crio) => match model_crio_name(crio) {
                Some((pod, ns)) => valid(pod, ns, CRIO_SANDBOX_NAME, CRIO_SANDBOX_NAME, &mut bad),
                None => {
                    bad.push(CRIO_SANDBOX_NAME);
                    None
                }
            },
            None => {
                bad.extend([SANDBOX_NAME, SANDBOX_NAMESPACE]);
                None
            }
        },
    };
    let mut number = |key: &'static str, whole: Whole, max: u64| {
        let (verdict, message) = model_number(m, key, whole, max);
        if let Some(message) = message {
            messages.insert(key, message);
        }
        match verdict {
            NumberVerdict::Unset => None,
            NumberVerdict::Value(v) => Some(v),
            NumberVerdict::OutOfRange => {
                bad.push(key);
                out_of_range.push(key);
                None
            }
            NumberVerdict::Invalid => {
                bad.push(key);
                None
            }
        }
    };
    let vcpus = number(DEFAULT_VCPUS, Whole::RoundUp, 4096).map(|v| v as u32);
    let memory_mib = number(DEFAULT_MEMORY, Whole::RoundUp, 64 * 1024 * 1024);
    let gpus = number(DEFAULT_GPUS, Whole::Only, 1024).map(|v| v as u32);
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
    let initdata = model_initdata(m).unwrap_or_else(|message| {
        bad.push(CC_INIT_DATA);
        if let Some(message) = message {
            messages.insert(CC_INIT_DATA, message);
        }
        None
    });
    let expected = match identity {
        Some((pod_name, pod_namespace)) if bad.is_empty() => Some(Expected {
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
        messages,
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
            let got = received(&request).map_err(TestCaseError::fail)?;
            prop_assert_eq!(Some(got), model.expected);
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
            let key = key.unwrap();
            if let Some(want) = model.messages.get(key) {
                prop_assert_eq!(&msg, want);
            } else if key == CC_INIT_DATA {
                let why = msg.strip_prefix(&format!("annotation {CC_INIT_DATA}: "));
                prop_assert!(
                    why.is_some_and(|why| INITDATA_REASONS.iter().any(|r| why.starts_with(r))
                        || why.ends_with(" bytes, above the limit of 1048576")
                        || why.ends_with(&format!(" bytes once gzip + base64 encoded for the pod VM, above the limit of {INITDATA_LIMIT}"))),
                    "not a documented initdata error: {msg}"
                );
            }
        }
    }
    Ok(())
}

/// A whole value rendered in one of the ways Kata and people write numbers.
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

/// `n` plus a fraction of `micros` millionths (1..1_000_000), written in
/// one of the ways Kata, runtime-rs and people write fractions. It rounds
/// up to `n + 1` (a millionth is far above `f64`'s resolution here).
fn render_fraction(n: u64, micros: u32, style: u8, pad: &str) -> String {
    let digits = format!("{micros:06}");
    let digits = digits.trim_end_matches('0');
    let s = match style % 4 {
        0 => format!("{n}.{digits}"),
        1 => format!("{n}.{digits}00"),
        2 => format!("{n}{digits}e-{}", digits.len()),
        // runtime-rs's f32 sandbox size, in quarters (exact in f32).
        _ if n < 1 << 20 => format!("{}", n as f32 + (1 + micros % 3) as f32 / 4.0),
        _ => format!("+{n}.{digits}"),
    };
    format!("{pad}{s}{pad}")
}

/// A vCPU or memory annotation up to `max`, and what it must read as:
/// whole values as they are (0: unset), fractions rounded up.
fn rounded_number(max: u64) -> impl Strategy<Value = (String, Option<u64>)> {
    let pad = || select(vec!["", " ", "\t", "\n"]);
    prop_oneof![
        (0..=max, any::<u8>(), pad())
            .prop_map(|(n, style, pad)| (render_number(n, style, pad), Some(n).filter(|n| *n > 0))),
        (0..max, 1u32..1_000_000, any::<u8>(), pad()).prop_map(|(n, micros, style, pad)| (
            render_fraction(n, micros, style, pad),
            Some(n + 1)
        )),
    ]
}

/// The pod identity annotations, and the pod name and namespace they
/// must read as.
fn identity_annotations() -> impl Strategy<Value = (Vec<(&'static str, String)>, String, String)> {
    let pad = || select(vec!["", " ", "\t", "\n "]);
    prop_oneof![
        // containerd: a Kubernetes pod name and namespace, trimmed.
        2 => (pod_name_text(), namespace_text(), pad(), pad())
            .prop_map(|(pod, namespace, p1, p2)| {
                let entries = vec![
                    (SANDBOX_NAME, format!("{p1}{pod}{p2}")),
                    (SANDBOX_NAMESPACE, format!("{p2}{namespace}{p1}")),
                ];
                (entries, pod, namespace)
            }),
        // CRI-O's own key: k8s_<pod>_<ns>_<uid>_<attempt>.
        1 => (crio_parts(), pad()).prop_map(|((pod, ns, uid, attempt), pad)| {
            let crio = format!("{pad}k8s_{pod}_{ns}_{uid}_{attempt}{pad}");
            (vec![(CRIO_SANDBOX_NAME, crio)], pod, ns)
        }),
        // The Go shim under CRI-O: CRI-O's sandbox name in containerd's
        // key, cut to the pod name (its namespace is the pod's). Near
        // misses are no pod names at all: `annotation_map` covers them.
        2 => (crio_parts(), pad(), pad()).prop_map(
            |((pod, ns, uid, attempt), pad, ns_pad)| {
                let name = format!("k8s_{pod}_{ns}_{uid}_{attempt}");
                let entries = vec![
                    (SANDBOX_NAME, format!("{pad}{name}{pad}")),
                    (SANDBOX_NAMESPACE, format!("{ns_pad}{ns}{ns_pad}")),
                ];
                (entries, pod, ns)
            },
        ),
    ]
}

/// A valid annotation set and the request it must parse to.
fn valid_annotations() -> impl Strategy<Value = (HashMap<String, String>, Expected)> {
    let gpus = option::of((0..=1024u64, any::<u8>(), select(vec!["", " ", "\t"])));
    let text = || option::of("[ ]{0,2}[^\\p{Cc}\\s][^\\p{Cc}]{0,40}");
    let initdata = option::of((initdata_document(), initdata_form()));
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
        identity_annotations(),
        (
            option::of(rounded_number(4096)),
            option::of(rounded_number(64 * 1024 * 1024)),
            gpus,
        ),
        (text(), text(), text()),
        initdata,
        noise,
        // The Go shim sends all nine keys, an unset one as "" or "0".
        any::<bool>(),
    )
        .prop_map(
            |(
                (identity, pod_name, pod_namespace),
                (vcpus, memory, gpus),
                (machine, gpu_model, image),
                init,
                noise,
                all_keys,
            )| {
                let mut m: HashMap<String, String> = noise;
                for (key, value) in identity {
                    m.insert(key.into(), value);
                }
                let mut rounded = |key: &str, v: Option<(String, Option<u64>)>| {
                    let (raw, n) = v?;
                    m.insert(key.into(), raw);
                    n
                };
                let vcpus = rounded(DEFAULT_VCPUS, vcpus);
                let memory_mib = rounded(DEFAULT_MEMORY, memory);
                let gpus = gpus.map(|(n, style, pad)| {
                    m.insert(DEFAULT_GPUS.into(), render_number(n, style, pad));
                    n
                });
                let mut text = |key: &str, v: Option<String>| {
                    let v = v?;
                    m.insert(key.into(), v.clone());
                    Some(v.trim().to_owned())
                };
                let instance_type = text(MACHINE_TYPE, machine);
                let gpu_model = text(DEFAULT_GPU_MODEL, gpu_model);
                let image = text(IMAGE, image);
                let initdata = init.map(|(document, form)| {
                    m.insert(CC_INIT_DATA.into(), initdata_value(&document, &form));
                    document
                });
                let gpus = if all_keys {
                    for (key, unset) in [
                        (MACHINE_TYPE, ""),
                        (IMAGE, ""),
                        (DEFAULT_VCPUS, "0"),
                        (DEFAULT_MEMORY, "0"),
                        (CC_INIT_DATA, ""),
                        (DEFAULT_GPUS, "0"),
                        (DEFAULT_GPU_MODEL, ""),
                    ] {
                        m.entry(key.into()).or_insert_with(|| unset.into());
                    }
                    // "0" GPUs is a count.
                    gpus.or(Some(0))
                } else {
                    gpus
                };
                let spec = InstanceSpec {
                    instance_type,
                    vcpus: vcpus.map(|n| n as u32),
                    memory_mib,
                    gpus: gpus.map(|n| n as u32),
                    gpu_model,
                    image,
                };
                let expected = Expected {
                    pod_name,
                    pod_namespace,
                    spec,
                    initdata,
                };
                (m, expected)
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

    /// Valid annotation sets — however their numbers are written (fractions
    /// rounded up), with a CRI-O sandbox name in either key, and initdata
    /// as raw TOML or encoded — parse to exactly the values they hold, the
    /// initdata encoded for the pod VM from the exact document sent.
    #[test]
    fn valid_annotations_round_trip((m, expected) in valid_annotations()) {
        let request = parse(&m).map_err(TestCaseError::fail)?;
        prop_assert_eq!(received(&request).map_err(TestCaseError::fail)?, expected);
        check_parse(&m)?;
    }

    /// One number annotation at a time, over the whole range and past it:
    /// accepted exactly when a non-negative number in range (vCPUs and
    /// memory rounded up, GPUs whole), and then as that value.
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

    /// Initdata alone, valid or nearly: accepted exactly when the model
    /// says, as the exact document sent.
    #[test]
    fn initdata_is_read_as_documented(raw in initdata_text()) {
        let m = HashMap::from([
            (SANDBOX_NAME.to_owned(), "web".to_owned()),
            (SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
            (CC_INIT_DATA.to_owned(), raw),
        ]);
        check_parse(&m)?;
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// An error about a number out of range says so ("outside
    /// min..=max"), whether it is written as an integer, a whole float or
    /// a fraction that rounds up past the maximum, rather than calling it
    /// not a number.
    #[test]
    fn out_of_range_numbers_are_called_out_of_range(
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

/// A valid initdata document padded with a TOML comment to exactly `len`
/// bytes.
fn initdata_padded_to(len: usize) -> String {
    let mut document = String::from(
        "algorithm = \"sha256\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs]\n'''\n# ",
    );
    document.push_str(&"x".repeat(len - document.len() - 1));
    document.push('\n');
    assert_eq!(document.len(), len);
    document
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
        for raw in [
            max.to_string(),
            format!("{max}.0"),
            format!("{}.5", max - 1),
            format!("{max}.000001"),
            (max + 1).to_string(),
            "0.000001".to_owned(),
            "-0.000001".to_owned(),
        ] {
            check_parse(&base(key, raw)).unwrap();
        }
    }
    // Fractions round up to the maximum, and no further.
    let spec = |k: &str, v: &str| parse(&base(k, v.to_owned())).map(|r| r.spec);
    assert_eq!(spec(DEFAULT_VCPUS, "4095.5").unwrap().vcpus, Some(4096));
    assert_eq!(spec(DEFAULT_VCPUS, "0.000001").unwrap().vcpus, Some(1));
    assert_eq!(
        spec(DEFAULT_MEMORY, "67108863.5").unwrap().memory_mib,
        Some(64 * 1024 * 1024)
    );
    assert_eq!(
        spec(DEFAULT_VCPUS, "4096.5").unwrap_err(),
        format!("annotation {DEFAULT_VCPUS} is 4096.5, outside 1..=4096")
    );
    assert_eq!(
        spec(DEFAULT_GPUS, "1023.5").unwrap_err(),
        format!("annotation {DEFAULT_GPUS} is '1023.5', not a whole number")
    );
    // Initdata: raw TOML of exactly the 64 KiB limit, and one byte past it.
    let at_limit = initdata_padded_to(INITDATA_LIMIT);
    let r = parse(&base(CC_INIT_DATA, at_limit.clone())).unwrap();
    assert_eq!(received(&r).unwrap().initdata, Some(at_limit));
    let e = parse(&base(CC_INIT_DATA, initdata_padded_to(INITDATA_LIMIT + 1))).unwrap_err();
    assert_eq!(
        e,
        format!("annotation {CC_INIT_DATA}: 65537 bytes, above the limit of 65536")
    );
    // The encoded form at the limit, and one byte (a line break) past it.
    let document = initdata_padded_to(INITDATA_LIMIT / 4 * 3);
    let encoded = STANDARD.encode(&document);
    assert_eq!(encoded.len(), INITDATA_LIMIT);
    let r = parse(&base(CC_INIT_DATA, encoded.clone())).unwrap();
    assert_eq!(received(&r).unwrap().initdata, Some(document));
    let e = parse(&base(CC_INIT_DATA, format!("{encoded}\n"))).unwrap_err();
    assert_eq!(
        e,
        format!("annotation {CC_INIT_DATA}: 65537 bytes, above the limit of 65536")
    );
    // A gzip-compressed document of exactly 1 MiB, and one byte more.
    for (len, ok) in [
        (INITDATA_DOCUMENT_LIMIT, true),
        (INITDATA_DOCUMENT_LIMIT + 1, false),
    ] {
        let document = initdata_padded_to(len);
        let form = InitdataForm::Encoded {
            gzip: Some(9),
            pad: true,
            wrap: Some("\n"),
            around: "",
        };
        let m = base(CC_INIT_DATA, initdata_value(&document, &form));
        check_parse(&m).unwrap();
        match parse(&m) {
            Ok(r) if ok => assert_eq!(received(&r).unwrap().initdata, Some(document)),
            Err(e) if !ok => assert!(
                e.ends_with("1048577 bytes, above the limit of 1048576"),
                "{e}"
            ),
            other => panic!("{len} bytes: {other:?}"),
        }
    }
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
/// one: `pod_name`, `pod_namespace`, `spec`, and `initdata` — `true` or
/// `false` for whether there is initdata, or the exact TOML document the
/// pod VM must receive); `err-*` must be refused, with an error that starts
/// `annotation <key>` for a key of the map (and contains the text of the
/// sidecar `err-*.expect`, when there is one). Every file must also agree
/// with the model, as generated maps must.
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
                    let document = received(&r)
                        .unwrap_or_else(|e| panic!("{file}: {e}"))
                        .initdata;
                    let initdata = match want["initdata"] {
                        Value::String(_) => json!(document),
                        _ => json!(document.is_some()),
                    };
                    let got = json!({
                        "pod_name": r.pod_name,
                        "pod_namespace": r.pod_namespace,
                        "spec": r.spec,
                        "initdata": initdata,
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
                assert_eq!(*known, SCHEMA_VERSION);
            }
            (kind, result) => panic!("{file}: expected {kind}, got {result:?}"),
        }
    }
}
