//! The Azure provider: pod VMs as Azure virtual machines.

use super::client::{Arm, COMPUTE_API, GALLERY_API, Lro, NETWORK_API};
use super::config::{is_arm_id, is_arm_name, is_community_image};
use super::errors::{self, ArmError};
use crate::error::{ErrorClass, ProviderError};
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider, TAG_TOKEN};
use crate::selection::{TypeSize, select_instance_type};
use async_trait::async_trait;
use azure_core::http::Method;
use base64::Engine;
use podvisor_state::UnixMillis;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Azure's limit on a VM's `userData`: 64 KiB of base64 (Microsoft Learn,
/// "User data for Azure Virtual Machine"; the reference checks the same).
pub const MAX_USER_DATA_BASE64: usize = 64 * 1024;

/// The instance id podvisor keeps for a VM: its ARM id, `#`, and its
/// `vmId` (the GUID Azure gives each VM it makes). A VM's ARM id is its
/// name, which the next generation of the same sandbox reuses; the `vmId`
/// tells the two apart, so a replayed delete of an old record never
/// deletes the VM that took its name.
pub fn instance_id(arm_id: &str, vm_id: &str) -> String {
    format!("{arm_id}#{vm_id}")
}

/// What the provider needs besides its client (from the flags).
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// The subscription of everything.
    pub subscription_id: String,
    /// The region of the VMs.
    pub region: String,
    /// The resource group of the VMs.
    pub resource_group: String,
    /// The subnet's ARM id.
    pub subnet_id: String,
    /// The network security group's ARM id, if any.
    pub nsg_id: Option<String>,
    /// The default image (ARM id or community gallery image id).
    pub image_id: String,
    /// The default VM size.
    pub instance_size: String,
    /// The allow-list of sizes (empty: only the default).
    pub instance_sizes: Vec<String>,
    /// The admin user.
    pub ssh_username: String,
    /// The admin user's OpenSSH public key.
    pub ssh_public_key: String,
    /// Whether confidential VMs are off.
    pub disable_cvm: bool,
    /// Whether secure boot is on.
    pub secure_boot: bool,
    /// Whether each VM gets a public IP, reached first.
    pub use_public_ip: bool,
    /// The OS disk size in GiB; 0 keeps the image's.
    pub root_volume_size: u32,
    /// `TAGS`.
    pub tags: Vec<(String, String)>,
    /// The poll interval of long-running operations without `Retry-After`.
    pub poll_interval: Duration,
}

/// The Azure provider.
#[derive(Debug)]
pub struct AzureProvider {
    arm: Arm,
    settings: AzureSettings,
    sizes: OnceCell<Vec<TypeSize>>,
}

#[derive(Debug, Deserialize)]
struct Vm {
    id: String,
    name: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    properties: VmProperties,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct VmProperties {
    provisioning_state: Option<String>,
    vm_id: Option<String>,
    time_created: Option<String>,
    network_profile: Option<NetworkProfile>,
    instance_view: Option<InstanceView>,
}

/// A VM's instance view (`$expand=instanceView`): its statuses, such as
/// `ProvisioningState/failed/AllocationFailed` and `PowerState/deallocated`.
#[derive(Debug, Deserialize, Default)]
struct InstanceView {
    #[serde(default)]
    statuses: Vec<InstanceStatusEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceStatusEntry {
    code: Option<String>,
    display_status: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkProfile {
    #[serde(default)]
    network_interfaces: Vec<NicRef>,
}

#[derive(Debug, Deserialize)]
struct NicRef {
    id: String,
    #[serde(default)]
    properties: Option<Primary>,
}

#[derive(Debug, Deserialize, Default)]
struct Primary {
    primary: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Nic {
    #[serde(default)]
    properties: NicProperties,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NicProperties {
    #[serde(default)]
    ip_configurations: Vec<IpConfiguration>,
}

#[derive(Debug, Deserialize)]
struct IpConfiguration {
    #[serde(default)]
    properties: IpConfigurationProperties,
}

#[derive(Debug, Deserialize, Default)]
struct IpConfigurationProperties {
    #[serde(rename = "privateIPAddress")]
    private_ip_address: Option<String>,
    primary: Option<bool>,
    #[serde(rename = "publicIPAddress")]
    public_ip_address: Option<IdRef>,
}

#[derive(Debug, Deserialize)]
struct IdRef {
    id: String,
}

#[derive(Debug, Deserialize)]
struct PublicIp {
    #[serde(default)]
    properties: PublicIpProperties,
}

#[derive(Debug, Deserialize, Default)]
struct PublicIpProperties {
    #[serde(rename = "ipAddress")]
    ip_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmSizeInfo {
    name: String,
    number_of_cores: u32,
    #[serde(rename = "memoryInMB")]
    memory_in_mb: u64,
}

/// A VM's provisioning state, as podvisor acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `Creating`, `Updating`, or none yet.
    Provisioning,
    /// `Succeeded`.
    Ready,
    /// `Failed` or `Canceled`: delete and make again.
    Failed,
    /// `Deleting`: gone, for every method.
    Deleting,
}

impl Vm {
    fn phase(&self) -> Phase {
        let state = self.properties.provisioning_state.as_deref().unwrap_or("");
        if state.eq_ignore_ascii_case("Succeeded") {
            Phase::Ready
        } else if state.eq_ignore_ascii_case("Failed") || state.eq_ignore_ascii_case("Canceled") {
            Phase::Failed
        } else if state.eq_ignore_ascii_case("Deleting") {
            Phase::Deleting
        } else {
            Phase::Provisioning
        }
    }

    /// The power state of the instance view (`running`, `deallocated`…),
    /// if the VM was read with it.
    fn power_state(&self) -> Option<&str> {
        let view = self.properties.instance_view.as_ref()?;
        view.statuses
            .iter()
            .filter_map(|s| s.code.as_deref())
            .find_map(|c| c.strip_prefix("PowerState/"))
    }

    /// Whether the instance view says the VM is stopped or on its way
    /// there (a stopped VM keeps running no guest: it must be started).
    fn is_stopped(&self) -> bool {
        self.power_state().is_some_and(|p| {
            ["stopped", "stopping", "deallocated", "deallocating"]
                .iter()
                .any(|s| p.eq_ignore_ascii_case(s))
        })
    }

    /// Why provisioning failed, from the instance view
    /// (`ProvisioningState/failed/<code>` and its message).
    fn failure(&self) -> ArmError {
        let failed = self.properties.instance_view.as_ref().and_then(|v| {
            v.statuses.iter().find(|s| {
                s.code.as_deref().is_some_and(|c| {
                    c.to_ascii_lowercase()
                        .starts_with("provisioningstate/failed")
                })
            })
        });
        match failed {
            Some(status) => ArmError {
                code: status
                    .code
                    .as_deref()
                    .and_then(|c| c.splitn(3, '/').nth(2))
                    .map(str::to_owned),
                message: status
                    .message
                    .clone()
                    .or_else(|| status.display_status.clone()),
                target: None,
            },
            None => ArmError::default(),
        }
    }

    /// The token tag (a tag name is case-insensitive in Azure).
    fn tag(&self, key: &str) -> Option<&str> {
        let key = azure_tag_name(key);
        self.tags
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&key))
            .map(|(_, v)| v.as_str())
    }

    fn token(&self) -> Option<&str> {
        self.tag(TAG_TOKEN)
    }

    /// The podvisor instance id, or an error when Azure gave no `vmId`.
    fn instance_id(&self) -> Result<String, ProviderError> {
        match self.properties.vm_id.as_deref().filter(|v| !v.is_empty()) {
            Some(vm_id) => Ok(instance_id(&self.id, vm_id)),
            None => Err(ProviderError::transient(format!(
                "Azure VM {}: the answer has no vmId",
                self.name
            ))),
        }
    }

    /// The instance, with `ips` (none while not ready).
    fn to_instance(&self, ips: Vec<IpAddr>) -> Result<Instance, ProviderError> {
        let id = self.instance_id()?;
        if parse_instance_id(&id).is_none() {
            // An id delete_instance could not read back would be a VM
            // forgotten: refused here, never recorded.
            return Err(ProviderError::transient(format!(
                "Azure VM {}: an id podvisor cannot keep ({})",
                self.name, self.id
            )));
        }
        Ok(Instance {
            id,
            name: self.name.clone(),
            ips,
            tags: podvisor_tags(&self.tags),
            created_at: self.properties.time_created.as_deref().and_then(parse_time),
            status: match self.phase() {
                Phase::Ready if self.is_stopped() => InstanceStatus::Stopped,
                Phase::Ready => InstanceStatus::Running,
                _ => InstanceStatus::Starting,
            },
        })
    }

    /// The primary NIC's ARM id.
    fn primary_nic(&self) -> Option<&str> {
        let nics = &self.properties.network_profile.as_ref()?.network_interfaces;
        nics.iter()
            .find(|n| n.properties.as_ref().and_then(|p| p.primary) == Some(true))
            .or_else(|| nics.first())
            .map(|n| n.id.as_str())
    }
}

/// The Azure tag name of a podvisor tag key: `/` is not allowed in an
/// Azure tag name, so `podvisor.io/node` is `podvisor.io_node`.
pub fn azure_tag_name(key: &str) -> String {
    match key.strip_prefix("podvisor.io/") {
        Some(rest) => format!("podvisor.io_{rest}"),
        None => key.to_owned(),
    }
}

/// A VM's tags with podvisor's own under their podvisor keys again.
fn podvisor_tags(tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tags.iter()
        .map(|(k, v)| {
            let key = match k.get(..12) {
                Some(prefix) if prefix.eq_ignore_ascii_case("podvisor.io_") => {
                    format!("podvisor.io/{}", &k[12..])
                }
                _ => k.clone(),
            };
            (key, v.clone())
        })
        .collect()
}

/// An RFC 3339 time (`2024-05-01T12:00:00.1234567+00:00`) in Unix
/// milliseconds; `None` if it is not one.
fn parse_time(text: &str) -> Option<UnixMillis> {
    let utc = text
        .strip_suffix("+00:00")
        .map_or_else(|| text.to_owned(), |t| format!("{t}Z"));
    let time = humantime::parse_rfc3339_weak(&utc).ok()?;
    let millis = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    UnixMillis::try_from(millis).ok()
}

/// `(ARM VM id, vmId)` of a podvisor instance id, if it is one: a VM id
/// of safe segments, `#`, a vmId.
fn parse_instance_id(id: &str) -> Option<(&str, &str)> {
    let (arm_id, vm_id) = id.split_once('#')?;
    let segments: Vec<&str> = arm_id.get(1..)?.split('/').collect();
    let shaped = is_arm_id(arm_id)
        && segments.len() == 8
        && segments[0].eq_ignore_ascii_case("subscriptions")
        && segments[2].eq_ignore_ascii_case("resourceGroups")
        && segments[4].eq_ignore_ascii_case("providers")
        && segments[5].eq_ignore_ascii_case("Microsoft.Compute")
        && segments[6].eq_ignore_ascii_case("virtualMachines");
    (shaped && is_arm_name(vm_id)).then_some((arm_id, vm_id))
}

impl AzureProvider {
    /// A provider on `arm` with `settings`.
    pub fn new(arm: Arm, settings: AzureSettings) -> Self {
        Self {
            arm,
            settings,
            sizes: OnceCell::new(),
        }
    }

    /// The ARM client (for tests' counters).
    pub fn arm(&self) -> &Arm {
        &self.arm
    }

    fn vm_path(&self, name: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{name}",
            self.settings.subscription_id, self.settings.resource_group
        )
    }

    /// The VM named `name` (a checked name), or `None` (404); with its
    /// instance view (power state, provisioning failure) when `view`.
    async fn get_vm(&self, name: &str, view: bool) -> Result<Option<Vm>, ProviderError> {
        self.get_vm_by_id(&self.vm_path(name), view).await
    }

    /// The VM at ARM id `arm_id` (a checked id), or `None` (404); with its
    /// instance view when `view`.
    async fn get_vm_by_id(&self, arm_id: &str, view: bool) -> Result<Option<Vm>, ProviderError> {
        let what = format!("get VM {arm_id}");
        let mut url = self.arm.url(arm_id, COMPUTE_API);
        if view {
            url.query_pairs_mut().append_pair("$expand", "instanceView");
        }
        let answer = self
            .arm
            .send(&what, Method::Get, url, None, &[], &[404])
            .await?;
        if answer.status == 404 {
            return Ok(None);
        }
        answer.parse(&what).map(Some)
    }

    /// The region's VM sizes, listed once.
    async fn sizes(&self) -> Result<&[TypeSize], ProviderError> {
        let sizes = self
            .sizes
            .get_or_try_init(|| async {
                let path = format!(
                    "/subscriptions/{}/providers/Microsoft.Compute/locations/{}/vmSizes",
                    self.settings.subscription_id, self.settings.region
                );
                let listed: Vec<VmSizeInfo> = self
                    .arm
                    .list("list the region's VM sizes", &path, COMPUTE_API)
                    .await?;
                // Azure's size list says nothing of GPUs: a GPU request
                // fits no size, and the pod's machine_type annotation is
                // how a pod gets a GPU size (as in the reference).
                Ok::<_, ProviderError>(
                    listed
                        .into_iter()
                        .map(|s| TypeSize {
                            name: s.name,
                            vcpus: s.number_of_cores,
                            memory_mib: s.memory_in_mb,
                            gpus: 0,
                        })
                        .collect(),
                )
            })
            .await?;
        Ok(sizes)
    }

    /// The VM size of `request`.
    async fn size_of(&self, request: &CreateRequest) -> Result<String, ProviderError> {
        let s = &self.settings;
        let sizes = if s.instance_sizes.is_empty() {
            &[][..]
        } else {
            self.sizes().await?
        };
        let size = select_instance_type(&request.spec, &s.instance_size, &s.instance_sizes, sizes)
            .map_err(ProviderError::permanent)?;
        if !is_arm_name(&size) {
            return Err(ProviderError::permanent(format!(
                "VM size {size:?} is not an Azure VM size name"
            )));
        }
        Ok(size)
    }

    /// The PUT body of `request`'s VM.
    fn vm_body(
        &self,
        request: &CreateRequest,
        size: &str,
        image: &str,
        user_data: &str,
    ) -> serde_json::Value {
        let s = &self.settings;
        let name = &request.instance_name;
        let mut tags: BTreeMap<String, String> = s.tags.iter().cloned().collect();
        for (k, v) in &request.tags {
            tags.insert(azure_tag_name(k), v.clone());
        }
        let image_reference = if is_community_image(image) {
            json!({ "communityGalleryImageId": image })
        } else {
            json!({ "id": image })
        };
        let mut managed_disk = json!({ "storageAccountType": "StandardSSD_LRS" });
        let mut os_disk = json!({
            "name": format!("{name}-disk"),
            "createOption": "FromImage",
            "deleteOption": "Delete",
        });
        if s.root_volume_size > 0 {
            os_disk["diskSizeGB"] = json!(s.root_volume_size);
        }
        let security_profile = if !s.disable_cvm {
            managed_disk["securityProfile"] =
                json!({ "securityEncryptionType": "VMGuestStateOnly" });
            Some(json!({
                "securityType": "ConfidentialVM",
                "uefiSettings": { "secureBootEnabled": s.secure_boot, "vTpmEnabled": true },
            }))
        } else if s.secure_boot {
            Some(json!({
                "securityType": "TrustedLaunch",
                "uefiSettings": { "secureBootEnabled": true, "vTpmEnabled": true },
            }))
        } else {
            None
        };
        os_disk["managedDisk"] = managed_disk;
        let mut ip_configuration = json!({
            "name": "ipconfig",
            "properties": { "primary": true, "subnet": { "id": s.subnet_id } },
        });
        if s.use_public_ip {
            ip_configuration["properties"]["publicIPAddressConfiguration"] = json!({
                "name": format!("{name}-ip"),
                "properties": { "deleteOption": "Delete", "publicIPAllocationMethod": "Static" },
                "sku": { "name": "Standard" },
            });
        }
        let mut nic = json!({
            "name": format!("{name}-net"),
            "properties": {
                "primary": true,
                "deleteOption": "Delete",
                "ipConfigurations": [ip_configuration],
            },
        });
        if let Some(nsg) = &s.nsg_id {
            nic["properties"]["networkSecurityGroup"] = json!({ "id": nsg });
        }
        let mut properties = json!({
            "hardwareProfile": { "vmSize": size },
            "storageProfile": { "imageReference": image_reference, "osDisk": os_disk },
            "osProfile": {
                "computerName": name,
                "adminUsername": s.ssh_username,
                "linuxConfiguration": {
                    "disablePasswordAuthentication": true,
                    "ssh": { "publicKeys": [{
                        "path": format!("/home/{}/.ssh/authorized_keys", s.ssh_username),
                        "keyData": s.ssh_public_key,
                    }] },
                },
            },
            "networkProfile": {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [nic],
            },
            "userData": user_data,
        });
        if let Some(security_profile) = security_profile {
            properties["securityProfile"] = security_profile;
        }
        json!({ "location": s.region, "tags": tags, "properties": properties })
    }

    /// The addresses of a ready VM: its primary NIC's private address, and
    /// with `--use-public-ip` its public one first.
    async fn addresses(&self, vm: &Vm) -> Result<Vec<IpAddr>, ProviderError> {
        let Some(nic_id) = vm.primary_nic().filter(|id| is_arm_id(id)) else {
            return Err(ProviderError::transient(format!(
                "Azure VM {}: no network interface yet",
                vm.name
            )));
        };
        let what = format!("get the network interface of VM {}", vm.name);
        let nic: Nic = self.arm.get(&what, nic_id, NETWORK_API).await?;
        let configs = &nic.properties.ip_configurations;
        let primary = configs
            .iter()
            .find(|c| c.properties.primary == Some(true))
            .or_else(|| configs.first());
        let private = primary
            .and_then(|c| c.properties.private_ip_address.as_deref())
            .and_then(|a| a.parse::<IpAddr>().ok());
        let mut ips = Vec::new();
        if self.settings.use_public_ip {
            let public_id = primary
                .and_then(|c| c.properties.public_ip_address.as_ref())
                .map(|r| r.id.as_str())
                .filter(|id| is_arm_id(id));
            let Some(public_id) = public_id else {
                return Err(ProviderError::transient(format!(
                    "Azure VM {}: no public IP address yet",
                    vm.name
                )));
            };
            let what = format!("get the public IP address of VM {}", vm.name);
            let public: PublicIp = self.arm.get(&what, public_id, NETWORK_API).await?;
            match public
                .properties
                .ip_address
                .as_deref()
                .and_then(|a| a.parse::<IpAddr>().ok())
            {
                Some(ip) => ips.push(ip),
                None => {
                    return Err(ProviderError::transient(format!(
                        "Azure VM {}: its public IP address has no address yet",
                        vm.name
                    )));
                }
            }
        }
        match private {
            Some(ip) => ips.push(ip),
            None => {
                return Err(ProviderError::transient(format!(
                    "Azure VM {}: no private address yet",
                    vm.name
                )));
            }
        }
        Ok(ips)
    }

    /// Makes `vm` (this token's) ready: waits out its provisioning,
    /// starts it if it is stopped, deletes it when it failed (the retry
    /// makes it anew), then reads its addresses.
    async fn adopt(&self, mut vm: Vm) -> Result<Instance, ProviderError> {
        let what = format!("create VM {}", vm.name);
        let id_path = vm.id_path()?;
        if vm.phase() == Phase::Provisioning {
            let url = self.arm.url(&id_path, COMPUTE_API);
            // No operation to follow: the VM's provisioningState.
            let waited = self
                .arm
                .wait(
                    &what,
                    &super::client::Answer::default(),
                    &url,
                    Lro::Put,
                    self.settings.poll_interval,
                )
                .await;
            vm = self.get_vm_by_id(&id_path, true).await?.ok_or_else(|| {
                ProviderError::transient(format!("Azure VM {}: gone while created", vm.name))
            })?;
            // A failed provisioning is handled from the VM itself below.
            if let Err(e) = waited
                && vm.phase() != Phase::Failed
            {
                return Err(e);
            }
        }
        match vm.phase() {
            Phase::Ready => {
                if vm.is_stopped() {
                    self.start(&vm, &id_path).await?;
                }
                let ips = self.addresses(&vm).await?;
                let mut instance = vm.to_instance(ips)?;
                instance.status = InstanceStatus::Running;
                Ok(instance)
            }
            Phase::Failed => self.discard_failed(&vm).await,
            Phase::Deleting => Err(ProviderError::transient(format!(
                "Azure VM {}: being deleted",
                vm.name
            ))),
            Phase::Provisioning => Err(ProviderError::transient(format!(
                "Azure VM {}: still provisioning",
                vm.name
            ))),
        }
    }

    /// Starts this token's stopped or deallocated VM (`POST …/start`) and
    /// waits for the operation.
    async fn start(&self, vm: &Vm, id_path: &str) -> Result<(), ProviderError> {
        let what = format!("start VM {}", vm.name);
        tracing::info!(vm = %vm.name, power = ?vm.power_state(), "starting a stopped pod VM");
        let url = self.arm.url(&format!("{id_path}/start"), COMPUTE_API);
        let answer = self
            .arm
            .send(&what, Method::Post, url, None, &[], &[])
            .await?;
        let resource = self.arm.url(id_path, COMPUTE_API);
        self.arm
            .wait(
                &what,
                &answer,
                &resource,
                Lro::Put,
                self.settings.poll_interval,
            )
            .await
    }

    /// Deletes this token's VM whose provisioning failed and waits until
    /// it is gone, so the retry's PUT makes it anew; the error carries
    /// Azure's failure code from the instance view.
    async fn discard_failed(&self, vm: &Vm) -> Result<Instance, ProviderError> {
        let failure = vm.failure();
        self.start_delete(vm).await?;
        if let (Ok(id_path), Some(vm_id)) = (vm.id_path(), vm.properties.vm_id.as_deref()) {
            self.wait_gone(&id_path, vm_id).await?;
        }
        let err = errors::from_operation(&format!("create VM {}", vm.name), "Failed", &failure);
        // Deleted: whatever the code, the retry makes a new VM.
        let retry = ProviderError::transient(format!("{}; deleted, to be made again", err.message));
        Err(match err.code {
            Some(code) => retry.with_code(code),
            None => retry,
        })
    }

    /// What a create does with the VM it found under its name: adopts it
    /// if it is this token's; waits if an earlier one is being deleted;
    /// refuses another token's.
    async fn take_over(&self, vm: Vm, request: &CreateRequest) -> Result<Instance, ProviderError> {
        if vm.token() == Some(request.token.as_str()) {
            return self.adopt(vm).await;
        }
        if vm.phase() == Phase::Deleting {
            return Err(ProviderError::transient(format!(
                "Azure VM {}: an earlier VM of this name is being deleted",
                vm.name
            )));
        }
        Err(ProviderError::permanent(format!(
            "Azure VM {} exists and was made for another create (token)",
            vm.name
        )))
    }

    /// Starts deleting `vm`, without waiting: a failed VM of a create, or
    /// one whose create ended `Failed`.
    async fn start_delete(&self, vm: &Vm) -> Result<(), ProviderError> {
        let url = self.arm.url(&vm.id_path()?, COMPUTE_API);
        self.arm
            .send(
                &format!("delete VM {}", vm.name),
                Method::Delete,
                url,
                None,
                &[],
                &[404],
            )
            .await
            .map(|_| ())
    }

    /// Waits until the VM at `arm_id` with `vm_id` answers 404 (or another
    /// VM holds its name).
    async fn wait_gone(&self, arm_id: &str, vm_id: &str) -> Result<(), ProviderError> {
        for _ in 0..120 {
            match self.get_vm_by_id(arm_id, false).await? {
                None => return Ok(()),
                Some(vm)
                    if vm.properties.vm_id.is_some()
                        && vm.properties.vm_id.as_deref() != Some(vm_id) =>
                {
                    return Ok(());
                }
                Some(_) => tokio::time::sleep(self.settings.poll_interval).await,
            }
        }
        Err(ProviderError::transient(format!(
            "Azure VM {arm_id}: still there after its delete"
        )))
    }

    async fn verify_image(&self) -> Result<(), ProviderError> {
        let s = &self.settings;
        let image = &s.image_id;
        let (path, api) = if is_community_image(image) {
            // /CommunityGalleries/{g}/Images/{i}/Versions/{v} is read at
            // the region's communityGalleries endpoint.
            let parts: Vec<&str> = image[1..].split('/').collect();
            if parts.len() != 6 {
                return Err(ProviderError::config(format!(
                    "--imageid (AZURE_IMAGE_ID): {image} is not \
                     /CommunityGalleries/<gallery>/Images/<image>/Versions/<version>"
                )));
            }
            (
                format!(
                    "/subscriptions/{}/providers/Microsoft.Compute/locations/{}/communityGalleries/{}/images/{}/versions/{}",
                    s.subscription_id, s.region, parts[1], parts[3], parts[5]
                ),
                GALLERY_API,
            )
        } else if image.to_ascii_lowercase().contains("/galleries/") {
            (image.clone(), GALLERY_API)
        } else {
            (image.clone(), COMPUTE_API)
        };
        self.arm
            .get::<serde_json::Value>("get the pod VM image", &path, api)
            .await
            .map(drop)
            .map_err(|e| {
                e.missing_is_config("--imageid (AZURE_IMAGE_ID)", format_args!("image {image}"))
            })
    }
}

impl Vm {
    /// The VM's ARM id, checked before it becomes a URL path.
    fn id_path(&self) -> Result<String, ProviderError> {
        if is_arm_id(&self.id) {
            Ok(self.id.clone())
        } else {
            Err(ProviderError::transient(format!(
                "Azure VM {}: an id that is not an ARM id",
                self.name
            )))
        }
    }
}

#[async_trait]
impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn paces_requests(&self) -> bool {
        true
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        let name = &request.instance_name;
        if !is_arm_name(name) {
            return Err(ProviderError::permanent(format!(
                "Instance name {name:?} cannot name an Azure VM"
            )));
        }
        let user_data = base64::engine::general_purpose::STANDARD.encode(&request.user_data);
        if user_data.len() > MAX_USER_DATA_BASE64 {
            return Err(ProviderError::permanent(format!(
                "The user data is {} bytes in base64, above Azure's limit of {MAX_USER_DATA_BASE64}",
                user_data.len()
            )));
        }
        let image = request
            .spec
            .image
            .as_deref()
            .filter(|i| !i.is_empty())
            .unwrap_or(&self.settings.image_id);
        if !is_arm_id(image) {
            return Err(ProviderError::permanent(format!(
                "Image {image:?} is not an Azure image id"
            )));
        }
        // A create that may have reached ARM before (a retry, a recovery)
        // looks the name up first: its VM is adopted without a PUT (which
        // would only be refused 412 and spend the VM-create budget), and
        // before the size is chosen (a changed allow-list must not fail
        // the recovery of a VM that exists).
        if request.earlier_attempt
            && let Some(vm) = self.get_vm(name, true).await?
        {
            return self.take_over(vm, request).await;
        }
        let size = self.size_of(request).await?;
        let body = self.vm_body(request, &size, image, &user_data);
        let body = serde_json::to_vec(&body)
            .map_err(|e| ProviderError::permanent(format!("the VM's body: {e}")))?;
        let url = self.arm.url(&self.vm_path(name), COMPUTE_API);
        let what = format!("create VM {name}");
        // `If-None-Match: *`: ARM's PUT is create-or-replace; this makes it
        // create-only, so a retry (or another token's create under the
        // same name) never rewrites a VM: it is answered 412 and the VM is
        // looked up instead.
        for _ in 0..3 {
            let sent = self
                .arm
                .send(
                    &what,
                    Method::Put,
                    url.clone(),
                    Some(body.clone()),
                    &[("if-none-match", "*")],
                    &[412],
                )
                .await;
            match sent {
                Ok(answer) if answer.status == 412 => {
                    if let Some(vm) = self.get_vm(name, true).await? {
                        return self.take_over(vm, request).await;
                    }
                }
                Ok(answer) => {
                    crate::failpoints::hit(crate::failpoints::AZURE_PUT_BEFORE_WAIT);
                    let waited = self
                        .arm
                        .wait(&what, &answer, &url, Lro::Put, self.settings.poll_interval)
                        .await;
                    if let Err(e) = waited {
                        // A failed operation leaves a Failed VM: delete
                        // it and wait until it is gone, so the retry's PUT
                        // makes it anew. A poll that failed leaves it
                        // findable by name for the retry.
                        if let Some(vm) = self.get_vm(name, false).await?
                            && vm.phase() == Phase::Failed
                            && vm.token() == Some(request.token.as_str())
                        {
                            self.start_delete(&vm).await?;
                            if let (Ok(path), Some(vm_id)) =
                                (vm.id_path(), vm.properties.vm_id.as_deref())
                            {
                                self.wait_gone(&path, vm_id).await?;
                            }
                        }
                        return Err(e);
                    }
                    // The PUT's answer is the VM (its id, vmId, tags and,
                    // if ARM had made it yet, its NIC), and the operation
                    // says it succeeded: no GET unless something is missing.
                    let vm = match answer.parse::<Vm>(&what) {
                        Ok(mut vm)
                            if vm.properties.vm_id.is_some() && vm.primary_nic().is_some() =>
                        {
                            vm.properties.provisioning_state = Some("Succeeded".into());
                            vm
                        }
                        _ => self.get_vm(name, true).await?.ok_or_else(|| {
                            ProviderError::transient(format!("Azure VM {name}: gone once created"))
                        })?,
                    };
                    return self.adopt(vm).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::transient(format!(
            "Azure VM {name}: exists and vanishes by turns; try again"
        )))
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        let Some((arm_id, vm_id)) = parse_instance_id(instance_id) else {
            // Not an id this provider makes: nothing of ours to delete.
            return Ok(());
        };
        let Some(vm) = self.get_vm_by_id(arm_id, false).await? else {
            return Ok(());
        };
        if vm.properties.vm_id.is_none() {
            return Err(ProviderError::transient(format!(
                "Azure VM {}: the answer has no vmId; cannot tell it is the one to delete",
                vm.name
            )));
        }
        if vm.properties.vm_id.as_deref() != Some(vm_id) {
            // Another VM (a later generation) holds the name: ours is gone.
            return Ok(());
        }
        if vm.phase() != Phase::Deleting {
            let what = format!("delete VM {}", vm.name);
            let url = self.arm.url(arm_id, COMPUTE_API);
            let answer = self
                .arm
                .send(&what, Method::Delete, url.clone(), None, &[], &[404])
                .await?;
            if answer.status == 202 || answer.status == 200 {
                self.arm
                    .wait(
                        &what,
                        &answer,
                        &url,
                        Lro::Delete,
                        self.settings.poll_interval,
                    )
                    .await?;
            }
        }
        // The NIC, the disk and the public IP go with the VM
        // (deleteOption: Delete); the record goes only once ARM says 404.
        self.wait_gone(arm_id, vm_id).await
    }

    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        if !is_arm_name(name) {
            return Ok(None);
        }
        let Some(vm) = self.get_vm(name, true).await? else {
            return Ok(None);
        };
        if vm.token() != Some(token) {
            return Ok(None);
        }
        match vm.phase() {
            Phase::Deleting => Ok(None),
            // Stopped: reported so, without addresses; the create starts it.
            Phase::Ready if vm.is_stopped() => vm.to_instance(Vec::new()).map(Some),
            Phase::Ready => match self.addresses(&vm).await {
                Ok(ips) => vm.to_instance(ips).map(Some),
                // Found before its address (or its NIC): the create adopts it.
                Err(e) if matches!(e.class, ErrorClass::Transient | ErrorClass::NotFound) => {
                    vm.to_instance(Vec::new()).map(Some)
                }
                Err(e) => Err(e),
            },
            Phase::Provisioning | Phase::Failed => vm.to_instance(Vec::new()).map(Some),
        }
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        // ARM's VM listing has no tag filter (the generic resources
        // listing has one, but answers no provisioning state): the
        // resource group's VMs are listed page by page, and filtered here.
        let path = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
            self.settings.subscription_id, self.settings.resource_group
        );
        let vms: Vec<Vm> = self
            .arm
            .list("list the resource group's VMs", &path, COMPUTE_API)
            .await?;
        let mut found = Vec::new();
        for vm in vms {
            if vm.phase() == Phase::Deleting || vm.tag(key) != Some(value) {
                continue;
            }
            // A VM without a vmId cannot be deleted safely: skipped.
            if let Ok(instance) = vm.to_instance(Vec::new()) {
                found.push(instance);
            }
        }
        Ok(found)
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        let s = &self.settings;
        let sizes = self.sizes().await?;
        for size in std::iter::once(&s.instance_size).chain(&s.instance_sizes) {
            if !sizes.iter().any(|t| t.name.eq_ignore_ascii_case(size)) {
                let (flag, env) = if *size == s.instance_size {
                    ("instance-size", "AZURE_INSTANCE_SIZE")
                } else {
                    ("instance-sizes", "AZURE_INSTANCE_SIZES")
                };
                return Err(ProviderError::config(format!(
                    "--{flag} ({env}): VM size {size} is not offered in region {}",
                    s.region
                )));
            }
        }
        self.verify_image().await?;
        self.arm
            .get::<serde_json::Value>("get the subnet", &s.subnet_id, NETWORK_API)
            .await
            .map(drop)
            .map_err(|e| {
                e.missing_is_config(
                    "--subnetid (AZURE_SUBNET_ID)",
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
    fn instance_ids_carry_the_vm_id_and_only_vm_ids_parse() {
        let arm_id = "/subscriptions/s-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/podvm-a";
        let id = instance_id(arm_id, "0f6b2c1e-4d3a");
        assert_eq!(parse_instance_id(&id), Some((arm_id, "0f6b2c1e-4d3a")));
        for bad in [
            arm_id,
            "",
            "#x",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n#x",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/../x#y",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/a#y/z",
        ] {
            assert_eq!(parse_instance_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn podvisor_tags_round_trip_through_azure_names() {
        assert_eq!(azure_tag_name("podvisor.io/node"), "podvisor.io_node");
        assert_eq!(azure_tag_name("team"), "team");
        let azure: BTreeMap<String, String> = [
            ("podvisor.io_token".to_owned(), "t".to_owned()),
            ("team".to_owned(), "a".to_owned()),
        ]
        .into();
        let back = podvisor_tags(&azure);
        assert_eq!(back.get(TAG_TOKEN).map(String::as_str), Some("t"));
        assert_eq!(back.get("team").map(String::as_str), Some("a"));
    }

    #[test]
    fn azure_times_parse() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(
            parse_time("2024-05-01T12:00:00.1234567+00:00"),
            Some(1_714_564_800_123)
        );
        assert_eq!(parse_time("yesterday"), None);
    }
}
