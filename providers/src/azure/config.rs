//! The Azure provider's configuration: the reference's flags and
//! environment variables (cloud-api-adaptor's `azure` provider), plus the
//! endpoints (`--authority-host`, `--resource-manager-endpoint`) for
//! sovereign clouds and tests, `--federated-token-file` for workload
//! identity, `--ca-bundle` for a private CA and `--poll-interval`.

use crate::secret::Secret;
use clap::builder::BoolishValueParser;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Microsoft Entra ID's public authority (azure_identity's default).
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Azure Resource Manager's public endpoint.
pub const DEFAULT_RESOURCE_MANAGER: &str = "https://management.azure.com";
/// The reference's default VM size.
pub const DEFAULT_INSTANCE_SIZE: &str = "Standard_DC2as_v5";

/// Flags of `podvisor azure`, each with the reference's environment
/// variable.
#[derive(clap::Args, Debug, Clone)]
pub struct AzureConfig {
    /// Client (application) id of the service principal or the workload identity [default: a managed identity's own]
    #[arg(long = "clientid", env = "AZURE_CLIENT_ID", value_name = "ID")]
    pub client_id: Option<String>,

    /// Client secret of the service principal (without one: workload identity, else the node's managed identity)
    #[arg(
        long = "secret",
        env = "AZURE_CLIENT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<Secret>,

    /// Tenant (directory) id
    #[arg(long = "tenantid", env = "AZURE_TENANT_ID", value_name = "ID")]
    pub tenant_id: Option<String>,

    /// Projected service-account token of Azure workload identity (set by its webhook), used when no secret is given
    #[arg(
        long = "federated-token-file",
        env = "AZURE_FEDERATED_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub federated_token_file: Option<PathBuf>,

    /// Subscription of the pod VMs
    #[arg(
        long = "subscriptionid",
        env = "AZURE_SUBSCRIPTION_ID",
        value_name = "ID"
    )]
    pub subscription_id: Option<String>,

    /// Region of the pod VMs (`eastus`)
    #[arg(long = "region", env = "AZURE_REGION", value_name = "REGION")]
    pub region: Option<String>,

    /// Resource group of the pod VMs
    #[arg(
        long = "resourcegroup",
        env = "AZURE_RESOURCE_GROUP",
        value_name = "NAME"
    )]
    pub resource_group: Option<String>,

    /// VM size used when a pod asks for no particular size
    #[arg(
        long = "instance-size",
        env = "AZURE_INSTANCE_SIZE",
        value_name = "SIZE",
        default_value = DEFAULT_INSTANCE_SIZE
    )]
    pub instance_size: String,

    /// VM sizes pods may get, comma-separated [default: only --instance-size]
    #[arg(
        long = "instance-sizes",
        env = "AZURE_INSTANCE_SIZES",
        value_name = "SIZES",
        value_delimiter = ','
    )]
    pub instance_sizes: Vec<String>,

    /// Subnet of the pod VMs' network interface (its full ARM id)
    #[arg(long = "subnetid", env = "AZURE_SUBNET_ID", value_name = "ID")]
    pub subnet_id: Option<String>,

    /// Network security group of the pod VMs' network interface (its full ARM id)
    #[arg(long = "securitygroupid", env = "AZURE_NSG_ID", value_name = "ID")]
    pub nsg_id: Option<String>,

    /// Image of the pod VMs: a managed image or gallery image version ARM id, or a community gallery image (`/CommunityGalleries/<name>/Images/<image>/Versions/<version>`); the pod annotation `io.katacontainers.config.hypervisor.image` overrides it
    #[arg(long = "imageid", env = "AZURE_IMAGE_ID", value_name = "ID")]
    pub image_id: Option<String>,

    /// OpenSSH public key file for the pod VMs' admin user [default: a throw-away Ed25519 key made at start-up]
    #[arg(long = "ssh-key-path", value_name = "FILE")]
    pub ssh_key_path: Option<PathBuf>,

    /// Admin user name of the pod VMs
    #[arg(
        long = "ssh-username",
        env = "SSH_USERNAME",
        value_name = "NAME",
        default_value = "peerpod"
    )]
    pub ssh_username: String,

    /// Do not make confidential VMs (AMD SEV-SNP with a vTPM)
    #[arg(
        long = "disable-cvm",
        env = "DISABLECVM",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub disable_cvm: bool,

    /// Turn on secure boot (trusted launch, or with a confidential VM)
    #[arg(
        long = "enable-secure-boot",
        env = "ENABLE_SECURE_BOOT",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub enable_secure_boot: bool,

    /// Give each pod VM a public IP address and reach its agent there
    #[arg(
        long = "use-public-ip",
        env = "USE_PUBLIC_IP",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub use_public_ip: bool,

    /// OS disk size in GiB (0: the image's size)
    #[arg(
        long = "root-volume-size",
        env = "ROOT_VOLUME_SIZE",
        value_name = "GIB",
        default_value_t = 0
    )]
    pub root_volume_size: u32,

    /// Extra tags of every pod VM, as key=value pairs, comma-separated
    #[arg(
        long = "tags",
        env = "TAGS",
        value_name = "K=V,...",
        default_value = ""
    )]
    pub tags: AzureTagList,

    /// Microsoft Entra ID authority (sovereign clouds, tests)
    #[arg(
        long = "authority-host",
        env = "AZURE_AUTHORITY_HOST",
        value_name = "URL",
        default_value = DEFAULT_AUTHORITY_HOST
    )]
    pub authority_host: String,

    /// Azure Resource Manager endpoint (sovereign clouds, tests)
    #[arg(
        long = "resource-manager-endpoint",
        env = "AZURE_RESOURCE_MANAGER_ENDPOINT",
        value_name = "URL",
        default_value = DEFAULT_RESOURCE_MANAGER
    )]
    pub resource_manager_endpoint: String,

    /// PEM file of extra CA certificates to trust (a private endpoint's or a proxy's), besides the system's
    #[arg(long = "ca-bundle", env = "AZURE_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,

    /// Time between two polls of a long-running operation when Azure gives no Retry-After (Go duration)
    #[arg(
        long = "poll-interval",
        env = "AZURE_POLL_INTERVAL",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = crate::duration::parse_duration
    )]
    pub poll_interval: Duration,
}

/// Tags written as `k=v,k=v` (the reference's `TAGS`), checked against
/// Azure's rules (Azure Resource Manager docs, "Use tags to organize your
/// Azure resources", limitations): a name of at most 512 characters
/// without `<`, `>`, `%`, `&`, `\`, `?` or `/`, a value of at most 256;
/// names are case-insensitive. A resource holds at most 50 tags, five of
/// which are podvisor's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AzureTagList(pub Vec<(String, String)>);

/// How many tags of `TAGS` fit beside podvisor's own five (Azure: 50).
pub const MAX_USER_TAGS: usize = 45;

impl FromStr for AzureTagList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tags: Vec<(String, String)> = Vec::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            if !is_tag_name(key) {
                return Err(format!(
                    "tag name '{key}' is not an Azure tag name (1 to 512 characters, none of \
                     < > % & \\ ? /)"
                ));
            }
            if value.chars().count() > 256 {
                return Err(format!("tag '{key}': the value is over 256 characters"));
            }
            let lower = key.to_ascii_lowercase();
            if lower.starts_with("podvisor.io") {
                return Err(format!("tag name '{key}' is set by podvisor itself"));
            }
            if tags.iter().any(|(k, _)| k.to_ascii_lowercase() == lower) {
                return Err(format!("tag name '{key}' is given twice"));
            }
            tags.push((key.to_owned(), value.to_owned()));
        }
        if tags.len() > MAX_USER_TAGS {
            return Err(format!(
                "{} tags: an Azure resource holds at most 50, and podvisor sets 5",
                tags.len()
            ));
        }
        Ok(Self(tags))
    }
}

/// Whether `name` is a valid Azure tag name.
pub fn is_tag_name(name: &str) -> bool {
    (1..=512).contains(&name.chars().count())
        && !name.contains(['<', '>', '%', '&', '\\', '?', '/'])
}

/// Whether `name` is a safe ARM resource-name or id segment: what Azure
/// allows in the names podvisor handles (subscription and tenant GUIDs,
/// resource groups, regions, VM sizes, VM names), and nothing that could
/// change a URL's path or query: letters, digits, `-`, `_`, `.`, `(`, `)`,
/// 1 to 90 characters, not `.` or `..`.
pub fn is_arm_name(name: &str) -> bool {
    (1..=90).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'(' | b')'))
}

/// Whether `id` is an ARM resource id podvisor may put in a URL path or a
/// request body: `/`-separated safe segments ([`is_arm_name`]), starting
/// with `/subscriptions/` or (a community gallery image)
/// `/CommunityGalleries/`, case-insensitively.
pub fn is_arm_id(id: &str) -> bool {
    let lower = id.to_ascii_lowercase();
    (lower.starts_with("/subscriptions/") || lower.starts_with("/communitygalleries/"))
        && id.len() <= 1024
        && id[1..].split('/').all(is_arm_name)
}

/// Whether `id` names a community gallery image version.
pub fn is_community_image(id: &str) -> bool {
    id.to_ascii_lowercase().starts_with("/communitygalleries/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_azure_rules() {
        assert_eq!("".parse::<AzureTagList>().unwrap(), AzureTagList::default());
        assert_eq!(
            "Team=A, env = prod ,flag="
                .parse::<AzureTagList>()
                .unwrap()
                .0,
            [
                ("Team".to_owned(), "A".to_owned()),
                ("env".to_owned(), "prod".to_owned()),
                ("flag".to_owned(), String::new())
            ]
        );
        for (bad, why) in [
            ("novalue", "not key=value"),
            ("=v", "not an Azure tag name"),
            ("a/b=c", "not an Azure tag name"),
            ("a?b=c", "not an Azure tag name"),
            ("podvisor.io_node=x", "podvisor itself"),
            ("a=1,A=2", "twice"),
        ] {
            let err = bad.parse::<AzureTagList>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let many: Vec<String> = (0..46).map(|i| format!("k{i}=v")).collect();
        assert!(
            many.join(",")
                .parse::<AzureTagList>()
                .unwrap_err()
                .contains("at most 50")
        );
        assert!(
            format!("k={}", "v".repeat(257))
                .parse::<AzureTagList>()
                .is_err()
        );
    }

    #[test]
    fn arm_names_and_ids_are_recognised() {
        for good in [
            "eastus",
            "Standard_DC2as_v5",
            "my-rg.1",
            "rg(1)",
            "0f6b2c1e-4d3a-4b5c-8d7e-9f0a1b2c3d4e",
        ] {
            assert!(is_arm_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "a?b",
            "a%2f",
            "a#b",
            &"a".repeat(91),
        ] {
            assert!(!is_arm_name(bad), "{bad}");
        }
        for good in [
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i",
            "/CommunityGalleries/cocopodvm-1a2b/Images/podvm/Versions/1.0.0",
        ] {
            assert!(is_arm_id(good), "{good}");
        }
        for bad in [
            "subscriptions/s",
            "/subscriptions/s/../x",
            "/subscriptions/s//x",
            "/subscriptions/s/x?y",
            "/other/x",
            "/subscriptions/s/",
        ] {
            assert!(!is_arm_id(bad), "{bad}");
        }
        assert!(is_community_image(
            "/communityGalleries/g/images/i/versions/1"
        ));
    }
}
