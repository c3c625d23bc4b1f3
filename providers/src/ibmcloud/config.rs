//! The IBM Cloud VPC provider's configuration (the reference's `types.go`):
//! the reference's flags and environment variables, plus the endpoints of
//! Global Tagging and Global Search and `--ca-bundle` for a private CA.

use crate::secret::Secret;
use clap::builder::BoolishValueParser;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The IAM endpoint the reference defaults to; `/identity/token` is
/// accepted with or without the path.
pub const DEFAULT_IAM_URL: &str = "https://iam.cloud.ibm.com/identity/token";
/// Global Tagging's public endpoint (IBM's `GlobalTaggingV1` default).
pub const DEFAULT_TAGGING_URL: &str = "https://tags.global-search-tagging.cloud.ibm.com";
/// Global Search's public endpoint (IBM's `GlobalSearchV2` default).
pub const DEFAULT_SEARCH_URL: &str = "https://api.global-search-tagging.cloud.ibm.com";
/// Where IBM's container authenticator looks for a compute-resource token,
/// in order (IBM `go-sdk-core`, `ContainerAuthenticator`).
pub const DEFAULT_CR_TOKEN_FILES: &[&str] = &[
    "/var/run/secrets/tokens/vault-token",
    "/var/run/secrets/tokens/sa-token",
    "/var/run/secrets/codeengine.cloud.ibm.com/compute-resource-token/token",
];

/// Flags of `podvisor ibmcloud`, each with the reference's environment
/// variable.
#[derive(clap::Args, Debug, Clone)]
pub struct IbmCloudConfig {
    /// IAM API key (or use --iam-profile-id with a compute-resource token)
    #[arg(
        long = "api-key",
        env = "IBMCLOUD_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<Secret>,

    /// IAM trusted profile id, used with the pod's projected service-account token when no API key is given
    #[arg(
        long = "iam-profile-id",
        env = "IBMCLOUD_IAM_PROFILE_ID",
        value_name = "ID"
    )]
    pub iam_profile_id: Option<String>,

    /// Compute-resource token file of the trusted profile [default: the first of IBM's default paths that exists]
    #[arg(
        long = "iam-cr-token-file",
        env = "IBMCLOUD_CR_TOKEN_FILENAME",
        value_name = "FILE"
    )]
    pub cr_token_file: Option<PathBuf>,

    /// IAM token endpoint
    #[arg(
        long = "iam-service-url",
        env = "IBMCLOUD_IAM_ENDPOINT",
        value_name = "URL",
        default_value = DEFAULT_IAM_URL
    )]
    pub iam_service_url: String,

    /// VPC API endpoint [default: https://<region of --zone-name>.iaas.cloud.ibm.com/v1]
    #[arg(
        long = "vpc-service-url",
        env = "IBMCLOUD_VPC_ENDPOINT",
        value_name = "URL"
    )]
    pub vpc_service_url: Option<String>,

    /// Global Tagging API endpoint
    #[arg(
        long = "tagging-service-url",
        env = "IBMCLOUD_TAGGING_ENDPOINT",
        value_name = "URL",
        default_value = DEFAULT_TAGGING_URL
    )]
    pub tagging_service_url: String,

    /// Global Search API endpoint
    #[arg(
        long = "search-service-url",
        env = "IBMCLOUD_SEARCH_ENDPOINT",
        value_name = "URL",
        default_value = DEFAULT_SEARCH_URL
    )]
    pub search_service_url: String,

    /// PEM file of extra CA certificates to trust (a private endpoint's or a proxy's), besides the system's
    #[arg(long = "ca-bundle", env = "IBMCLOUD_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,

    /// Instance profile used when a pod asks for no particular size
    #[arg(
        long = "profile-name",
        env = "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME",
        value_name = "PROFILE"
    )]
    pub profile_name: Option<String>,

    /// Instance profiles pods may get, comma-separated [default: only --profile-name]
    #[arg(
        long = "profile-list",
        env = "IBMCLOUD_PODVM_INSTANCE_PROFILE_LIST",
        value_name = "PROFILES",
        value_delimiter = ','
    )]
    pub profile_list: Vec<String>,

    /// Images of the pod VMs, comma-separated, at most one per architecture (the pod annotation `io.katacontainers.config.hypervisor.image` overrides it)
    #[arg(
        long = "image-id",
        env = "IBMCLOUD_PODVM_IMAGE_ID",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub image_ids: Vec<String>,

    /// Zone of the pod VMs (`us-south-1`)
    #[arg(long = "zone-name", env = "IBMCLOUD_ZONE", value_name = "ZONE")]
    pub zone_name: Option<String>,

    /// Subnet of the pod VMs' primary network interface
    #[arg(
        long = "primary-subnet-id",
        env = "IBMCLOUD_VPC_SUBNET_ID",
        value_name = "ID"
    )]
    pub primary_subnet_id: Option<String>,

    /// VPC of the pod VMs
    #[arg(long = "vpc-id", env = "IBMCLOUD_VPC_ID", value_name = "ID")]
    pub vpc_id: Option<String>,

    /// Resource group of the pod VMs [default: the account's default group]
    #[arg(
        long = "resource-group-id",
        env = "IBMCLOUD_RESOURCE_GROUP_ID",
        value_name = "ID"
    )]
    pub resource_group_id: Option<String>,

    /// SSH key of the pod VMs
    #[arg(long = "key-id", env = "IBMCLOUD_SSH_KEY_ID", value_name = "ID")]
    pub key_id: Option<String>,

    /// Security groups of the pod VMs' primary interface, comma-separated (older variable: IBMCLOUD_VPC_SG_ID) [default: the VPC's default group]
    #[arg(
        long = "security-group-ids",
        env = "IBMCLOUD_SECURITY_GROUP_IDS",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub security_group_ids: Vec<String>,

    /// Cluster id: pod VMs are tagged `coco-pod-vm:<id>` [default: no cluster tag]
    #[arg(long = "cluster-id", env = "IBMCLOUD_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,

    /// Dedicated hosts to place pod VMs on, comma-separated: the first in --zone-name is used, and a create it refuses goes to --dedicated-host-group-ids
    #[arg(
        long = "dedicated-host-ids",
        env = "IBMCLOUD_DEDICATED_HOST_IDS",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub dedicated_host_ids: Vec<String>,

    /// Dedicated host groups to place pod VMs in, comma-separated: the first in --zone-name is used
    #[arg(
        long = "dedicated-host-group-ids",
        env = "IBMCLOUD_DEDICATED_HOST_GROUP_IDS",
        value_name = "IDS",
        value_delimiter = ','
    )]
    pub dedicated_host_group_ids: Vec<String>,

    /// Do not ask for TDX confidential VMs with secure boot (true by default, as in the reference)
    #[arg(
        long = "disable-cvm",
        env = "DISABLECVM",
        value_name = "BOOL",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "true",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub disable_cvm: bool,

    /// Time between two polls of an instance, for its address after a create and its removal after a delete (Go duration)
    #[arg(
        long = "poll-interval",
        env = "IBMCLOUD_POLL_INTERVAL",
        value_name = "DURATION",
        default_value = "2s",
        value_parser = crate::duration::parse_duration
    )]
    pub poll_interval: Duration,

    /// Extra tags of every pod VM, as key=value pairs, comma-separated (attached as `key:value`)
    #[arg(
        long = "tags",
        env = "TAGS",
        value_name = "K=V,...",
        default_value = ""
    )]
    pub tags: IbmTagList,
}

/// `TAGS` (`k=v,k=v`) as IBM user tags, `k:v`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IbmTagList(pub Vec<String>);

impl FromStr for IbmTagList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tags: Vec<String> = Vec::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(format!("'{pair}' has an empty key"));
            }
            if key.starts_with("podvisor.io") || key == "coco-pod-vm" {
                return Err(format!("tag key '{key}' is set by podvisor itself"));
            }
            let tag = if value.is_empty() {
                key.to_owned()
            } else {
                format!("{key}:{value}")
            };
            if !is_user_tag(&tag) {
                return Err(format!(
                    "tag '{tag}' is not an IBM Cloud tag (at most 128 of letters, digits, \
                     space, '_', '.', '-', ':')"
                ));
            }
            let lower = key.to_ascii_lowercase();
            if tags
                .iter()
                .any(|t| t.split(':').next() == Some(lower.as_str()))
            {
                return Err(format!("tag key '{key}' is given twice"));
            }
            tags.push(tag.to_ascii_lowercase());
        }
        Ok(Self(tags))
    }
}

/// Whether `tag` is a valid IBM Cloud user tag: 1 to 128 characters, each
/// a letter, a digit, a space, `_`, `.`, `-` or `:` (IBM Cloud docs,
/// "Working with tags": tag names are case-insensitive and stored lowercase).
pub fn is_user_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'.' | b'-' | b':'))
}

/// Whether `id` looks like an IBM Cloud VPC id or name (`r006-…`,
/// `0717_…`, `bx2-2x8`): 1 to 64 of lowercase letters, digits, `-` and `_`.
/// Ids reach URL paths, so nothing else may pass.
pub fn is_vpc_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The region of a zone (`us-south-1` → `us-south`), if it is zone-shaped.
pub fn region_of_zone(zone: &str) -> Option<&str> {
    let (region, n) = zone.rsplit_once('-')?;
    let valid = !region.is_empty()
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_become_lowercase_ibm_user_tags_and_bad_ones_are_refused() {
        assert_eq!("".parse::<IbmTagList>().unwrap(), IbmTagList::default());
        assert_eq!(
            "Team=A, env = prod ,flag=".parse::<IbmTagList>().unwrap().0,
            ["team:a", "env:prod", "flag"]
        );
        for (bad, why) in [
            ("novalue", "not key=value"),
            ("=v", "empty key"),
            ("podvisor.io/node=x", "podvisor itself"),
            ("coco-pod-vm=x", "podvisor itself"),
            ("a=b/c", "not an IBM Cloud tag"),
            ("a=1,a=2", "twice"),
            ("team=a,Team=b", "twice"),
        ] {
            let err = bad.parse::<IbmTagList>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(!is_user_tag(&"x".repeat(129)));
    }

    #[test]
    fn ids_and_zones_are_recognised() {
        for good in ["r006-9c1f2b0e", "0717_abc-def", "bx2-2x8"] {
            assert!(is_vpc_id(good), "{good}");
        }
        for bad in ["", "a/b", "../x", "A", "a?b", &"a".repeat(65)] {
            assert!(!is_vpc_id(bad), "{bad}");
        }
        assert_eq!(region_of_zone("us-south-1"), Some("us-south"));
        assert_eq!(region_of_zone("jp-tok-3"), Some("jp-tok"));
        for bad in ["us-south", "us-south-x", "-1", "US-1", "a b-1"] {
            assert_eq!(region_of_zone(bad), None, "{bad}");
        }
    }
}
