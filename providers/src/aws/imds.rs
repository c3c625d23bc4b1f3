//! Filling missing settings from the EC2 instance metadata service, as the
//! reference does when podvisor runs on an EC2 node: the region, and the
//! node's subnet, security groups and key pair for its pod VMs.

use super::config::AwsConfig;
use crate::error::ProviderError;
use async_trait::async_trait;

/// Where metadata comes from: aws-config's IMDS client, or a test's map.
#[async_trait]
pub trait MetadataSource: Send + Sync {
    /// The text at `path` (`/latest/meta-data/...`).
    async fn get(&self, path: &str) -> Result<String, String>;
}

/// Fills the region, subnet, security groups and key name that `config`
/// lacks. A region is required, so failing to read it is an error naming
/// the flag; the others are best effort (EC2 then uses the subnet's defaults).
pub async fn fill_from_metadata(
    config: &mut AwsConfig,
    source: &dyn MetadataSource,
) -> Result<(), ProviderError> {
    if config.region.is_none() {
        let region = source
            .get("/latest/meta-data/placement/region")
            .await
            .map_err(|e| {
                ProviderError::config(format!(
                    "--aws-region (AWS_REGION): not set, and the instance metadata service did not give it ({e}); set it when not on EC2"
                ))
            })?;
        let region = region.trim().to_owned();
        tracing::info!(%region, "region from the instance metadata service");
        config.region = Some(region);
    }
    if config.use_launch_template {
        // The template decides the network and the key.
        return Ok(());
    }
    let wants_network =
        config.subnet_id.is_none() || config.security_group_ids.iter().all(String::is_empty);
    if wants_network {
        match source.get("/latest/meta-data/mac").await {
            Ok(mac) => {
                let base = format!("/latest/meta-data/network/interfaces/macs/{}", mac.trim());
                if config.subnet_id.is_none() {
                    match source.get(&format!("{base}/subnet-id")).await {
                        Ok(subnet) => {
                            let subnet = subnet.trim().to_owned();
                            tracing::info!(%subnet, "subnet from the instance metadata service");
                            config.subnet_id = Some(subnet);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "no subnet from the instance metadata service");
                        }
                    }
                }
                if config.security_group_ids.iter().all(String::is_empty) {
                    match source.get(&format!("{base}/security-group-ids")).await {
                        Ok(groups) => {
                            config.security_group_ids =
                                groups.split_whitespace().map(str::to_owned).collect();
                            tracing::info!(groups = ?config.security_group_ids, "security groups from the instance metadata service");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "no security groups from the instance metadata service");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no network interface from the instance metadata service");
            }
        }
    }
    if config.key_name.is_none() {
        // `public-keys/` lists `0=<key name>`; a node without a key has none.
        match source.get("/latest/meta-data/public-keys/").await {
            Ok(keys) => {
                config.key_name = keys
                    .lines()
                    .find_map(|l| l.split_once('=').map(|(_, name)| name.trim().to_owned()))
                    .filter(|k| !k.is_empty());
            }
            Err(e) => tracing::debug!(error = %e, "no key pair from the instance metadata service"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::AwsManager;
    use crate::manager::CloudManager;
    use clap::FromArgMatches;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);

    #[async_trait]
    impl MetadataSource for Map {
        async fn get(&self, path: &str) -> Result<String, String> {
            self.0
                .get(path)
                .map(std::string::ToString::to_string)
                .ok_or_else(|| format!("{path}: 404"))
        }
    }

    fn config(args: &[&str]) -> AwsConfig {
        let m = AwsManager
            .command()
            .try_get_matches_from(
                ["aws", "--imageid", "ami-03cf127a"]
                    .into_iter()
                    .chain(args.iter().copied()),
            )
            .unwrap();
        AwsConfig::from_arg_matches(&m).unwrap()
    }

    fn node() -> Map {
        let mac = "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11";
        Map(HashMap::from([
            ("/latest/meta-data/placement/region", "eu-west-1"),
            ("/latest/meta-data/mac", "0e:49:61:0f:c3:11\n"),
            (
                Box::leak(format!("{mac}/subnet-id").into_boxed_str()) as &str,
                "subnet-0123456789abcdef0",
            ),
            (
                Box::leak(format!("{mac}/security-group-ids").into_boxed_str()) as &str,
                "sg-01234567\nsg-89abcdef",
            ),
            ("/latest/meta-data/public-keys/", "0=node-key"),
        ]))
    }

    #[tokio::test]
    async fn missing_values_come_from_the_node_and_given_ones_stay() {
        let mut c = config(&[]);
        fill_from_metadata(&mut c, &node()).await.unwrap();
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.subnet_id.as_deref(), Some("subnet-0123456789abcdef0"));
        assert_eq!(c.security_group_ids, ["sg-01234567", "sg-89abcdef"]);
        assert_eq!(c.key_name.as_deref(), Some("node-key"));

        let mut c = config(&[
            "--aws-region",
            "us-east-1",
            "--subnetid",
            "subnet-aaaaaaaa",
            "--keyname",
            "mine",
        ]);
        fill_from_metadata(&mut c, &node()).await.unwrap();
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
        assert_eq!(c.subnet_id.as_deref(), Some("subnet-aaaaaaaa"));
        assert_eq!(c.security_group_ids, ["sg-01234567", "sg-89abcdef"]);
        assert_eq!(c.key_name.as_deref(), Some("mine"));
    }

    #[tokio::test]
    async fn no_region_anywhere_fails_naming_the_flag_and_the_rest_is_best_effort() {
        let mut c = config(&[]);
        let err = fill_from_metadata(&mut c, &Map(HashMap::new()))
            .await
            .unwrap_err();
        assert!(
            err.message
                .starts_with("--aws-region (AWS_REGION): not set"),
            "{}",
            err.message
        );
        let mut c = config(&["--aws-region", "us-east-1"]);
        fill_from_metadata(&mut c, &Map(HashMap::new()))
            .await
            .unwrap();
        assert_eq!(c.subnet_id, None);
        assert_eq!(c.key_name, None);
    }
}
