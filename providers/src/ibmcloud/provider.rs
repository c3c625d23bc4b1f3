//! The `Provider` impl for IBM Cloud VPC (the reference's `provider.go`).
//! How each guarantee of the trait is kept on a cloud whose create call
//! takes no tags: see the module docs of [`super`].

use super::client::{
    BootVolumeAttachment, BootVolumePrototype, ById, ByName, Client, InstancePrototype,
    MetadataService, NetworkInterfacePrototype, VpcInstance,
};
use super::errors::UNIQUE_FAILED;
use crate::error::{ErrorClass, ProviderError};
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider, TAG_TOKEN};
use crate::selection::{TypeSize, select_instance_type};
use async_trait::async_trait;
use podvisor_state::UnixMillis;
use std::collections::BTreeMap;
use std::time::Duration;

/// VPC's limit on user data (IBM Cloud docs, "User data").
pub const MAX_USER_DATA: usize = 64 * 1024;
/// The tag every pod VM of a cluster carries, as in the reference.
pub const CLUSTER_TAG_KEY: &str = "coco-pod-vm";

/// What the provider needs, resolved from the flags.
#[derive(Debug, Clone)]
pub struct IbmCloudSettings {
    /// The zone of the pod VMs.
    pub zone: String,
    /// Their VPC.
    pub vpc_id: String,
    /// Their primary subnet.
    pub subnet_id: String,
    /// Security groups of the primary interface (none: the VPC's default).
    pub security_group_ids: Vec<String>,
    /// Their resource group (none: the account's default).
    pub resource_group_id: Option<String>,
    /// An SSH key.
    pub key_id: Option<String>,
    /// Images, at most one per architecture.
    pub image_ids: Vec<String>,
    /// The default profile.
    pub profile_name: String,
    /// The allow-list of profiles (empty: only the default).
    pub profile_list: Vec<String>,
    /// Tags every VM gets `coco-pod-vm:<cluster id>` when set.
    pub cluster_id: Option<String>,
    /// Dedicated hosts: the first in the zone is used.
    pub dedicated_host_ids: Vec<String>,
    /// Dedicated host groups: the first in the zone is used when no host
    /// is given, and when a create on the host fails (the reference's
    /// fall-back).
    pub dedicated_host_group_ids: Vec<String>,
    /// No TDX, no secure boot.
    pub disable_cvm: bool,
    /// `TAGS`, as IBM tags.
    pub tags: Vec<String>,
    /// Between two polls of an instance (its address, its deletion).
    pub poll_interval: Duration,
    /// Polls for the address before a create gives up (transiently); the
    /// reference polls 10 × 2 s.
    pub address_polls: u32,
    /// Polls for a deleted instance to be gone (404) before a delete gives
    /// up (transiently, to be retried).
    pub delete_polls: u32,
    /// Tries of the tag attach before the create deletes its instance.
    pub tag_attempts: u32,
}

impl IbmCloudSettings {
    /// Settings with the reference's waits, for the given placement.
    pub fn new(
        zone: &str,
        vpc_id: &str,
        subnet_id: &str,
        image_ids: Vec<String>,
        profile: &str,
    ) -> Self {
        Self {
            zone: zone.to_owned(),
            vpc_id: vpc_id.to_owned(),
            subnet_id: subnet_id.to_owned(),
            security_group_ids: Vec::new(),
            resource_group_id: None,
            key_id: None,
            image_ids,
            profile_name: profile.to_owned(),
            profile_list: Vec::new(),
            cluster_id: None,
            dedicated_host_ids: Vec::new(),
            dedicated_host_group_ids: Vec::new(),
            disable_cvm: true,
            tags: Vec::new(),
            poll_interval: Duration::from_secs(2),
            address_polls: 10,
            delete_polls: 30,
            tag_attempts: 3,
        }
    }
}

/// What the region offers, read once: each image's architecture and each
/// profile's size and architecture.
#[derive(Debug)]
struct Catalog {
    images: Vec<(String, String)>,
    sizes: Vec<TypeSize>,
    architectures: BTreeMap<String, String>,
    /// The dedicated host in the zone, if hosts are configured.
    host: Option<String>,
    /// The dedicated host group in the zone, if groups are configured.
    group: Option<String>,
}

/// Pod VMs as IBM Cloud VPC instances.
#[derive(Debug)]
pub struct IbmCloudProvider {
    client: Client,
    settings: IbmCloudSettings,
    catalog: tokio::sync::OnceCell<Catalog>,
}

/// The IBM tag of a podvisor tag: IBM tags are `key:value` of letters,
/// digits, space, `_ . - :`, so the `/` of `podvisor.io/node` becomes `_`.
pub fn ibm_tag(key: &str, value: &str) -> String {
    format!("{}:{value}", key.replace('/', "_")).to_ascii_lowercase()
}

/// The podvisor tag of an IBM tag (the inverse of [`ibm_tag`] for
/// podvisor's keys; other tags split at their first `:`).
pub fn podvisor_tag(tag: &str) -> (String, String) {
    let (key, value) = tag.split_once(':').unwrap_or((tag, ""));
    let key = match key.strip_prefix("podvisor.io_") {
        Some(rest) => format!("podvisor.io/{rest}"),
        None => key.to_owned(),
    };
    (key, value.to_owned())
}

/// Whether `token` can be a VPC volume name: 1 to 63 lowercase letters,
/// digits and `-`, starting with a letter, not ending with `-` (IBM Cloud
/// VPC API, `VolumePrototype.name`). podvisor's tokens (`pv-<hex>-g<n>`) are.
fn is_volume_name(token: &str) -> bool {
    (1..=63).contains(&token.len())
        && token.starts_with(|c: char| c.is_ascii_lowercase())
        && !token.ends_with('-')
        && token
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An error of a service the credentials must reach, said so.
fn access(service: &str, e: ProviderError) -> ProviderError {
    match e.class {
        ErrorClass::Config => ProviderError::config(format!(
            "--api-key (IBMCLOUD_API_KEY) / --iam-profile-id: the credentials cannot use {service}: {}",
            e.message
        )),
        _ => e,
    }
}

fn parse_time(text: &str) -> Option<UnixMillis> {
    let at = humantime::parse_rfc3339_weak(text).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

impl IbmCloudProvider {
    /// A provider on `client` with `settings`.
    pub fn new(client: Client, settings: IbmCloudSettings) -> Self {
        Self {
            client,
            settings,
            catalog: tokio::sync::OnceCell::new(),
        }
    }

    /// The REST client (tests read its IAM request count).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn catalog(&self) -> Result<&Catalog, ProviderError> {
        self.catalog
            .get_or_try_init(|| async {
                let mut images = Vec::new();
                for id in &self.settings.image_ids {
                    let image = self.client.get_image(id).await.map_err(|e| {
                        e.missing_is_config(
                            "--image-id (IBMCLOUD_PODVM_IMAGE_ID)",
                            format_args!("image {id}"),
                        )
                    })?;
                    let arch = image
                        .operating_system
                        .map_or_else(|| "amd64".to_owned(), |os| os.architecture);
                    images.push((id.clone(), arch));
                }
                let mut sizes = Vec::new();
                let mut architectures = BTreeMap::new();
                for p in self.client.list_profiles().await? {
                    let value = |v: &Option<super::client::Value>| v.as_ref().and_then(|v| v.value);
                    if let Some(arch) = p.vcpu_architecture.as_ref().and_then(|a| a.value.clone()) {
                        architectures.insert(p.name.clone(), arch);
                    }
                    if let (Some(vcpus), Some(memory)) = (value(&p.vcpu_count), value(&p.memory)) {
                        sizes.push(TypeSize {
                            name: p.name.clone(),
                            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
                            memory_mib: memory.saturating_mul(1024),
                            gpus: u32::try_from(value(&p.gpu_count).unwrap_or(0))
                                .unwrap_or(u32::MAX),
                        });
                    }
                }
                let host = self
                    .in_zone(&self.settings.dedicated_host_ids, false)
                    .await?;
                let group = self
                    .in_zone(&self.settings.dedicated_host_group_ids, true)
                    .await?;
                Ok(Catalog {
                    images,
                    sizes,
                    architectures,
                    host,
                    group,
                })
            })
            .await
    }

    /// The first of `ids` (dedicated hosts, or with `group` host groups) in
    /// the zone, as the reference picks it; `None` for no ids.
    ///
    /// # Errors
    /// `Config` naming the flag when none is in the zone or one does not
    /// exist.
    async fn in_zone(&self, ids: &[String], group: bool) -> Result<Option<String>, ProviderError> {
        let flag = if group {
            "--dedicated-host-group-ids (IBMCLOUD_DEDICATED_HOST_GROUP_IDS)"
        } else {
            "--dedicated-host-ids (IBMCLOUD_DEDICATED_HOST_IDS)"
        };
        for id in ids {
            let zone = self
                .client
                .dedicated_host_zone(id, group)
                .await
                .map_err(|e| e.missing_is_config(flag, id))?;
            if zone == self.settings.zone {
                return Ok(Some(id.clone()));
            }
        }
        if ids.is_empty() {
            Ok(None)
        } else {
            Err(ProviderError::config(format!(
                "{flag}: none of {} is in zone {}",
                ids.join(","),
                self.settings.zone
            )))
        }
    }

    /// The profile and image of a create: the selection shared with AWS,
    /// then the image of the profile's architecture (the pod's own image
    /// wins).
    async fn profile_and_image(
        &self,
        request: &CreateRequest,
    ) -> Result<(String, String), ProviderError> {
        let catalog = self.catalog().await?;
        let profile = select_instance_type(
            &request.spec,
            &self.settings.profile_name,
            &self.settings.profile_list,
            &catalog.sizes,
        )
        .map_err(ProviderError::permanent)?;
        if let Some(image) = request.spec.image.as_deref().filter(|i| !i.is_empty()) {
            if !super::config::is_vpc_id(image) {
                return Err(ProviderError::permanent(format!(
                    "Image {image:?} (the pod's image annotation) is not an IBM Cloud image id"
                )));
            }
            return Ok((profile, image.to_owned()));
        }
        let arch = catalog
            .architectures
            .get(&profile)
            .map_or("amd64", String::as_str);
        let image = catalog
            .images
            .iter()
            .find(|(_, a)| a == arch)
            .map(|(id, _)| id.clone())
            .ok_or_else(|| {
                ProviderError::config(format!(
                    "--image-id (IBMCLOUD_PODVM_IMAGE_ID): no image of architecture {arch}, \
                     which profile {profile} needs"
                ))
            })?;
        Ok((profile, image))
    }

    fn prototype(
        &self,
        request: &CreateRequest,
        profile: String,
        image: String,
        placement: Option<&String>,
    ) -> InstancePrototype {
        let s = &self.settings;
        let placement = placement.map(|id| ById { id: id.clone() });
        InstancePrototype {
            name: request.instance_name.clone(),
            profile: ByName { name: profile },
            image: ById { id: image },
            zone: ByName {
                name: s.zone.clone(),
            },
            vpc: ById {
                id: s.vpc_id.clone(),
            },
            primary_network_interface: NetworkInterfacePrototype {
                subnet: ById {
                    id: s.subnet_id.clone(),
                },
                security_groups: s
                    .security_group_ids
                    .iter()
                    .map(|id| ById { id: id.clone() })
                    .collect(),
            },
            keys: s.key_id.iter().map(|id| ById { id: id.clone() }).collect(),
            user_data: request.user_data.clone(),
            metadata_service: MetadataService {
                enabled: true,
                protocol: "http".into(),
            },
            resource_group: s
                .resource_group_id
                .as_ref()
                .map(|id| ById { id: id.clone() }),
            boot_volume_attachment: BootVolumeAttachment {
                volume: BootVolumePrototype {
                    name: request.token.clone(),
                    profile: ByName {
                        name: "general-purpose".into(),
                    },
                },
                delete_volume_on_instance_delete: true,
            },
            confidential_compute_mode: (!s.disable_cvm).then(|| "tdx".to_owned()),
            enable_secure_boot: (!s.disable_cvm).then_some(true),
            placement_target: placement,
        }
    }

    /// Every tag of a create's instance, as IBM tags.
    ///
    /// # Errors
    /// `Permanent` when a tag cannot be an IBM tag.
    fn tags_of(&self, request: &CreateRequest) -> Result<Vec<String>, ProviderError> {
        let mut tags: Vec<String> = Vec::new();
        if let Some(cluster) = &self.settings.cluster_id {
            tags.push(ibm_tag(CLUSTER_TAG_KEY, cluster));
        }
        tags.extend(self.settings.tags.iter().cloned());
        for (key, value) in &request.tags {
            let tag = ibm_tag(key, value);
            if !super::config::is_user_tag(&tag) {
                return Err(ProviderError::permanent(format!(
                    "Tag {key}={value} cannot be an IBM Cloud tag (at most 128 of letters, \
                     digits, space, '_', '.', '-', ':')"
                )));
            }
            tags.push(tag);
        }
        Ok(tags)
    }

    /// The live instance named `name` in the region, whatever its token.
    async fn by_name(&self, name: &str) -> Result<Option<VpcInstance>, ProviderError> {
        // Instance names are unique in the region, not only in the VPC:
        // the lookup must see the instance a create's name clashes with.
        let found = self.client.instances_named(name).await?;
        Ok(found.into_iter().find(|i| i.name == name && !i.is_gone()))
    }

    /// The live instance named `name` made with `token`; `Permanent` when
    /// the name is held by another token's instance.
    async fn own_by_name(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<VpcInstance>, ProviderError> {
        match self.by_name(name).await? {
            Some(i) if i.boot_volume_name() == Some(token) => Ok(Some(i)),
            Some(i) => Err(ProviderError::permanent(format!(
                "Instance name {name} is held by instance {} of another creation (boot volume {:?}, \
                 not {token}); delete it, or it is deleted when its own sandbox stops",
                i.id,
                i.boot_volume_name().unwrap_or("none")
            ))),
            None => Ok(None),
        }
    }

    fn instance(&self, vpc: &VpcInstance, tags: BTreeMap<String, String>) -> Instance {
        let status = match vpc.status.as_str() {
            "running" => InstanceStatus::Running,
            "stopped" | "stopping" | "failed" | "suspended" | "paused" => InstanceStatus::Stopped,
            _ => InstanceStatus::Starting,
        };
        Instance {
            id: vpc.id.clone(),
            name: vpc.name.clone(),
            ips: vpc.address().into_iter().collect(),
            tags,
            created_at: vpc.created_at.as_deref().and_then(parse_time),
            status,
        }
    }

    fn token_tags(vpc: &VpcInstance) -> BTreeMap<String, String> {
        vpc.boot_volume_name()
            .map(|t| BTreeMap::from([(TAG_TOKEN.to_owned(), t.to_owned())]))
            .unwrap_or_default()
    }

    /// Attaches `tags`, retried; when every try fails, deletes the instance
    /// (an untagged VM is one the orphan GC cannot see) and fails.
    async fn tag_or_delete(&self, vpc: &VpcInstance, tags: &[String]) -> Result<(), ProviderError> {
        let mut last = None;
        for attempt in 0..self.settings.tag_attempts.max(1) {
            if attempt > 0 {
                let wait = last
                    .as_ref()
                    .and_then(|e: &ProviderError| e.retry_after)
                    .unwrap_or(self.settings.poll_interval);
                tokio::time::sleep(wait).await;
            }
            match self.client.attach_tags(&vpc.crn, tags).await {
                Ok(()) => return Ok(()),
                Err(e) if e.class == ErrorClass::Config || e.class == ErrorClass::Permanent => {
                    last = Some(e);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| ProviderError::transient("tagging failed"));
        tracing::warn!(instance = %vpc.id, name = %vpc.name, error = %e,
            "tags could not be attached; deleting the instance");
        // The DELETE only: the retried create waits (its name is refused
        // while the instance goes), not this one.
        if let Err(d) = self.client.delete_instance(&vpc.id).await {
            tracing::warn!(instance = %vpc.id, error = %d,
                "the untagged instance could not be deleted; a lookup by its name finds it");
        }
        let message = format!(
            "Instance {} was made but its tags could not be attached, so it was deleted: {}",
            vpc.name, e.message
        );
        // A refusal no retry cures (no permission to tag: Config) must not
        // make and delete a VM on every retry.
        let error = match e.class {
            ErrorClass::Config => ProviderError::config(message),
            ErrorClass::Permanent => ProviderError::permanent(message),
            _ => ProviderError::transient(message),
        };
        Err(error.with_code(e.code().unwrap_or("tagging").to_owned()))
    }

    /// Waits (bounded) for the primary address; a stopped instance of the
    /// token is started first.
    async fn with_address(&self, mut vpc: VpcInstance) -> Result<Instance, ProviderError> {
        if vpc.status == "failed" {
            self.client.delete_instance(&vpc.id).await?;
            return Err(ProviderError::transient(format!(
                "Instance {} of this sandbox failed; it was deleted and is made again",
                vpc.name
            )));
        }
        if matches!(vpc.status.as_str(), "stopped" | "stopping") {
            self.client.start_instance(&vpc.id).await?;
            vpc.status = "starting".into();
        }
        let tags = Self::token_tags(&vpc);
        for poll in 0..=self.settings.address_polls {
            if vpc.address().is_some() {
                return Ok(self.instance(&vpc, tags));
            }
            if poll == self.settings.address_polls {
                break;
            }
            tokio::time::sleep(self.settings.poll_interval).await;
            vpc = match self.client.get_instance(&vpc.id).await? {
                Some(v) if !v.is_gone() => v,
                _ => {
                    return Err(ProviderError::transient(format!(
                        "Instance {} disappeared while its address was awaited",
                        vpc.name
                    )));
                }
            };
        }
        Err(ProviderError::transient(format!(
            "Instance {} ({}) has no address after {} polls; the retry adopts it",
            vpc.name, vpc.id, self.settings.address_polls
        )))
    }
}

#[async_trait]
impl Provider for IbmCloudProvider {
    fn name(&self) -> &'static str {
        "ibmcloud"
    }

    fn paces_requests(&self) -> bool {
        true
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        if !is_volume_name(&request.token) {
            return Err(ProviderError::permanent(format!(
                "Token {:?} cannot name a boot volume",
                request.token
            )));
        }
        if request.user_data.len() > MAX_USER_DATA {
            return Err(ProviderError::permanent(format!(
                "The user data is {} bytes, above IBM Cloud VPC's limit of {MAX_USER_DATA}",
                request.user_data.len()
            )));
        }
        let tags = self.tags_of(request)?;
        if request.earlier_attempt
            && let Some(found) = self
                .own_by_name(&request.token, &request.instance_name)
                .await?
        {
            // Tagging may have been cut off: attaching again is a no-op
            // for tags already there.
            self.tag_or_delete(&found, &tags).await?;
            return self.with_address(found).await;
        }
        let (profile, image) = self.profile_and_image(request).await?;
        let catalog = self.catalog().await?;
        let mut body = self.prototype(
            request,
            profile,
            image,
            catalog.host.as_ref().or(catalog.group.as_ref()),
        );
        let mut answer = self.client.create_instance(&body).await;
        if let (Err(e), Some(host), Some(group)) = (&answer, &catalog.host, &catalog.group)
            && matches!(e.class, ErrorClass::Permanent | ErrorClass::Transient)
            && e.code() != Some(UNIQUE_FAILED)
        {
            // The reference's fall-back: the group, when the host refuses.
            // A create on the host whose answer was lost is found by name
            // when the group's create is refused as not unique.
            tracing::warn!(instance = %request.instance_name, error = %e,
                "the create on dedicated host {host} failed; trying dedicated host group {group}");
            body.placement_target = Some(ById { id: group.clone() });
            answer = self.client.create_instance(&body).await;
        }
        let created = match answer {
            Ok(created) => created,
            Err(e) if e.code() == Some(UNIQUE_FAILED) => {
                // A create whose answer was lost, or one this token's
                // instance is still being deleted under.
                match self
                    .own_by_name(&request.token, &request.instance_name)
                    .await?
                {
                    Some(found) => found,
                    None => {
                        return Err(ProviderError::transient(format!(
                            "{}; no live instance has the name yet (one may be being deleted)",
                            e.message
                        ))
                        .with_code(UNIQUE_FAILED));
                    }
                }
            }
            Err(e) if e.class == ErrorClass::NotFound => {
                // An image, a profile, a subnet or a zone that is not there.
                let code = e.code().unwrap_or("not_found").to_owned();
                return Err(ProviderError::permanent(e.message).with_code(code));
            }
            Err(e) => return Err(e),
        };
        crate::failpoints::hit(crate::failpoints::IBMCLOUD_CREATED_BEFORE_TAGS);
        self.tag_or_delete(&created, &tags).await?;
        self.with_address(created).await
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        if !super::config::is_vpc_id(instance_id) {
            return Ok(()); // cannot exist on VPC; never reaches a URL
        }
        if !self.client.delete_instance(instance_id).await? {
            return Ok(());
        }
        for _ in 0..self.settings.delete_polls {
            tokio::time::sleep(self.settings.poll_interval).await;
            if self.client.get_instance(instance_id).await?.is_none() {
                return Ok(());
            }
        }
        Err(ProviderError::transient(format!(
            "Instance {instance_id} is still being deleted after {} polls",
            self.settings.delete_polls
        )))
    }

    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        let Some(found) = self
            .by_name(name)
            .await?
            .filter(|i| i.boot_volume_name() == Some(token))
        else {
            return Ok(None);
        };
        let mut instance = self.instance(&found, Self::token_tags(&found));
        // A create cut off between the instance and its tags: answer it
        // as not reachable yet, so the daemon's create with this token
        // adopts it and attaches the tags (or, for a stopped sandbox, the
        // daemon deletes it, as it would any instance found).
        let token_tag = ibm_tag(TAG_TOKEN, token);
        if !self
            .client
            .list_tags(&found.crn)
            .await?
            .contains(&token_tag)
        {
            instance.ips.clear();
            instance.status = InstanceStatus::Starting;
        }
        Ok(Some(instance))
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        // Search first, then VPC: an instance created after the search is
        // not listed; one deleted after it is not live in VPC.
        let tag = ibm_tag(key, value);
        if !super::config::is_user_tag(&tag) || tag.contains('"') {
            return Err(ProviderError::permanent(format!(
                "Tag {key}={value} cannot be an IBM Cloud tag"
            )));
        }
        let query = format!("type:instance AND tags:\"{tag}\"");
        let found = self.client.search(&query).await?;
        let mut tags_by_crn: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for item in found {
            let tags = item.tags.iter().map(|t| podvisor_tag(t)).collect();
            tags_by_crn.insert(item.crn, tags);
        }
        // Each hit is read from VPC itself (the index lags deletes): a
        // filtered lookup per instance of the node, never a listing of
        // every instance in the VPC.
        let mut live = Vec::new();
        for (crn, tags) in tags_by_crn {
            let Some(id) = crn
                .rsplit_once("::instance:")
                .map(|(_, id)| id)
                .filter(|id| super::config::is_vpc_id(id))
            else {
                continue;
            };
            if let Some(found) = self.client.get_instance(id).await?
                && !found.is_gone()
                && found.crn == crn
            {
                live.push(self.instance(&found, tags));
            }
        }
        Ok(live)
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        let catalog = self.catalog().await?;
        let s = &self.settings;
        let known = |name: &String| {
            catalog.sizes.iter().any(|t| &t.name == name)
                || catalog.architectures.contains_key(name)
        };
        for profile in std::iter::once(&s.profile_name).chain(&s.profile_list) {
            if !known(profile) {
                return Err(ProviderError::config(format!(
                    "--profile-name/--profile-list (IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME/_LIST): \
                     profile {profile} is not offered in the region"
                )));
            }
        }
        // Global Search and Global Tagging answer with the credentials'
        // access: a listing of one node's VMs and one resource's tags (a
        // missing permission would otherwise surface at the first pod).
        self.client
            .search("type:instance AND tags:\"podvisor.io_node:podvisor-verify\"")
            .await
            .map_err(|e| access("Global Search", e))?;
        self.client
            .list_tags("crn:v1:bluemix:public:is:podvisor-verify")
            .await
            .map_err(|e| access("Global Tagging", e))?;
        self.client.get_subnet(&s.subnet_id).await.map_err(|e| {
            e.missing_is_config(
                "--primary-subnet-id (IBMCLOUD_VPC_SUBNET_ID)",
                format_args!("subnet {}", s.subnet_id),
            )
        })
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podvisor_tags_survive_the_round_trip_through_ibm_tags() {
        for (key, value) in [
            ("podvisor.io/node", "worker-1.example"),
            ("podvisor.io/journal-seq", "42"),
            ("podvisor.io/token", "pv-0123abcd-g1"),
        ] {
            let tag = ibm_tag(key, value);
            assert!(super::super::config::is_user_tag(&tag), "{tag}");
            assert_eq!(podvisor_tag(&tag), (key.to_owned(), value.to_owned()));
        }
        assert_eq!(podvisor_tag("team:a"), ("team".into(), "a".into()));
        assert_eq!(podvisor_tag("flag"), ("flag".into(), String::new()));
    }

    #[test]
    fn tokens_are_volume_names_and_nothing_else_is() {
        let token = podvisor_state::naming::idempotency_token("sandbox", 7);
        assert!(is_volume_name(&token), "{token}");
        for bad in ["", "1abc", "abc-", "a_b", "A", &"a".repeat(64)] {
            assert!(!is_volume_name(bad), "{bad}");
        }
    }

    #[test]
    fn creation_times_are_read_from_rfc_3339() {
        assert_eq!(parse_time("2026-12-01T10:00:00Z"), Some(1_796_119_200_000));
        assert_eq!(parse_time("yesterday"), None);
    }
}
