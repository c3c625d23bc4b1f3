//! The local provider's cloud manager: flags, validation, and `NewProvider`.

use super::config::LocalConfig;
use super::provider::LocalProvider;
use super::vm_network::VmNetwork;
use crate::error::ProviderError;
use crate::manager::{CloudManager, ConfigError, ProviderConfig, ProviderContext};
use crate::provider::Provider;
use async_trait::async_trait;
use clap::{Args, FromArgMatches};
use std::path::PathBuf;
use std::sync::Arc;

/// Registers `podvisor local`.
#[derive(Debug)]
pub struct LocalManager;

impl CloudManager for LocalManager {
    fn name(&self) -> &'static str {
        "local"
    }

    fn command(&self) -> clap::Command {
        // `about` after `augment_args`: the derive would put the config
        // struct's doc comment there.
        LocalConfig::augment_args(clap::Command::new("local")).about(
            "Pod VMs as detached forwarder processes on loopback addresses (development, tests, demos)",
        )
    }

    fn configure(
        &self,
        matches: &clap::ArgMatches,
    ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let config =
            LocalConfig::from_arg_matches(matches).map_err(|e| ConfigError::from_clap(&e))?;
        if let Some(bin) = &config.forwarder_bin
            && !bin.is_file()
        {
            return Err(ConfigError::flag(
                "forwarder-bin",
                Some("LOCAL_FORWARDER_BIN"),
                format!("{} is not a file", bin.display()),
            ));
        }
        if let Some(dir) = &config.local_dir {
            ConfigError::check_directory("local-dir", "LOCAL_DIR", dir)?;
        }
        let bridge = &config.cloud_bridge;
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(ConfigError::flag(
                "cloud-bridge",
                Some("LOCAL_CLOUD_BRIDGE"),
                format!(
                    "'{bridge}' is not an interface name (1 to 15 letters, digits, '-', '_', '.')"
                ),
            ));
        }
        let subnet = config.cloud_subnet;
        if !(8..=29).contains(&subnet.prefix_len()) || subnet.addr().is_loopback() {
            return Err(ConfigError::flag(
                "cloud-subnet",
                Some("LOCAL_CLOUD_SUBNET"),
                format!(
                    "{subnet} must be a /8 to /29 outside 127.0.0.0/8 (the bridge and its instances' link)"
                ),
            ));
        }
        Ok(Box::new(config))
    }
}

/// The forwarder next to the running binary, where packaging puts it.
fn default_forwarder() -> Result<PathBuf, ProviderError> {
    let exe = std::env::current_exe()
        .map_err(|e| ProviderError::config(format!("Cannot locate the podvisor binary: {e}")))?;
    let candidate = exe.with_file_name("podvisor-forwarder");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(ProviderError::config(format!(
            "--forwarder-bin (LOCAL_FORWARDER_BIN): no podvisor-forwarder next to {}; \
             build it (cargo build -p podvisor-podvm) or pass its path",
            exe.display()
        )))
    }
}

/// `--local-dir`, else `local` in the daemon's state directory.
fn local_dir(config: &LocalConfig, context: &ProviderContext) -> PathBuf {
    config
        .local_dir
        .clone()
        .unwrap_or_else(|| context.state_dir.join("local"))
}

/// `--forwarder-bin`, else the forwarder next to the running binary.
fn forwarder_bin(config: &LocalConfig) -> Result<PathBuf, ProviderError> {
    match &config.forwarder_bin {
        Some(bin) => Ok(bin.clone()),
        None => default_forwarder(),
    }
}

#[async_trait]
impl ProviderConfig for LocalConfig {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "local_dir": self.local_dir,
            "forwarder_bin": self.forwarder_bin,
            "agent_socket": self.agent_socket,
            "address_range": format!("{}/{}", self.address_range.base, self.address_range.prefix),
            "create_delay_ms": self.create_delay.as_millis() as u64,
            "delete_delay_ms": self.delete_delay.as_millis() as u64,
            "lookup_delay_ms": self.lookup_delay.as_millis() as u64,
            "netns_per_vm": self.netns_per_vm,
            "cloud_bridge": self.cloud_bridge,
            "cloud_subnet": self.cloud_subnet.trunc().to_string(),
        })
    }

    fn effective_summary(&self, context: &ProviderContext) -> serde_json::Value {
        let mut summary = self.summary();
        summary["local_dir"] = serde_json::json!(local_dir(self, context));
        if let Ok(forwarder) = forwarder_bin(self) {
            summary["forwarder_bin"] = serde_json::json!(forwarder);
        }
        summary
    }

    async fn build(&self, context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        let dir = local_dir(self, context);
        let forwarder = forwarder_bin(self)?;
        let provider = LocalProvider::new(dir, forwarder, context.forwarder_port)
            .map_err(|e| ProviderError::config(e.to_string()))?
            .with_agent_socket(self.agent_socket.clone())
            .with_address_range(self.address_range)
            .with_delays(self.create_delay, self.delete_delay)
            .with_lookup_delay(self.lookup_delay);
        let provider = if self.netns_per_vm {
            let network = VmNetwork::new(self.cloud_bridge.clone(), self.cloud_subnet);
            network.prepare().await?;
            provider.with_vm_network(network)
        } else {
            provider
        };
        Ok(Arc::new(provider))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(args: &[&str]) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let m = LocalManager
            .command()
            .try_get_matches_from(std::iter::once("local").chain(args.iter().copied()))
            .map_err(|e| ConfigError::from_clap(&e))?;
        LocalManager.configure(&m)
    }

    #[test]
    fn defaults_are_valid() {
        let c = configure(&[]).unwrap();
        assert_eq!(
            c.summary()["agent_socket"],
            "/run/kata-containers/agent.sock"
        );
        assert_eq!(c.summary()["address_range"], "127.64.0.0/10");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = configure(&["--create-delay", "soon"]).unwrap_err().message;
        assert!(err.contains("--create-delay"), "{err}");
        let err = configure(&["--address-range", "10.0.0.0/8"])
            .unwrap_err()
            .message;
        assert!(
            err.contains("--address-range") && err.contains("loopback"),
            "{err}"
        );
        let err = configure(&["--forwarder-bin", "/nonexistent/fwd"])
            .unwrap_err()
            .message;
        assert_eq!(
            err,
            "--forwarder-bin (LOCAL_FORWARDER_BIN): /nonexistent/fwd is not a file"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = configure(&["--local-dir", file.path().to_str().unwrap()])
            .unwrap_err()
            .message;
        assert!(err.starts_with("--local-dir (LOCAL_DIR):"), "{err}");
        let err = configure(&["--cloud-bridge", "a-name-far-too-long"])
            .unwrap_err()
            .message;
        assert!(
            err.starts_with("--cloud-bridge (LOCAL_CLOUD_BRIDGE):"),
            "{err}"
        );
        let err = configure(&["--cloud-subnet", "127.5.0.0/16"])
            .unwrap_err()
            .message;
        assert!(
            err.starts_with("--cloud-subnet (LOCAL_CLOUD_SUBNET):"),
            "{err}"
        );
        let err = configure(&["--cloud-subnet", "10.0.0.0/30"])
            .unwrap_err()
            .message;
        assert!(err.contains("/8 to /29"), "{err}");
    }
}
