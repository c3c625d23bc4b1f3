//! Why the daemon could not start, or could not stop cleanly.

use podvisor_providers::ProviderError;
use podvisor_state::JournalError;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A step of [`super::serve`] that failed. Each variant names the step and
/// the flag (with its environment variable) or the thing to fix, and is
/// printed as the process's last word (`podvisor: <message>`, exit
/// [`StartupError::exit_code`]).
///
/// A variant that keeps its cause as a typed [`source`](std::error::Error::source)
/// does not repeat it in its own message: [`report()`] joins the two. A cause
/// from a part of the daemon that only reports its failures in words
/// (`reason`) is part of the message. No message holds a secret: the token
/// file, the keys and the initdata are named by path or flag, never shown.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// `--log-level` does not parse, or logging was set up already.
    #[error("Logging cannot start: {reason}")]
    Logging {
        /// Names the flag and the cause.
        reason: String,
    },
    /// The Prometheus recorder could not be installed.
    #[error("The metrics recorder cannot be installed: {reason}")]
    Metrics {
        /// The cause.
        reason: String,
    },
    /// No `--node-name`, and the host name cannot be read.
    #[error("--node-name (NODE_NAME) is not set and the host name is unreadable")]
    HostName {
        /// The `gethostname` failure.
        #[source]
        source: nix::Error,
    },
    /// No `--node-name`, and the host name is not UTF-8.
    #[error("--node-name (NODE_NAME) is not set and the host name is not UTF-8")]
    HostNameNotUtf8,
    /// The `--grpc-token-file` cannot be read or holds no usable token.
    #[error("--grpc-token-file (PODVISOR_GRPC_TOKEN_FILE) {reason}")]
    GrpcToken {
        /// The file's path and what is wrong with it, never its content.
        reason: String,
    },
    /// A directory the daemon keeps its state or its pods' sockets in
    /// cannot be created, or not made readable by its owner only.
    #[error("{flag} {}: cannot create the directory, or make it its owner's only", path.display())]
    Directory {
        /// `--state-dir` or `--pods-dir`.
        flag: &'static str,
        /// The directory.
        path: PathBuf,
        /// The file-system error.
        #[source]
        source: std::io::Error,
    },
    /// A directory flag cannot be made absolute (it is empty, or relative
    /// to a working directory that cannot be read).
    #[error("{flag} {:?}: cannot be made an absolute path", path.display().to_string())]
    RelativeDirectory {
        /// `--pods-dir`.
        flag: &'static str,
        /// The directory, as given.
        path: PathBuf,
        /// The file-system error.
        #[source]
        source: std::io::Error,
    },
    /// Opening (step 1), loading or flushing the journal failed.
    #[error("--state-dir {}: cannot {action} the journal", state_dir.display())]
    Journal {
        /// What the daemon was doing: `open`, `load`, `read the quarantine of`, `flush`.
        action: &'static str,
        /// `--state-dir`; the journal is its `journal` directory.
        state_dir: PathBuf,
        /// The journal's error.
        #[source]
        source: JournalError,
    },
    /// A task a step waited for ended without its result (it panicked, or
    /// the runtime was shutting down).
    #[error("Interrupted while {task}")]
    Interrupted {
        /// What the task was doing: `opening the journal`, `loading the TLS keys`, ….
        task: &'static str,
        /// Tokio's error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The provider could not be built from its configuration (step 2).
    #[error("Provider {provider} cannot be built")]
    BuildProvider {
        /// The provider's name (`aws`, `local`, …).
        provider: &'static str,
        /// The provider's error, naming its flag.
        #[source]
        source: ProviderError,
    },
    /// `--cloud-config-verify`, and the configuration does not verify
    /// against the cloud (step 2).
    #[error("Provider {provider}: the configuration does not verify (--cloud-config-verify)")]
    ProviderUnverified {
        /// The provider's name.
        provider: &'static str,
        /// What the cloud said.
        #[source]
        source: ProviderError,
    },
    /// `--tls-min-version` and `--tls-cipher-suites` leave no usable TLS
    /// (step 3).
    #[error("--tls-min-version/--tls-cipher-suites: {reason}")]
    TlsPolicy {
        /// The cause.
        reason: String,
    },
    /// `--ca-cert-file`, `--cert-file` or `--cert-key` cannot be loaded
    /// (step 3).
    #[error("--ca-cert-file/--cert-file/--cert-key: {reason}")]
    TlsFiles {
        /// The file and the cause.
        reason: String,
    },
    /// The daemon's own TLS keys in `--state-dir` cannot be loaded or
    /// created (step 3).
    #[error("--state-dir {}: cannot load or create the TLS keys: {reason}", dir.display())]
    TlsKeys {
        /// Their directory.
        dir: PathBuf,
        /// The file and the cause.
        reason: String,
    },
    /// The client certificate's first check (and renewal, if due) failed
    /// (step 3).
    #[error("The TLS client certificate cannot be checked or renewed: {reason}")]
    TlsCheck {
        /// The cause.
        reason: String,
    },
    /// The Kubernetes API client cannot be made (step 3).
    #[error("The Kubernetes API client: {reason}")]
    KubeApi {
        /// The flag and its value (URL, CA file, kubeconfig), and the cause.
        reason: String,
    },
    /// `--initdata` is not initdata (step 4; the CLI checks it first).
    #[error("--initdata (INITDATA): {reason}")]
    Initdata {
        /// What is wrong with it.
        reason: String,
    },
    /// The supervisor did not take the journal's records (step 4).
    #[error("Recovery cannot start: the supervisor did not take the journal's records")]
    Recovery {
        /// The mailbox error.
        #[source]
        source: actix::MailboxError,
    },
    /// An address cannot be listened on (step 5).
    #[error("{flag} {addr}: cannot listen")]
    Listen {
        /// `--admin-addr (PODVISOR_ADMIN_ADDR)` or `--grpc-addr (PODVISOR_GRPC_ADDR)`.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// `--socket-group` names no group (step 5).
    #[error("--socket-group (PODVISOR_SOCKET_GROUP): {reason}")]
    SocketGroup {
        /// The cause.
        reason: String,
    },
    /// The Kata socket or the gRPC socket cannot be served (step 5).
    #[error("{reason}")]
    ControlSocket {
        /// Names the flag (`--socket`, `--grpc-socket`), the path and the
        /// cause; another daemon serving on it is one.
        reason: String,
    },
    /// The Kata socket's server did not stop (step 6).
    #[error("The Kata socket's server did not shut down")]
    KataShutdown {
        /// ttrpc's error.
        #[source]
        source: ttrpc::Error,
    },
}

impl StartupError {
    /// The process's exit code for this error: 2 when the configuration is
    /// what must change (a provider that cannot be built from it, such as
    /// AWS with no credentials, or a `--socket-group` that names no group),
    /// as for a command line that cannot run; 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::BuildProvider { source, .. }
                if source.class == podvisor_providers::ErrorClass::Config =>
            {
                2
            }
            StartupError::SocketGroup { .. } => 2,
            _ => 1,
        }
    }
}

pub use podvisor_state::report;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_the_flag_the_path_and_the_cause_once() {
        let e = StartupError::Directory {
            flag: "--state-dir",
            path: PathBuf::from("/dev/null/x"),
            source: std::io::Error::from_raw_os_error(20),
        };
        let line = report(&e);
        assert!(line.starts_with("--state-dir /dev/null/x: "), "{line}");
        assert!(line.contains("Not a directory"), "{line}");
        assert_eq!(line.matches("Not a directory").count(), 1, "{line}");
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("Outer: {source}")]
        struct Quoting {
            #[source]
            source: std::io::Error,
        }
        let e = Quoting {
            source: std::io::Error::other("disk gone"),
        };
        assert_eq!(report(&e), "Outer: disk gone");
    }

    #[test]
    fn an_address_that_cannot_be_listened_on_names_flag_address_and_cause() {
        let e = StartupError::Listen {
            flag: "--admin-addr (PODVISOR_ADMIN_ADDR)",
            addr: "127.0.0.1:9797".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let line = report(&e);
        assert!(
            line.starts_with("--admin-addr (PODVISOR_ADMIN_ADDR) 127.0.0.1:9797: cannot listen: "),
            "{line}"
        );
        assert!(line.to_lowercase().contains("address in use"), "{line}");
    }

    #[tokio::test]
    async fn an_interrupted_task_says_what_it_was_doing() {
        let source = tokio::spawn(async { panic!("disk on fire") })
            .await
            .unwrap_err();
        let line = report(&StartupError::Interrupted {
            task: "opening the journal",
            source,
        });
        assert!(
            line.starts_with("Interrupted while opening the journal: ")
                && line.contains("panicked"),
            "{line}"
        );
    }

    #[test]
    fn a_provider_that_cannot_be_built_is_named_with_the_flag_its_error_gives() {
        let e = StartupError::BuildProvider {
            provider: "local",
            source: ProviderError::config("--forwarder-bin (LOCAL_FORWARDER_BIN): no file"),
        };
        assert_eq!(
            report(&e),
            "Provider local cannot be built: --forwarder-bin (LOCAL_FORWARDER_BIN): no file"
        );
    }
}
