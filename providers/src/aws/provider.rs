//! The AWS provider's `Provider` implementation: pod VMs as EC2 instances.
//!
//! Idempotency has two layers, because EC2-compatible servers differ: every
//! `RunInstances` carries the journaled token as its `ClientToken` (EC2 then
//! returns the first instance, even before it shows up in listings), and the
//! token is also a tag set in that same call, which a create looks up first
//! whenever an earlier create with the token may have reached the server
//! ([`CreateRequest::earlier_attempt`]: moto ignores `ClientToken` and has
//! no `client-token` filter). A token's first create skips the lookup.
//!
//! # EC2 requests per pod
//!
//! In the common case a pod VM costs two: `RunInstances` at StartVM and
//! `TerminateInstances` at StopVM. More only when needed:
//!
//! - `DescribeInstances` (the token lookup, batched with other sandboxes')
//!   before a create that is not its token's first;
//! - `StartInstances` for a stopped instance of the token;
//! - in public-IP mode, `DescribeInstances` polls until the instance runs
//!   with a public address (EC2's `RunInstances` answers `pending`, without
//!   one); in private mode the private address is in `RunInstances`'s own
//!   answer;
//! - `DescribeAddresses` (then `DisassociateAddress`/`ReleaseAddress`) at
//!   the delete of an instance last seen holding an Elastic IP.
//!
//! # Elastic IPs
//!
//! podvisor never attaches an Elastic IP; someone else may, and the delete
//! releases it. EC2 tells which instance holds one only when asked, so
//! rather than a `DescribeAddresses` before every delete, the provider
//! remembers every instance it reads (lookups, the orphan GC's listing by
//! node tag every `--gc-interval`, recovery's checks, the public-IP wait)
//! whose address association is not Amazon's own (`IpOwnerId` other than
//! `amazon`: see `instances::may_hold_elastic_ip`), and releases addresses
//! only at the delete of those. The trade-off: an Elastic IP attached after
//! the instance was last read (within one GC interval of its delete, or
//! after a restart before the first listing) is not released. EC2 still
//! disassociates it when it terminates the instance, so it is not lost: it
//! stays allocated to the account, unassociated, for its owner to reuse or
//! release (`aws ec2 describe-addresses`).

use super::config::is_ec2_id;
use super::errors::{INVALID_INSTANCE_TYPE, from_sdk, names_a_missing_thing};
use super::instances::{InstanceReader, TokenLookups};
use crate::error::ProviderError;
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider};
use crate::selection::{TypeSize, select_instance_type};
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    AmdSevSnpSpecification, BlockDeviceMapping, CpuOptionsRequest, EbsBlockDevice, Filter,
    InstanceNetworkInterfaceSpecification, InstanceType, LaunchTemplateSpecification, ResourceType,
    Tag, TagSpecification,
};
use base64::Engine;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OnceCell};

/// EC2's limit on user data (before base64).
const USER_DATA_LIMIT: usize = 16 * 1024;
/// Instances per `DescribeInstances` page (EC2 allows 5 to 1000).
const PAGE_SIZE: i32 = 1000;
/// How long a token lookup waits to share its `DescribeInstances` with
/// lookups of other sandboxes (small beside EC2's own latency).
const LOOKUP_WINDOW: Duration = Duration::from_millis(10);
/// How long a public-IP create waits for the instance to run (the reference's bound).
const PUBLIC_IP_WAIT: Duration = Duration::from_secs(120);
/// Between polls of that wait.
const PUBLIC_IP_POLL: Duration = Duration::from_secs(2);

/// What the AWS provider needs to know, after flags and the instance
/// metadata service have had their say.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// The region (for messages).
    pub region: String,
    /// The default AMI; a pod's image annotation overrides it.
    pub image_id: Option<String>,
    /// The type used when a pod asks for no size.
    pub instance_type: String,
    /// The allow-list (empty: only the default).
    pub instance_types: Vec<String>,
    /// The subnet, if set (else EC2's default subnet).
    pub subnet_id: Option<String>,
    /// Security groups (empty: the subnet's default group).
    pub security_group_ids: Vec<String>,
    /// SSH key pair.
    pub key_name: Option<String>,
    /// Launch template name, when instances come from one.
    pub launch_template: Option<String>,
    /// Reach the agent through a public IP.
    pub use_public_ip: bool,
    /// Root volume size in GiB (0: the image's).
    pub root_volume_gib: u32,
    /// No AMD SEV-SNP.
    pub disable_cvm: bool,
    /// Extra tags of every instance (`TAGS`).
    pub tags: Vec<(String, String)>,
}

/// The root device of an AMI, for sizing the root volume.
#[derive(Debug, Clone)]
struct ImageRoot {
    /// The root device name (`/dev/xvda`).
    device: String,
    /// The size of its snapshot in GiB, if EC2 says.
    size_gib: Option<u32>,
}

/// Pod VMs as EC2 instances.
pub struct AwsProvider {
    /// Reads instances (and holds the client; `None` after teardown).
    reader: Arc<InstanceReader>,
    /// Lookups by token, batched.
    lookups: TokenLookups,
    /// What to create.
    settings: AwsSettings,
    /// Sizes of the allowed types, read once (`DescribeInstanceTypes`).
    sizes: OnceCell<Vec<TypeSize>>,
    /// Root devices of the AMIs used so far (`DescribeImages`, once per AMI).
    images: Mutex<HashMap<String, ImageRoot>>,
    /// The client paces each request itself (see [`AwsProvider::paced`]).
    paced: bool,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AwsProvider {
    /// A provider creating instances as `settings` say, through `client`.
    pub fn new(client: Client, settings: AwsSettings) -> Self {
        let reader = Arc::new(InstanceReader::new(
            client,
            settings.use_public_ip,
            PAGE_SIZE,
        ));
        Self {
            lookups: TokenLookups::new(reader.clone(), LOOKUP_WINDOW),
            reader,
            settings,
            sizes: OnceCell::new(),
            images: Mutex::new(HashMap::new()),
            paced: false,
        }
    }

    /// The same provider on a client that paces every request through the
    /// daemon's pacer (see [`super::paced`]): it says so
    /// ([`Provider::paces_requests`]), so the daemon takes no token of its
    /// own per call.
    pub(crate) fn paced(client: Client, settings: AwsSettings) -> Self {
        Self {
            paced: true,
            ..Self::new(client, settings)
        }
    }

    /// Sets the `DescribeInstances` page size (5 to 1000), to test paging.
    pub fn with_page_size(self, page_size: i32) -> Self {
        self.reader.set_page_size(page_size);
        self
    }

    /// Sets how long a token lookup waits to share its call with others
    /// (10 ms by default), to test batching on a slow machine.
    pub fn with_lookup_window(mut self, window: Duration) -> Self {
        self.lookups.set_window(window);
        self
    }

    /// The settings in use.
    pub fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    fn client(&self) -> Result<Client, ProviderError> {
        self.reader.client()
    }

    /// The instance made with `token`, if any: by the token tag, which the
    /// create call itself sets; batched with other lookups under way.
    async fn by_token(&self, token: &str) -> Result<Option<Instance>, ProviderError> {
        self.lookups.find(token).await
    }

    /// The sizes of the allowed types, read from EC2 once.
    async fn sizes(&self) -> Result<&[TypeSize], ProviderError> {
        self.sizes
            .get_or_try_init(|| async {
                let mut names = self.settings.instance_types.clone();
                if !names.contains(&self.settings.instance_type) {
                    names.push(self.settings.instance_type.clone());
                }
                describe_types(&self.client()?, &names).await
            })
            .await
            .map(Vec::as_slice)
    }

    /// The root device of `image`, read from EC2 once per image.
    async fn image_root(&self, image: &str) -> Result<ImageRoot, ProviderError> {
        let mut images = self.images.lock().await;
        if let Some(root) = images.get(image) {
            return Ok(root.clone());
        }
        let out = self
            .client()?
            .describe_images()
            .image_ids(image)
            .send()
            .await
            .map_err(|e| from_sdk("DescribeImages", &e))?;
        let found = out.images().iter().find(|i| i.image_id() == Some(image));
        let Some(found) = found else {
            return Err(ProviderError::permanent(format!(
                "Image {image} does not exist in {}",
                self.settings.region
            )));
        };
        let device = found.root_device_name().unwrap_or("/dev/xvda").to_owned();
        let size_gib = found
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(device.as_str()))
            .and_then(|m| m.ebs())
            .and_then(aws_sdk_ec2::types::EbsBlockDevice::volume_size)
            .and_then(|s| u32::try_from(s).ok());
        let root = ImageRoot { device, size_gib };
        images.insert(image.to_owned(), root.clone());
        Ok(root)
    }

    /// The `RunInstances` call for `request` (without sending it).
    async fn run_request(
        &self,
        request: &CreateRequest,
    ) -> Result<
        aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder,
        ProviderError,
    > {
        let s = &self.settings;
        if request.user_data.len() > USER_DATA_LIMIT {
            return Err(ProviderError::permanent(format!(
                "User data of {} is {} bytes; EC2 takes at most {USER_DATA_LIMIT}",
                request.instance_name,
                request.user_data.len()
            )));
        }
        let mut tags = vec![("Name".to_owned(), request.instance_name.clone())];
        tags.extend(s.tags.iter().cloned());
        tags.extend(
            request
                .tags
                .iter()
                .filter(|(k, _)| k.as_str() != "Name")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let tag_spec = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(
                    tags.iter()
                        .map(|(k, v)| Tag::builder().key(k).value(v).build())
                        .collect(),
                ))
                .build()
        };
        let mut run = self
            .client()?
            .run_instances()
            .min_count(1)
            .max_count(1)
            .client_token(&request.token)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&request.user_data))
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .tag_specifications(tag_spec(ResourceType::NetworkInterface));

        let pod_image = request.spec.image.as_deref().filter(|i| !i.is_empty());
        if let Some(image) = pod_image
            && !is_ec2_id(image, "ami-")
        {
            return Err(ProviderError::permanent(format!(
                "Image '{image}' (the pod's image annotation) is not an AMI id (ami-…)"
            )));
        }
        let pod_type = request
            .spec
            .instance_type
            .as_deref()
            .is_some_and(|t| !t.is_empty());
        let pod_size = request.spec.vcpus.is_some_and(|v| v > 0)
            || request.spec.memory_mib.is_some_and(|m| m > 0)
            || request.spec.gpus.is_some_and(|g| g > 0);
        let sizes: &[TypeSize] = if pod_size && !pod_type && !s.instance_types.is_empty() {
            self.sizes().await?
        } else {
            &[]
        };
        let instance_type =
            select_instance_type(&request.spec, &s.instance_type, &s.instance_types, sizes)
                .map_err(ProviderError::permanent)?;

        if let Some(template) = &s.launch_template {
            // As in the reference, the template decides image, type and
            // network — except what the pod itself asked for, which the
            // reference silently dropped: parameters override the template.
            run = run.launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(template)
                    .build(),
            );
            if pod_type || (pod_size && !s.instance_types.is_empty()) {
                run = run.instance_type(InstanceType::from(instance_type.as_str()));
            }
            if let Some(image) = pod_image {
                run = run.image_id(image);
            }
            return Ok(run);
        }

        let image = pod_image
            .or(s.image_id.as_deref())
            .ok_or_else(|| ProviderError::config("No image: set --imageid (PODVM_AMI_ID)"))?;
        if !is_ec2_id(image, "ami-") {
            return Err(ProviderError::permanent(format!(
                "Image '{image}' is not an AMI id (ami-…)"
            )));
        }
        run = run
            .image_id(image)
            .instance_type(InstanceType::from(instance_type.as_str()));

        let root = self.image_root(image).await?;
        if s.root_volume_gib > 0 {
            let size = s.root_volume_gib.max(root.size_gib.unwrap_or(0));
            run = run.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(root.device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(i32::try_from(size).unwrap_or(i32::MAX))
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        if s.use_public_ip {
            // A public address needs the network interface spelled out.
            run = run.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(true)
                    .delete_on_termination(true)
                    .set_subnet_id(s.subnet_id.clone())
                    .set_groups(
                        (!s.security_group_ids.is_empty()).then(|| s.security_group_ids.clone()),
                    )
                    .build(),
            );
        } else {
            run = run
                .set_subnet_id(s.subnet_id.clone())
                .set_security_group_ids(
                    (!s.security_group_ids.is_empty()).then(|| s.security_group_ids.clone()),
                );
        }
        if let Some(key) = &s.key_name {
            run = run.key_name(key);
        }
        if !s.disable_cvm {
            run = run.cpu_options(
                CpuOptionsRequest::builder()
                    .amd_sev_snp(AmdSevSnpSpecification::Enabled)
                    .build(),
            );
        }
        Ok(run)
    }

    /// Waits until `id` runs and has a public address (public-IP mode).
    async fn wait_for_public_ip(&self, id: &str) -> Result<Instance, ProviderError> {
        let deadline = Instant::now() + PUBLIC_IP_WAIT;
        loop {
            let out = self
                .client()?
                .describe_instances()
                .instance_ids(id)
                .send()
                .await;
            match out {
                Ok(out) => {
                    let instance = out
                        .reservations()
                        .iter()
                        .flat_map(aws_sdk_ec2::types::Reservation::instances)
                        .find(|i| i.instance_id() == Some(id));
                    match instance.and_then(|i| self.reader.to_instance(i)) {
                        Some(i)
                            if i.status == InstanceStatus::Running
                                && instance.and_then(|i| i.public_ip_address()).is_some() =>
                        {
                            return Ok(i);
                        }
                        Some(_) => {}
                        None if instance.is_some() => {
                            return Err(ProviderError::transient(format!(
                                "Instance {id} was terminated while starting"
                            )));
                        }
                        None => {}
                    }
                }
                Err(e) => {
                    let e = from_sdk("DescribeInstances", &e);
                    // Just made: EC2's listings may not show it yet.
                    if e.class != crate::ErrorClass::NotFound {
                        return Err(e);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::transient(format!(
                    "Instance {id} has no public IP {PUBLIC_IP_WAIT:?} after its create"
                )));
            }
            tokio::time::sleep(PUBLIC_IP_POLL).await;
        }
    }

    /// Releases the Elastic IPs `id` holds: `DescribeAddresses` filtered by
    /// the instance, then `DisassociateAddress` and `ReleaseAddress` for
    /// each (one already gone counts as done).
    async fn release_addresses(&self, id: &str) -> Result<(), ProviderError> {
        let client = self.client()?;
        let out = client
            .describe_addresses()
            .filters(Filter::builder().name("instance-id").values(id).build())
            .send()
            .await
            .map_err(|e| from_sdk("DescribeAddresses", &e))?;
        for address in out.addresses() {
            if let Some(association) = address.association_id() {
                match client
                    .disassociate_address()
                    .association_id(association)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) => {
                        let e = from_sdk("DisassociateAddress", &e);
                        if !names_a_missing_thing(&e) {
                            return Err(e);
                        }
                    }
                }
            }
            if let Some(allocation) = address.allocation_id() {
                match client
                    .release_address()
                    .allocation_id(allocation)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(instance = id, allocation, "released an Elastic IP");
                    }
                    Err(e) => {
                        let e = from_sdk("ReleaseAddress", &e);
                        if !names_a_missing_thing(&e) {
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A filter on one tag's value.
fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// The sizes of `names`, all pages; a name EC2 does not know is a config error.
pub(crate) async fn describe_types(
    client: &Client,
    names: &[String],
) -> Result<Vec<TypeSize>, ProviderError> {
    let mut sizes = Vec::new();
    // DescribeInstanceTypes takes at most 100 names per call.
    for chunk in names.chunks(100) {
        let mut pages = client
            .describe_instance_types()
            .set_instance_types(Some(
                chunk
                    .iter()
                    .map(|n| InstanceType::from(n.as_str()))
                    .collect(),
            ))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                let e = from_sdk("DescribeInstanceTypes", &e);
                if e.code() == Some(INVALID_INSTANCE_TYPE) {
                    ProviderError {
                        code: e.code.clone(),
                        ..ProviderError::config(format!(
                            "--instance-types (PODVM_INSTANCE_TYPES) or --instance-type (PODVM_INSTANCE_TYPE): {}",
                            e.message
                        ))
                    }
                } else {
                    e
                }
            })?;
            for info in page.instance_types() {
                let Some(name) = info.instance_type() else {
                    continue;
                };
                sizes.push(TypeSize {
                    name: name.as_str().to_owned(),
                    vcpus: info
                        .v_cpu_info()
                        .and_then(aws_sdk_ec2::types::VCpuInfo::default_v_cpus)
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(0),
                    memory_mib: info
                        .memory_info()
                        .and_then(aws_sdk_ec2::types::MemoryInfo::size_in_mib)
                        .and_then(|m| u64::try_from(m).ok())
                        .unwrap_or(0),
                    gpus: info.gpu_info().map_or(0, |g| {
                        g.gpus()
                            .iter()
                            .filter_map(aws_sdk_ec2::types::GpuDeviceInfo::count)
                            .filter_map(|c| u32::try_from(c).ok())
                            .sum()
                    }),
                });
            }
        }
    }
    let missing: Vec<&str> = names
        .iter()
        .filter(|n| !sizes.iter().any(|s| &s.name == *n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(ProviderError::config(format!(
            "--instance-types (PODVM_INSTANCE_TYPES): EC2 does not offer {}",
            missing.join(", ")
        )));
    }
    Ok(sizes)
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn paces_requests(&self) -> bool {
        self.paced
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        if request.token.is_empty() || request.token.len() > 64 || !request.token.is_ascii() {
            return Err(ProviderError::permanent(format!(
                "Token '{}' is not an EC2 client token (1 to 64 ASCII characters)",
                request.token
            )));
        }
        // What this token already made, on a server that ignores
        // ClientToken: looked up only when an earlier create may have
        // reached the server. A first create cannot find anything.
        let found = if request.earlier_attempt {
            self.by_token(&request.token).await?
        } else {
            None
        };
        // Whether the instance runs with its public address already (then
        // public-IP mode need not wait for one).
        let (mut instance, addressed) = if let Some(found) = found {
            (found, false)
        } else {
            let run = self.run_request(request).await?;
            let out = run.send().await.map_err(|e| from_sdk("RunInstances", &e))?;
            let Some(made) = out.instances().first() else {
                return Err(ProviderError::transient(
                    "EC2 RunInstances returned no instance",
                ));
            };
            let Some(instance) = self.reader.to_instance(made) else {
                // EC2 answered a repeated ClientToken with an instance that
                // is already gone: this token cannot make a VM any more.
                return Err(ProviderError::permanent(format!(
                    "Instance {} of token {} was terminated",
                    made.instance_id().unwrap_or("?"),
                    request.token
                )));
            };
            tracing::info!(instance = %instance.id, name = %request.instance_name, "EC2 instance created");
            if !request.earlier_attempt {
                // Just launched (the token is fresh, so EC2 cannot have
                // answered with an older instance): nobody can have attached
                // an Elastic IP yet, whatever owner the answer gives a
                // public address (moto gives the account's to an
                // auto-assigned one, EC2 `amazon`).
                self.reader.forget(&instance.id);
            }
            // EC2 answers `pending` without a public address; a server
            // that answers `running` with one needs no wait.
            let addressed =
                instance.status == InstanceStatus::Running && made.public_ip_address().is_some();
            (instance, addressed)
        };
        if instance.status == InstanceStatus::Stopped {
            // A stopped pod VM of this token (found, or returned by EC2 for
            // a repeated ClientToken): bring it up, never make another.
            self.client()?
                .start_instances()
                .instance_ids(&instance.id)
                .send()
                .await
                .map_err(|e| from_sdk("StartInstances", &e))?;
            tracing::info!(instance = %instance.id, "started the stopped instance of this token");
        }
        // Made now or found (adopted, or started again): the same address
        // rules. A stopped instance just started has lost its public IP.
        if self.settings.use_public_ip && !addressed {
            // If this fails, the instance stays findable by its token tag.
            instance = self.wait_for_public_ip(&instance.id).await?;
        }
        if instance.ips.is_empty() {
            return Err(ProviderError::transient(format!(
                "Instance {} has no IP address yet",
                instance.id
            )));
        }
        Ok(instance)
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        if !is_ec2_id(instance_id, "i-") {
            // No such instance can exist.
            return Ok(());
        }
        // Only an instance last seen with an Elastic IP has addresses to
        // release (the module's docs say what that misses, and why).
        if self.reader.seen_with_elastic_ip(instance_id) {
            self.release_addresses(instance_id).await?;
        }
        match self
            .client()?
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => {
                let e = from_sdk("TerminateInstances", &e);
                if e.class != crate::ErrorClass::NotFound {
                    return Err(e);
                }
            }
        }
        self.reader.forget(instance_id);
        Ok(())
    }

    async fn find_instance(
        &self,
        token: &str,
        _name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        if token.is_empty() {
            return Ok(None);
        }
        self.by_token(token).await
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        self.reader.describe(vec![tag_filter(key, value)]).await
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        let template = self.settings.launch_template.is_some();
        if let Some(image) = self.settings.image_id.as_ref().filter(|_| !template) {
            self.image_root(image).await.map_err(|e| {
                if e.is_retryable() {
                    // EC2 could not say; that is not a wrong flag.
                    e
                } else {
                    ProviderError {
                        code: e.code.clone(),
                        ..ProviderError::config(format!("--imageid (PODVM_AMI_ID): {}", e.message))
                    }
                }
            })?;
        }
        // Without a subnet EC2 launches into the account's default subnet
        // (if there is one), where the node rarely reaches its pod VMs.
        if !template && self.settings.subnet_id.is_none() {
            return Err(ProviderError::config(
                "--subnetid (AWS_SUBNET_ID) and --securitygroupids (AWS_SG_IDS): no subnet was given and the instance metadata service named none; pod VMs would start in the account's default subnet, which the node may not reach",
            ));
        }
        // With a template, the types matter only for what pods ask for.
        if !template || !self.settings.instance_types.is_empty() {
            self.sizes().await?;
        }
        Ok(())
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        self.reader.close();
        Ok(())
    }
}
