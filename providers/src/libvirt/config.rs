//! The libvirt provider's configuration (the reference's `types.go`): every
//! flag and environment variable of the reference's libvirt provider.

use clap::ArgAction;
use clap::builder::BoolishValueParser;
use std::path::PathBuf;
use std::str::FromStr;

/// Flags of `podvisor libvirt`, each with the reference's environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct LibvirtConfig {
    /// libvirt connection URI (qemu:///system, qemu+ssh://user@host/system, test:///default)
    #[arg(
        long = "uri",
        env = "LIBVIRT_URI",
        value_name = "URI",
        default_value = "qemu+ssh://root@192.168.122.1/system?no_verify=1"
    )]
    pub uri: LibvirtUri,

    /// Storage pool of the base volume and of each pod VM's volumes
    #[arg(
        long = "pool-name",
        env = "LIBVIRT_POOL",
        value_name = "POOL",
        default_value = "default"
    )]
    pub pool: String,

    /// libvirt network the pod VMs' NIC joins (its DHCP leases give their addresses)
    #[arg(
        long = "network-name",
        env = "LIBVIRT_NET",
        value_name = "NETWORK",
        default_value = "default"
    )]
    pub network: String,

    /// Base volume (the pod VM image) in the pool; the pod annotation `io.katacontainers.config.hypervisor.image` overrides it
    #[arg(
        long = "vol-name",
        env = "LIBVIRT_VOL_NAME",
        value_name = "VOLUME",
        default_value = "podvm-base.qcow2"
    )]
    pub base_volume: String,

    /// vCPUs of a pod VM that asks for none
    #[arg(
        long = "cpu",
        env = "LIBVIRT_CPU",
        value_name = "N",
        default_value = "2"
    )]
    pub vcpus: u32,

    /// Memory in MiB of a pod VM that asks for none
    #[arg(
        long = "memory",
        env = "LIBVIRT_MEMORY",
        value_name = "MIB",
        default_value = "8192"
    )]
    pub memory_mib: u64,

    /// Host CPUs the pod VMs' vCPUs may run on, in libvirt cpuset syntax (0-3,^2) [default: any]
    #[arg(
        long = "cpuset",
        env = "LIBVIRT_CPUSET",
        value_name = "CPUSET",
        default_value = ""
    )]
    pub cpuset: CpuSet,

    /// Root disk size in GiB (raised to the base volume's size when smaller)
    #[arg(
        long = "root-disk-size",
        env = "LIBVIRT_ROOT_DISK_SIZE",
        value_name = "GIB",
        default_value = "10"
    )]
    pub root_disk_gib: u64,

    /// UEFI firmware of x86_64 and aarch64 pod VMs, a path on the libvirt host ("" for none: BIOS)
    #[arg(
        long = "firmware",
        env = "LIBVIRT_EFI_FIRMWARE",
        value_name = "PATH",
        default_value = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    )]
    pub firmware: String,

    /// Confidential launch: auto (s390x: s390-pv when --disable-cvm is false), none, s390-pv
    #[arg(
        long = "launch-security",
        env = "LIBVIRT_LAUNCH_SECURITY",
        value_name = "TYPE",
        default_value = "auto"
    )]
    pub launch_security: LaunchSecurity,

    /// Do not ask for confidential VMs (true by default, as in the reference)
    #[arg(
        long = "disable-cvm",
        env = "DISABLECVM",
        value_name = "BOOL",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value = "true",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub disable_cvm: bool,

    /// Directory for pod VM files on the host (accepted for the reference's
    /// ConfigMaps; podvisor builds the cidata ISO in memory and uploads it to the pool)
    #[arg(
        long = "data-dir",
        value_name = "DIR",
        default_value = "/var/lib/libvirt/images"
    )]
    pub data_dir: PathBuf,
}

/// A libvirt connection URI. `Display` and `Debug` show it without a
/// password, should one be written into it (`qemu+tcp://user:secret@host/…`):
/// messages, logs and the admin summary use those; only the connection
/// itself reads [`LibvirtUri::as_str`].
#[derive(Clone, PartialEq, Eq)]
pub struct LibvirtUri(String);

impl LibvirtUri {
    /// The URI as given, password and all: for opening the connection.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for LibvirtUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = self.0.as_str();
        if let Some((scheme, rest)) = uri.split_once("://")
            && let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return write!(f, "{scheme}://{user}:<redacted>@{host}");
        }
        f.write_str(uri)
    }
}

impl std::fmt::Debug for LibvirtUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl FromStr for LibvirtUri {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl From<&str> for LibvirtUri {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for LibvirtUri {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// The reference's `LIBVIRT_LAUNCH_SECURITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSecurity {
    /// What the host's arch offers (s390x: IBM Secure Execution), when
    /// confidential VMs are not disabled.
    Auto,
    /// Never a confidential launch.
    None,
    /// IBM Secure Execution (s390x only).
    S390Pv,
}

impl FromStr for LaunchSecurity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "s390-pv" | "s390pv" => Ok(Self::S390Pv),
            other => Err(format!(
                "'{other}' is not a launch security type (auto, none, s390-pv)"
            )),
        }
    }
}

impl LaunchSecurity {
    /// The name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::S390Pv => "s390-pv",
        }
    }
}

/// Host CPUs in libvirt's cpuset syntax: `N`, `N-M` and `^N`, comma-separated.
/// Empty means no pinning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSet(pub Option<String>);

impl FromStr for CpuSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self(None));
        }
        let number = |t: &str| -> Result<u32, String> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("'{t}' is not a CPU number"));
            }
            t.parse().map_err(|_| format!("'{t}' is too large"))
        };
        let mut includes = false;
        for part in s.split(',').map(str::trim) {
            if let Some(excluded) = part.strip_prefix('^') {
                number(excluded)?;
            } else if let Some((a, b)) = part.split_once('-') {
                if number(a)? > number(b)? {
                    return Err(format!("range '{part}' runs backwards"));
                }
                includes = true;
            } else {
                number(part)?;
                includes = true;
            }
        }
        if !includes {
            return Err(format!("'{s}' excludes CPUs but includes none"));
        }
        Ok(Self(Some(s.replace(' ', ""))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_security_names() {
        assert_eq!("".parse::<LaunchSecurity>().unwrap(), LaunchSecurity::Auto);
        assert_eq!(
            "AUTO".parse::<LaunchSecurity>().unwrap(),
            LaunchSecurity::Auto
        );
        assert_eq!(
            "none".parse::<LaunchSecurity>().unwrap(),
            LaunchSecurity::None
        );
        assert_eq!(
            "s390-pv".parse::<LaunchSecurity>().unwrap(),
            LaunchSecurity::S390Pv
        );
        let err = "sev".parse::<LaunchSecurity>().unwrap_err();
        assert!(err.contains("auto, none, s390-pv"), "{err}");
    }

    #[test]
    fn cpusets_use_libvirts_syntax() {
        assert_eq!("".parse::<CpuSet>().unwrap(), CpuSet(None));
        assert_eq!(
            "0-3, ^2,8".parse::<CpuSet>().unwrap(),
            CpuSet(Some("0-3,^2,8".into()))
        );
        for (bad, why) in [
            ("a", "not a CPU number"),
            ("3-1", "backwards"),
            ("^2", "includes none"),
            ("1,,2", "not a CPU number"),
            ("-1", "not a CPU number"),
            ("99999999999", "too large"),
        ] {
            let err = bad.parse::<CpuSet>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
