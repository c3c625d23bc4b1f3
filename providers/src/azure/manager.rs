//! The Azure provider's cloud manager: flags, validation, credentials
//! (client secret, else workload identity, else managed identity — the
//! reference's order, with managed identity as the last resort as
//! `DefaultAzureCredential` has it), and `NewProvider`.

use super::client::{Arm, client_options};
use super::config::{AzureConfig, is_arm_id, is_arm_name};
use super::provider::{AzureProvider, AzureSettings};
use crate::error::ProviderError;
use crate::manager::{CallLimits, CloudManager, ConfigError, ProviderConfig, ProviderContext};
use crate::provider::Provider;
use async_trait::async_trait;
use azure_core::credentials::{Secret as AzureSecret, TokenCredential};
use azure_core::http::Url;
use clap::{Args, FromArgMatches};
use std::sync::Arc;

/// Registers `podvisor azure`.
#[derive(Debug)]
pub struct AzureManager;

/// The default pace of Azure requests. ARM meters each subscription's
/// requests per region with token buckets: writes refill at 10/s (bucket
/// 200), reads at 25/s (bucket 250) (Microsoft Learn, "Understand how
/// Azure Resource Manager throttles requests"); the compute provider adds
/// its own VM budgets, reported in `x-ms-ratelimit-remaining-resource`
/// (`Microsoft.Compute/PutVM3Min;240`, `PutVM30Min;1200`: 1.33 and 0.67
/// creates/s sustained). A pod VM's create is one PUT and its delete one
/// DELETE; 1/s with a burst of 10 starts a node's pods at once, stays
/// under the 3-minute VM budget, and the remaining-count headers slow it
/// further before the 30-minute one runs out. Reads (operation polls,
/// lookups, listings): 10/s, burst 50.
pub const AZURE_CALL_LIMITS: CallLimits = CallLimits {
    rate: 1.0,
    burst: 10,
    read_rate: 10.0,
    read_burst: 50,
};

impl CloudManager for AzureManager {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn command(&self) -> clap::Command {
        AzureConfig::augment_args(clap::Command::new("azure"))
            .about("Pod VMs as Azure virtual machines")
    }

    fn configure(
        &self,
        matches: &clap::ArgMatches,
    ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let config =
            AzureConfig::from_arg_matches(matches).map_err(|e| ConfigError::from_clap(&e))?;
        validate(&config)?;
        Ok(Box::new(config))
    }

    fn default_call_limits(&self) -> CallLimits {
        AZURE_CALL_LIMITS
    }
}

fn nonempty(value: Option<&String>) -> Option<&str> {
    value.map(String::as_str).filter(|v| !v.trim().is_empty())
}

fn https_url(flag: &str, env: &str, url: &str) -> Result<Url, ConfigError> {
    let parsed = Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "https" && u.host_str().is_some());
    parsed.ok_or_else(|| {
        ConfigError::flag(
            flag,
            Some(env),
            format!("'{url}' is not an https URL (Azure sends bearer tokens over HTTPS only)"),
        )
    })
}

/// Everything that can be checked without the cloud.
fn validate(c: &AzureConfig) -> Result<(), ConfigError> {
    for (flag, env, value, what) in [
        (
            "subscriptionid",
            "AZURE_SUBSCRIPTION_ID",
            &c.subscription_id,
            "the subscription of the pod VMs",
        ),
        (
            "region",
            "AZURE_REGION",
            &c.region,
            "the region of the pod VMs, e.g. eastus",
        ),
        (
            "resourcegroup",
            "AZURE_RESOURCE_GROUP",
            &c.resource_group,
            "the resource group of the pod VMs",
        ),
    ] {
        match nonempty(value.as_ref()) {
            None => {
                return Err(ConfigError::flag(
                    flag,
                    Some(env),
                    format!("is required ({what})"),
                ));
            }
            Some(v) if !is_arm_name(v.trim()) => {
                return Err(ConfigError::flag(
                    flag,
                    Some(env),
                    format!("'{v}' is not an Azure name"),
                ));
            }
            Some(_) => {}
        }
    }
    for (flag, env, value, required) in [
        ("subnetid", "AZURE_SUBNET_ID", &c.subnet_id, true),
        ("imageid", "AZURE_IMAGE_ID", &c.image_id, true),
        ("securitygroupid", "AZURE_NSG_ID", &c.nsg_id, false),
    ] {
        match nonempty(value.as_ref()) {
            None if required => return Err(ConfigError::flag(flag, Some(env), "is required")),
            None => {}
            Some(id) if !is_arm_id(id.trim()) => {
                return Err(ConfigError::flag(
                    flag,
                    Some(env),
                    format!("'{id}' is not an Azure resource id (/subscriptions/…)"),
                ));
            }
            Some(_) => {}
        }
    }
    if !is_arm_name(&c.instance_size) {
        return Err(ConfigError::flag(
            "instance-size",
            Some("AZURE_INSTANCE_SIZE"),
            format!("'{}' is not a VM size name", c.instance_size),
        ));
    }
    let sizes = nonempty_list(&c.instance_sizes);
    if let Some(bad) = sizes.iter().find(|s| !is_arm_name(s)) {
        return Err(ConfigError::flag(
            "instance-sizes",
            Some("AZURE_INSTANCE_SIZES"),
            format!("'{bad}' is not a VM size name"),
        ));
    }
    if !sizes.is_empty() && !sizes.contains(&c.instance_size) {
        return Err(ConfigError::flag(
            "instance-size",
            Some("AZURE_INSTANCE_SIZE"),
            format!(
                "{} is not in --instance-sizes (AZURE_INSTANCE_SIZES): {}",
                c.instance_size,
                sizes.join(",")
            ),
        ));
    }
    if !is_user_name(&c.ssh_username) {
        return Err(ConfigError::flag(
            "ssh-username",
            Some("SSH_USERNAME"),
            format!("'{}' is not a Linux user name", c.ssh_username),
        ));
    }
    if let Some(path) = &c.ssh_key_path {
        read_public_key(path).map_err(|why| ConfigError::flag("ssh-key-path", None, why))?;
    }
    https_url("authority-host", "AZURE_AUTHORITY_HOST", &c.authority_host)?;
    https_url(
        "resource-manager-endpoint",
        "AZURE_RESOURCE_MANAGER_ENDPOINT",
        &c.resource_manager_endpoint,
    )?;
    let has_secret = c
        .client_secret
        .as_ref()
        .is_some_and(|s| !s.expose().trim().is_empty());
    if has_secret || c.federated_token_file.is_some() {
        for (flag, env, value) in [
            ("clientid", "AZURE_CLIENT_ID", &c.client_id),
            ("tenantid", "AZURE_TENANT_ID", &c.tenant_id),
        ] {
            if nonempty(value.as_ref()).is_none() {
                return Err(ConfigError::flag(
                    flag,
                    Some(env),
                    "is required with a client secret or a workload identity",
                ));
            }
        }
    }
    if let Some(file) = &c.federated_token_file
        && !has_secret
        && !file.is_file()
    {
        return Err(ConfigError::flag(
            "federated-token-file",
            Some("AZURE_FEDERATED_TOKEN_FILE"),
            format!("{} is not a file", file.display()),
        ));
    }
    if let Some(bundle) = &c.ca_bundle
        && !bundle.is_file()
    {
        return Err(ConfigError::flag(
            "ca-bundle",
            Some("AZURE_CA_BUNDLE"),
            format!("{} is not a file", bundle.display()),
        ));
    }
    Ok(())
}

/// A Linux user name Azure accepts: 1 to 64 of lowercase letters, digits,
/// `-`, `_`, starting with a letter or `_`.
fn is_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn nonempty_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The first line of an OpenSSH public key file, if it is one
/// (`ssh-rsa`, `ssh-ed25519`, `ecdsa-sha2-*`).
fn read_public_key(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let kind = line.split_whitespace().next().unwrap_or("");
    if line.contains("PRIVATE KEY") {
        return Err(format!(
            "{} holds a private key; give the public one (.pub)",
            path.display()
        ));
    }
    if !(kind == "ssh-rsa" || kind == "ssh-ed25519" || kind.starts_with("ecdsa-sha2-")) {
        return Err(format!("{} is not an OpenSSH public key", path.display()));
    }
    Ok(line.to_owned())
}

/// A throw-away Ed25519 public key in OpenSSH form, its private half
/// dropped at once: Azure requires an SSH key on a Linux VM, and nobody is
/// meant to log in to a pod VM.
fn throwaway_public_key() -> Result<String, ProviderError> {
    use base64::Engine;
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ProviderError::config("could not make an SSH key"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| ProviderError::config("could not make an SSH key"))?;
    // RFC 8709: string "ssh-ed25519", string key (each length-prefixed).
    let mut blob = Vec::new();
    for part in [b"ssh-ed25519".as_slice(), pair.public_key().as_ref()] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        blob.extend_from_slice(&len.to_be_bytes());
        blob.extend_from_slice(part);
    }
    Ok(format!(
        "ssh-ed25519 {} podvisor-throwaway",
        base64::engine::general_purpose::STANDARD.encode(blob)
    ))
}

impl AzureConfig {
    /// Which credential the configuration picks.
    fn credential_kind(&self) -> &'static str {
        if self
            .client_secret
            .as_ref()
            .is_some_and(|s| !s.expose().trim().is_empty())
        {
            "client secret"
        } else if self.federated_token_file.is_some() {
            "workload identity"
        } else {
            "managed identity"
        }
    }

    /// The credential: client secret, else workload identity, else the
    /// node's managed identity; each on our transport.
    fn credential(
        &self,
        http: &reqwest::Client,
    ) -> Result<Arc<dyn TokenCredential>, ProviderError> {
        use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
        use azure_identity::{
            ClientAssertionCredentialOptions, ClientSecretCredential,
            ClientSecretCredentialOptions, ManagedIdentityCredential,
            ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
            WorkloadIdentityCredentialOptions,
        };
        let mut options = client_options(http);
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = self.authority_host.trim_end_matches('/').to_owned();
        options.cloud = Some(Arc::new(CloudConfiguration::Custom(cloud)));
        let failed = |e: azure_core::Error| {
            ProviderError::config(format!(
                "Azure credentials ({}): {e}",
                self.credential_kind()
            ))
        };
        let tenant = self.tenant_id.as_deref().unwrap_or_default().trim();
        let client = self.client_id.as_deref().unwrap_or_default().trim();
        match self.credential_kind() {
            "client secret" => {
                let secret = self
                    .client_secret
                    .as_ref()
                    .map(|s| s.expose().trim().to_owned())
                    .unwrap_or_default();
                let credential = ClientSecretCredential::new(
                    tenant,
                    client.to_owned(),
                    AzureSecret::new(secret),
                    Some(ClientSecretCredentialOptions {
                        client_options: options,
                    }),
                )
                .map_err(failed)?;
                Ok(credential)
            }
            "workload identity" => {
                let credential =
                    WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                        credential_options: ClientAssertionCredentialOptions {
                            client_options: options,
                        },
                        client_id: Some(client.to_owned()),
                        tenant_id: Some(tenant.to_owned()),
                        token_file_path: self.federated_token_file.clone(),
                    }))
                    .map_err(failed)?;
                Ok(credential)
            }
            _ => {
                let user_assigned_id =
                    (!client.is_empty()).then(|| UserAssignedId::ClientId(client.to_owned()));
                let credential =
                    ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                        user_assigned_id,
                        client_options: options,
                    }))
                    .map_err(failed)?;
                Ok(credential)
            }
        }
    }

    /// The provider settings of this configuration (validated).
    fn settings(&self, ssh_public_key: String) -> AzureSettings {
        let trimmed = |v: &Option<String>| v.as_deref().unwrap_or_default().trim().to_owned();
        AzureSettings {
            subscription_id: trimmed(&self.subscription_id),
            region: trimmed(&self.region),
            resource_group: trimmed(&self.resource_group),
            subnet_id: trimmed(&self.subnet_id),
            nsg_id: nonempty(self.nsg_id.as_ref()).map(|v| v.trim().to_owned()),
            image_id: trimmed(&self.image_id),
            instance_size: self.instance_size.clone(),
            instance_sizes: nonempty_list(&self.instance_sizes),
            ssh_username: self.ssh_username.clone(),
            ssh_public_key,
            disable_cvm: self.disable_cvm,
            secure_boot: self.enable_secure_boot,
            use_public_ip: self.use_public_ip,
            root_volume_size: self.root_volume_size,
            tags: self.tags.0.clone(),
            poll_interval: self.poll_interval,
        }
    }
}

#[async_trait]
impl ProviderConfig for AzureConfig {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "credentials": self.credential_kind(),
            "client_id": self.client_id,
            "tenant_id": self.tenant_id,
            "federated_token_file": self.federated_token_file,
            "subscription_id": self.subscription_id,
            "region": self.region,
            "resource_group": self.resource_group,
            "subnet_id": self.subnet_id,
            "nsg_id": self.nsg_id,
            "image_id": self.image_id,
            "instance_size": self.instance_size,
            "instance_sizes": self.instance_sizes,
            "ssh_username": self.ssh_username,
            "ssh_key_path": self.ssh_key_path,
            "disable_cvm": self.disable_cvm,
            "enable_secure_boot": self.enable_secure_boot,
            "use_public_ip": self.use_public_ip,
            "root_volume_size_gib": self.root_volume_size,
            "authority_host": self.authority_host,
            "resource_manager_endpoint": self.resource_manager_endpoint,
            "ca_bundle": self.ca_bundle,
            "poll_interval_ms": u64::try_from(self.poll_interval.as_millis()).unwrap_or(u64::MAX),
            "tags": self.tags.0,
        })
    }

    fn default_call_limits(&self) -> CallLimits {
        AZURE_CALL_LIMITS
    }

    async fn build(&self, context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        let http = crate::https::http_client(self.ca_bundle.as_deref(), "AZURE_CA_BUNDLE")?;
        let credential = self.credential(&http)?;
        let endpoint = Url::parse(&self.resource_manager_endpoint).map_err(|e| {
            ProviderError::config(format!(
                "--resource-manager-endpoint (AZURE_RESOURCE_MANAGER_ENDPOINT): {e}"
            ))
        })?;
        let key = match &self.ssh_key_path {
            Some(path) => read_public_key(path)
                .map_err(|why| ProviderError::config(format!("--ssh-key-path: {why}")))?,
            None => throwaway_public_key()?,
        };
        let arm = Arm::new(&http, credential, endpoint, context.pacer.clone());
        Ok(Arc::new(AzureProvider::new(arm, self.settings(key))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i";
    const SUBNET: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/d";

    fn good() -> Vec<&'static str> {
        vec![
            "azure",
            "--clientid",
            "c",
            "--secret",
            "s3cr3t-value",
            "--tenantid",
            "t",
            "--subscriptionid",
            "s",
            "--region",
            "eastus",
            "--resourcegroup",
            "rg",
            "--subnetid",
            SUBNET,
            "--imageid",
            IMAGE,
        ]
    }

    fn configure(args: &[&str]) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let matches = AzureManager
            .command()
            .try_get_matches_from(args)
            .map_err(|e| ConfigError::from_clap(&e))?;
        AzureManager.configure(&matches)
    }

    fn without(flag: &str) -> Vec<&'static str> {
        let mut args = good();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args.drain(at..at + 2);
        args
    }

    fn replaced(flag: &str, value: &'static str) -> Vec<&'static str> {
        let mut args = good();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        args
    }

    #[test]
    fn a_complete_configuration_is_valid_with_the_reference_defaults() {
        let config = configure(&good()).unwrap();
        let summary = config.summary();
        assert_eq!(summary["instance_size"], "Standard_DC2as_v5");
        assert_eq!(summary["ssh_username"], "peerpod");
        assert_eq!(summary["disable_cvm"], false);
        assert_eq!(summary["credentials"], "client secret");
        assert!(!summary.to_string().contains("s3cr3t"), "{summary}");
        assert!(!format!("{config:?}").contains("s3cr3t"));
        assert_eq!(config.default_call_limits(), AZURE_CALL_LIMITS);
    }

    #[test]
    fn each_missing_or_bad_value_names_its_flag_and_variable() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                without("--subscriptionid"),
                "--subscriptionid (AZURE_SUBSCRIPTION_ID): is required",
            ),
            (without("--region"), "--region (AZURE_REGION): is required"),
            (
                without("--resourcegroup"),
                "--resourcegroup (AZURE_RESOURCE_GROUP): is required",
            ),
            (
                without("--subnetid"),
                "--subnetid (AZURE_SUBNET_ID): is required",
            ),
            (
                without("--imageid"),
                "--imageid (AZURE_IMAGE_ID): is required",
            ),
            (
                replaced("--imageid", "podvm-image"),
                "--imageid (AZURE_IMAGE_ID): 'podvm-image' is not an Azure resource id",
            ),
            (
                replaced("--region", "east us"),
                "--region (AZURE_REGION): 'east us'",
            ),
            (
                without("--tenantid"),
                "--tenantid (AZURE_TENANT_ID): is required with a client secret",
            ),
        ];
        for (args, want) in cases {
            let err = configure(&args)
                .err()
                .map(|e| e.message)
                .unwrap_or_default();
            assert!(err.starts_with(want), "{args:?}: {err}");
        }
        let mut args = good();
        args.extend(["--instance-sizes", "Standard_D2as_v5,Standard_D4as_v5"]);
        let err = configure(&args).err().unwrap().message;
        assert!(
            err.starts_with("--instance-size (AZURE_INSTANCE_SIZE): Standard_DC2as_v5 is not in --instance-sizes"),
            "{err}"
        );
        let mut args = good();
        args.extend(["--resource-manager-endpoint", "http://127.0.0.1:1"]);
        let err = configure(&args).err().unwrap().message;
        assert!(err.contains("not an https URL"), "{err}");
        let mut args = good();
        args.extend(["--tags", "a/b=c"]);
        assert!(configure(&args).is_err());
    }

    #[test]
    fn without_a_secret_the_credential_is_workload_then_managed_identity() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "jwt").unwrap();
        let mut args = without("--secret");
        let path = token.display().to_string();
        args.extend(["--federated-token-file", Box::leak(path.into_boxed_str())]);
        assert_eq!(
            configure(&args).unwrap().summary()["credentials"],
            "workload identity"
        );
        let mut args = without("--secret");
        args.retain(|a| *a != "--tenantid" && *a != "t");
        assert_eq!(
            configure(&args).unwrap().summary()["credentials"],
            "managed identity"
        );
    }

    #[test]
    fn ssh_keys_are_public_openssh_keys() {
        let key = throwaway_public_key().unwrap();
        assert!(
            key.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"),
            "{key}"
        );
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("id");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        assert!(
            read_public_key(&private)
                .unwrap_err()
                .contains("private key")
        );
        let public = dir.path().join("id.pub");
        std::fs::write(&public, format!("\n{key}\n")).unwrap();
        assert_eq!(read_public_key(&public).unwrap(), key);
        assert!(is_user_name("peerpod"));
        assert!(!is_user_name("Peer pod"));
    }
}
