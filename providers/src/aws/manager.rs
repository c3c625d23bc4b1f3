//! The AWS provider's cloud manager: flags, validation, credentials, the
//! instance metadata fill-in, and `NewProvider`.

use super::config::{AwsConfig, is_ec2_id, is_instance_type_name};
use super::errors::{CREDENTIALS_HINT, sentences};
use super::imds::{MetadataSource, fill_from_metadata};
use super::paced::PacedHttpClient;
use super::provider::{AwsProvider, AwsSettings};
use crate::error::ProviderError;
use crate::manager::{CallLimits, CloudManager, ConfigError, ProviderConfig, ProviderContext};
use crate::provider::Provider;
use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::{Credentials, ProvideCredentials, Region};
use clap::{Args, FromArgMatches};
use std::sync::Arc;
use std::time::Duration;

/// Registers `podvisor aws`.
#[derive(Debug)]
pub struct AwsManager;

/// EBS's largest gp2/gp3 volume, in GiB.
const MAX_ROOT_VOLUME_GIB: u32 = 16 * 1024;

/// The default pace of creates and deletes on EC2, below its documented API
/// throttling (token buckets per account and region, "Request throttling
/// for the Amazon EC2 API"):
///
/// - Mutating actions: bucket 50, refill 5/s. One podvisor create or delete
///   is one mutating request (`RunInstances`, or `StartInstances` for a
///   stopped instance of the token; `TerminateInstances`; plus
///   `DisassociateAddress`/`ReleaseAddress` only for Elastic IPs someone
///   attached). 2/s is 40% of the refill and a burst of 20 is 40% of the
///   bucket: the rest is left to the other nodes and tools of the account.
/// - `RunInstances` resource rate: bucket 1000, refill 2/s. Each
///   `RunInstances` launches one instance (MinCount = MaxCount = 1), so even
///   if every token went to creates, launches never outrun the refill.
/// - `TerminateInstances` resource rate: bucket 1000, refill 20/s: far above.
///
/// A first create and a delete need no lookup around them. The lookups
/// there are (`DescribeInstances` by token before a create that is not its
/// token's first, `DescribeAddresses` before deleting an instance seen with
/// an Elastic IP, the public-IP wait's polls) are non-mutating (bucket 100,
/// refill 20/s) and, at most a few per create or delete, stay well within
/// that refill. The buckets are shared by the whole account in
/// the region: with many nodes in one account, lower `--provider-rate`.
///
/// Reads (`DescribeInstances` lookups and listings): half the non-mutating
/// bucket's refill (10/s) and burst (50).
const EC2_CALL_LIMITS: CallLimits = CallLimits {
    rate: 2.0,
    burst: 20,
    read_rate: 10.0,
    read_burst: 50,
};

impl CloudManager for AwsManager {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn command(&self) -> clap::Command {
        AwsConfig::augment_args(clap::Command::new("aws"))
            .about("Pod VMs as AWS EC2 instances (or on an EC2-compatible endpoint)")
    }

    fn configure(
        &self,
        matches: &clap::ArgMatches,
    ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let config =
            AwsConfig::from_arg_matches(matches).map_err(|e| ConfigError::from_clap(&e))?;
        validate(&config)?;
        Ok(Box::new(config))
    }

    fn default_call_limits(&self) -> CallLimits {
        EC2_CALL_LIMITS
    }
}

/// Everything that can be checked without the cloud.
fn validate(c: &AwsConfig) -> Result<(), ConfigError> {
    match (&c.access_key_id, &c.secret_access_key) {
        (Some(_), None) => {
            return Err(ConfigError::flag(
                "aws-secret-key",
                Some("AWS_SECRET_ACCESS_KEY"),
                "is required with --aws-access-key-id (AWS_ACCESS_KEY_ID)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::flag(
                "aws-access-key-id",
                Some("AWS_ACCESS_KEY_ID"),
                "is required with --aws-secret-key (AWS_SECRET_ACCESS_KEY)",
            ));
        }
        (None, None) if c.session_token.is_some() => {
            return Err(ConfigError::flag(
                "aws-session-token",
                Some("AWS_SESSION_TOKEN"),
                "needs --aws-access-key-id and --aws-secret-key",
            ));
        }
        _ => {}
    }
    if let Some(profile) = &c.profile
        && profile.trim().is_empty()
    {
        return Err(ConfigError::flag("aws-profile", None, "is empty"));
    }
    if let Some(region) = &c.region {
        let ok = !region.is_empty()
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(ConfigError::flag(
                "aws-region",
                Some("AWS_REGION"),
                format!("'{region}' is not a region name (e.g. us-east-1)"),
            ));
        }
    }
    if let Some(endpoint) = &c.endpoint {
        let rest = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
            return Err(ConfigError::flag(
                "aws-endpoint",
                Some("AWS_ENDPOINT_URL"),
                format!("'{endpoint}' is not an http(s) URL"),
            ));
        }
    }
    match &c.image_id {
        Some(image) if !is_ec2_id(image, "ami-") => {
            return Err(ConfigError::flag(
                "imageid",
                Some("PODVM_AMI_ID"),
                format!("'{image}' is not an AMI id (ami-…)"),
            ));
        }
        None if !c.use_launch_template => {
            return Err(ConfigError::flag(
                "imageid",
                Some("PODVM_AMI_ID"),
                "is required (the AMI of the pod VMs), unless --use-lt (USE_PODVM_LAUNCHTEMPLATE)",
            ));
        }
        _ => {}
    }
    if !is_instance_type_name(&c.instance_type) {
        return Err(ConfigError::flag(
            "instance-type",
            Some("PODVM_INSTANCE_TYPE"),
            format!(
                "'{}' is not an instance type (e.g. m6a.large)",
                c.instance_type
            ),
        ));
    }
    let types: Vec<&String> = c.instance_types.iter().filter(|t| !t.is_empty()).collect();
    if let Some(bad) = types.iter().find(|t| !is_instance_type_name(t)) {
        return Err(ConfigError::flag(
            "instance-types",
            Some("PODVM_INSTANCE_TYPES"),
            format!("'{bad}' is not an instance type (e.g. m6a.large)"),
        ));
    }
    if !types.is_empty() && !types.contains(&&c.instance_type) {
        return Err(ConfigError::flag(
            "instance-type",
            Some("PODVM_INSTANCE_TYPE"),
            format!(
                "{} is not in --instance-types (PODVM_INSTANCE_TYPES): {}",
                c.instance_type,
                c.instance_types.join(",")
            ),
        ));
    }
    if let Some(subnet) = &c.subnet_id
        && !is_ec2_id(subnet, "subnet-")
    {
        return Err(ConfigError::flag(
            "subnetid",
            Some("AWS_SUBNET_ID"),
            format!("'{subnet}' is not a subnet id (subnet-…)"),
        ));
    }
    if let Some(bad) = c
        .security_group_ids
        .iter()
        .find(|g| !g.is_empty() && !is_ec2_id(g, "sg-"))
    {
        return Err(ConfigError::flag(
            "securitygroupids",
            Some("AWS_SG_IDS"),
            format!("'{bad}' is not a security group id (sg-…)"),
        ));
    }
    if c.key_name.as_deref().is_some_and(|k| k.len() > 255) {
        return Err(ConfigError::flag(
            "keyname",
            Some("SSH_KP_NAME"),
            "is longer than 255 characters",
        ));
    }
    if c.use_launch_template && c.launch_template_name.trim().is_empty() {
        return Err(ConfigError::flag(
            "aws-lt-name",
            Some("PODVM_LAUNCHTEMPLATE_NAME"),
            "is empty, and --use-lt needs a template",
        ));
    }
    if c.root_volume_size > MAX_ROOT_VOLUME_GIB {
        return Err(ConfigError::flag(
            "root-volume-size",
            Some("ROOT_VOLUME_SIZE"),
            format!(
                "{} GiB is more than EBS allows ({MAX_ROOT_VOLUME_GIB} GiB)",
                c.root_volume_size
            ),
        ));
    }
    Ok(())
}

/// The instance metadata service, through aws-config's IMDS client: IMDSv2,
/// bounded timeouts, and its endpoint from `AWS_EC2_METADATA_SERVICE_ENDPOINT`;
/// never asked when `AWS_EC2_METADATA_DISABLED` is `true`, as the SDK's own
/// region and credential providers do.
struct Imds(aws_config::imds::Client);

#[async_trait]
impl MetadataSource for Imds {
    async fn get(&self, path: &str) -> Result<String, String> {
        if metadata_disabled() {
            return Err("AWS_EC2_METADATA_DISABLED is true".to_owned());
        }
        self.0
            .get(path)
            .await
            .map(|v| v.as_ref().to_owned())
            .map_err(|e| sentences(&e))
    }
}

/// Whether `AWS_EC2_METADATA_DISABLED` turns the instance metadata service
/// off (the SDK's rule: `true` in any case).
fn metadata_disabled() -> bool {
    std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The longest wait for the credential chain at start-up (the SDK bounds
/// each provider's calls; this bounds them all).
const CREDENTIALS_WAIT: Duration = Duration::from_secs(30);

/// Loads the credentials `sdk` will sign with once, at start-up, so that
/// none is a configuration error that says how to give them — not a
/// "cannot reach the endpoint" at every call. The credentials themselves
/// are dropped at once, never shown.
///
/// # Errors
/// A `Config` error naming the cause and the ways to give credentials.
async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), ProviderError> {
    let Some(provider) = sdk.credentials_provider() else {
        return Err(ProviderError::config(format!(
            "no AWS credentials: {CREDENTIALS_HINT}"
        )));
    };
    match tokio::time::timeout(CREDENTIALS_WAIT, provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ProviderError::config(format!(
            "no AWS credentials ({}): {CREDENTIALS_HINT}",
            sentences(&e)
        ))),
        Err(_) => Err(ProviderError::config(format!(
            "no AWS credentials: none loaded in {} s: {CREDENTIALS_HINT}",
            CREDENTIALS_WAIT.as_secs()
        ))),
    }
}

#[async_trait]
impl ProviderConfig for AwsConfig {
    fn summary(&self) -> serde_json::Value {
        let credentials = if self.access_key_id.is_some() {
            "static keys"
        } else if self.profile.is_some() {
            "profile"
        } else {
            "default chain"
        };
        serde_json::json!({
            "credentials": credentials,
            "profile": self.profile,
            "region": self.region,
            "endpoint": self.endpoint,
            "image_id": self.image_id,
            "instance_type": self.instance_type,
            "instance_types": self.instance_types,
            "subnet_id": self.subnet_id,
            "security_group_ids": self.security_group_ids,
            "key_name": self.key_name,
            "use_launch_template": self.use_launch_template,
            "launch_template_name": self.launch_template_name,
            "use_public_ip": self.use_public_ip,
            "root_volume_size_gib": self.root_volume_size,
            "disable_cvm": self.disable_cvm,
            "tags": self.tags.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        })
    }

    fn default_call_limits(&self) -> CallLimits {
        EC2_CALL_LIMITS
    }

    async fn build(&self, context: &ProviderContext) -> Result<Arc<dyn Provider>, ProviderError> {
        let mut config = self.clone();
        let needs_metadata = config.region.is_none()
            || (!config.use_launch_template
                && (config.subnet_id.is_none()
                    || config.security_group_ids.iter().all(String::is_empty)
                    || config.key_name.is_none()));
        let filled = if needs_metadata {
            let imds = aws_config::imds::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .read_timeout(Duration::from_secs(2))
                .max_attempts(2)
                .build();
            fill_from_metadata(&mut config, &Imds(imds)).await
        } else {
            Ok(())
        };
        // Credentials are checked even without a region, so that an
        // operator off EC2 learns of both at once.
        let sdk = sdk_config(&config).await;
        match (filled, check_credentials(&sdk).await) {
            (Ok(()), Ok(())) => {}
            (Err(e), Ok(())) | (Ok(()), Err(e)) => return Err(e),
            (Err(_), Err(credentials)) => {
                return Err(ProviderError::config(format!(
                    "{}; set AWS_REGION too",
                    credentials.message
                )));
            }
        }
        let region = config.region.clone().ok_or_else(|| {
            ProviderError::config(
                "--aws-region (AWS_REGION): not set, and the instance metadata service did not say; set it",
            )
        })?;
        // Each EC2 request waits for its token (the credential chain's own
        // requests, to STS or the metadata service, do not).
        let ec2 = aws_sdk_ec2::config::Builder::from(&sdk)
            .http_client(PacedHttpClient::new(
                sdk.http_client(),
                context.pacer.clone(),
            ))
            .build();
        Ok(Arc::new(AwsProvider::paced(
            aws_sdk_ec2::Client::from_conf(ec2),
            settings(&config, region),
        )))
    }
}

/// The region the SDK configuration gets when `config` has none, only for
/// the credentials check before start-up fails for the missing region:
/// without one the SDK's credential chain would ask the instance metadata
/// service again (and log its error as a `Debug` dump). Only STS (web
/// identity, assumed roles) uses it.
const REGION_FOR_THE_CHECK: &str = "us-east-1";

/// The SDK configuration of the EC2 client: static keys, else the profile,
/// else the SDK's default chain (web identity / IRSA, ECS, instance
/// profile); the region of `config`, and no other looked for. SDK-level
/// retries are off: the daemon retries, looking the instance up before a
/// repeated create, which a blind resend of `RunInstances` would not do on
/// a server that ignores `ClientToken`.
async fn sdk_config(config: &AwsConfig) -> aws_config::SdkConfig {
    let region = config.region.as_deref().unwrap_or(REGION_FOR_THE_CHECK);
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .build(),
        );
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(
                id.expose(),
                secret.expose(),
                config.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "podvisor-flags",
            ));
        }
        _ => {
            if let Some(profile) = &config.profile {
                loader = loader.profile_name(profile);
            }
        }
    }
    loader.load().await
}

/// What the provider needs, from a filled-in configuration.
fn settings(c: &AwsConfig, region: String) -> AwsSettings {
    AwsSettings {
        region,
        image_id: c.image_id.clone(),
        instance_type: c.instance_type.clone(),
        instance_types: c
            .instance_types
            .iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect(),
        subnet_id: c.subnet_id.clone(),
        security_group_ids: c
            .security_group_ids
            .iter()
            .filter(|g| !g.is_empty())
            .cloned()
            .collect(),
        key_name: c.key_name.clone().filter(|k| !k.is_empty()),
        launch_template: c
            .use_launch_template
            .then(|| c.launch_template_name.clone()),
        use_public_ip: c.use_public_ip,
        root_volume_gib: c.root_volume_size,
        disable_cvm: c.disable_cvm,
        tags: c.tags.0.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(args: &[&str]) -> Result<Box<dyn ProviderConfig>, ConfigError> {
        let m = AwsManager
            .command()
            .try_get_matches_from(std::iter::once("aws").chain(args.iter().copied()))
            .map_err(|e| ConfigError::from_clap(&e))?;
        AwsManager.configure(&m)
    }

    const IMAGE: [&str; 2] = ["--imageid", "ami-03cf127a"];

    #[test]
    fn the_reference_defaults_apply_and_secrets_stay_out_of_the_summary() {
        let c = configure(&[
            "--imageid",
            "ami-03cf127a",
            "--aws-access-key-id",
            "AKIDSECRETID",
            "--aws-secret-key",
            "VERYSECRETKEY",
            "--aws-session-token",
            "SESSIONSECRET",
        ])
        .unwrap();
        let summary = c.summary();
        assert_eq!(summary["instance_type"], "m6a.large");
        assert_eq!(summary["launch_template_name"], "kata");
        assert_eq!(summary["root_volume_size_gib"], 30);
        assert_eq!(summary["use_public_ip"], false);
        assert_eq!(summary["disable_cvm"], false);
        assert_eq!(summary["credentials"], "static keys");
        let shown = format!("{summary} {c:?}");
        for secret in ["AKIDSECRETID", "VERYSECRETKEY", "SESSIONSECRET"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }

    #[test]
    fn the_default_call_limits_stay_below_ec2s_documented_buckets() {
        let limits = configure(&IMAGE).unwrap().default_call_limits();
        // What `podvisor --help` says is what a configuration gets.
        assert_eq!(AwsManager.default_call_limits(), limits);
        // Mutating actions: bucket 50, refill 5/s; RunInstances resources:
        // bucket 1000, refill 2/s (one instance per call).
        // One create or delete is one mutating request and launches at most
        // one instance: at most the launch refill, under the mutating one.
        assert!(limits.rate <= 2.0, "{limits:?}");
        assert!(limits.burst < 50, "{limits:?}");
        // Non-mutating actions: bucket 100, refill 20/s.
        assert!(limits.read_rate <= 20.0 / 2.0, "{limits:?}");
        assert!(limits.read_burst <= 100 / 2, "{limits:?}");
        assert_eq!(
            limits,
            CallLimits {
                rate: 2.0,
                burst: 20,
                read_rate: 10.0,
                read_burst: 50,
            }
        );
    }

    #[test]
    fn help_never_shows_the_values_of_credential_variables() {
        let cmd = AwsManager.command();
        for id in ["access_key_id", "secret_access_key", "session_token"] {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert!(arg.is_hide_env_values_set(), "{id}");
        }
    }

    #[test]
    fn every_bad_value_names_its_flag_and_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--imageid (PODVM_AMI_ID): is required"),
            (
                &["--imageid", "img-1"],
                "--imageid (PODVM_AMI_ID): 'img-1' is not an AMI id",
            ),
            (
                &["--aws-access-key-id", "x"],
                "--aws-secret-key (AWS_SECRET_ACCESS_KEY): is required",
            ),
            (
                &["--aws-secret-key", "x"],
                "--aws-access-key-id (AWS_ACCESS_KEY_ID): is required",
            ),
            (
                &["--aws-session-token", "x"],
                "--aws-session-token (AWS_SESSION_TOKEN): needs",
            ),
            (&["--aws-profile", " "], "--aws-profile: is empty"),
            (
                &["--aws-region", "US East"],
                "--aws-region (AWS_REGION): 'US East' is not a region",
            ),
            (
                &["--aws-endpoint", "127.0.0.1:5000"],
                "--aws-endpoint (AWS_ENDPOINT_URL): '127.0.0.1:5000' is not an http(s) URL",
            ),
            (
                &["--instance-type", "large"],
                "--instance-type (PODVM_INSTANCE_TYPE): 'large' is not an instance type",
            ),
            (
                &["--instance-types", "m6a.large,big"],
                "--instance-types (PODVM_INSTANCE_TYPES): 'big' is not",
            ),
            (
                &["--instance-types", "m6a.xlarge"],
                "--instance-type (PODVM_INSTANCE_TYPE): m6a.large is not in --instance-types",
            ),
            (
                &["--subnetid", "sub-1"],
                "--subnetid (AWS_SUBNET_ID): 'sub-1' is not a subnet id",
            ),
            (
                &["--securitygroupids", "sg-0123abcd,group"],
                "--securitygroupids (AWS_SG_IDS): 'group' is not",
            ),
            (
                &["--use-lt", "--aws-lt-name", " "],
                "--aws-lt-name (PODVM_LAUNCHTEMPLATE_NAME): is empty",
            ),
            (
                &["--root-volume-size", "20000"],
                "--root-volume-size (ROOT_VOLUME_SIZE): 20000 GiB is more than EBS allows",
            ),
            (&["--root-volume-size", "big"], "--root-volume-size"),
            (&["--tags", "novalue"], "--tags"),
            (&["--tags", "Name=x"], "set by podvisor itself"),
        ];
        for (args, want) in cases {
            let mut all: Vec<&str> = Vec::new();
            if !args.contains(&"--imageid") && !args.is_empty() {
                all.extend(IMAGE);
            }
            all.extend(args.iter());
            let err = configure(&all).unwrap_err().message;
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_launch_template_needs_no_image_and_good_values_pass() {
        configure(&["--use-lt"]).unwrap();
        configure(&[
            "--imageid",
            "ami-0123456789abcdef0",
            "--aws-region",
            "eu-west-1",
            "--aws-endpoint",
            "http://127.0.0.1:5000",
            "--instance-types",
            "m6a.large,m6a.xlarge",
            "--subnetid",
            "subnet-0123456789abcdef0",
            "--securitygroupids",
            "sg-01234567,sg-89abcdef",
            "--keyname",
            "mykey",
            "--use-public-ip",
            "--disable-cvm",
            "--root-volume-size",
            "0",
            "--tags",
            "team=a,env=prod",
        ])
        .unwrap();
    }

    #[test]
    fn settings_follow_the_flags() {
        let m = AwsManager
            .command()
            .try_get_matches_from([
                "aws",
                "--imageid",
                "ami-03cf127a",
                "--use-lt",
                "--instance-types",
                "m6a.large,,m6a.xlarge",
                "--tags",
                "a=1",
            ])
            .unwrap();
        let c = AwsConfig::from_arg_matches(&m).unwrap();
        let s = settings(&c, "us-east-1".into());
        assert_eq!(s.launch_template.as_deref(), Some("kata"));
        assert_eq!(s.instance_types, ["m6a.large", "m6a.xlarge"]);
        assert_eq!(s.tags, [("a".to_owned(), "1".to_owned())]);
        assert!(!s.disable_cvm);
    }
}
