//! The cloud-manager side of a provider: its flags (with environment
//! fallbacks), its configuration, and how it builds the [`Provider`] — the
//! reference's `ParseCmd`, `LoadEnv` and `NewProvider` — plus the registry the
//! CLI is built from.

use crate::error::ProviderError;
use crate::provider::Provider;
use async_trait::async_trait;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// What the daemon tells a provider when building it.
#[derive(Debug, Clone)]
pub struct ProviderContext {
    /// This node's name; instances are tagged with it.
    pub node_name: String,
    /// The port the pod VM's forwarder listens on.
    pub forwarder_port: u16,
    /// The daemon's state directory, for providers that keep local state.
    pub state_dir: PathBuf,
    /// The daemon's token buckets of cloud requests, for a provider that
    /// paces each request itself ([`crate::Provider::paces_requests`]).
    pub pacer: std::sync::Arc<crate::pacing::Pacer>,
}

/// A provider configuration that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// Names the flag, its environment variable and what is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about one flag: `--<flag> (<ENV>): <why>`.
    pub fn flag(flag: &str, env: Option<&str>, why: impl fmt::Display) -> Self {
        let message = match env {
            Some(env) => format!("--{flag} ({env}): {why}"),
            None => format!("--{flag}: {why}"),
        };
        Self { message }
    }

    /// A provider flag that clap refused, said without clap's own `error: `
    /// prefix and `--help` hint (the CLI adds its own prefix): the first
    /// paragraph of clap's message, which names the flag and the value.
    pub fn from_clap(err: &clap::Error) -> Self {
        let rendered = err.to_string();
        let text = rendered.trim_start();
        let text = text.strip_prefix("error: ").unwrap_or(text);
        let first = text.split("\n\n").next().unwrap_or(text);
        Self {
            message: first.trim_end().to_owned(),
        }
    }

    /// Checks a directory flag before anything is created: a path that
    /// exists and is not a directory is refused, `--<flag> (<ENV>): <path>
    /// is not a directory`; a missing one is fine (the daemon creates it).
    ///
    /// # Errors
    /// The error above.
    pub fn check_directory(flag: &str, env: &str, dir: &std::path::Path) -> Result<(), Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Self::flag(
                flag,
                Some(env),
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(())
    }
}

/// How fast the daemon may call a cloud: one token bucket for mutating
/// calls (creates and deletes), refilled at `rate` tokens per second and
/// holding at most `burst`, and one for reads (lookups, listings — the
/// orphan GC's and recovery's — and the configuration check), `read_rate`
/// and `read_burst`. One token per try of a provider call; a create's
/// lookup by token before it (a retry, a recovery) takes a read token of
/// its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallLimits {
    /// Mutating calls per second, sustained.
    pub rate: f64,
    /// Mutating calls allowed at once after an idle spell.
    pub burst: u32,
    /// Reads per second, sustained.
    pub read_rate: f64,
    /// Reads allowed at once after an idle spell.
    pub read_burst: u32,
}

impl CallLimits {
    /// The limits of a provider that declares none: modest enough for any
    /// cloud's documented API limits we know of, and the daemon's global
    /// defaults before providers could choose.
    pub const DEFAULT: CallLimits = CallLimits {
        rate: 5.0,
        burst: 10,
        read_rate: 20.0,
        read_burst: 100,
    };
}

/// A validated provider configuration, ready to build the provider.
#[async_trait]
pub trait ProviderConfig: Send + Sync + fmt::Debug {
    /// The configuration for logs and the admin endpoint, secrets redacted.
    fn summary(&self) -> serde_json::Value;

    /// [`ProviderConfig::summary`] as the provider [`ProviderConfig::build`]
    /// makes with `context` runs: a setting left to a default that
    /// depends on the daemon (a directory under its state directory, a
    /// binary beside it) shows the value in use, not `null`. The summary
    /// itself for a configuration without such defaults.
    fn effective_summary(&self, _context: &ProviderContext) -> serde_json::Value {
        self.summary()
    }

    /// The token bucket this provider's mutating calls stay under when the
    /// operator sets none (`--provider-rate`, `--provider-burst`): below the
    /// cloud's documented API limits, for this configuration. Its manager's
    /// [`CloudManager::default_call_limits`] (which `--help` shows) unless
    /// this configuration needs lower ones.
    fn default_call_limits(&self) -> CallLimits {
        CallLimits::DEFAULT
    }

    /// Builds the provider (the reference's `NewProvider`).
    ///
    /// # Errors
    /// A [`ProviderError`] (class `Config`) when a setting the flags left
    /// open cannot be completed — AWS: the region, which the instance
    /// metadata service did not give, or credentials, which no way of
    /// giving them (keys, profile, IRSA, instance profile) gave; local: no
    /// forwarder binary, or its state directory cannot be created. The
    /// cloud's API is never called here; only what completes the settings
    /// is (the instance metadata service, the credential chain).
    async fn build(&self, context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError>;
}

/// One provider's entry in the CLI.
pub trait CloudManager: Send + Sync {
    /// The subcommand name (`local`, `aws`, ...).
    fn name(&self) -> &'static str;

    /// The subcommand with every flag of this provider, each with its
    /// environment variable (the reference's `ParseCmd` and `LoadEnv`).
    fn command(&self) -> clap::Command;

    /// Reads and validates the flags parsed by [`CloudManager::command`].
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag, its environment variable and what
    /// is wrong with its value (missing, malformed or out of range, or
    /// inconsistent with another flag).
    fn configure(&self, matches: &clap::ArgMatches)
    -> Result<Box<dyn ProviderConfig>, ConfigError>;

    /// The token bucket of mutating calls this provider stays under unless
    /// the operator sets `--provider-rate` or `--provider-burst`, as
    /// `podvisor --help` shows it; [`CallLimits::DEFAULT`] unless the
    /// provider declares its own (below its cloud's documented API limits).
    /// A configuration's own [`ProviderConfig::default_call_limits`] may be
    /// lower.
    fn default_call_limits(&self) -> CallLimits {
        CallLimits::DEFAULT
    }
}

/// Every provider podvisor knows by name, compiled into this build or not,
/// with the cargo feature of the `podvisor` package that compiles it in
/// (`cargo build --features <feature>`); `None` for a provider of the
/// reference (cloud-api-adaptor) that podvisor does not have yet. The CLI
/// says which one to build when an operator names a missing provider.
pub const KNOWN_PROVIDERS: &[(&str, Option<&str>)] = &[
    ("local", Some("local")),
    ("aws", Some("aws")),
    ("libvirt", Some("libvirt")),
    ("azure", Some("azure")),
    ("ibmcloud", Some("ibmcloud")),
    ("ibmcloud-powervs", None),
    ("gcp", None),
    ("alibabacloud", None),
];

/// Every provider compiled into this build, in CLI order.
pub fn registry() -> Vec<&'static dyn CloudManager> {
    vec![
        // One line per provider, behind its cargo feature.
        #[cfg(feature = "local")]
        &crate::local::LocalManager,
        #[cfg(feature = "aws")]
        &crate::aws::AwsManager,
        #[cfg(feature = "libvirt")]
        &crate::libvirt::LibvirtManager,
        #[cfg(feature = "azure")]
        &crate::azure::AzureManager,
        #[cfg(feature = "ibmcloud")]
        &crate::ibmcloud::IbmCloudManager,
    ]
}

/// The manager of the provider called `name`, if this build has it.
pub fn find_manager(name: &str) -> Option<&'static dyn CloudManager> {
    registry().into_iter().find(|m| m.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_errors_name_the_flag_and_its_variable() {
        assert_eq!(
            ConfigError::flag("local-dir", Some("LOCAL_DIR"), "is not a directory").to_string(),
            "--local-dir (LOCAL_DIR): is not a directory"
        );
        assert_eq!(ConfigError::flag("x", None, "bad").to_string(), "--x: bad");
    }

    #[test]
    fn clap_errors_become_one_line_without_clap_s_prefix() {
        let err = clap::Command::new("aws")
            .arg(
                clap::Arg::new("n")
                    .long("root-volume-size")
                    .value_parser(clap::value_parser!(u32)),
            )
            .try_get_matches_from(["aws", "--root-volume-size", "lots"])
            .unwrap_err();
        let e = ConfigError::from_clap(&err);
        assert!(
            e.message
                .starts_with("invalid value 'lots' for '--root-volume-size <n>'"),
            "{e}"
        );
        assert!(!e.message.contains("error:"), "{e}");
        assert!(!e.message.contains('\n'), "{e}");
    }

    #[test]
    fn every_compiled_provider_is_known_with_its_feature() {
        for m in registry() {
            let known = KNOWN_PROVIDERS.iter().find(|(name, _)| *name == m.name());
            assert_eq!(known, Some(&(m.name(), Some(m.name()))), "{}", m.name());
        }
    }

    #[cfg(feature = "local")]
    #[test]
    fn the_registry_lists_local_and_commands_are_named_after_providers() {
        let names: Vec<_> = registry().iter().map(|m| m.name()).collect();
        assert!(names.contains(&"local"));
        for m in registry() {
            assert_eq!(m.command().get_name(), m.name());
            m.command().debug_assert();
        }
        assert!(find_manager("local").is_some());
        assert!(find_manager("nope").is_none());
    }

    #[cfg(feature = "libvirt")]
    #[test]
    fn the_registry_lists_libvirt() {
        let libvirt =
            find_manager("libvirt").expect("the libvirt feature registers `podvisor libvirt`");
        libvirt.command().debug_assert();
    }

    #[cfg(feature = "ibmcloud")]
    #[test]
    fn the_registry_lists_ibmcloud() {
        let ibm =
            find_manager("ibmcloud").expect("the ibmcloud feature registers `podvisor ibmcloud`");
        ibm.command().debug_assert();
    }

    #[cfg(feature = "aws")]
    #[test]
    fn the_registry_lists_aws() {
        let aws = find_manager("aws").expect("the aws feature registers `podvisor aws`");
        aws.command().debug_assert();
    }
}
