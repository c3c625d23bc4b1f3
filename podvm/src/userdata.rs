//! Provisioning inside the pod VM (the reference's `process-user-data`):
//! find the user data the daemon rendered, parse it strictly, and write
//! only the allow-listed files under `/run/peerpod/`, plus the initdata
//! digest.
//!
//! User data is a `#cloud-config` document with a single key,
//! `write_files`, whose entries have exactly `path` and `content`. Anything
//! else — another key, another field, a path outside the allow-list, a file
//! above its size limit — is an error, and then nothing is written.

use crate::initdata::{Initdata, InitdataError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the files go (under the root given to [`apply`]).
pub const PEERPOD_DIR: &str = "run/peerpod";
/// The files user data may write, by name under `/run/peerpod/`.
pub const ALLOWED: &[&str] = &[
    "apf.json",
    "auth.json",
    "initdata",
    "scratch-space.marker",
    "aa.toml",
    "cdh.toml",
    "policy.rego",
];
/// The largest user data accepted.
pub const MAX_USER_DATA: usize = 256 << 10;
/// The largest `auth.json` (the reference omits larger ones).
pub const MAX_AUTH_JSON: usize = 12288;
/// The initdata files derived from its `[data]` table.
const INITDATA_DATA_FILES: &[&str] = &["aa.toml", "cdh.toml", "policy.rego"];

/// What went wrong; never carries file contents (they may hold secrets).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserDataError {
    /// The user data is not a `#cloud-config` document.
    #[error("The user data is not a cloud-config (its first line must be '#cloud-config')")]
    NotCloudConfig,
    /// The user data is larger than [`MAX_USER_DATA`].
    #[error("The user data is {size} bytes, above the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The YAML does not parse, or has keys or fields other than allowed.
    #[error("The user data is malformed: {0}")]
    Malformed(String),
    /// A path outside the allow-list.
    #[error("The user data writes {0}, which is not one of the allowed /run/peerpod files")]
    PathNotAllowed(String),
    /// One path twice.
    #[error("The user data writes {0} twice")]
    Duplicate(String),
    /// A file above its limit.
    #[error("The user data's {path} is {size} bytes, above the limit of {limit}")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The initdata does not decode.
    #[error("The initdata is malformed: {0}")]
    Initdata(#[from] InitdataError),
    /// A file could not be written.
    #[error("Cannot write {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        message: String,
    },
    /// No source had user data in time.
    #[error("No user data after {waited:?}: {tried}")]
    NotFound {
        /// How long it looked.
        waited: Duration,
        /// What each source said last.
        tried: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudConfig {
    write_files: Vec<WriteFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteFile {
    path: String,
    content: String,
}

/// One file to write, by its allow-listed name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Its name under `/run/peerpod/`.
    pub name: &'static str,
    /// What to write.
    pub content: String,
}

/// Parses user data strictly into the files it writes.
///
/// # Errors
/// [`UserDataError::TooLarge`] above [`MAX_USER_DATA`],
/// [`UserDataError::NotCloudConfig`] without the `#cloud-config` line,
/// [`UserDataError::Malformed`] for bad YAML or an unknown key or field,
/// [`UserDataError::PathNotAllowed`], [`UserDataError::Duplicate`], or
/// [`UserDataError::FileTooLarge`] for a file above its own limit.
pub fn parse(text: &str) -> Result<Vec<File>, UserDataError> {
    if text.len() > MAX_USER_DATA {
        return Err(UserDataError::TooLarge {
            size: text.len(),
            limit: MAX_USER_DATA,
        });
    }
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err(UserDataError::NotCloudConfig);
    }
    let config: CloudConfig =
        serde_norway::from_str(text).map_err(|e| UserDataError::Malformed(e.to_string()))?;
    let mut files: Vec<File> = Vec::new();
    for entry in config.write_files {
        let name = entry
            .path
            .strip_prefix("/run/peerpod/")
            .and_then(|n| ALLOWED.iter().find(|a| **a == n))
            .ok_or_else(|| UserDataError::PathNotAllowed(entry.path.clone()))?;
        if files.iter().any(|f| f.name == *name) {
            return Err(UserDataError::Duplicate(entry.path));
        }
        let limit = match *name {
            "auth.json" => MAX_AUTH_JSON,
            "initdata" => crate::initdata::MAX_ENCODED,
            _ => MAX_USER_DATA,
        };
        if entry.content.len() > limit {
            return Err(UserDataError::FileTooLarge {
                path: entry.path,
                size: entry.content.len(),
                limit,
            });
        }
        files.push(File {
            name,
            content: entry.content,
        });
    }
    Ok(files)
}

/// Checks everything, then writes the files under `<root>/run/peerpod/`
/// (owner-only), the initdata digest, and the initdata's `[data]` files
/// that user data did not write itself. Returns the paths written.
///
/// # Errors
/// [`UserDataError::Initdata`] when the `initdata` file does not decode
/// (then nothing is written); [`UserDataError::Io`] naming the path when
/// the directory or a file cannot be created, written, synced or renamed.
pub fn apply(files: &[File], root: &Path) -> Result<Vec<PathBuf>, UserDataError> {
    // Decide everything before writing anything.
    let mut out: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.name.to_owned(), f.content.clone()))
        .collect();
    if let Some(initdata) = files.iter().find(|f| f.name == "initdata") {
        let decoded = Initdata::decode(&initdata.content)?;
        out.push(("initdata.digest".into(), decoded.digest.clone()));
        for (name, content) in decoded.data {
            if INITDATA_DATA_FILES.contains(&name.as_str()) && !files.iter().any(|f| f.name == name)
            {
                out.push((name, content));
            }
        }
    }
    let dir = root.join(PEERPOD_DIR);
    let io = |path: &Path, e: std::io::Error| UserDataError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| io(&dir, e))?;
    }
    let mut written = Vec::new();
    for (name, content) in out {
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io(&tmp, e))?;
            f.write_all(content.as_bytes()).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Where user data can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file: a `cidata` volume's `user-data` (libvirt), or any path.
    File(PathBuf),
    /// AWS IMDSv2 at this endpoint (`http://169.254.169.254`).
    Aws(String),
    /// Azure IMDS at this endpoint (`http://169.254.169.254`).
    Azure(String),
    /// The IBM Cloud VPC metadata service at this endpoint
    /// (`http://169.254.169.254`, which IBM documents beside its name
    /// `http://api.metadata.cloud.ibm.com` for the `http` protocol; the IP
    /// needs no DNS this early in boot). Its flow, at API version
    /// [`IBMCLOUD_API_VERSION`]: `PUT /instance_identity/v1/token` with
    /// `Metadata-Flavor: ibm` and `{"expires_in": 300}` answers
    /// `{"access_token": …}`; `GET /metadata/v1/instance/initialization` with
    /// `Authorization: Bearer <token>` answers JSON whose `user_data` is the
    /// user data, as given at instance creation (not encoded).
    ///
    /// The instance's metadata service must be enabled (IBM leaves it off
    /// by default; podvisor's IBM Cloud provider turns it on, as the
    /// reference's does) with protocol `http`: this build has no TLS client,
    /// and with protocol `https` IBM answers only on the hostname.
    ///
    /// It is in `podvisor-userdata`'s default source list, last, so that
    /// one image boots on every provider: elsewhere an earlier source
    /// answers first and it is never asked; where none has answered yet it
    /// costs one more request a round, bounded by the same 3 s timeout. On
    /// IBM Cloud the `aws` and `azure` requests reach IBM's service at the
    /// same address and fail (neither path is IBM's, and each flow needs its
    /// own token), so they cannot be mistaken for user data. The reference
    /// reads `/media/cidata/user-data` there, which `cidata` (first in the
    /// list) still does when the image mounts that volume.
    IbmCloud(String),
}

/// The IBM Cloud VPC metadata API version asked for: the first with the
/// instance identity token (`/instance_identity/v1/token`), answering
/// `access_token`.
pub const IBMCLOUD_API_VERSION: &str = "2022-03-01";
/// The largest IBM token answer read.
const MAX_TOKEN_ANSWER: u64 = 64 << 10;

impl std::str::FromStr for Source {
    type Err = String;
    /// `cidata[:<path>]`, `file:<path>`, and `aws`, `azure`, `ibmcloud`,
    /// each with an optional `:http://HOST:PORT` (or `://HOST:PORT`).
    fn from_str(s: &str) -> Result<Self, String> {
        const IMDS: &str = "http://169.254.169.254";
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        // `aws:http://h:p` (as `--help` shows it) or `aws://h:p`; a host
        // and port only, the paths are the source's own.
        let endpoint = |a: &str| {
            let url = if a.starts_with("//") {
                format!("http:{a}")
            } else {
                a.to_owned()
            };
            let url = url.trim_end_matches('/');
            url.strip_prefix("http://")
                .is_some_and(|host| !host.is_empty() && !host.contains('/'))
                .then(|| url.to_owned())
        };
        let bad = || {
            format!(
                "'{s}' is not a user data source (cidata[:PATH], file:PATH, aws[:http://HOST:PORT], azure[:http://HOST:PORT], ibmcloud[:http://HOST:PORT])"
            )
        };
        let imds = |make: fn(String) -> Source| match arg {
            None => Ok(make(IMDS.into())),
            Some(e) => endpoint(e).map(make).ok_or_else(bad),
        };
        match (kind, arg) {
            ("cidata", None) => Ok(Source::File("/media/cidata/user-data".into())),
            ("cidata" | "file", Some(p)) if !p.is_empty() => Ok(Source::File(p.into())),
            ("aws", _) => imds(Source::Aws),
            ("azure", _) => imds(Source::Azure),
            ("ibmcloud", _) => imds(Source::IbmCloud),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Aws(e) => write!(f, "AWS IMDS at {e}"),
            Source::Azure(e) => write!(f, "Azure IMDS at {e}"),
            Source::IbmCloud(e) => write!(f, "IBM Cloud metadata service at {e}"),
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into()
}

/// One look at `source`: `Ok(None)` when it has no user data (yet).
///
/// # Errors
/// A message saying why when the file cannot be read (other than missing),
/// the metadata service cannot be reached or answers an unexpected status,
/// or its answer is too large, not base64 (Azure), not the JSON expected
/// (IBM Cloud) or not UTF-8. Messages never carry a token or user data.
pub fn fetch(source: &Source) -> Result<Option<String>, String> {
    match source {
        Source::File(path) => match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        Source::Aws(endpoint) => {
            let agent = agent();
            let mut token = agent
                .put(&format!("{endpoint}/latest/api/token"))
                .header("X-aws-ec2-metadata-token-ttl-seconds", "300")
                .send_empty()
                .map_err(|e| e.to_string())?;
            if token.status() != 200 {
                return Err(format!("token request answered {}", token.status()));
            }
            let token = token
                .body_mut()
                .read_to_string()
                .map_err(|e| e.to_string())?;
            let mut resp = agent
                .get(&format!("{endpoint}/latest/user-data"))
                .header("X-aws-ec2-metadata-token", token.trim())
                .call()
                .map_err(|e| e.to_string())?;
            match resp.status().as_u16() {
                200 => resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_USER_DATA as u64 + 1)
                    .read_to_string()
                    .map(Some)
                    .map_err(|e| e.to_string()),
                404 => Ok(None),
                other => Err(format!("user-data answered {other}")),
            }
        }
        Source::Azure(endpoint) => {
            let mut resp = agent()
                .get(&format!(
                    "{endpoint}/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
                ))
                .header("Metadata", "true")
                .call()
                .map_err(|e| e.to_string())?;
            if resp.status() != 200 {
                return Err(format!("userData answered {}", resp.status()));
            }
            let encoded = resp
                .body_mut()
                .with_config()
                .limit(2 * MAX_USER_DATA as u64)
                .read_to_string()
                .map_err(|e| e.to_string())?;
            if encoded.trim().is_empty() {
                return Ok(None);
            }
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| format!("userData is not base64: {e}"))?;
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| "userData is not UTF-8".into())
        }
        Source::IbmCloud(endpoint) => fetch_ibmcloud(endpoint),
    }
}

/// The IBM Cloud VPC flow (see [`Source::IbmCloud`]). JSON errors are
/// replaced by fixed messages: serde's would quote the value (the token,
/// or the user data).
fn fetch_ibmcloud(endpoint: &str) -> Result<Option<String>, String> {
    #[derive(Deserialize)]
    struct Token {
        access_token: String,
    }
    #[derive(Deserialize)]
    struct Initialization {
        #[serde(default)]
        user_data: Option<String>,
    }
    let agent = agent();
    let mut resp = agent
        .put(&format!(
            "{endpoint}/instance_identity/v1/token?version={IBMCLOUD_API_VERSION}"
        ))
        .header("Metadata-Flavor", "ibm")
        .header("Accept", "application/json")
        .header("Content-Type", "application/json")
        .send(r#"{"expires_in": 300}"#)
        .map_err(|e| format!("token request: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("token request answered {}", resp.status()));
    }
    let answer = resp
        .body_mut()
        .with_config()
        .limit(MAX_TOKEN_ANSWER)
        .read_to_string()
        .map_err(|e| format!("token answer: {e}"))?;
    let token = serde_json::from_str::<Token>(&answer)
        .map_err(|_| "the token answer is not JSON with a string access_token".to_owned())?
        .access_token;
    // It goes into a header: refuse what would not fit one rather than let
    // the HTTP library's error describe it.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token answer's access_token is empty or not printable ASCII".into());
    }
    let mut resp = agent
        .get(&format!(
            "{endpoint}/metadata/v1/instance/initialization?version={IBMCLOUD_API_VERSION}"
        ))
        .header("Accept", "application/json")
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| format!("initialization request: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("initialization answered {}", resp.status()));
    }
    // JSON escapes can make the user data up to six times longer; parse()
    // then holds it to MAX_USER_DATA.
    let answer = resp
        .body_mut()
        .with_config()
        .limit(8 * MAX_USER_DATA as u64)
        .read_to_string()
        .map_err(|e| format!("initialization answer: {e}"))?;
    let init = serde_json::from_str::<Initialization>(&answer).map_err(|_| {
        "the initialization answer is not JSON with a string (or absent) user_data".to_owned()
    })?;
    Ok(init.user_data.filter(|u| !u.is_empty()))
}

/// Tries every source in turn, every `interval`, until one has user data
/// or `limit` passes.
///
/// # Errors
/// [`UserDataError::NotFound`], with how long it waited and what each
/// source said last, when no source had user data before `limit`.
pub fn find(
    sources: &[Source],
    interval: Duration,
    limit: Duration,
) -> Result<String, UserDataError> {
    let started = Instant::now();
    loop {
        let mut tried = Vec::new();
        for source in sources {
            match fetch(source) {
                Ok(Some(text)) => return Ok(text),
                Ok(None) => tried.push(format!("{source}: none")),
                Err(e) => tried.push(format!("{source}: {e}")),
            }
        }
        if started.elapsed() + interval > limit {
            return Err(UserDataError::NotFound {
                waited: started.elapsed(),
                tried: tried.join("; "),
            });
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests;
