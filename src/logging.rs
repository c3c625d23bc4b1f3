//! Logging: the operator's filter (`--log-level`, `--log-format`), under a
//! cap that no filter lifts on the libraries that print credentials and
//! other secrets below a certain level.
//!
//! The cap is a filter of its own beside the operator's, and an event is
//! written only if both let it through: a filter that names a capped target
//! (`aws_sigv4=trace`), or turns everything up (`trace`, `[span]=trace`),
//! still gets nothing below the cap from it. podvisor's own targets are never
//! capped.

use crate::cli::LogFormat;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A target prefix whose events are written at most at `cap`, whatever the
/// operator's filter says, and why.
#[derive(Debug, Clone, Copy)]
pub struct Cap {
    /// Matched as tracing matches targets: by prefix (`aws_` is every AWS
    /// SDK crate, `ureq` both `ureq` and `ureq_proto`).
    pub prefix: &'static str,
    /// The most detailed level written from those targets.
    pub cap: LevelFilter,
    /// What they print below the cap.
    pub why: &'static str,
}

/// The capped targets. Each crate's debug lines were read and print no
/// secret; its trace lines do, as below (the AWS SDK calls its trace level
/// "unredacted"). Add a crate here when it joins the tree and dumps requests,
/// headers or payloads.
pub const CAPS: &[Cap] = &[
    Cap {
        prefix: "aws_",
        cap: LevelFilter::DEBUG,
        why: "the AWS SDK: at trace, aws_sigv4 prints every canonical request with the \
              x-amz-security-token header (the session token), and aws_smithy_runtime every \
              request with its authorization (signature) and x-amz-security-token headers and \
              every response, whose bodies carry credentials from the instance metadata \
              service and STS",
    },
    Cap {
        prefix: "ureq",
        cap: LevelFilter::DEBUG,
        why: "podvisor client's HTTP client: at trace, ureq_proto prints every byte sent and \
              received (the Kubernetes API client is kube-rs now, whose trace lines carry \
              no header or body: tests/pull_secrets.rs runs it at trace)",
    },
    Cap {
        prefix: "ttrpc",
        cap: LevelFilter::DEBUG,
        why: "at trace, ttrpc prints every Kata API message's bytes: CreateVM carries the \
              pod's initdata",
    },
    Cap {
        prefix: "sled",
        cap: LevelFilter::DEBUG,
        why: "at trace, sled prints every journal write's key and value bytes: the records \
              hold the pods' initdata",
    },
];

/// The filter that enforces [`CAPS`]; every other target passes.
pub fn secret_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(CAPS.iter().map(|c| (c.prefix, c.cap)))
}

/// The operator's filter, parsed; the error names the flag and the cause.
///
/// # Errors
/// A message naming `--log-level (PODVISOR_LOG)`, the filter and the
/// parser's reason when `filter` is not valid `EnvFilter` syntax.
pub fn operator_filter(filter: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(filter).map_err(|e| format!("--log-level (PODVISOR_LOG) '{filter}': {e}"))
}

/// Sets up the process's logging on stderr: the operator's `filter` in
/// `format`, under [`CAPS`]; `log` records (ttrpc, sled, ureq) go through
/// the same filters. Says once, at info, which caps the filter runs into.
///
/// # Errors
/// Those of [`operator_filter`]; "cannot set up logging" when a global
/// subscriber or `log` logger is already installed.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal;
    let operator = operator_filter(filter)?;
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry()
        .with(secret_cap())
        .with(operator);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))?;
    let lifted = lifted_caps(filter);
    if !lifted.is_empty() {
        let capped: Vec<String> = lifted
            .iter()
            .map(|c| format!("{}*={}", c.prefix, c.cap))
            .collect();
        tracing::info!(
            capped = %capped.join(","),
            "--log-level (PODVISOR_LOG) asks for more detail than some libraries may give: below these caps they print credentials or other secrets, so they stay at them (docs/operations.md, Logs)"
        );
    }
    Ok(())
}

/// The caps that `filter` (EnvFilter syntax) asks to go beyond: a directive
/// with no target (`trace`, `[span]=trace`) lifts every cap it is above; one
/// with a target lifts the caps whose targets it covers (`aws_sigv4=trace`,
/// `aws=trace`). Only for telling the operator: the cap holds regardless.
pub fn lifted_caps(filter: &str) -> Vec<Cap> {
    let mut lifted: Vec<Cap> = Vec::new();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `target[span{field}]=level`: the span part only narrows where
        // the level applies, so drop it.
        let without_span = match (directive.find('['), directive.rfind(']')) {
            (Some(open), Some(close)) if open < close => {
                format!("{}{}", &directive[..open], &directive[close + 1..])
            }
            _ => directive.to_owned(),
        };
        let (target, level) = match without_span.split_once('=') {
            Some((target, level)) => (target, level.parse::<LevelFilter>().ok()),
            // A bare word is a level for every target, or a target at trace.
            None => match without_span.parse::<LevelFilter>() {
                Ok(level) => ("", Some(level)),
                Err(_) => (without_span.as_str(), Some(LevelFilter::TRACE)),
            },
        };
        let Some(level) = level else { continue };
        for cap in CAPS {
            let covers = target.is_empty()
                || target.starts_with(cap.prefix)
                || cap.prefix.starts_with(target);
            if covers && level > cap.cap && !lifted.iter().any(|c| c.prefix == cap.prefix) {
                lifted.push(*cap);
            }
        }
    }
    lifted
}

/// A log sink for unit tests: a `tracing_subscriber` writer whose text a
/// test reads back.
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Arc, Mutex, PoisonError};

    /// Collects what a subscriber writes; clones share one buffer.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        /// Everything written so far, as text.
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
                .into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::capture::Buffer;
    use super::*;

    /// What the daemon's subscriber writes for events from a few targets,
    /// under the operator's `filter`.
    fn written_under(filter: &str) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(secret_cap())
            .with(operator_filter(filter).unwrap())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "aws_sigv4::http_request::sign", "canonical_request=x-amz-security-token:SECRET-1");
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", "transmitting request SECRET-2");
            tracing::trace!(target: "ureq_proto::util", "SECRET-3");
            tracing::trace!(target: "ttrpc::asynchronous::connection", "SECRET-4");
            tracing::trace!(target: "sled::pagecache", "SECRET-5");
            let span = tracing::info_span!("call");
            let _in = span.enter();
            tracing::trace!(target: "aws_sigv4::http_request::sign", "in a span SECRET-6");
            tracing::debug!(target: "aws_smithy_runtime::client::orchestrator", "sdk debug line");
            tracing::trace!(target: "podvisor::metered", "podvisor trace line");
            tracing::trace!(target: "hyper_util::client::legacy::pool", "hyper_util trace line");
        });
        buffer.text()
    }

    #[test]
    fn capped_targets_print_nothing_below_their_cap_whatever_the_filter_asks() {
        for filter in [
            "trace",
            "trace,aws_sigv4=trace,aws_smithy_runtime::client::orchestrator=trace",
            "aws_sigv4::http_request::sign=trace,ureq_proto=trace,ttrpc=trace,sled=trace,trace",
            "[call]=trace,trace",
        ] {
            let log = written_under(filter);
            assert!(!log.contains("SECRET"), "filter {filter}: {log}");
            assert!(log.contains("sdk debug line"), "filter {filter}: {log}");
            assert!(
                log.contains("podvisor trace line"),
                "filter {filter}: {log}"
            );
            assert!(
                log.contains("hyper_util trace line"),
                "filter {filter}: {log}"
            );
        }
    }

    #[test]
    fn the_operator_filter_still_narrows_capped_and_own_targets() {
        let log = written_under("info,podvisor=trace");
        assert!(log.contains("podvisor trace line"), "{log}");
        assert!(!log.contains("sdk debug line"), "{log}");
        assert!(!log.contains("hyper_util trace line"), "{log}");
    }

    #[test]
    fn only_filters_above_a_cap_are_reported_as_lifting_it() {
        let prefixes = |filter: &str| -> Vec<&'static str> {
            lifted_caps(filter).iter().map(|c| c.prefix).collect()
        };
        assert_eq!(prefixes("trace"), ["aws_", "ureq", "ttrpc", "sled"]);
        assert_eq!(prefixes("[call]=trace"), ["aws_", "ureq", "ttrpc", "sled"]);
        assert!(prefixes("debug").is_empty());
        assert!(prefixes("info,podvisor=trace").is_empty());
        assert!(prefixes("info,ureq_proto=debug").is_empty());
        assert_eq!(prefixes("info,aws_sigv4=trace"), ["aws_"]);
        assert_eq!(prefixes("info,aws=trace"), ["aws_"]);
        assert_eq!(prefixes("info,ureq_proto"), ["ureq"]);
        assert_eq!(prefixes("sled[journal{id=1}]=trace"), ["sled"]);
    }
}
