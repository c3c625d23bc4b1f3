//! Initdata: the Confidential Containers TOML document (`version`,
//! `algorithm`, a `[data]` table of file contents) that configures the
//! attestation agent, the CDH and the agent policy inside a pod VM.
//!
//! It travels in three forms, and this module converts between them:
//! - as **raw TOML text** in CreateVM's `cc_init_data` annotation: Kata's
//!   runtime decodes the pod's annotation before it calls the remote
//!   hypervisor (Kata `src/runtime/pkg/oci/utils.go`,
//!   `addHypervisorInitdataOverrides`; runtime-rs
//!   `kata-types/src/initdata.rs`, `decode_raw_initdata`);
//! - **gzip + standard base64** in the daemon's `INITDATA` setting and in the
//!   pod VM's `/run/peerpod/initdata` — the reference encodes the runtime's
//!   TOML again before it writes it into user data (cloud-api-adaptor
//!   `pkg/util/cloud.go`, `GetInitdataFromAnnotation`, and
//!   `pkg/initdata/initdata.go`, `Encode`);
//! - as the parsed document, whose digest — the hash named by `algorithm`
//!   over the exact TOML bytes, lower-case hex — goes to
//!   `/run/peerpod/initdata.digest` (cloud-api-adaptor
//!   `pkg/initdata/initdata.go`, `digest`).
//!
//! Raw TOML and the encoded form are told apart without guessing: valid
//! initdata has a string `version`, so its TOML holds a quote (`"` or `'`),
//! which the base64 alphabet never does.

use base64::Engine as _;
use serde::Deserialize;
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};

/// The largest encoded initdata (gzip + base64): the pod VM's limit for
/// `/run/peerpod/initdata`, and the daemon's for the annotation.
pub const MAX_ENCODED: usize = 64 << 10;
/// The largest initdata document once decoded, in bytes.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// The digest algorithms initdata may name.
pub const ALGORITHMS: &[&str] = &["sha256", "sha384", "sha512"];

/// Why a value is not initdata. Every variant reads as the end of a
/// sentence about the value ("initdata …: it is not base64").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitdataError {
    /// Longer than the limit of its form.
    #[error("it is {size} bytes, above the limit of {limit}")]
    TooLarge {
        /// Its size, bytes.
        size: usize,
        /// The limit, bytes.
        limit: usize,
    },
    /// The encoded form does not decode as standard base64.
    #[error("it is not base64: {0}")]
    NotBase64(String),
    /// Base64 of something that starts as gzip but is not a gzip stream.
    #[error("it is not a gzip stream: {0}")]
    NotGzip(String),
    /// The document is empty.
    #[error("it is empty")]
    Empty,
    /// The document is not UTF-8.
    #[error("it is not UTF-8 text")]
    NotUtf8,
    /// The document is not TOML, or lacks a key initdata needs.
    #[error("it is not initdata TOML: {0}")]
    NotToml(String),
    /// `algorithm` names no supported digest.
    #[error("its algorithm '{0}' is not sha256, sha384 or sha512")]
    Algorithm(String),
    /// `version` is empty.
    #[error("its version is empty")]
    EmptyVersion,
    /// There is no `[data]` table.
    #[error("it has no [data] table (an empty one is fine)")]
    NoData,
}

/// A valid initdata document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initdata {
    /// The TOML document, byte for byte as received (its digest covers
    /// exactly these bytes).
    pub document: String,
    /// `algorithm`: sha256, sha384 or sha512.
    pub algorithm: String,
    /// `version`, as written (the reference does not interpret it).
    pub version: String,
    /// The digest of `document` with `algorithm`, lower-case hex.
    pub digest: String,
    /// The `[data]` entries: file name → content.
    pub data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct InitdataToml {
    algorithm: String,
    version: String,
    data: Option<BTreeMap<String, String>>,
}

impl Initdata {
    /// Parses and checks a TOML document: `version` (not empty),
    /// `algorithm` (one of [`ALGORITHMS`]) and a `[data]` table of strings.
    ///
    /// # Errors
    /// [`InitdataError::TooLarge`] above [`MAX_DOCUMENT`] bytes,
    /// [`InitdataError::Empty`], [`InitdataError::NotToml`],
    /// [`InitdataError::Algorithm`] for an unknown algorithm,
    /// [`InitdataError::EmptyVersion`], or [`InitdataError::NoData`] without
    /// a `[data]` table.
    pub fn parse(document: String) -> Result<Self, InitdataError> {
        if document.len() > MAX_DOCUMENT {
            return Err(InitdataError::TooLarge {
                size: document.len(),
                limit: MAX_DOCUMENT,
            });
        }
        if document.trim().is_empty() {
            return Err(InitdataError::Empty);
        }
        let parsed: InitdataToml = toml::from_str(&document)
            .map_err(|e| InitdataError::NotToml(e.message().to_owned()))?;
        let digest = match parsed.algorithm.as_str() {
            "sha256" => hex::encode(sha2::Sha256::digest(document.as_bytes())),
            "sha384" => hex::encode(sha2::Sha384::digest(document.as_bytes())),
            "sha512" => hex::encode(sha2::Sha512::digest(document.as_bytes())),
            _ => return Err(InitdataError::Algorithm(parsed.algorithm)),
        };
        if parsed.version.trim().is_empty() {
            return Err(InitdataError::EmptyVersion);
        }
        let data = parsed.data.ok_or(InitdataError::NoData)?;
        Ok(Self {
            document,
            algorithm: parsed.algorithm,
            version: parsed.version,
            digest,
            data,
        })
    }

    /// Decodes the encoded form: standard base64 (padding optional; line
    /// breaks ignored, as Go's decoder ignores them) of a gzip stream — or,
    /// leniently, of the plain TOML.
    ///
    /// # Errors
    /// [`InitdataError::TooLarge`] when the encoded form or what it unpacks
    /// to is above its limit, [`InitdataError::NotBase64`],
    /// [`InitdataError::NotGzip`] for a broken gzip stream,
    /// [`InitdataError::NotUtf8`], and then the errors of
    /// [`Initdata::parse`].
    pub fn decode(encoded: &str) -> Result<Self, InitdataError> {
        if encoded.len() > MAX_ENCODED {
            return Err(InitdataError::TooLarge {
                size: encoded.len(),
                limit: MAX_ENCODED,
            });
        }
        let unwrapped: String = encoded
            .trim()
            .chars()
            .filter(|c| *c != '\n' && *c != '\r')
            .collect();
        let raw = LENIENT_BASE64
            .decode(unwrapped.as_bytes())
            .map_err(|e| InitdataError::NotBase64(e.to_string()))?;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .take(MAX_DOCUMENT as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| InitdataError::NotGzip(e.to_string()))?;
            out
        } else {
            raw
        };
        if bytes.len() > MAX_DOCUMENT {
            return Err(InitdataError::TooLarge {
                size: bytes.len(),
                limit: MAX_DOCUMENT,
            });
        }
        let document = String::from_utf8(bytes).map_err(|_| InitdataError::NotUtf8)?;
        Self::parse(document)
    }

    /// Reads CreateVM's `cc_init_data` annotation: the raw TOML Kata's
    /// runtime sends, or (as older clients sent) the encoded form. The two
    /// cannot be confused: see the module documentation.
    ///
    /// # Errors
    /// Those of [`Initdata::decode`] for the encoded form, of
    /// [`Initdata::parse`] for raw TOML.
    pub fn from_annotation(value: &str) -> Result<Self, InitdataError> {
        if is_encoded_form(value) {
            Self::decode(value)
        } else {
            Self::parse(value.to_owned())
        }
    }

    /// The encoded form the pod VM receives: gzip of the document, then
    /// standard padded base64 on one line — as the reference's `Encode`.
    pub fn encode(&self) -> String {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing into a Vec cannot fail.
        let compressed = gzip
            .write_all(self.document.as_bytes())
            .and_then(|()| gzip.finish())
            .unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(compressed)
    }
}

/// Whether `value` can only be the encoded form: nothing but the base64
/// alphabet, padding and line breaks. Valid initdata TOML always holds a
/// quote, so it never passes.
fn is_encoded_form(value: &str) -> bool {
    let value = value.trim();
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(&b))
}

/// Standard base64 with or without padding (hand-written values often lack it).
const LENIENT_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The initdata of the reference's documentation and its sha384
    /// (computed independently, with Python's hashlib).
    const DOC: &str = "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = \"\"\"\n[token_configs]\n\"\"\"\n\"policy.rego\" = \"package agent_policy\"\n";
    const SHA384: &str = "2c6e3923824751b4f0d907c0e0d1c6a49c1c12959f5ea667666966ff18706d814a49ef05d165bce9d7836b789de0d7d8";
    /// `gzip -n | base64` of DOC (GNU gzip 1.12): what an operator puts in INITDATA.
    const GNU_GZIP_WRAPPED: &str = "H4sIAAAAAAAAAyXKQQqDMBCF4f2cIrwDBItduOlJpMgQYwzGjCSD4O2N7eJt/u9xClKirrv5GNSV\n++ENOn2pUfKTOvuyHYjGmZW/BGarsic8BtCosvk8OclLDLV5azgkRXfZ4oP8fge7jYM3bVmnv4Ju\nQe6f/XoAAAA=\n";

    #[test]
    fn the_runtimes_raw_toml_is_parsed_with_the_references_digest() {
        let d = Initdata::from_annotation(DOC).unwrap();
        assert_eq!(d.document, DOC);
        assert_eq!(d.algorithm, "sha384");
        assert_eq!(d.version, "0.1.0");
        assert_eq!(d.digest, SHA384);
        assert_eq!(d.data["policy.rego"], "package agent_policy");
    }

    #[test]
    fn encoding_round_trips_and_is_gzip_base64_on_one_line() {
        let d = Initdata::parse(DOC.to_owned()).unwrap();
        let encoded = d.encode();
        assert!(encoded.starts_with("H4sI"), "{encoded}");
        assert!(!encoded.contains('\n'));
        assert_eq!(Initdata::decode(&encoded).unwrap(), d);
        assert_eq!(Initdata::from_annotation(&encoded).unwrap(), d);
    }

    #[test]
    fn line_wrapped_base64_is_read_as_gos_decoder_reads_it() {
        let d = Initdata::decode(GNU_GZIP_WRAPPED).unwrap();
        assert_eq!(d.document, DOC);
        assert_eq!(d.digest, SHA384);
    }

    #[test]
    fn every_problem_is_named() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        for (value, why) in [
            ("%%%".to_owned(), "not initdata TOML"),
            ("!!!".to_owned(), "not initdata TOML"),
            ("a".to_owned(), "not base64"),
            ("H4sIAAAA".to_owned(), "not a gzip stream"),
            ("/w==".to_owned(), "not UTF-8"),
            (
                "algorithm = \"md5\"\nversion = \"0.1.0\"\n[data]\n".to_owned(),
                "'md5' is not sha256",
            ),
            (
                "version = \"0.1.0\"\n[data]\n".to_owned(),
                "not initdata TOML",
            ),
            (
                "algorithm = \"sha256\"\nversion = \"\"\n[data]\n".to_owned(),
                "version is empty",
            ),
            (
                "algorithm = \"sha256\"\nversion = \"0.1.0\"\n".to_owned(),
                "no [data] table",
            ),
            (
                "algorithm = \"sha256\"\nversion = \"0.1.0\"\n[data]\nx = 1\n".to_owned(),
                "not initdata TOML",
            ),
            (b64("version = \"0.1.0\"\n"), "not initdata TOML"),
            ("   ".to_owned(), "it is empty"),
            ("A".repeat(MAX_ENCODED + 1), "above the limit of 65536"),
        ] {
            let e = Initdata::from_annotation(&value).unwrap_err().to_string();
            assert!(e.contains(why), "{value:.60}: {e}");
        }
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_document_limit() {
        let zeros = vec![b' '; MAX_DOCUMENT * 4];
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&zeros).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(gzip.finish().unwrap());
        assert!(encoded.len() < MAX_ENCODED);
        let e = Initdata::decode(&encoded).unwrap_err();
        assert!(matches!(e, InitdataError::TooLarge { .. }), "{e}");
    }
}
