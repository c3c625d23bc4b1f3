//! The IBM Cloud provider's cloud manager: flags, validation, the HTTP
//! client (reqwest on rustls with ring, as the daemon's own TLS), IAM, and
//! `NewProvider`.

use super::client::{Client, Endpoints};
use super::config::{
    DEFAULT_CR_TOKEN_FILES, IbmCloudConfig, is_user_tag, is_vpc_id, region_of_zone,
};
use super::iam::{Grant, Iam};
use super::provider::{IbmCloudProvider, IbmCloudSettings};
use crate::error::ProviderError;
use crate::manager::{CallLimits, CloudManager, ConfigError, ProviderConfig, ProviderContext};
use crate::provider::Provider;
use crate::secret::Secret;
use async_trait::async_trait;
use clap::{Args, FromArgMatches};
use std::path::PathBuf;
use std::sync::Arc;

/// Registers `podvisor ibmcloud`.
#[derive(Debug)]
pub struct IbmCloudManager;

/// The default pace of IBM Cloud requests. IBM publishes no per-account
/// request budget for the VPC API; it answers `429` with `Retry-After`
/// when a caller goes too fast (IBM Cloud VPC API, "Rate limiting"), and
/// each podvisor request is paced and slows down on a 429. A pod VM's
/// create is three mutating requests (instance, tags; a start only for a
/// stopped one) and a delete one; 2/s with a burst of 10 starts a node's
/// worth of pods within seconds while leaving the account's budget to the
/// cluster's other nodes. Reads (address and deletion polls every 2 s,
/// lookups, the orphan GC's listing): 10/s, burst 50.
pub const IBM_CALL_LIMITS: CallLimits = CallLimits {
    rate: 2.0,
    burst: 10,
    read_rate: 10.0,
    read_burst: 50,
};

impl CloudManager for IbmCloudManager {
    fn name(&self) -> &'static str {
        "ibmcloud"
    }

    fn command(&self) -> clap::Command {
        IbmCloudConfig::augment_args(clap::Command::new("ibmcloud"))
            .about("Pod VMs as IBM Cloud VPC virtual server instances")
    }

    fn configure(
        &self,
        matches: &clap::ArgMatches,
    ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let mut config =
            IbmCloudConfig::from_arg_matches(matches).map_err(|e| ConfigError::from_clap(&e))?;
        if config.security_group_ids.iter().all(String::is_empty)
            && let Ok(older) = std::env::var("IBMCLOUD_VPC_SG_ID")
        {
            config.security_group_ids = older
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        validate(&config)?;
        Ok(Box::new(config))
    }

    fn default_call_limits(&self) -> CallLimits {
        IBM_CALL_LIMITS
    }
}

fn is_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) && reqwest::Url::parse(url).is_ok()
}

fn ids_ok(flag: &str, env: &str, ids: &[String]) -> Result<(), ConfigError> {
    match ids.iter().find(|id| !is_vpc_id(id)) {
        Some(bad) => Err(ConfigError::flag(
            flag,
            Some(env),
            format!("'{bad}' is not an IBM Cloud id"),
        )),
        None => Ok(()),
    }
}

/// Everything that can be checked without the cloud.
fn validate(c: &IbmCloudConfig) -> Result<(), ConfigError> {
    if c.api_key
        .as_ref()
        .is_none_or(|k| k.expose().trim().is_empty())
        && c.iam_profile_id.as_deref().is_none_or(str::is_empty)
    {
        return Err(ConfigError::flag(
            "api-key",
            Some("IBMCLOUD_API_KEY"),
            "is required, unless a trusted profile is given with --iam-profile-id \
             (IBMCLOUD_IAM_PROFILE_ID)",
        ));
    }
    for (flag, env, url) in [
        (
            "iam-service-url",
            "IBMCLOUD_IAM_ENDPOINT",
            Some(&c.iam_service_url),
        ),
        (
            "vpc-service-url",
            "IBMCLOUD_VPC_ENDPOINT",
            c.vpc_service_url.as_ref(),
        ),
        (
            "tagging-service-url",
            "IBMCLOUD_TAGGING_ENDPOINT",
            Some(&c.tagging_service_url),
        ),
        (
            "search-service-url",
            "IBMCLOUD_SEARCH_ENDPOINT",
            Some(&c.search_service_url),
        ),
    ] {
        if let Some(url) = url
            && !is_url(url)
        {
            return Err(ConfigError::flag(
                flag,
                Some(env),
                format!("'{url}' is not an http(s) URL"),
            ));
        }
    }
    let Some(zone) = c.zone_name.as_deref().filter(|z| !z.is_empty()) else {
        return Err(ConfigError::flag(
            "zone-name",
            Some("IBMCLOUD_ZONE"),
            "is required (the zone of the pod VMs, e.g. us-south-1)",
        ));
    };
    if region_of_zone(zone).is_none() {
        return Err(ConfigError::flag(
            "zone-name",
            Some("IBMCLOUD_ZONE"),
            format!("'{zone}' is not a zone name (e.g. us-south-1)"),
        ));
    }
    let images: Vec<String> = c
        .image_ids
        .iter()
        .filter(|i| !i.is_empty())
        .cloned()
        .collect();
    if images.is_empty() {
        return Err(ConfigError::flag(
            "image-id",
            Some("IBMCLOUD_PODVM_IMAGE_ID"),
            "is required (the pod VM image, one per architecture)",
        ));
    }
    ids_ok("image-id", "IBMCLOUD_PODVM_IMAGE_ID", &images)?;
    for (flag, env, value) in [
        (
            "primary-subnet-id",
            "IBMCLOUD_VPC_SUBNET_ID",
            &c.primary_subnet_id,
        ),
        ("vpc-id", "IBMCLOUD_VPC_ID", &c.vpc_id),
    ] {
        match value.as_deref().filter(|v| !v.is_empty()) {
            None => {
                return Err(ConfigError::flag(flag, Some(env), "is required"));
            }
            Some(id) => ids_ok(flag, env, &[id.to_owned()])?,
        }
    }
    let Some(profile) = c.profile_name.as_deref().filter(|p| !p.is_empty()) else {
        return Err(ConfigError::flag(
            "profile-name",
            Some("IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME"),
            "is required (the default instance profile, e.g. bx2-2x8)",
        ));
    };
    ids_ok(
        "profile-name",
        "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME",
        &[profile.to_owned()],
    )?;
    let list: Vec<String> = c
        .profile_list
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    ids_ok(
        "profile-list",
        "IBMCLOUD_PODVM_INSTANCE_PROFILE_LIST",
        &list,
    )?;
    if !list.is_empty() && !list.iter().any(|p| p == profile) {
        return Err(ConfigError::flag(
            "profile-name",
            Some("IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME"),
            format!(
                "{profile} is not in --profile-list (IBMCLOUD_PODVM_INSTANCE_PROFILE_LIST): {}",
                list.join(",")
            ),
        ));
    }
    for (flag, env, value) in [
        (
            "resource-group-id",
            "IBMCLOUD_RESOURCE_GROUP_ID",
            &c.resource_group_id,
        ),
        ("key-id", "IBMCLOUD_SSH_KEY_ID", &c.key_id),
    ] {
        if let Some(id) = value.as_deref().filter(|v| !v.is_empty()) {
            ids_ok(flag, env, &[id.to_owned()])?;
        }
    }
    for (flag, env, ids) in [
        (
            "security-group-ids",
            "IBMCLOUD_SECURITY_GROUP_IDS",
            &c.security_group_ids,
        ),
        (
            "dedicated-host-ids",
            "IBMCLOUD_DEDICATED_HOST_IDS",
            &c.dedicated_host_ids,
        ),
        (
            "dedicated-host-group-ids",
            "IBMCLOUD_DEDICATED_HOST_GROUP_IDS",
            &c.dedicated_host_group_ids,
        ),
    ] {
        let ids: Vec<String> = ids.iter().filter(|i| !i.is_empty()).cloned().collect();
        ids_ok(flag, env, &ids)?;
    }
    if let Some(cluster) = c.cluster_id.as_deref().filter(|v| !v.is_empty())
        && !is_user_tag(&format!("coco-pod-vm:{cluster}"))
    {
        return Err(ConfigError::flag(
            "cluster-id",
            Some("IBMCLOUD_CLUSTER_ID"),
            format!("'{cluster}' cannot be part of a tag"),
        ));
    }
    if let Some(bundle) = &c.ca_bundle
        && !bundle.is_file()
    {
        return Err(ConfigError::flag(
            "ca-bundle",
            Some("IBMCLOUD_CA_BUNDLE"),
            format!("{} is not a file", bundle.display()),
        ));
    }
    Ok(())
}

fn nonempty(value: Option<&String>) -> Option<String> {
    value.filter(|v| !v.is_empty()).cloned()
}

fn nonempty_list(values: &[String]) -> Vec<String> {
    values.iter().filter(|v| !v.is_empty()).cloned().collect()
}

impl IbmCloudConfig {
    /// The provider settings of this configuration (validated).
    fn settings(&self) -> IbmCloudSettings {
        let mut s = IbmCloudSettings::new(
            self.zone_name.as_deref().unwrap_or_default(),
            self.vpc_id.as_deref().unwrap_or_default(),
            self.primary_subnet_id.as_deref().unwrap_or_default(),
            nonempty_list(&self.image_ids),
            self.profile_name.as_deref().unwrap_or_default(),
        );
        s.profile_list = nonempty_list(&self.profile_list);
        s.security_group_ids = nonempty_list(&self.security_group_ids);
        s.resource_group_id = nonempty(self.resource_group_id.as_ref());
        s.key_id = nonempty(self.key_id.as_ref());
        s.cluster_id = nonempty(self.cluster_id.as_ref());
        s.dedicated_host_ids = nonempty_list(&self.dedicated_host_ids);
        s.dedicated_host_group_ids = nonempty_list(&self.dedicated_host_group_ids);
        s.disable_cvm = self.disable_cvm;
        s.tags.clone_from(&self.tags.0);
        s.poll_interval = self.poll_interval;
        s
    }

    /// The VPC endpoint: the flag, else the zone's region's public one.
    fn vpc_url(&self) -> String {
        match &self.vpc_service_url {
            Some(url) => url.clone(),
            None => {
                let zone = self.zone_name.as_deref().unwrap_or_default();
                let region = region_of_zone(zone).unwrap_or(zone);
                format!("https://{region}.iaas.cloud.ibm.com/v1")
            }
        }
    }

    fn grant(&self) -> Result<Grant, ProviderError> {
        if let Some(key) = self
            .api_key
            .as_ref()
            .filter(|k| !k.expose().trim().is_empty())
        {
            // A key from a Kubernetes Secret often ends in a newline.
            return Ok(Grant::ApiKey(Secret::from(key.expose().trim().to_owned())));
        }
        let profile_id = self.iam_profile_id.clone().unwrap_or_default();
        let cr_token_file = match &self.cr_token_file {
            Some(file) => file.clone(),
            None => DEFAULT_CR_TOKEN_FILES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    ProviderError::config(format!(
                        "--iam-cr-token-file (IBMCLOUD_CR_TOKEN_FILENAME): a trusted profile needs \
                         a compute-resource token, and none of {} exists",
                        DEFAULT_CR_TOKEN_FILES.join(", ")
                    ))
                })?,
        };
        Ok(Grant::TrustedProfile {
            profile_id,
            cr_token_file,
        })
    }
}

#[async_trait]
impl ProviderConfig for IbmCloudConfig {
    fn summary(&self) -> serde_json::Value {
        let credentials = if self
            .api_key
            .as_ref()
            .is_some_and(|k| !k.expose().trim().is_empty())
        {
            "api key"
        } else {
            "trusted profile"
        };
        serde_json::json!({
            "credentials": credentials,
            "iam_profile_id": self.iam_profile_id,
            "iam_service_url": self.iam_service_url,
            "vpc_service_url": self.vpc_url(),
            "tagging_service_url": self.tagging_service_url,
            "search_service_url": self.search_service_url,
            "ca_bundle": self.ca_bundle,
            "zone": self.zone_name,
            "vpc_id": self.vpc_id,
            "primary_subnet_id": self.primary_subnet_id,
            "security_group_ids": self.security_group_ids,
            "resource_group_id": self.resource_group_id,
            "key_id": self.key_id,
            "image_ids": self.image_ids,
            "profile_name": self.profile_name,
            "profile_list": self.profile_list,
            "cluster_id": self.cluster_id,
            "dedicated_host_ids": self.dedicated_host_ids,
            "dedicated_host_group_ids": self.dedicated_host_group_ids,
            "disable_cvm": self.disable_cvm,
            "poll_interval_ms": u64::try_from(self.poll_interval.as_millis()).unwrap_or(u64::MAX),
            "tags": self.tags.0,
        })
    }

    fn default_call_limits(&self) -> CallLimits {
        IBM_CALL_LIMITS
    }

    async fn build(&self, context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        let node_tag = super::provider::ibm_tag(crate::provider::TAG_NODE, &context.node_name);
        if !is_user_tag(&node_tag) {
            return Err(ProviderError::config(format!(
                "the node name {:?} cannot be an IBM Cloud tag ({node_tag:?}: at most 128 of \
                 letters, digits, space, '_', '.', '-', ':'); pod VMs could not be listed by node",
                context.node_name
            )));
        }
        let http = crate::https::http_client(self.ca_bundle.as_deref(), "IBMCLOUD_CA_BUNDLE")?;
        let iam = Arc::new(Iam::new(http.clone(), &self.iam_service_url, self.grant()?));
        let endpoints = Endpoints {
            vpc: self.vpc_url(),
            tagging: self.tagging_service_url.clone(),
            search: self.search_service_url.clone(),
        };
        let client = Client::new(http, iam, endpoints, context.pacer.clone());
        Ok(Arc::new(IbmCloudProvider::new(client, self.settings())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[&str] = &[
        "ibmcloud",
        "--api-key",
        "k",
        "--zone-name",
        "us-south-1",
        "--image-id",
        "r006-image",
        "--primary-subnet-id",
        "0717-subnet",
        "--vpc-id",
        "r006-vpc",
        "--profile-name",
        "bx2-2x8",
    ];

    fn configure(args: &[&str]) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let matches = IbmCloudManager
            .command()
            .try_get_matches_from(args)
            .map_err(|e| ConfigError::from_clap(&e))?;
        IbmCloudManager.configure(&matches)
    }

    fn without(flag: &str) -> Vec<&'static str> {
        let mut args = GOOD.to_vec();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args.drain(at..at + 2);
        args
    }

    fn replaced(flag: &str, value: &'static str) -> Vec<&'static str> {
        let mut args = GOOD.to_vec();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        args
    }

    #[test]
    fn a_complete_configuration_is_valid_and_cvm_is_off_by_default() {
        let config = configure(GOOD).unwrap();
        let summary = config.summary();
        assert_eq!(summary["disable_cvm"], true);
        assert_eq!(
            summary["vpc_service_url"],
            "https://us-south.iaas.cloud.ibm.com/v1"
        );
        assert_eq!(summary["credentials"], "api key");
        assert!(!summary.to_string().contains("\"k\""), "{summary}");
        assert_eq!(config.default_call_limits(), IBM_CALL_LIMITS);
    }

    #[test]
    fn each_missing_or_bad_value_names_its_flag_and_variable() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                without("--api-key"),
                "--api-key (IBMCLOUD_API_KEY): is required",
            ),
            (
                without("--zone-name"),
                "--zone-name (IBMCLOUD_ZONE): is required",
            ),
            (
                replaced("--zone-name", "us-south"),
                "--zone-name (IBMCLOUD_ZONE): 'us-south'",
            ),
            (
                without("--image-id"),
                "--image-id (IBMCLOUD_PODVM_IMAGE_ID): is required",
            ),
            (
                replaced("--image-id", "../x"),
                "--image-id (IBMCLOUD_PODVM_IMAGE_ID): '../x'",
            ),
            (
                without("--vpc-id"),
                "--vpc-id (IBMCLOUD_VPC_ID): is required",
            ),
            (
                without("--primary-subnet-id"),
                "--primary-subnet-id (IBMCLOUD_VPC_SUBNET_ID): is required",
            ),
            (
                without("--profile-name"),
                "--profile-name (IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME): is required",
            ),
        ];
        for (args, want) in cases {
            let err = configure(&args)
                .err()
                .map(|e| e.message)
                .unwrap_or_default();
            assert!(err.starts_with(want), "{args:?}: {err}");
        }
        let mut args = GOOD.to_vec();
        args.extend(["--vpc-service-url", "ftp://x"]);
        let err = configure(&args).err().unwrap().message;
        assert!(
            err.starts_with("--vpc-service-url (IBMCLOUD_VPC_ENDPOINT)"),
            "{err}"
        );
        let mut args = GOOD.to_vec();
        args.extend(["--profile-list", "bx2-4x16,cx2-2x4"]);
        let err = configure(&args).err().unwrap().message;
        assert!(err.contains("is not in --profile-list"), "{err}");
    }

    #[test]
    fn a_trusted_profile_replaces_the_api_key() {
        let mut args = without("--api-key");
        args.extend(["--iam-profile-id", "Profile-1"]);
        let config = configure(&args).unwrap();
        assert_eq!(config.summary()["credentials"], "trusted profile");
    }
}
