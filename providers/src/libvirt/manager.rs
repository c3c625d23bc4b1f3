//! The libvirt provider's cloud manager: flags, validation, and `NewProvider`.

use super::config::{LaunchSecurity, LibvirtConfig};
use super::provider::{LibvirtProvider, LibvirtSettings};
use crate::error::ProviderError;
use crate::manager::{CloudManager, ConfigError, ProviderConfig, ProviderContext};
use crate::provider::Provider;
use async_trait::async_trait;
use clap::{Args, FromArgMatches};
use std::sync::Arc;

/// Registers `podvisor libvirt`.
#[derive(Debug)]
pub struct LibvirtManager;

/// The largest root disk accepted, in GiB (64 TiB; qcow2 allows more, but a
/// larger number is a typo).
const MAX_ROOT_DISK_GIB: u64 = 64 * 1024;
/// The most vCPUs accepted (libvirt's own limit for q35 is 4096, KVM's lower).
const MAX_VCPUS: u32 = 4096;
/// The least memory accepted, in MiB: a pod VM needs a kernel and the agent.
const MIN_MEMORY_MIB: u64 = 128;

impl CloudManager for LibvirtManager {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn command(&self) -> clap::Command {
        LibvirtConfig::augment_args(clap::Command::new("libvirt"))
            .about("Pod VMs as libvirt domains (QEMU/KVM on this host or over qemu+ssh)")
    }

    fn configure(
        &self,
        matches: &clap::ArgMatches,
    ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let config =
            LibvirtConfig::from_arg_matches(matches).map_err(|e| ConfigError::from_clap(&e))?;
        validate(&config)?;
        Ok(Box::new(config))
    }
}

/// A name libvirt can hold (pool, network, volume): not empty, no `/`.
fn is_object_name(name: &str) -> bool {
    !name.trim().is_empty() && !name.contains('/') && !name.chars().any(char::is_control)
}

/// Everything that can be checked without libvirt.
fn validate(c: &LibvirtConfig) -> Result<(), ConfigError> {
    let scheme_ok = c
        .uri
        .as_str()
        .split_once(':')
        .is_some_and(|(scheme, rest)| {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+')
                && !rest.is_empty()
        });
    if !scheme_ok {
        return Err(ConfigError::flag(
            "uri",
            Some("LIBVIRT_URI"),
            format!(
                "'{}' is not a libvirt URI (e.g. qemu:///system, qemu+ssh://root@host/system)",
                c.uri
            ),
        ));
    }
    for (flag, env, value, what) in [
        ("pool-name", "LIBVIRT_POOL", &c.pool, "storage pool"),
        ("network-name", "LIBVIRT_NET", &c.network, "network"),
        ("vol-name", "LIBVIRT_VOL_NAME", &c.base_volume, "volume"),
    ] {
        if !is_object_name(value) {
            return Err(ConfigError::flag(
                flag,
                Some(env),
                format!("'{value}' is not a {what} name"),
            ));
        }
    }
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        return Err(ConfigError::flag(
            "cpu",
            Some("LIBVIRT_CPU"),
            format!("{} vCPUs: give 1 to {MAX_VCPUS}", c.vcpus),
        ));
    }
    if c.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::flag(
            "memory",
            Some("LIBVIRT_MEMORY"),
            format!(
                "{} MiB is less than a pod VM needs (at least {MIN_MEMORY_MIB})",
                c.memory_mib
            ),
        ));
    }
    if c.root_disk_gib > MAX_ROOT_DISK_GIB {
        return Err(ConfigError::flag(
            "root-disk-size",
            Some("LIBVIRT_ROOT_DISK_SIZE"),
            format!(
                "{} GiB is more than {MAX_ROOT_DISK_GIB} GiB",
                c.root_disk_gib
            ),
        ));
    }
    if !c.firmware.is_empty() && !c.firmware.starts_with('/') {
        return Err(ConfigError::flag(
            "firmware",
            Some("LIBVIRT_EFI_FIRMWARE"),
            format!(
                "'{}' is not an absolute path on the libvirt host",
                c.firmware
            ),
        ));
    }
    if c.launch_security == LaunchSecurity::S390Pv && c.disable_cvm {
        return Err(ConfigError::flag(
            "launch-security",
            Some("LIBVIRT_LAUNCH_SECURITY"),
            "s390-pv is a confidential launch, but --disable-cvm (DISABLECVM) is true",
        ));
    }
    if !c.data_dir.is_absolute() {
        return Err(ConfigError::flag(
            "data-dir",
            None,
            format!("'{}' is not an absolute path", c.data_dir.display()),
        ));
    }
    Ok(())
}

impl LibvirtConfig {
    /// The provider settings this configuration asks for.
    pub fn settings(&self) -> LibvirtSettings {
        let mut s = LibvirtSettings::new(self.uri.clone());
        s.pool = self.pool.clone();
        s.network = self.network.clone();
        s.base_volume = self.base_volume.clone();
        s.vcpus = self.vcpus;
        s.memory_mib = self.memory_mib;
        s.cpuset = self.cpuset.0.clone();
        s.root_disk_bytes = self.root_disk_gib << 30;
        s.firmware = (!self.firmware.is_empty()).then(|| self.firmware.clone());
        s.launch_security = self.launch_security;
        s.disable_cvm = self.disable_cvm;
        s
    }
}

#[async_trait]
impl ProviderConfig for LibvirtConfig {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "uri": self.uri.to_string(),
            "pool": self.pool,
            "network": self.network,
            "base_volume": self.base_volume,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "cpuset": self.cpuset.0,
            "root_disk_gib": self.root_disk_gib,
            "firmware": self.firmware,
            "launch_security": self.launch_security.as_str(),
            "disable_cvm": self.disable_cvm,
            "data_dir": self.data_dir,
        })
    }

    async fn build(&self, _context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        // The connection opens on first use, on the blocking pool.
        Ok(Arc::new(LibvirtProvider::new(self.settings())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::LibvirtUri;

    fn configure(args: &[&str]) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let m = LibvirtManager
            .command()
            .try_get_matches_from(std::iter::once("libvirt").chain(args.iter().copied()))
            .map_err(|e| ConfigError::from_clap(&e))?;
        LibvirtManager.configure(&m)
    }

    #[test]
    fn defaults_are_the_references() {
        let s = configure(&[]).unwrap().summary();
        assert_eq!(s["uri"], "qemu+ssh://root@192.168.122.1/system?no_verify=1");
        assert_eq!(s["pool"], "default");
        assert_eq!(s["network"], "default");
        assert_eq!(s["base_volume"], "podvm-base.qcow2");
        assert_eq!(s["vcpus"], 2);
        assert_eq!(s["memory_mib"], 8192);
        assert_eq!(s["cpuset"], serde_json::Value::Null);
        assert_eq!(s["root_disk_gib"], 10);
        assert_eq!(s["firmware"], "/usr/share/OVMF/OVMF_CODE_4M.fd");
        assert_eq!(s["launch_security"], "auto");
        assert_eq!(s["disable_cvm"], true, "DISABLECVM defaults to true");
        assert_eq!(s["data_dir"], "/var/lib/libvirt/images");
    }

    #[test]
    fn disable_cvm_takes_a_value_or_stands_alone() {
        let s = configure(&["--disable-cvm=false"]).unwrap().summary();
        assert_eq!(s["disable_cvm"], false);
        let s = configure(&["--disable-cvm"]).unwrap().summary();
        assert_eq!(s["disable_cvm"], true);
        let err = configure(&["--disable-cvm=maybe"]).unwrap_err().message;
        assert!(err.contains("--disable-cvm"), "{err}");
    }

    #[test]
    fn settings_follow_the_flags() {
        let m = LibvirtManager
            .command()
            .try_get_matches_from([
                "libvirt",
                "--uri",
                "test:///default",
                "--root-disk-size",
                "20",
                "--firmware",
                "",
                "--cpuset",
                "0-1",
            ])
            .unwrap();
        let c = LibvirtConfig::from_arg_matches(&m).unwrap();
        let s = c.settings();
        assert_eq!(s.uri.as_str(), "test:///default");
        assert_eq!(s.root_disk_bytes, 20 << 30);
        assert_eq!(s.firmware, None, "an empty firmware means BIOS");
        assert_eq!(s.cpuset.as_deref(), Some("0-1"));
    }

    #[test]
    fn bad_values_name_the_flag_and_its_variable() {
        for (args, start) in [
            (&["--uri", "localhost"][..], "--uri (LIBVIRT_URI):"),
            (&["--pool-name", "a/b"][..], "--pool-name (LIBVIRT_POOL):"),
            (
                &["--network-name", " "][..],
                "--network-name (LIBVIRT_NET):",
            ),
            (
                &["--vol-name", "../x"][..],
                "--vol-name (LIBVIRT_VOL_NAME):",
            ),
            (&["--cpu", "0"][..], "--cpu (LIBVIRT_CPU):"),
            (&["--memory", "64"][..], "--memory (LIBVIRT_MEMORY):"),
            (
                &["--root-disk-size", "999999"][..],
                "--root-disk-size (LIBVIRT_ROOT_DISK_SIZE):",
            ),
            (
                &["--firmware", "OVMF.fd"][..],
                "--firmware (LIBVIRT_EFI_FIRMWARE):",
            ),
            (
                &["--launch-security", "s390-pv"][..],
                "--launch-security (LIBVIRT_LAUNCH_SECURITY):",
            ),
            (&["--data-dir", "images"][..], "--data-dir:"),
        ] {
            let err = configure(args).unwrap_err().message;
            assert!(err.starts_with(start), "{args:?}: {err}");
        }
        // Values clap parses name the flag in clap's own words.
        for (args, flag) in [
            (&["--cpu", "two"][..], "--cpu"),
            (&["--memory", "8G"][..], "--memory"),
            (&["--cpuset", "0-x"][..], "--cpuset"),
            (&["--launch-security", "tdx"][..], "--launch-security"),
        ] {
            let err = configure(args).unwrap_err().message;
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        // s390-pv with confidential VMs on is fine before the host is known.
        configure(&["--launch-security", "s390-pv", "--disable-cvm=false"]).unwrap();
    }

    #[test]
    fn passwords_in_the_uri_stay_out_of_the_summary() {
        let shown = |uri: &str| LibvirtUri::from(uri).to_string();
        assert_eq!(
            shown("qemu+tcp://admin:s3cret@host/system"),
            "qemu+tcp://admin:<redacted>@host/system"
        );
        assert_eq!(shown("qemu:///system"), "qemu:///system");
        assert_eq!(
            shown("qemu+ssh://root@192.168.122.1/system"),
            "qemu+ssh://root@192.168.122.1/system"
        );
        let config = configure(&["--uri", "qemu+tcp://admin:s3cret@host/system"]).unwrap();
        for shown in [format!("{config:?}"), config.summary().to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("admin:<redacted>@host"), "{shown}");
        }
    }
}
