//! The AWS provider's configuration (the reference's `types.go`): every flag
//! and environment variable of the reference's AWS provider, plus
//! `--aws-endpoint` for EC2-compatible endpoints.

use clap::builder::BoolishValueParser;
use std::str::FromStr;

pub use crate::secret::Secret;

/// Flags of `podvisor aws`, each with the reference's environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct AwsConfig {
    /// Access key id of static credentials (with --aws-secret-key)
    #[arg(
        long = "aws-access-key-id",
        env = "AWS_ACCESS_KEY_ID",
        value_name = "ID",
        hide_env_values = true
    )]
    pub access_key_id: Option<Secret>,

    /// Secret access key of static credentials
    #[arg(
        long = "aws-secret-key",
        env = "AWS_SECRET_ACCESS_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub secret_access_key: Option<Secret>,

    /// Session token of temporary static credentials
    #[arg(
        long = "aws-session-token",
        env = "AWS_SESSION_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub session_token: Option<Secret>,

    /// Shared-config profile whose credentials to use (when no static keys are given)
    #[arg(long = "aws-profile", value_name = "PROFILE")]
    pub profile: Option<String>,

    /// Region of the pod VMs [default: the node's region, from the instance metadata service]
    #[arg(long = "aws-region", env = "AWS_REGION", value_name = "REGION")]
    pub region: Option<String>,

    /// EC2 endpoint URL, for EC2-compatible services [default: the region's EC2 endpoint]
    #[arg(long = "aws-endpoint", env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint: Option<String>,

    /// AMI of the pod VMs (the pod annotation `io.katacontainers.config.hypervisor.image` overrides it)
    #[arg(long = "imageid", env = "PODVM_AMI_ID", value_name = "AMI")]
    pub image_id: Option<String>,

    /// Instance type used when a pod asks for no particular size
    #[arg(
        long = "instance-type",
        env = "PODVM_INSTANCE_TYPE",
        value_name = "TYPE",
        default_value = "m6a.large"
    )]
    pub instance_type: String,

    /// Instance types pods may get, comma-separated [default: only --instance-type]
    #[arg(
        long = "instance-types",
        env = "PODVM_INSTANCE_TYPES",
        value_name = "TYPES",
        value_delimiter = ','
    )]
    pub instance_types: Vec<String>,

    /// Subnet of the pod VMs [default: the node's subnet, from the instance metadata service]
    #[arg(long = "subnetid", env = "AWS_SUBNET_ID", value_name = "SUBNET")]
    pub subnet_id: Option<String>,

    /// Security groups of the pod VMs, comma-separated [default: the node's, from the instance metadata service]
    #[arg(
        long = "securitygroupids",
        env = "AWS_SG_IDS",
        value_name = "SGS",
        value_delimiter = ','
    )]
    pub security_group_ids: Vec<String>,

    /// SSH key pair of the pod VMs [default: the node's, from the instance metadata service]
    #[arg(long = "keyname", env = "SSH_KP_NAME", value_name = "NAME")]
    pub key_name: Option<String>,

    /// Create pod VMs from a launch template (it then decides image, type and network)
    #[arg(long = "use-lt", env = "USE_PODVM_LAUNCHTEMPLATE", value_parser = BoolishValueParser::new())]
    pub use_launch_template: bool,

    /// Name of the launch template (with --use-lt)
    #[arg(
        long = "aws-lt-name",
        env = "PODVM_LAUNCHTEMPLATE_NAME",
        value_name = "NAME",
        default_value = "kata"
    )]
    pub launch_template_name: String,

    /// Give pod VMs a public IP and reach their agent through it
    #[arg(long = "use-public-ip", env = "USE_PUBLIC_IP", value_parser = BoolishValueParser::new())]
    pub use_public_ip: bool,

    /// Root volume size in GiB (raised to the image's own size when smaller; 0: the image's size)
    #[arg(
        long = "root-volume-size",
        env = "ROOT_VOLUME_SIZE",
        value_name = "GIB",
        default_value = "30"
    )]
    pub root_volume_size: u32,

    /// Do not ask for AMD SEV-SNP confidential VMs
    #[arg(long = "disable-cvm", env = "DISABLECVM", value_parser = BoolishValueParser::new())]
    pub disable_cvm: bool,

    /// Extra tags of every pod VM, as key=value pairs, comma-separated
    #[arg(
        long = "tags",
        env = "TAGS",
        value_name = "K=V,...",
        default_value = ""
    )]
    pub tags: TagList,
}

/// Tags written as `k=v,k=v` (the reference's `TAGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagList(pub Vec<(String, String)>);

impl FromStr for TagList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tags: Vec<(String, String)> = Vec::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(format!("'{pair}' has an empty key"));
            }
            if key.len() > 128 || value.len() > 256 {
                return Err(format!(
                    "tag '{key}' is too long (keys ≤ 128, values ≤ 256 characters)"
                ));
            }
            if key.to_ascii_lowercase().starts_with("aws:") {
                return Err(format!("tag key '{key}': the aws: prefix is AWS's own"));
            }
            if key == "Name" || key.starts_with("podvisor.io/") {
                return Err(format!("tag key '{key}' is set by podvisor itself"));
            }
            if tags.iter().any(|(k, _)| k == key) {
                return Err(format!("tag key '{key}' is given twice"));
            }
            tags.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self(tags))
    }
}

/// Whether `name` looks like an EC2 instance type (`family.size`).
pub fn is_instance_type_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(family, size)| {
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        ok(family) && ok(size)
    })
}

/// Whether `id` looks like an EC2 id with `prefix` (`ami-`, `subnet-`, `sg-`, `i-`).
pub fn is_ec2_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_lists_parse_and_refuse_what_ec2_or_podvisor_would() {
        assert_eq!("".parse::<TagList>().unwrap(), TagList::default());
        assert_eq!(
            "team=a, env = prod ,".parse::<TagList>().unwrap().0,
            [("team".into(), "a".into()), ("env".into(), "prod".into())]
        );
        assert_eq!(
            "empty=".parse::<TagList>().unwrap().0,
            [("empty".into(), String::new())]
        );
        for (bad, why) in [
            ("novalue", "not key=value"),
            ("=v", "empty key"),
            ("aws:x=1", "AWS's own"),
            ("Name=x", "podvisor itself"),
            ("podvisor.io/node=x", "podvisor itself"),
            ("a=1,a=2", "twice"),
        ] {
            let err = bad.parse::<TagList>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn ids_and_type_names_are_recognised() {
        assert!(is_instance_type_name("m6a.large"));
        assert!(is_instance_type_name("u-6tb1.metal"));
        for bad in ["", "m6a", ".large", "m6a.", "M6A.large", "m6a large"] {
            assert!(!is_instance_type_name(bad), "{bad}");
        }
        assert!(is_ec2_id("ami-03cf127a", "ami-"));
        assert!(is_ec2_id("i-0123456789abcdef0", "i-"));
        for bad in ["ami-", "ami-xyz12345", "i-123", "subnet-0123456789abcdef0"] {
            assert!(!is_ec2_id(bad, "ami-"), "{bad}");
        }
    }
}
