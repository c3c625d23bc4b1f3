//! The Azure test server (feature `conformance`): one HTTPS listener on
//! 127.0.0.1 that answers the wire protocol of what the `azure` provider
//! calls — Microsoft Entra ID's token endpoint (client secret and federated
//! workload identity) and Azure Resource Manager (ARM) for Compute (virtual
//! machines, their asynchronous operations, VM sizes, images, disks) and
//! Network (network interfaces, public IP addresses, subnets) — all on one
//! base URL, with a throwaway CA whose PEM is [`AzureServer::ca_file`].
//!
//! Microsoft's official Python SDK (`azure-identity`, `azure-mgmt-compute`,
//! `azure-mgmt-network`) drives it in `providers/tests/azure_sdk.py`: MSAL's
//! authority discovery and token request, the SDK's own long-running
//! operation poller and pager, and its error mapping all take its answers.
//!
//! # What it emulates, and where each wire fact comes from
//!
//! - **Entra ID** (Microsoft Learn: "Microsoft identity platform and the OAuth
//!   2.0 client credentials flow", "OpenID Connect on the Microsoft identity
//!   platform", "Microsoft Entra authentication and authorization error
//!   codes"): `POST /{tenant}/oauth2/v2.0/token` with `client_credentials`
//!   and either `client_secret` or a `client_assertion` of type
//!   `urn:ietf:params:oauth:client-assertion-type:jwt-bearer` ("Workload
//!   identity federation"); `GET /{tenant}/v2.0/.well-known/openid-configuration`,
//!   which MSAL (Python) reads before its first token request when instance
//!   discovery is disabled. Refusals carry the documented `AADSTS` codes:
//!   90002 (unknown tenant, 400 `invalid_request`; 400 `invalid_tenant` on
//!   discovery), 700016 (unknown client, 400 `unauthorized_client`), 7000215
//!   (wrong secret, 401 `invalid_client`), 7000216 (no credential, 401
//!   `invalid_client`), 900144 (missing parameter, 400 `invalid_request`),
//!   1002012 (a client-credentials scope without `/.default`, 400
//!   `invalid_scope`), 70003 (another grant, 400 `unsupported_grant_type`).
//! - **ARM's common protocol** (Microsoft Learn: "Azure Resource Manager
//!   request limits and throttling", "Troubleshoot API throttling errors",
//!   "Resolve resource not found errors", "Troubleshoot common Azure
//!   deployment errors"; the `Azure/azure-resource-manager-rpc` repository:
//!   "Asynchronous operations", "Common API details"): the `api-version` query
//!   parameter (`MissingApiVersionParameter`, `InvalidApiVersionParameter`);
//!   `Authorization: Bearer` (401 `AuthenticationFailed`,
//!   `InvalidAuthenticationToken`, `ExpiredAuthenticationToken`,
//!   `InvalidAuthenticationTokenAudience`, with `WWW-Authenticate`); error
//!   bodies `{"error":{"code","message"[,"target"]}}`; 404
//!   `ResourceNotFound` with its `aka.ms/ARMResourceNotFoundFix` message,
//!   `ResourceGroupNotFound`, `SubscriptionNotFound`; 204 for deleting what
//!   does not exist; `x-ms-request-id`, `x-ms-correlation-request-id` (the
//!   client's when it sent one), `x-ms-routing-request-id`, and the
//!   `x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}` headers;
//!   `Location`/`Azure-AsyncOperation`/`Retry-After` of long-running
//!   operations; `nextLink` paging (the link carries `api-version`, as ARM's
//!   do); resource names and types matched case-insensitively, echoed in
//!   the case they were created with; 415 `UnsupportedMediaType` for a PUT
//!   body that is not JSON.
//! - **Compute (CRP)** (Microsoft Learn REST reference "Virtual Machines -
//!   Create Or Update / Get / List / Delete / Start / Instance View",
//!   "Virtual Machine Sizes - List",
//!   "Images - Get", "Gallery Image Versions - Get", "Disks - Get"; "User
//!   Data for Azure Virtual Machine"; "Delete a VM and its attached
//!   resources"; "Troubleshoot API throttling errors" for the
//!   `x-ms-ratelimit-remaining-resource` buckets `PutVM3Min`/`PutVM30Min`,
//!   `DeleteVM3Min`/`DeleteVM30Min`, `LowCostGet3Min`/`LowCostGet30Min`,
//!   `HighCostGet3Min`/`HighCostGet30Min`, `GetOperation3Min`/`GetOperation30Min`
//!   and for CRP's throttling body, which has no `error` wrapper): a create
//!   answers 201 with `provisioningState: Creating` and
//!   `Azure-AsyncOperation`; an update 200; a delete 202 with both
//!   `Azure-AsyncOperation` and `Location` (`monitor=true`); the operation
//!   answers `{"startTime","status":"InProgress","name"}` then
//!   `Succeeded`/`Failed` with `endTime` (and `error`). The VM's NIC, OS disk
//!   and public IP are created with it and deleted with it when their
//!   `deleteOption` is `Delete`, kept (detached) when it is `Detach` or
//!   absent (CRP's default). `userData` must be base64 and at most 87380
//!   characters (64 KB, "User Data for Azure Virtual Machine"; 87380 is the
//!   base64 length of 65535 bytes and the limit CRP quotes for `customData`
//!   in "Custom data in OSProfile must be in Base64 encoding and with a
//!   maximum length of 87380 characters"). GET omits `userData` unless
//!   `$expand=userData`; `$expand=instanceView` adds the instance view, and
//!   `GET …/virtualMachines/{name}/instanceView` answers it alone.
//! - **Power states** (Microsoft Learn: "States and billing status of Azure
//!   Virtual Machines"; REST "Virtual Machines - Start", "Disks - Get" for
//!   `diskState`): the instance view's `statuses` hold
//!   `ProvisioningState/{state}` and `PowerState/{power}` (`displayStatus`
//!   `VM {power}`, level `Info`): `starting` while the VM is created or
//!   started, `running` once it is, `stopping` while it is deleted, and
//!   `stopped` or `deallocated` as a test sets them
//!   ([`AzureServer::set_power_state`]). `POST …/virtualMachines/{name}/start`
//!   answers 202 with `Azure-AsyncOperation` and `Location`; the VM is
//!   `Updating` until the operation ends `Succeeded` and it is `running`. A
//!   stopped or deallocated VM keeps its NIC, private address, disk and
//!   (static) public IP; a deallocated VM's OS disk is `Reserved`.
//! - **Errors seen from the real services** (public issue reports quoting
//!   CRP's answers, not Microsoft Learn pages): a missing managed image is
//!   404 `NotFound` "The Image '…' cannot be found in '…' region."; a missing
//!   gallery image version 404 `GalleryImageNotFound` (target
//!   `imageReference`); an unknown size 400 `InvalidParameter` (target
//!   `vmSize`); `If-None-Match: *` on an existing VM 412 `PreconditionFailed`
//!   (the code CRP uses for conditional-header failures); a PUT on a VM being
//!   deleted 409 `OperationNotAllowed` "… since the VM is marked for deletion.
//!   You can only retry the Delete operation (or wait for an ongoing one to
//!   complete)."; an operation overtaken by a later PUT or DELETE on the same
//!   VM ends `Failed` with `OperationPreempted` "Operation execution has been
//!   preempted by a more recent operation."; a subnet or security group that
//!   does not exist 400 `InvalidResourceReference` (NRP).
//!
//! Guessed (no source found; shaped like their neighbours): the messages of
//! `PreconditionFailed` and of `userData` refusals; the status (`Failed`) of a
//! preempted operation; 400 (not 401) for a federated assertion that matches
//! no federated credential (AADSTS700211); 404 `OperationNotFound` for an
//! unknown operation id; the operation name `start` in the 409
//! `OperationNotAllowed` of a start of a VM being deleted (CRP names its
//! operations so, as in "Operation 'powerOff' is not allowed on VM …"); a
//! start of a running VM (or one being created) accepted with an operation
//! that has already succeeded; the VM `Updating` while it starts.
//!
//! # What the real cloud does over time, scripted
//!
//! Operations end after a number of reads *and* a time
//! ([`AzureServer::set_provisioning`], [`AzureServer::set_deleting`]);
//! creates can be made to fail ([`AzureServer::fail_next_creates`]); VMs
//! stop or are deallocated ([`AzureServer::set_power_state`]); listing
//! pages ([`AzureServer::set_max_page`]); tokens expire
//! ([`AzureServer::set_token_ttl`]); any route can fail
//! ([`AzureServer::fault`]).
//!
//! # What it does not emulate
//!
//! Anything not listed above: no other resource types or PUTs of NICs,
//! disks, IPs or networks (they exist only as a VM's), no power actions but
//! start (no deallocate, power off, restart, redeploy or hibernate requests:
//! tests set a VM stopped or deallocated with
//! [`AzureServer::set_power_state`], at once, with no `stopping` or
//! `deallocating` on the way and no `Updating`), no dynamic public IPs
//! (released on deallocation on Azure; here every IP is static), no
//! availability zones, no extensions, no ETag /
//! `If-Match`, no tag limits, no validation of SSH keys, passwords or of
//! `securityProfile` (stored and echoed as sent), no quota or capacity
//! errors (script them with [`AzureServer::fault`]), no signature checks on
//! tokens or assertions (they are compared as strings), no continuous
//! access evaluation challenges, no throttling of its own, no token check on
//! routes it does not know (they are 404 at once), and no resource groups
//! but the options' one for VMs and what they make (images and the subnet
//! are found by their whole id, wherever it points).
//!
//! Nothing here connects anywhere: the server only listens, on 127.0.0.1,
//! and hands out NIC and public addresses from pools of loopback addresses.

use crate::https_test_server::{TestServer, TestServerThread};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// The Entra tenant (directory) the server knows.
pub const TEST_TENANT_ID: &str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
/// The application (client) id of the service principal the server knows.
pub const TEST_CLIENT_ID: &str = "8c3b5a1e-2d4f-4e6a-9b7c-1d2e3f4a5b6c";
/// The service principal's valid client secret; tests grep logs for it.
pub const TEST_CLIENT_SECRET: &str = "azure-test-secret-never-logged";
/// The one subscription.
pub const TEST_SUBSCRIPTION_ID: &str = "0b1f6471-1bf0-4dda-aec3-5f2e1c0d9a87";
/// The valid federated token (workload identity's `client_assertion`),
/// shaped as the projected service account token it stands for.
pub const TEST_FEDERATED_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InBvZHZpc29yLXRlc3QiLCJ0eXAiOiJKV1QifQ.eyJhdWQiOiJhcGk6Ly9BenVyZUFEVG9rZW5FeGNoYW5nZSIsImlzcyI6Imh0dHBzOi8vb2lkYy5wb2R2aXNvci50ZXN0L2NsdXN0ZXIiLCJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y29uZmlkZW50aWFsLWNvbnRhaW5lcnMtc3lzdGVtOnBvZHZpc29yIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJlLW5vdC1jaGVja2Vk";

/// The `client_assertion_type` of a federated credential.
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The longest `userData` (base64 characters) CRP takes.
const MAX_USER_DATA: usize = 87_380;
/// The audiences ARM accepts in a token (with or without the trailing
/// slash); the server's own URL is accepted too.
const ARM_AUDIENCES: [&str; 2] = [
    "https://management.azure.com",
    "https://management.core.windows.net",
];

/// A VM size the server offers in its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSize {
    /// Its name, such as `Standard_D2as_v5`.
    pub name: String,
    /// Virtual CPUs (`numberOfCores`).
    pub cores: u32,
    /// Memory, MiB (`memoryInMB`).
    pub memory_mib: u64,
}

impl VmSize {
    /// A size named `name`.
    pub fn new(name: &str, cores: u32, memory_mib: u64) -> Self {
        Self {
            name: name.into(),
            cores,
            memory_mib,
        }
    }
}

/// What the server holds at start.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The NICs' private addresses, handed out in order (tests pass loopback
    /// ones, so a pod VM's forwarder can bind them).
    pub addresses: Vec<Ipv4Addr>,
    /// The public IP addresses, handed out in order.
    pub public_addresses: Vec<Ipv4Addr>,
    /// The one region, such as `eastus`.
    pub region: String,
    /// The resource group VMs (and their NICs, disks, IPs) live in.
    pub resource_group: String,
    /// The VM sizes of the region.
    pub sizes: Vec<VmSize>,
    /// The ARM ids of the images that exist: managed images
    /// (`…/Microsoft.Compute/images/{name}`), gallery image versions
    /// (`…/galleries/{g}/images/{i}/versions/{v}`) or community gallery
    /// image ids (`/CommunityGalleries/…`, usable in a create only).
    pub images: Vec<String>,
    /// The one subnet's ARM id.
    pub subnet_id: String,
    /// The ARM ids of the network security groups that exist.
    pub nsg_ids: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        let rg = format!("/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/podvisor-test-rg");
        Self {
            addresses: (2..=250).map(|n| Ipv4Addr::new(127, 23, 0, n)).collect(),
            public_addresses: (2..=250).map(|n| Ipv4Addr::new(127, 24, 0, n)).collect(),
            region: "eastus".into(),
            resource_group: "podvisor-test-rg".into(),
            sizes: vec![
                VmSize::new("Standard_D2as_v5", 2, 8192),
                VmSize::new("Standard_D4as_v5", 4, 16384),
                VmSize::new("Standard_DC2as_v5", 2, 8192),
                VmSize::new("Standard_DC4as_v5", 4, 16384),
                VmSize::new("Standard_B1s", 1, 1024),
            ],
            images: vec![
                format!("{rg}/providers/Microsoft.Compute/images/podvm-image"),
                format!(
                    "{rg}/providers/Microsoft.Compute/galleries/podvm/images/podvm/versions/1.0.0"
                ),
            ],
            subnet_id: format!(
                "{rg}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default"
            ),
            nsg_ids: vec![format!(
                "{rg}/providers/Microsoft.Network/networkSecurityGroups/podvisor-test-nsg"
            )],
        }
    }
}

/// A route of the server, for faults and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// `POST /{tenant}/oauth2/v2.0/token` (Entra ID).
    Token,
    /// `GET /{tenant}/v2.0/.well-known/openid-configuration` (Entra ID).
    OpenIdConfiguration,
    /// `PUT …/Microsoft.Compute/virtualMachines/{name}`.
    PutVm,
    /// `GET …/Microsoft.Compute/virtualMachines/{name}`.
    GetVm,
    /// `GET …/Microsoft.Compute/virtualMachines` (in the resource group or
    /// the subscription).
    ListVms,
    /// `DELETE …/Microsoft.Compute/virtualMachines/{name}`.
    DeleteVm,
    /// `POST …/Microsoft.Compute/virtualMachines/{name}/start`.
    StartVm,
    /// `GET …/Microsoft.Compute/virtualMachines/{name}/instanceView`.
    GetVmInstanceView,
    /// `GET …/locations/{region}/operations/{id}` (the `Azure-AsyncOperation`
    /// URL).
    OperationStatus,
    /// `GET …/locations/{region}/operations/{id}?monitor=true` (the
    /// `Location` URL).
    OperationResult,
    /// `GET …/Microsoft.Network/networkInterfaces/{name}`.
    GetNic,
    /// `GET …/Microsoft.Network/publicIPAddresses/{name}`.
    GetPublicIp,
    /// `GET …/Microsoft.Compute/disks/{name}`.
    GetDisk,
    /// `GET …/locations/{region}/vmSizes`.
    ListSizes,
    /// `GET` of a managed image or a gallery image version.
    GetImage,
    /// `GET …/virtualNetworks/{vnet}/subnets/{name}`.
    GetSubnet,
    /// Anything else: 404 (`InvalidResourceType` under `/subscriptions`,
    /// `NotFound` elsewhere), before any token check.
    Other,
}

/// The body shape of a scripted error ([`Fault::Status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// ARM's `{"error":{"code","message"}}`.
    Arm,
    /// `{"code","message"}` without the wrapper: CRP's throttling answer.
    Bare,
}

/// A scripted failure of a route ([`AzureServer::fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with an error body carrying `code` in `shape` (on the
    /// Entra routes always Entra's `{"error": code, "error_description"}`),
    /// and `Retry-After: retry_after` (seconds) when given.
    Status {
        /// The HTTP status.
        status: u16,
        /// The error code in the body.
        code: String,
        /// The `Retry-After` header, seconds.
        retry_after: Option<u64>,
        /// The body's shape.
        shape: ErrorShape,
    },
    /// Do the work (create the VM, start the delete…), then answer 502 with
    /// an empty body: an answer lost on the way.
    DropAnswer,
    /// Close the connection without an answer and without doing the work.
    Close,
}

/// A VM as the server holds it (for tests' assertions).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerVm {
    /// Its name, as created.
    pub name: String,
    /// Its ARM id.
    pub id: String,
    /// Its tags (the last PUT's).
    pub tags: BTreeMap<String, String>,
    /// `Creating`, `Updating`, `Succeeded`, `Failed` or `Deleting`.
    pub provisioning_state: String,
    /// Its power state as the instance view shows it (`PowerState/…`
    /// without the prefix): `starting`, `running`, `stopping`, `stopped` or
    /// `deallocated`; `None` when provisioning `Failed`.
    pub power_state: Option<String>,
    /// Its size.
    pub size: String,
    /// Its `userData`, base64 as sent.
    pub user_data: Option<String>,
    /// Its primary NIC's private address.
    pub private_ip: Ipv4Addr,
    /// Its public address, when it has one.
    pub public_ip: Option<Ipv4Addr>,
    /// Its primary NIC's name.
    pub nic: String,
    /// Its OS disk's name.
    pub os_disk: String,
    /// The body of the last accepted PUT.
    pub body: Value,
}

/// One VM and what drives it.
#[derive(Debug, Clone)]
struct HeldVm {
    name: String,
    vm_id: String,
    tags: BTreeMap<String, String>,
    provisioning_state: String,
    /// Its power state once no create, start or delete is under way.
    power: Power,
    size: String,
    user_data: Option<String>,
    body: Value,
    /// Keys (lowercase names) of its NIC, OS disk, public IP.
    nic: String,
    disk: String,
    public_ip: Option<String>,
    /// Whether each goes with the VM (`deleteOption: Delete`).
    nic_delete: bool,
    disk_delete: bool,
    ip_delete: bool,
    created: SystemTime,
    /// The operation in progress on it.
    op: Option<String>,
    seq: u64,
}

#[derive(Debug, Clone)]
struct HeldNic {
    name: String,
    address: Ipv4Addr,
    ipconfig: String,
    subnet: String,
    nsg: Option<String>,
    public_ip: Option<String>,
    /// The VM it is attached to (key).
    vm: Option<String>,
}

#[derive(Debug, Clone)]
struct HeldDisk {
    name: String,
    size_gb: u64,
    sku: String,
    image: Value,
    vm: Option<String>,
    created: SystemTime,
}

#[derive(Debug, Clone)]
struct HeldIp {
    name: String,
    address: Ipv4Addr,
    /// The NIC it is attached to (key).
    nic: Option<String>,
}

/// A VM's power state when nothing is under way (`PowerState/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    Running,
    Stopped,
    Deallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Create,
    Update,
    Delete,
    Start,
}

/// An asynchronous operation.
#[derive(Debug, Clone)]
struct Operation {
    kind: OpKind,
    /// The VM's key.
    vm: String,
    start: SystemTime,
    started: Instant,
    /// Reads answered so far.
    reads: u32,
    /// Reads that must be answered `InProgress` first.
    need_reads: u32,
    /// The time it takes at least.
    need_time: Duration,
    /// The scripted failure it ends with.
    failure: Option<(String, String)>,
    /// `None` while in progress; `Some(None)` succeeded; `Some(Some(error))`
    /// failed.
    outcome: Option<Option<(String, String)>>,
    end: Option<SystemTime>,
}

/// Everything the server holds, under one lock.
#[derive(Debug)]
struct State {
    vms: BTreeMap<String, HeldVm>,
    nics: BTreeMap<String, HeldNic>,
    disks: BTreeMap<String, HeldDisk>,
    ips: BTreeMap<String, HeldIp>,
    ops: HashMap<String, Operation>,
    next_seq: u64,
    free_private: Vec<Ipv4Addr>,
    free_public: Vec<Ipv4Addr>,
    /// Token → (expiry, audience).
    tokens: HashMap<String, (SystemTime, String)>,
    tokens_issued: usize,
    token_ttl: Duration,
    provisioning: (u32, Duration),
    deleting: (u32, Duration),
    lro_retry_after: Option<u64>,
    failing_creates: Option<(u32, String, String)>,
    max_page: usize,
    ratelimit_remaining: Option<u32>,
    faults: HashMap<Route, (Fault, usize)>,
    counts: BTreeMap<Route, usize>,
    put_bodies: Vec<Value>,
}

/// What the connection tasks share.
#[derive(Debug)]
struct Shared {
    options: ServerOptions,
    /// `https://127.0.0.1:PORT`.
    url: String,
    state: Mutex<State>,
    /// Whether long-running operations' first answers leave out
    /// `Azure-AsyncOperation` ([`AzureServer::set_async_operation_header`]).
    no_async_operation: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The Azure test server: Entra ID and ARM on one HTTPS base URL on
/// 127.0.0.1. It runs on its own thread with its own Tokio runtime, so sync
/// and async tests (and daemons the test spawns) can use it; dropping it
/// stops it.
pub struct AzureServer {
    shared: Arc<Shared>,
    server: TestServerThread,
}

impl fmt::Debug for AzureServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureServer")
            .field("url", &self.url())
            .field("ca_file", &self.ca_file())
            .field("vms", &self.shared.lock().vms.len())
            .finish_non_exhaustive()
    }
}

impl AzureServer {
    /// Starts a server holding `options`' resources, on a free port of
    /// 127.0.0.1, with a new CA. Panics (a test helper) when it cannot.
    pub fn start(options: ServerOptions) -> Self {
        let bound = TestServer::bind("podvisor Azure test CA");
        let shared = Arc::new(Shared {
            url: bound.url(),
            no_async_operation: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                vms: BTreeMap::new(),
                nics: BTreeMap::new(),
                disks: BTreeMap::new(),
                ips: BTreeMap::new(),
                ops: HashMap::new(),
                next_seq: 0,
                free_private: options.addresses.clone(),
                free_public: options.public_addresses.clone(),
                tokens: HashMap::new(),
                tokens_issued: 0,
                token_ttl: Duration::from_secs(3600),
                provisioning: (1, Duration::ZERO),
                deleting: (1, Duration::ZERO),
                lro_retry_after: None,
                failing_creates: None,
                max_page: 100,
                ratelimit_remaining: Some(1199),
                faults: HashMap::new(),
                counts: BTreeMap::new(),
                put_bodies: Vec::new(),
            }),
            options,
        });
        let serving = shared.clone();
        let server = bound.spawn("azure-test-server", move |request, close| {
            handle(serving.clone(), close, request)
        });
        Self { shared, server }
    }

    /// The base URL of Entra ID (the authority host) and of ARM (the
    /// resource manager endpoint): `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The PEM of the CA the server's certificate is issued by.
    pub fn ca_file(&self) -> PathBuf {
        self.server.ca_file()
    }

    /// The options the server was started with.
    pub fn options(&self) -> &ServerOptions {
        &self.shared.options
    }

    /// The `podvisor azure` command line of a provider on this server: the
    /// subcommand, then the test service principal, subscription, the
    /// options' region, resource group, subnet and first image, size
    /// `Standard_D2as_v5`, this server as authority host and resource manager
    /// endpoint, its CA, and a 50 ms poll interval. A test adds or replaces
    /// flags after it.
    pub fn flags(&self) -> Vec<String> {
        let o = &self.shared.options;
        let url = self.url();
        let mut args: Vec<String> = vec!["azure".into()];
        for (flag, value) in [
            ("--clientid", TEST_CLIENT_ID.to_owned()),
            ("--secret", TEST_CLIENT_SECRET.to_owned()),
            ("--tenantid", TEST_TENANT_ID.to_owned()),
            ("--subscriptionid", TEST_SUBSCRIPTION_ID.to_owned()),
            ("--region", o.region.clone()),
            ("--resourcegroup", o.resource_group.clone()),
            ("--subnetid", o.subnet_id.clone()),
            ("--imageid", o.images.first().cloned().unwrap_or_default()),
            ("--instance-size", "Standard_D2as_v5".into()),
            ("--authority-host", url.clone()),
            ("--resource-manager-endpoint", url),
            ("--ca-bundle", self.ca_file().display().to_string()),
            ("--poll-interval", "50ms".into()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        args
    }

    /// The next `times` requests to `route` get `fault` (before any other
    /// handling, authentication included). Replaces the route's earlier
    /// fault.
    pub fn fault(&self, route: Route, fault: Fault, times: usize) {
        self.shared.lock().faults.insert(route, (fault, times));
    }

    /// Requests to `route` so far (faulted ones included).
    pub fn count(&self, route: Route) -> usize {
        self.shared.lock().counts.get(&route).copied().unwrap_or(0)
    }

    /// Requests so far, by route.
    pub fn counts(&self) -> BTreeMap<Route, usize> {
        self.shared.lock().counts.clone()
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        self.shared.lock().counts.clear();
    }

    /// Every VM not yet gone (`Deleting` ones included), oldest first, as a
    /// read would show them now (operations whose time has come end).
    pub fn vms(&self) -> Vec<ServerVm> {
        let mut state = self.shared.lock();
        settle(&mut state);
        let mut held: Vec<&HeldVm> = state.vms.values().collect();
        held.sort_by_key(|v| v.seq);
        held.iter()
            .map(|v| server_vm(&self.shared.options, &state, v))
            .collect()
    }

    /// The names of the NICs that exist.
    pub fn nics(&self) -> Vec<String> {
        let mut state = self.shared.lock();
        settle(&mut state);
        state.nics.values().map(|n| n.name.clone()).collect()
    }

    /// The names of the disks that exist.
    pub fn disks(&self) -> Vec<String> {
        let mut state = self.shared.lock();
        settle(&mut state);
        state.disks.values().map(|d| d.name.clone()).collect()
    }

    /// The names of the public IP addresses that exist.
    pub fn public_ips(&self) -> Vec<String> {
        let mut state = self.shared.lock();
        settle(&mut state);
        state.ips.values().map(|i| i.name.clone()).collect()
    }

    /// The JSON bodies of the accepted VM PUTs (creates and updates), in
    /// order.
    pub fn put_bodies(&self) -> Vec<Value> {
        self.shared.lock().put_bodies.clone()
    }

    /// Tokens Entra ID has issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.shared.lock().tokens_issued
    }

    /// Creates and updates started from now on stay `InProgress` for their
    /// first `polls` reads (a read is a GET of the operation's status or
    /// `Location` URL, or of the VM) and at least `time` after the PUT; the
    /// first read after both answers the end. Default: 1 read, no time.
    pub fn set_provisioning(&self, polls: u32, time: Duration) {
        self.shared.lock().provisioning = (polls, time);
    }

    /// Deletes started from now on stay `InProgress` (the VM `Deleting`) as
    /// [`AzureServer::set_provisioning`] says for creates; when they end the
    /// VM, and its NIC, disk and IP whose `deleteOption` is `Delete`, are
    /// gone. Default: 1 read, no time.
    pub fn set_deleting(&self, polls: u32, time: Duration) {
        self.shared.lock().deleting = (polls, time);
    }

    /// The `Retry-After` header (seconds) of the first answer of a
    /// long-running operation (201, 202, an update's 200), of its
    /// `InProgress` status answers and of its `Location` 202s. Default: none.
    pub fn set_lro_retry_after(&self, seconds: Option<u64>) {
        self.shared.lock().lro_retry_after = seconds;
    }

    /// Whether a long-running operation's first answer carries
    /// `Azure-AsyncOperation` (default `true`). Without it a create's 201
    /// has no operation header at all (the client follows the VM's
    /// `provisioningState`) and a delete's or a start's 202 only `Location`
    /// — the other two ways ARM documents ("Track asynchronous Azure
    /// operations").
    pub fn set_async_operation_header(&self, on: bool) {
        self.shared
            .no_async_operation
            .store(!on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next `n` creates (PUTs of new VMs) are accepted, then their
    /// operations end `Failed` with `code` and `message`, and the VMs'
    /// provisioning state becomes `Failed` (the VM, its NIC and disk stay,
    /// as on Azure).
    pub fn fail_next_creates(&self, n: u32, code: &str, message: &str) {
        self.shared.lock().failing_creates = (n > 0).then(|| (n, code.into(), message.into()));
    }

    /// Sets VM `name`'s (case-insensitive) power state, at once, as a stop
    /// or deallocation done outside the server would: `state` is `running`,
    /// `stopped` or `deallocated` (case-insensitive). A start in progress
    /// ends `Failed` with `OperationPreempted` (the VM `Succeeded`). While
    /// the VM is being created or deleted its instance view still shows
    /// `starting` or `stopping`; the state set shows once a create ends. A
    /// stopped or deallocated VM keeps its NIC, addresses and disk (a
    /// deallocated VM's disk is `Reserved`); `POST …/start` runs it again.
    /// Panics (a test helper) on an unknown VM or state.
    pub fn set_power_state(&self, name: &str, state: &str) {
        let power = match state.to_ascii_lowercase().as_str() {
            "running" => Power::Running,
            "stopped" => Power::Stopped,
            "deallocated" => Power::Deallocated,
            other => panic!(
                "set_power_state: unknown power state {other:?} (running, stopped or deallocated)"
            ),
        };
        let mut held = self.shared.lock();
        settle(&mut held);
        let key = name.to_ascii_lowercase();
        let Some(vm) = held.vms.get_mut(&key) else {
            panic!("set_power_state: no VM named {name:?}");
        };
        vm.power = power;
        let op = vm.op.clone();
        if let Some(op) = op
            && held.ops.get(&op).is_some_and(|o| o.kind == OpKind::Start)
        {
            preempt(&mut held, &op);
            if let Some(vm) = held.vms.get_mut(&key) {
                vm.op = None;
                vm.provisioning_state = "Succeeded".into();
            }
        }
    }

    /// Pages of the VM listing hold at most `n` VMs (default 100).
    pub fn set_max_page(&self, n: usize) {
        self.shared.lock().max_page = n.max(1);
    }

    /// The lifetime (`expires_in`) of tokens issued from now on; ARM answers
    /// 401 `ExpiredAuthenticationToken` to a token past it.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.shared.lock().token_ttl = ttl;
    }

    /// The value of the `x-ms-ratelimit-remaining-subscription-*` headers and
    /// of each bucket of `x-ms-ratelimit-remaining-resource` on ARM answers;
    /// `None` sends none of them. Default: `Some(1199)`.
    pub fn set_ratelimit_remaining(&self, remaining: Option<u32>) {
        self.shared.lock().ratelimit_remaining = remaining;
    }
}

// ---------------------------------------------------------------------------
// Requests and answers
// ---------------------------------------------------------------------------

impl Route {
    /// Whether the route is Entra ID's (its errors are OAuth's, not ARM's).
    fn is_entra(self) -> bool {
        matches!(self, Self::Token | Self::OpenIdConfiguration)
    }
}

/// The route of `method` and the lowercased path `segments`.
fn route_of(method: &str, segments: &[String], monitor: bool) -> Route {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, s.as_slice()) {
        ("POST", [_, "oauth2", "v2.0", "token"]) => Route::Token,
        ("GET", [_, "v2.0", ".well-known", "openid-configuration"]) => Route::OpenIdConfiguration,
        (
            m,
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.compute",
                "virtualmachines",
                _,
            ],
        ) => match m {
            "PUT" => Route::PutVm,
            "GET" => Route::GetVm,
            "DELETE" => Route::DeleteVm,
            _ => Route::Other,
        },
        (
            m,
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.compute",
                "virtualmachines",
                _,
                action,
            ],
        ) => match (m, *action) {
            ("POST", "start") => Route::StartVm,
            ("GET", "instanceview") => Route::GetVmInstanceView,
            _ => Route::Other,
        },
        (
            "GET",
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.compute",
                "virtualmachines",
            ]
            | [
                "subscriptions",
                _,
                "providers",
                "microsoft.compute",
                "virtualmachines",
            ],
        ) => Route::ListVms,
        (
            "GET",
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.compute",
                "locations",
                _,
                "operations",
                _,
            ],
        ) => {
            if monitor {
                Route::OperationResult
            } else {
                Route::OperationStatus
            }
        }
        (
            "GET",
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.compute",
                "locations",
                _,
                "vmsizes",
            ],
        ) => Route::ListSizes,
        (
            "GET",
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                ns,
                kind,
                rest @ ..,
            ],
        ) => match (*ns, *kind, rest) {
            ("microsoft.network", "networkinterfaces", [_]) => Route::GetNic,
            ("microsoft.network", "publicipaddresses", [_]) => Route::GetPublicIp,
            ("microsoft.network", "virtualnetworks", [_, "subnets", _]) => Route::GetSubnet,
            ("microsoft.compute", "disks", [_]) => Route::GetDisk,
            ("microsoft.compute", "images", [_])
            | ("microsoft.compute", "galleries", [_, "images", _, "versions", _]) => {
                Route::GetImage
            }
            _ => Route::Other,
        },
        _ => Route::Other,
    }
}

/// An answer, before it becomes a hyper response.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    fn empty(status: u16) -> Self {
        Self {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn retry_after(self, seconds: Option<u64>) -> Self {
        match seconds {
            Some(s) => self.header("retry-after", s.to_string()),
            None => self,
        }
    }
}

/// A request, read whole.
#[derive(Debug)]
struct Call {
    method: String,
    route: Route,
    /// The path's segments, percent-decoded, as sent.
    segments: Vec<String>,
    query: Vec<(String, String)>,
    authorization: Option<String>,
    if_none_match: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

impl Call {
    fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Path segment `i`, as sent.
    fn segment(&self, i: usize) -> &str {
        self.segments.get(i).map_or("", String::as_str)
    }

    /// The last path segment, as sent.
    fn last(&self) -> &str {
        self.segments.last().map_or("", String::as_str)
    }

    /// The request's `api-version` (checked before any handler runs).
    fn api_version(&self) -> &str {
        self.query("api-version").unwrap_or("")
    }

    /// Whether `$expand` names `what`.
    fn expands(&self, what: &str) -> bool {
        self.query("$expand")
            .is_some_and(|e| e.split(',').any(|x| x.trim().eq_ignore_ascii_case(what)))
    }
}

fn header(request: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn handle(
    shared: Arc<Shared>,
    close: Arc<Notify>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let segments: Vec<String> = request
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let query = request.uri().query().map(parse_form).unwrap_or_default();
    let monitor = query
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("monitor") && v.eq_ignore_ascii_case("true"));
    let method = request.method().as_str().to_owned();
    let route = route_of(&method, &lower, monitor);
    let correlation = request
        .headers()
        .get("x-ms-correlation-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(uuid, str::to_owned);
    let authorization = header(&request, hyper::header::AUTHORIZATION);
    let if_none_match = header(&request, hyper::header::IF_NONE_MATCH);
    let content_type = header(&request, hyper::header::CONTENT_TYPE);
    let body = request
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let call = Call {
        method,
        route,
        segments,
        query,
        authorization,
        if_none_match,
        content_type,
        body,
    };
    let fault = {
        let mut state = shared.lock();
        *state.counts.entry(route).or_insert(0) += 1;
        match state.faults.get_mut(&route) {
            Some((fault, times)) if *times > 0 => {
                *times -= 1;
                Some(fault.clone())
            }
            _ => None,
        }
    };
    let answer = match fault {
        Some(Fault::Close) => {
            close.notify_one();
            std::future::pending::<()>().await;
            unreachable!("the connection is dropped")
        }
        Some(Fault::Status {
            status,
            code,
            retry_after,
            shape,
        }) => {
            let message = format!("Injected fault {code}.");
            let answer = if route.is_entra() {
                Answer::json(
                    status,
                    json!({"error": code, "error_description": message, "error_codes": []}),
                )
            } else {
                match shape {
                    ErrorShape::Arm => arm_error(status, &code, &message, None),
                    ErrorShape::Bare => {
                        Answer::json(status, json!({"code": code, "message": message}))
                    }
                }
            };
            answer.retry_after(retry_after)
        }
        Some(Fault::DropAnswer) => {
            let _ = respond(&shared, &call);
            Answer::empty(502)
        }
        None => respond(&shared, &call),
    };
    let ratelimit = if route.is_entra() || route == Route::Other {
        None
    } else {
        shared.lock().ratelimit_remaining
    };
    Ok(into_response(
        answer,
        &call,
        &correlation,
        ratelimit,
        &shared.options.region,
    ))
}

/// The CRP throttling buckets a route counts against.
fn buckets(route: Route) -> Option<&'static str> {
    match route {
        Route::PutVm => Some("PutVM"),
        Route::DeleteVm => Some("DeleteVM"),
        Route::GetVm | Route::GetDisk | Route::GetImage => Some("LowCostGet"),
        Route::ListVms | Route::ListSizes => Some("HighCostGet"),
        Route::OperationStatus | Route::OperationResult => Some("GetOperation"),
        _ => None,
    }
}

fn into_response(
    answer: Answer,
    call: &Call,
    correlation: &str,
    ratelimit: Option<u32>,
    region: &str,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (name, value) in &answer.headers {
        builder = builder.header(*name, value.as_str());
    }
    if let Some(n) = ratelimit {
        let kind = match call.method.as_str() {
            "PUT" | "PATCH" | "POST" => "writes",
            "DELETE" => "deletes",
            _ => "reads",
        };
        builder = builder.header(
            format!("x-ms-ratelimit-remaining-subscription-{kind}"),
            n.to_string(),
        );
        if let Some(bucket) = buckets(call.route) {
            builder = builder.header(
                "x-ms-ratelimit-remaining-resource",
                format!("Microsoft.Compute/{bucket}3Min;{n},Microsoft.Compute/{bucket}30Min;{n}"),
            );
        }
    }
    let body = match answer.body {
        Some(value) => {
            builder = builder.header(
                hyper::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
            Bytes::from(value.to_string())
        }
        None => Bytes::new(),
    };
    let stamp = compact_time(SystemTime::now());
    builder
        .header("x-ms-request-id", uuid())
        .header("x-ms-correlation-request-id", correlation)
        .header(
            "x-ms-routing-request-id",
            format!("{}:{stamp}:{correlation}", region.to_ascii_uppercase()),
        )
        .header("cache-control", "no-cache")
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// ARM's error answer.
fn arm_error(status: u16, code: &str, message: &str, target: Option<&str>) -> Answer {
    let mut error = json!({"code": code, "message": message});
    if let Some(target) = target {
        error["target"] = json!(target);
    }
    Answer::json(status, json!({"error": error}))
}

/// ARM's 404 for a missing resource of `kind` (`Microsoft.Compute/virtualMachines`).
fn not_found(kind: &str, name: &str, rg: &str) -> Answer {
    arm_error(
        404,
        "ResourceNotFound",
        &format!(
            "The Resource '{kind}/{name}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
        None,
    )
}

/// Entra ID's error answer.
fn entra_error(status: u16, error: &str, aadsts: u32, description: &str) -> Answer {
    let trace = uuid();
    let correlation = uuid();
    let timestamp = entra_time(SystemTime::now());
    Answer::json(
        status,
        json!({
            "error": error,
            "error_description": format!(
                "AADSTS{aadsts}: {description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
            ),
            "error_codes": [aadsts],
            "timestamp": timestamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
        }),
    )
}

/// The answer to a request that passed the faults.
fn respond(shared: &Shared, call: &Call) -> Answer {
    match call.route {
        Route::Token => return token(shared, call),
        Route::OpenIdConfiguration => return openid_configuration(shared, call),
        Route::Other => {
            return if call.segments.len() >= 7
                && call.segments[0].eq_ignore_ascii_case("subscriptions")
            {
                let (ns, kind) = provider_type(&call.segments);
                arm_error(
                    404,
                    "InvalidResourceType",
                    &format!(
                        "The resource type '{kind}' could not be found in the namespace '{ns}' for api version '{}'.",
                        call.api_version()
                    ),
                    None,
                )
            } else {
                arm_error(
                    404,
                    "NotFound",
                    "The requested resource was not found.",
                    None,
                )
            };
        }
        _ => {}
    }
    if let Some(refused) = authenticate(shared, call) {
        return refused;
    }
    if let Some(refused) = api_version_problem(call) {
        return refused;
    }
    let opts = &shared.options;
    if !call.segment(1).eq_ignore_ascii_case(TEST_SUBSCRIPTION_ID) {
        return arm_error(
            404,
            "SubscriptionNotFound",
            &format!("The subscription '{}' could not be found.", call.segment(1)),
            None,
        );
    }
    // Routes in the VMs' resource group (images and the subnet are looked
    // up by their whole id).
    let in_group = match call.route {
        Route::ListVms => call.segments.len() > 5,
        Route::PutVm | Route::GetVm | Route::DeleteVm => true,
        Route::StartVm | Route::GetVmInstanceView => true,
        Route::GetNic | Route::GetPublicIp | Route::GetDisk => true,
        _ => false,
    };
    if in_group {
        let rg = call.segment(3);
        if !rg.eq_ignore_ascii_case(&opts.resource_group) {
            return arm_error(
                404,
                "ResourceGroupNotFound",
                &format!("Resource group '{rg}' could not be found."),
                None,
            );
        }
    }
    let mut state = shared.lock();
    settle(&mut state);
    match call.route {
        Route::PutVm => put_vm(shared, &mut state, call),
        Route::GetVm => get_vm(shared, &mut state, call),
        Route::ListVms => list_vms(shared, &state, call),
        Route::DeleteVm => delete_vm(shared, &mut state, call),
        Route::StartVm => start_vm(shared, &mut state, call),
        Route::GetVmInstanceView => get_instance_view(shared, &mut state, call),
        Route::OperationStatus | Route::OperationResult => operation(shared, &mut state, call),
        Route::GetNic => match state.nics.get(&call.last().to_ascii_lowercase()) {
            Some(nic) => Answer::json(200, nic_body(shared, &state, nic)),
            None => not_found(
                "Microsoft.Network/networkInterfaces",
                call.last(),
                &opts.resource_group,
            ),
        },
        Route::GetPublicIp => match state.ips.get(&call.last().to_ascii_lowercase()) {
            Some(ip) => Answer::json(200, public_ip_body(opts, &state, ip)),
            None => not_found(
                "Microsoft.Network/publicIPAddresses",
                call.last(),
                &opts.resource_group,
            ),
        },
        Route::GetDisk => match state.disks.get(&call.last().to_ascii_lowercase()) {
            Some(disk) => Answer::json(200, disk_body(opts, &state, disk)),
            None => not_found("Microsoft.Compute/disks", call.last(), &opts.resource_group),
        },
        Route::ListSizes => list_sizes(opts, call),
        Route::GetImage => get_image(opts, call),
        Route::GetSubnet => get_subnet(opts, &state, call),
        Route::Token | Route::OpenIdConfiguration | Route::Other => {
            unreachable!("answered above")
        }
    }
}

/// The namespace and type an unknown ARM path names (for
/// `InvalidResourceType`).
fn provider_type(segments: &[String]) -> (String, String) {
    let at = segments
        .iter()
        .position(|s| s.eq_ignore_ascii_case("providers"));
    match at {
        Some(i) => (
            segments.get(i + 1).cloned().unwrap_or_default(),
            segments.get(i + 2).cloned().unwrap_or_default(),
        ),
        None => (String::new(), segments.last().cloned().unwrap_or_default()),
    }
}

// ---------------------------------------------------------------------------
// Entra ID
// ---------------------------------------------------------------------------

fn unknown_tenant(tenant: &str) -> String {
    format!(
        "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
    )
}

/// `GET /{tenant}/v2.0/.well-known/openid-configuration`.
fn openid_configuration(shared: &Shared, call: &Call) -> Answer {
    let tenant = call.segment(0);
    if !tenant.eq_ignore_ascii_case(TEST_TENANT_ID) {
        return entra_error(400, "invalid_tenant", 90002, &unknown_tenant(tenant));
    }
    let base = format!("{}/{TEST_TENANT_ID}", shared.url);
    Answer::json(
        200,
        json!({
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{}/{TEST_TENANT_ID}/discovery/v2.0/keys", shared.url),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}/v2.0"),
            "request_uri_parameter_supported": false,
            "userinfo_endpoint": format!("{}/oidc/userinfo", shared.url),
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "end_session_endpoint": format!("{base}/oauth2/v2.0/logout"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "ver"],
            "kerberos_endpoint": format!("{base}/kerberos"),
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }),
    )
}

/// `POST /{tenant}/oauth2/v2.0/token`.
fn token(shared: &Shared, call: &Call) -> Answer {
    let tenant = call.segment(0);
    if !tenant.eq_ignore_ascii_case(TEST_TENANT_ID) {
        return entra_error(400, "invalid_request", 90002, &unknown_tenant(tenant));
    }
    let form = parse_form(&String::from_utf8_lossy(&call.body));
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let missing = |name: &str| {
        entra_error(
            400,
            "invalid_request",
            900_144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    };
    let Some(grant) = get("grant_type") else {
        return missing("grant_type");
    };
    if grant != "client_credentials" {
        return entra_error(
            400,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let Some(client) = get("client_id") else {
        return missing("client_id");
    };
    if !client.eq_ignore_ascii_case(TEST_CLIENT_ID) {
        return entra_error(
            400,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{client}' was not found in the directory '{TEST_TENANT_ID}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        );
    }
    let Some(scope) = get("scope") else {
        return missing("scope");
    };
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let resource = match scopes.as_slice() {
        [one] if one.ends_with("/.default") => one.trim_end_matches(".default").to_owned(),
        _ => {
            return entra_error(
                400,
                "invalid_scope",
                1_002_012,
                &format!(
                    "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            );
        }
    };
    match (
        get("client_secret"),
        get("client_assertion"),
        get("client_assertion_type"),
    ) {
        (Some(TEST_CLIENT_SECRET), None, _) => {}
        (Some(_), None, _) => {
            return entra_error(
                401,
                "invalid_client",
                7_000_215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{TEST_CLIENT_ID}'."
                ),
            );
        }
        (None, Some(TEST_FEDERATED_TOKEN), Some(ASSERTION_TYPE)) => {}
        (None, Some(_), Some(ASSERTION_TYPE)) => {
            return entra_error(
                400,
                "invalid_client",
                700_211,
                "No matching federated identity record found for presented assertion issuer 'https://oidc.podvisor.test/other'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.",
            );
        }
        (None, Some(_), _) => {
            return entra_error(
                400,
                "invalid_request",
                50027,
                "The client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
            );
        }
        (Some(_), Some(_), _) => {
            return entra_error(
                400,
                "invalid_request",
                7_000_218,
                "The request body must contain only one of 'client_assertion' or 'client_secret'.",
            );
        }
        (None, None, _) => {
            return entra_error(
                401,
                "invalid_client",
                7_000_216,
                "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
            );
        }
    }
    let mut state = shared.lock();
    let ttl = state.token_ttl;
    let now = SystemTime::now();
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","kid":"podvisor-test"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({
            "aud": resource,
            "iss": format!("https://sts.windows.net/{TEST_TENANT_ID}/"),
            "iat": unix(now),
            "nbf": unix(now),
            "exp": unix(now + ttl),
            "appid": TEST_CLIENT_ID,
            "appidacr": if get("client_secret").is_some() { "1" } else { "2" },
            "idp": format!("https://sts.windows.net/{TEST_TENANT_ID}/"),
            "idtyp": "app",
            "oid": "5d7e2c9b-1a3f-4b6e-8c0d-2f4a6b8c0e1f",
            "sub": "5d7e2c9b-1a3f-4b6e-8c0d-2f4a6b8c0e1f",
            "tid": TEST_TENANT_ID,
            "uti": uuid(),
            "ver": "1.0",
        })
        .to_string(),
    );
    let signature = URL_SAFE_NO_PAD.encode(format!("podvisor-test-signature-{}", uuid()));
    let access_token = format!("{header}.{payload}.{signature}");
    state
        .tokens
        .insert(access_token.clone(), (now + ttl, resource));
    state.tokens_issued += 1;
    Answer::json(
        200,
        json!({
            "token_type": "Bearer",
            "expires_in": ttl.as_secs(),
            "ext_expires_in": ttl.as_secs(),
            "access_token": access_token,
        }),
    )
}

// ---------------------------------------------------------------------------
// ARM's gate: the token and the api-version
// ---------------------------------------------------------------------------

/// The 401 of a request without a live ARM token; `None` when it has one.
fn authenticate(shared: &Shared, call: &Call) -> Option<Answer> {
    let refuse = |code: &str, message: &str, description: &str| {
        Some(arm_error(401, code, message, None).header(
            "www-authenticate",
            format!(
                "Bearer authorization_uri=\"https://login.microsoftonline.com/{TEST_TENANT_ID}\", error=\"invalid_token\", error_description=\"{description}\""
            ),
        ))
    };
    let Some(header) = call.authorization.as_deref() else {
        return refuse(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
            "The authentication failed because of missing 'Authorization' header.",
        );
    };
    let Some(token) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
    else {
        return refuse(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is provided in an invalid format.",
            "The authentication failed because of the invalid 'Authorization' header format.",
        );
    };
    let known = shared.lock().tokens.get(token.trim()).cloned();
    let Some((expiry, audience)) = known else {
        return refuse(
            "InvalidAuthenticationToken",
            "The access token is invalid.",
            "The access token is invalid.",
        );
    };
    let now = SystemTime::now();
    if expiry <= now {
        return refuse(
            "ExpiredAuthenticationToken",
            &format!(
                "The access token expiry UTC time '{}' is earlier than current UTC time '{}'.",
                entra_time(expiry),
                entra_time(now)
            ),
            "The access token has expired.",
        );
    }
    let audience = audience.trim_end_matches('/');
    let allowed = ARM_AUDIENCES
        .iter()
        .any(|a| a.eq_ignore_ascii_case(audience))
        || audience.eq_ignore_ascii_case(&shared.url);
    if !allowed {
        return refuse(
            "InvalidAuthenticationTokenAudience",
            &format!(
                "The access token has been obtained for wrong audience or resource '{audience}/'. It should exactly match with one of the allowed audiences 'https://management.core.windows.net/','https://management.core.windows.net','https://management.azure.com/','https://management.azure.com'."
            ),
            "The access token has an invalid audience.",
        );
    }
    None
}

/// The 400 of a request without a well-formed `api-version`.
fn api_version_problem(call: &Call) -> Option<Answer> {
    let Some(version) = call.query("api-version") else {
        return Some(arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
            None,
        ));
    };
    let date = version.strip_suffix("-preview").unwrap_or(version);
    let b = date.as_bytes();
    let valid = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if valid {
        None
    } else {
        Some(arm_error(
            400,
            "InvalidApiVersionParameter",
            &format!(
                "The api-version '{version}' is invalid. The supported versions are '2025-04-01,2024-11-01,2024-07-01,2024-03-01,2023-09-01,2023-07-01,2023-03-01,2022-11-01,2022-08-01'."
            ),
            None,
        ))
    }
}

// ---------------------------------------------------------------------------
// Virtual machines and their operations
// ---------------------------------------------------------------------------

fn rg_prefix(opts: &ServerOptions) -> String {
    format!(
        "/subscriptions/{TEST_SUBSCRIPTION_ID}/resourceGroups/{}",
        opts.resource_group
    )
}

fn vm_id(opts: &ServerOptions, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/virtualMachines/{name}",
        rg_prefix(opts)
    )
}

fn nic_id(opts: &ServerOptions, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/networkInterfaces/{name}",
        rg_prefix(opts)
    )
}

fn ip_id(opts: &ServerOptions, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/publicIPAddresses/{name}",
        rg_prefix(opts)
    )
}

fn disk_id(opts: &ServerOptions, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/disks/{name}",
        rg_prefix(opts)
    )
}

/// The last segment of an ARM id.
fn id_name(id: &str) -> &str {
    id.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// A region's name as ARM compares it (`East US` is `eastus`).
fn region_key(region: &str) -> String {
    region
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

fn text<'a>(body: &'a Value, pointer: &str) -> Option<&'a str> {
    body.pointer(pointer).and_then(Value::as_str)
}

/// Whether a `deleteOption` means the resource goes with the VM (absent is
/// CRP's default, `Detach`).
fn deletes(option: Option<&str>) -> bool {
    option.is_some_and(|o| o.eq_ignore_ascii_case("Delete"))
}

/// CRP's answer to a required property that is absent.
fn required(name: &str) -> Answer {
    arm_error(
        400,
        "InvalidParameter",
        &format!("Required parameter '{name}' is missing (null)."),
        Some(name),
    )
}

/// The headers that point at operation `id`, for a request of
/// `api_version`: `Azure-AsyncOperation`, and `Location` when `location`.
fn operation_headers(
    shared: &Shared,
    answer: Answer,
    id: &str,
    api_version: &str,
    location: bool,
    retry_after: Option<u64>,
) -> Answer {
    let base = format!(
        "{}/subscriptions/{TEST_SUBSCRIPTION_ID}/providers/Microsoft.Compute/locations/{}/operations/{id}",
        shared.url, shared.options.region
    );
    let p = uuid();
    let mut answer = answer;
    if !shared
        .no_async_operation
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        answer = answer.header(
            "azure-asyncoperation",
            format!("{base}?p={p}&api-version={api_version}"),
        );
    }
    if location {
        answer = answer.header(
            "location",
            format!("{base}?p={p}&monitor=true&api-version={api_version}"),
        );
    }
    answer.retry_after(retry_after)
}

/// Starts an operation on VM `vm` (key), preempting the one in progress.
fn start_operation(
    state: &mut State,
    kind: OpKind,
    vm: &str,
    failure: Option<(String, String)>,
) -> String {
    let (need_reads, need_time) = if kind == OpKind::Delete {
        state.deleting
    } else {
        state.provisioning
    };
    let id = uuid();
    let previous = state.vms.get_mut(vm).and_then(|v| v.op.replace(id.clone()));
    if let Some(previous) = previous {
        preempt(state, &previous);
    }
    state.ops.insert(
        id.clone(),
        Operation {
            kind,
            vm: vm.to_owned(),
            start: SystemTime::now(),
            started: Instant::now(),
            reads: 0,
            need_reads,
            need_time,
            failure,
            outcome: None,
            end: None,
        },
    );
    advance(state, &id, false);
    id
}

/// Ends operation `id`, if in progress, `Failed` with `OperationPreempted`.
fn preempt(state: &mut State, id: &str) {
    if let Some(op) = state.ops.get_mut(id)
        && op.outcome.is_none()
    {
        op.outcome = Some(Some((
            "OperationPreempted".into(),
            "Operation execution has been preempted by a more recent operation.".into(),
        )));
        op.end = Some(SystemTime::now());
    }
}

/// An operation of `kind` on VM `vm` (key) that has already succeeded, and
/// leaves the VM's own operation alone: a start of a running VM.
fn finished_operation(state: &mut State, kind: OpKind, vm: &str) -> String {
    let id = uuid();
    let now = SystemTime::now();
    state.ops.insert(
        id.clone(),
        Operation {
            kind,
            vm: vm.to_owned(),
            start: now,
            started: Instant::now(),
            reads: 0,
            need_reads: 0,
            need_time: Duration::ZERO,
            failure: None,
            outcome: Some(None),
            end: Some(now),
        },
    );
    id
}

/// Ends every operation whose reads and time have come (without counting a
/// read).
fn settle(state: &mut State) {
    let pending: Vec<String> = state
        .ops
        .iter()
        .filter(|(_, op)| op.outcome.is_none())
        .map(|(id, _)| id.clone())
        .collect();
    for id in pending {
        advance(state, &id, false);
    }
}

/// One look at operation `id` (`read`: a read the client sees, which counts
/// once the answer is decided): ends it when it is due.
fn advance(state: &mut State, id: &str, read: bool) {
    let Some(op) = state.ops.get_mut(id) else {
        return;
    };
    if op.outcome.is_some() {
        return;
    }
    let due = op.reads >= op.need_reads && op.started.elapsed() >= op.need_time;
    if read {
        op.reads = op.reads.saturating_add(1);
    }
    if !due {
        return;
    }
    let outcome = op.failure.clone();
    op.outcome = Some(outcome.clone());
    op.end = Some(SystemTime::now());
    let (kind, vm) = (op.kind, op.vm.clone());
    match kind {
        OpKind::Create | OpKind::Update | OpKind::Start => {
            if let Some(held) = state.vms.get_mut(&vm) {
                if kind == OpKind::Start && outcome.is_none() {
                    held.power = Power::Running;
                }
                held.provisioning_state = if outcome.is_some() {
                    "Failed"
                } else {
                    "Succeeded"
                }
                .into();
                held.op = None;
            }
        }
        OpKind::Delete => remove_vm(state, &vm),
    }
}

/// Forgets VM `key`, with its NIC, disk and public IP whose `deleteOption`
/// is `Delete`; detaches the others.
fn remove_vm(state: &mut State, key: &str) {
    let Some(vm) = state.vms.remove(key) else {
        return;
    };
    if vm.nic_delete {
        if let Some(nic) = state.nics.remove(&vm.nic) {
            state.free_private.push(nic.address);
            state.free_private.sort_unstable();
        }
    } else if let Some(nic) = state.nics.get_mut(&vm.nic) {
        nic.vm = None;
    }
    if vm.disk_delete {
        state.disks.remove(&vm.disk);
    } else if let Some(disk) = state.disks.get_mut(&vm.disk) {
        disk.vm = None;
    }
    if let Some(ip_key) = &vm.public_ip {
        if vm.ip_delete {
            if let Some(ip) = state.ips.remove(ip_key) {
                state.free_public.push(ip.address);
                state.free_public.sort_unstable();
            }
            if let Some(nic) = state.nics.get_mut(&vm.nic) {
                nic.public_ip = None;
            }
        } else if !state.nics.contains_key(&vm.nic)
            && let Some(ip) = state.ips.get_mut(ip_key)
        {
            ip.nic = None;
        }
    }
}

/// What a PUT's network profile asks for.
#[derive(Debug)]
struct Network {
    /// The NIC's name (a new one, or an existing one's from
    /// `networkInterfaces`).
    nic: String,
    nic_delete: bool,
    ipconfig: String,
    nsg: Option<String>,
    public_ip: Option<(String, bool)>,
}

/// Checks the network profile of a create.
fn network_of(
    opts: &ServerOptions,
    state: &State,
    body: &Value,
    vm_key: &str,
) -> Result<Network, Answer> {
    let Some(profile) = body.pointer("/properties/networkProfile") else {
        return Err(required("networkProfile"));
    };
    let invalid_reference = |id: &str, by: &str| {
        arm_error(
            400,
            "InvalidResourceReference",
            &format!(
                "Resource {id} referenced by resource {by} was not found. Please make sure that the referenced resource exists, and that both resources are in the same region."
            ),
            None,
        )
    };
    if let Some(configs) = profile
        .get("networkInterfaceConfigurations")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
    {
        if text(profile, "/networkApiVersion").is_none() {
            return Err(arm_error(
                400,
                "InvalidParameter",
                "Required parameter 'networkProfile.networkApiVersion' is missing (null). It is required when networkInterfaceConfigurations are specified.",
                Some("networkProfile.networkApiVersion"),
            ));
        }
        let config = configs
            .iter()
            .find(|c| c.pointer("/properties/primary") == Some(&Value::Bool(true)))
            .unwrap_or(&configs[0]);
        let Some(nic) = text(config, "/name") else {
            return Err(required("networkInterfaceConfigurations.name"));
        };
        let nic_ref = nic_id(opts, nic);
        let Some(ipconfigs) = config
            .pointer("/properties/ipConfigurations")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
        else {
            return Err(required("ipConfigurations"));
        };
        let ipconfig = ipconfigs
            .iter()
            .find(|c| c.pointer("/properties/primary") == Some(&Value::Bool(true)))
            .unwrap_or(&ipconfigs[0]);
        let Some(subnet) = text(ipconfig, "/properties/subnet/id") else {
            return Err(required("subnet"));
        };
        if !subnet.eq_ignore_ascii_case(&opts.subnet_id) {
            return Err(invalid_reference(subnet, &nic_ref));
        }
        let nsg = text(config, "/properties/networkSecurityGroup/id");
        if let Some(nsg) = nsg
            && !opts.nsg_ids.iter().any(|n| n.eq_ignore_ascii_case(nsg))
        {
            return Err(invalid_reference(nsg, &nic_ref));
        }
        if let Some(held) = state.nics.get(&nic.to_ascii_lowercase())
            && held.vm.as_deref().is_some_and(|v| v != vm_key)
        {
            return Err(nic_in_use(
                opts,
                &held.name,
                held.vm.as_deref().unwrap_or(""),
            ));
        }
        let public_ip = match ipconfig.pointer("/properties/publicIPAddressConfiguration") {
            Some(p) => {
                let Some(name) = text(p, "/name") else {
                    return Err(required("publicIPAddressConfiguration.name"));
                };
                if let Some(ip) = state.ips.get(&name.to_ascii_lowercase())
                    && ip.nic.is_some()
                    && ip.nic.as_deref() != Some(&nic.to_ascii_lowercase())
                {
                    return Err(arm_error(
                        400,
                        "PublicIPAddressInUse",
                        &format!(
                            "Resource {} is in use by another resource and cannot be referenced.",
                            ip_id(opts, &ip.name)
                        ),
                        None,
                    ));
                }
                Some((
                    name.to_owned(),
                    deletes(text(p, "/properties/deleteOption")),
                ))
            }
            None => None,
        };
        return Ok(Network {
            nic: nic.to_owned(),
            nic_delete: deletes(text(config, "/properties/deleteOption")),
            ipconfig: text(ipconfig, "/name").unwrap_or("ipconfig1").to_owned(),
            nsg: nsg.map(str::to_owned),
            public_ip,
        });
    }
    let Some(nics) = profile
        .get("networkInterfaces")
        .and_then(Value::as_array)
        .filter(|n| !n.is_empty())
    else {
        return Err(arm_error(
            400,
            "InvalidParameter",
            "At least one network interface is required: networkInterfaces or networkInterfaceConfigurations.",
            Some("networkProfile"),
        ));
    };
    let reference = nics
        .iter()
        .find(|n| n.pointer("/properties/primary") == Some(&Value::Bool(true)))
        .unwrap_or(&nics[0]);
    let Some(id) = text(reference, "/id") else {
        return Err(required("networkInterfaces.id"));
    };
    let name = id_name(id);
    let held = state
        .nics
        .get(&name.to_ascii_lowercase())
        .filter(|_| id.eq_ignore_ascii_case(&nic_id(opts, name)));
    let Some(held) = held else {
        return Err(invalid_reference(id, &vm_id(opts, vm_key)));
    };
    if let Some(other) = held.vm.as_deref()
        && other != vm_key
    {
        return Err(nic_in_use(opts, &held.name, other));
    }
    Ok(Network {
        nic: held.name.clone(),
        nic_delete: deletes(text(reference, "/properties/deleteOption")),
        ipconfig: held.ipconfig.clone(),
        nsg: held.nsg.clone(),
        public_ip: None,
    })
}

fn nic_in_use(opts: &ServerOptions, nic: &str, vm: &str) -> Answer {
    arm_error(
        400,
        "NicInUse",
        &format!(
            "Network Interface {} is used by existing resource {}. In order to use this network interface, you must first dissociate it from the resource.",
            nic_id(opts, nic),
            vm_id(opts, vm)
        ),
        None,
    )
}

/// Checks the image a create names: `Err` is CRP's refusal.
fn check_image(opts: &ServerOptions, body: &Value) -> Result<Value, Answer> {
    let Some(reference) = body.pointer("/properties/storageProfile/imageReference") else {
        return Err(required("imageReference"));
    };
    let id = text(reference, "/id")
        .or_else(|| text(reference, "/communityGalleryImageId"))
        .or_else(|| text(reference, "/sharedGalleryImageId"));
    let Some(id) = id else {
        return Err(arm_error(
            400,
            "InvalidParameter",
            "Only image references by id, communityGalleryImageId or sharedGalleryImageId are supported here.",
            Some("imageReference"),
        ));
    };
    if opts.images.iter().any(|i| i.eq_ignore_ascii_case(id)) {
        return Ok(reference.clone());
    }
    let region = &opts.region;
    if id.to_ascii_lowercase().contains("/galleries/")
        || id.to_ascii_lowercase().starts_with("/communitygalleries/")
        || id.to_ascii_lowercase().starts_with("/sharedgalleries/")
    {
        Err(arm_error(
            404,
            "GalleryImageNotFound",
            &format!(
                "\"The gallery image {id} is not available in {region} region. Please contact image owner to replicate to this region, or change your requested region.\""
            ),
            Some("imageReference"),
        ))
    } else {
        Err(arm_error(
            404,
            "NotFound",
            &format!("The Image '{id}' cannot be found in '{region}' region."),
            None,
        ))
    }
}

/// Checks `userData` and `osProfile.customData`.
fn check_base64(body: &Value) -> Result<Option<String>, Answer> {
    if let Some(custom) = body.pointer("/properties/osProfile/customData") {
        let ok = custom
            .as_str()
            .is_some_and(|c| c.len() <= MAX_USER_DATA && STANDARD.decode(c).is_ok());
        if !ok {
            return Err(arm_error(
                400,
                "InvalidParameter",
                &format!(
                    "Custom data in OSProfile must be in Base64 encoding and with a maximum length of {MAX_USER_DATA} characters."
                ),
                Some("customData"),
            ));
        }
    }
    match body.pointer("/properties/userData") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(data))
            if data.len() <= MAX_USER_DATA && STANDARD.decode(data).is_ok() =>
        {
            Ok(Some(data.clone()))
        }
        Some(_) => Err(arm_error(
            400,
            "InvalidParameter",
            &format!(
                "User data must be in Base64 encoding and with a maximum length of {MAX_USER_DATA} characters."
            ),
            Some("userData"),
        )),
    }
}

/// The tags of a PUT body.
fn tags_of(body: &Value) -> Result<BTreeMap<String, String>, Answer> {
    let mut tags = BTreeMap::new();
    match body.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return Err(arm_error(
                        400,
                        "InvalidRequestContent",
                        &format!(
                            "The request content was invalid and could not be deserialized: 'Error converting value of tag '{k}' to type 'System.String'.'."
                        ),
                        None,
                    ));
                };
                tags.insert(k.clone(), v.to_owned());
            }
        }
        Some(_) => {
            return Err(arm_error(
                400,
                "InvalidRequestContent",
                "The request content was invalid and could not be deserialized: 'tags must be an object'.",
                None,
            ));
        }
    }
    Ok(tags)
}

/// `PUT …/virtualMachines/{name}`.
fn put_vm(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let opts = &shared.options;
    let json_body = call
        .content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json"));
    if !json_body {
        return arm_error(
            415,
            "UnsupportedMediaType",
            &format!(
                "The content media type '{}' is not supported. Only 'application/json' is supported.",
                call.content_type.as_deref().unwrap_or("")
            ),
            None,
        );
    }
    let body = match serde_json::from_slice::<Value>(&call.body) {
        Ok(body) if body.is_object() => body,
        Ok(_) => {
            return arm_error(
                400,
                "InvalidRequestContent",
                "The request content was invalid and could not be deserialized: 'the body must be a JSON object'.",
                None,
            );
        }
        Err(e) => {
            return arm_error(
                400,
                "InvalidRequestContent",
                &format!("The request content was invalid and could not be deserialized: '{e}'."),
                None,
            );
        }
    };
    let name = call.last().to_owned();
    let key = name.to_ascii_lowercase();
    if let Some(held) = state.vms.get(&key) {
        if call.if_none_match.as_deref().map(str::trim) == Some("*") {
            return arm_error(
                412,
                "PreconditionFailed",
                &format!(
                    "The resource '{}' already exists and the request's If-None-Match header is '*'.",
                    held.name
                ),
                None,
            );
        }
        if held.provisioning_state == "Deleting" {
            return arm_error(
                409,
                "OperationNotAllowed",
                &format!(
                    "Operation 'Update VM' is not allowed on VM '{}' since the VM is marked for deletion. You can only retry the Delete operation (or wait for an ongoing one to complete).",
                    held.name
                ),
                None,
            );
        }
    }
    let Some(location) = text(&body, "/location") else {
        return arm_error(
            400,
            "LocationRequired",
            "The location property is required for this definition.",
            None,
        );
    };
    if region_key(location) != region_key(&opts.region) {
        return arm_error(
            400,
            "LocationNotAvailableForResourceType",
            &format!(
                "The provided location '{location}' is not available for resource type 'Microsoft.Compute/virtualMachines'. List of available regions for the resource type is '{}'.",
                opts.region
            ),
            None,
        );
    }
    let Some(size) = text(&body, "/properties/hardwareProfile/vmSize") else {
        return required("vmSize");
    };
    let Some(size) = opts
        .sizes
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(size))
    else {
        let available: Vec<&str> = opts.sizes.iter().map(|s| s.name.as_str()).collect();
        return arm_error(
            400,
            "InvalidParameter",
            &format!(
                "The requested VM size {size} is not available in the current region. The sizes available in the current region are: {}.\r\nFind out more on the available VM sizes in each region at https://aka.ms/azureregions.",
                available.join(",")
            ),
            Some("vmSize"),
        );
    };
    let size = size.name.clone();
    let tags = match tags_of(&body) {
        Ok(t) => t,
        Err(refused) => return refused,
    };
    let user_data = match check_base64(&body) {
        Ok(u) => u,
        Err(refused) => return refused,
    };
    let image = match check_image(opts, &body) {
        Ok(image) => image,
        Err(refused) => return refused,
    };
    if let Some(os) = body.pointer("/properties/osProfile")
        && text(os, "/adminUsername").is_none()
    {
        return required("adminUsername");
    }
    let retry_after = state.lro_retry_after;
    let api_version = call.api_version().to_owned();

    // An update: tags, size, user data and the body are replaced.
    if let Some(held) = state.vms.get(&key) {
        let stored = held
            .body
            .pointer("/properties/storageProfile/imageReference")
            .cloned()
            .unwrap_or(Value::Null);
        if !image_equal(&stored, &image) {
            return arm_error(
                409,
                "PropertyChangeNotAllowed",
                "Changing property 'imageReference' is not allowed.",
                Some("imageReference"),
            );
        }
        if let Some(held) = state.vms.get_mut(&key) {
            held.tags = tags;
            held.size = size;
            held.user_data = user_data;
            held.body = body.clone();
            held.provisioning_state = "Updating".into();
        }
        state.put_bodies.push(body);
        let answer = match state.vms.get(&key) {
            Some(held) => Answer::json(200, vm_body(shared, state, held, false, false)),
            None => Answer::empty(500),
        };
        let op = start_operation(state, OpKind::Update, &key, None);
        return operation_headers(shared, answer, &op, &api_version, false, retry_after);
    }

    // A create.
    let network = match network_of(opts, state, &body, &key) {
        Ok(n) => n,
        Err(refused) => return refused,
    };
    let disk_name = text(&body, "/properties/storageProfile/osDisk/name")
        .map_or_else(|| format!("{name}-disk"), str::to_owned);
    if let Some(disk) = state.disks.get(&disk_name.to_ascii_lowercase()) {
        return arm_error(
            409,
            "ConflictingUserInput",
            &format!(
                "Disk {} already exists in resource group {}. Only CreateOption.Attach is supported.",
                disk.name,
                opts.resource_group.to_ascii_uppercase()
            ),
            None,
        );
    }
    let nic_key = network.nic.to_ascii_lowercase();
    let reuse_nic = state.nics.contains_key(&nic_key);
    if !reuse_nic && state.free_private.is_empty() {
        let prefix = subnet_prefix(opts);
        return arm_error(
            400,
            "SubnetIsFull",
            &format!(
                "Subnet {} with address prefix {prefix} does not have enough capacity for 1 IP addresses.",
                id_name(&opts.subnet_id)
            ),
            None,
        );
    }
    let ip_key = network
        .public_ip
        .as_ref()
        .map(|(n, _)| n.to_ascii_lowercase());
    let reuse_ip = ip_key.as_ref().is_some_and(|k| state.ips.contains_key(k));
    if ip_key.is_some() && !reuse_ip && state.free_public.is_empty() {
        return arm_error(
            400,
            "PublicIPCountLimitReached",
            "Cannot create more than 0 public IP addresses for this subscription in this region.",
            None,
        );
    }

    // Everything checked: make the VM and its resources.
    let now = SystemTime::now();
    if !reuse_nic {
        let address = state.free_private.remove(0);
        state.nics.insert(
            nic_key.clone(),
            HeldNic {
                name: network.nic.clone(),
                address,
                ipconfig: network.ipconfig.clone(),
                subnet: opts.subnet_id.clone(),
                nsg: network.nsg.clone(),
                public_ip: None,
                vm: None,
            },
        );
    }
    if let (Some(ip_key), Some((ip_name, _))) = (&ip_key, &network.public_ip) {
        if !reuse_ip {
            let address = state.free_public.remove(0);
            state.ips.insert(
                ip_key.clone(),
                HeldIp {
                    name: ip_name.clone(),
                    address,
                    nic: None,
                },
            );
        }
        if let Some(ip) = state.ips.get_mut(ip_key) {
            ip.nic = Some(nic_key.clone());
        }
    }
    if let Some(nic) = state.nics.get_mut(&nic_key) {
        nic.vm = Some(key.clone());
        if ip_key.is_some() {
            nic.public_ip.clone_from(&ip_key);
        }
    }
    let disk_key = disk_name.to_ascii_lowercase();
    state.disks.insert(
        disk_key.clone(),
        HeldDisk {
            name: disk_name,
            size_gb: body
                .pointer("/properties/storageProfile/osDisk/diskSizeGB")
                .and_then(Value::as_u64)
                .unwrap_or(30),
            sku: text(
                &body,
                "/properties/storageProfile/osDisk/managedDisk/storageAccountType",
            )
            .unwrap_or("Premium_LRS")
            .to_owned(),
            image,
            vm: Some(key.clone()),
            created: now,
        },
    );
    let seq = state.next_seq;
    state.next_seq += 1;
    let public_ip = state.nics.get(&nic_key).and_then(|n| n.public_ip.clone());
    state.vms.insert(
        key.clone(),
        HeldVm {
            name,
            vm_id: uuid(),
            tags,
            provisioning_state: "Creating".into(),
            power: Power::Running,
            size,
            user_data,
            body: body.clone(),
            nic: nic_key,
            disk: disk_key,
            public_ip,
            nic_delete: network.nic_delete,
            disk_delete: deletes(text(
                &body,
                "/properties/storageProfile/osDisk/deleteOption",
            )),
            ip_delete: network.public_ip.as_ref().is_some_and(|(_, d)| *d),
            created: now,
            op: None,
            seq,
        },
    );
    state.put_bodies.push(body);
    let failure = match state.failing_creates.take() {
        Some((n, code, message)) => {
            if n > 1 {
                state.failing_creates = Some((n - 1, code.clone(), message.clone()));
            }
            Some((code, message))
        }
        None => None,
    };
    let answer = match state.vms.get(&key) {
        Some(held) => Answer::json(201, vm_body(shared, state, held, false, false)),
        None => Answer::empty(500),
    };
    let op = start_operation(state, OpKind::Create, &key, failure);
    operation_headers(shared, answer, &op, &api_version, false, retry_after)
}

/// Whether two image references name the same image.
fn image_equal(a: &Value, b: &Value) -> bool {
    let id = |v: &Value| {
        text(v, "/id")
            .or_else(|| text(v, "/communityGalleryImageId"))
            .or_else(|| text(v, "/sharedGalleryImageId"))
            .map(str::to_ascii_lowercase)
    };
    id(a) == id(b)
}

/// `GET …/virtualMachines/{name}`: a read of the VM's operation too.
fn get_vm(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let key = call.last().to_ascii_lowercase();
    if let Some(op) = state.vms.get(&key).and_then(|v| v.op.clone()) {
        advance(state, &op, true);
    }
    match state.vms.get(&key) {
        Some(held) => Answer::json(
            200,
            vm_body(
                shared,
                state,
                held,
                call.expands("userData"),
                call.expands("instanceView"),
            ),
        ),
        None => not_found(
            "Microsoft.Compute/virtualMachines",
            call.last(),
            &shared.options.resource_group,
        ),
    }
}

/// `GET …/virtualMachines`: pages of `max_page`, by name.
fn list_vms(shared: &Shared, state: &State, call: &Call) -> Answer {
    let start = match call.query("$skiptoken") {
        None => String::new(),
        Some(token) => match hex_decode(token) {
            Some(key) => key,
            None => {
                return arm_error(
                    400,
                    "InvalidSkipToken",
                    &format!("The skip token '{token}' is not valid."),
                    None,
                );
            }
        },
    };
    let mut keys = state.vms.range(start..);
    let mut value = Vec::new();
    for (_, held) in keys.by_ref().take(state.max_page) {
        value.push(vm_body(shared, state, held, false, false));
    }
    let mut body = json!({"value": value});
    if let Some((next, _)) = keys.next() {
        let path = call
            .segments
            .iter()
            .map(|s| encode(s))
            .collect::<Vec<_>>()
            .join("/");
        body["nextLink"] = json!(format!(
            "{}/{path}?api-version={}&$skiptoken={}",
            shared.url,
            encode(call.api_version()),
            hex_encode(next)
        ));
    }
    Answer::json(200, body)
}

/// `DELETE …/virtualMachines/{name}`.
fn delete_vm(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let key = call.last().to_ascii_lowercase();
    let Some(held) = state.vms.get(&key) else {
        return Answer::empty(204);
    };
    let retry_after = state.lro_retry_after;
    let api_version = call.api_version().to_owned();
    // A delete of a VM being deleted joins the delete in progress.
    let joined = held
        .op
        .as_ref()
        .filter(|op| state.ops.get(*op).is_some_and(|o| o.kind == OpKind::Delete))
        .cloned();
    let op = match joined {
        Some(op) => op,
        None => {
            if let Some(held) = state.vms.get_mut(&key) {
                held.provisioning_state = "Deleting".into();
            }
            start_operation(state, OpKind::Delete, &key, None)
        }
    };
    operation_headers(
        shared,
        Answer::empty(202),
        &op,
        &api_version,
        true,
        retry_after,
    )
}

/// `POST …/virtualMachines/{name}/start`: 202 with the operation's
/// headers. A stopped or deallocated VM is `Updating` (power `starting`)
/// until the operation ends, as [`AzureServer::set_provisioning`] says, and
/// then `Succeeded` and `running`; a start of a VM that runs (or is being
/// created) has already succeeded; a second start joins the first.
fn start_vm(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let name = call.segment(7);
    let key = name.to_ascii_lowercase();
    let Some(held) = state.vms.get(&key) else {
        return not_found(
            "Microsoft.Compute/virtualMachines",
            name,
            &shared.options.resource_group,
        );
    };
    if held.provisioning_state == "Deleting" {
        return arm_error(
            409,
            "OperationNotAllowed",
            &format!(
                "Operation 'start' is not allowed on VM '{}' since the VM is marked for deletion. You can only retry the Delete operation (or wait for an ongoing one to complete).",
                held.name
            ),
            None,
        );
    }
    let retry_after = state.lro_retry_after;
    let api_version = call.api_version().to_owned();
    let joined = held
        .op
        .as_ref()
        .filter(|op| {
            state
                .ops
                .get(*op)
                .is_some_and(|o| o.kind == OpKind::Start && o.outcome.is_none())
        })
        .cloned();
    let op = match joined {
        Some(op) => op,
        None if held.power == Power::Running => finished_operation(state, OpKind::Start, &key),
        None => {
            if let Some(held) = state.vms.get_mut(&key) {
                held.provisioning_state = "Updating".into();
            }
            start_operation(state, OpKind::Start, &key, None)
        }
    };
    operation_headers(
        shared,
        Answer::empty(202),
        &op,
        &api_version,
        true,
        retry_after,
    )
}

/// `GET …/virtualMachines/{name}/instanceView`: a read of the VM's
/// operation too, as a GET of the VM is.
fn get_instance_view(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let name = call.segment(7);
    let key = name.to_ascii_lowercase();
    if let Some(op) = state.vms.get(&key).and_then(|v| v.op.clone()) {
        advance(state, &op, true);
    }
    match state.vms.get(&key) {
        Some(held) => Answer::json(200, instance_view(state, held)),
        None => not_found(
            "Microsoft.Compute/virtualMachines",
            name,
            &shared.options.resource_group,
        ),
    }
}

/// `GET …/operations/{id}` (status) and `…?monitor=true` (result).
fn operation(shared: &Shared, state: &mut State, call: &Call) -> Answer {
    let id = call.last().to_owned();
    let region_ok = region_key(call.segment(5)) == region_key(&shared.options.region);
    if !region_ok || !state.ops.contains_key(&id) {
        return arm_error(
            404,
            "OperationNotFound",
            &format!("The operation '{id}' could not be found."),
            None,
        );
    }
    advance(state, &id, true);
    let Some(op) = state.ops.get(&id) else {
        return Answer::empty(500);
    };
    let retry_after = state.lro_retry_after;
    if call.route == Route::OperationResult {
        return match &op.outcome {
            None => operation_headers(
                shared,
                Answer::empty(202),
                &id,
                call.api_version(),
                true,
                retry_after,
            ),
            Some(None) => Answer::empty(200),
            Some(Some((code, message))) => arm_error(400, code, message, None),
        };
    }
    let mut body = json!({"startTime": crp_time(op.start), "name": id});
    match &op.outcome {
        None => {
            body["status"] = json!("InProgress");
            Answer::json(200, body).retry_after(retry_after)
        }
        Some(outcome) => {
            if let Some(end) = op.end {
                body["endTime"] = json!(crp_time(end));
            }
            match outcome {
                None => body["status"] = json!("Succeeded"),
                Some((code, message)) => {
                    body["status"] = json!("Failed");
                    body["error"] = json!({"code": code, "message": message});
                }
            }
            Answer::json(200, body)
        }
    }
}

// ---------------------------------------------------------------------------
// Sizes, images, subnet
// ---------------------------------------------------------------------------

/// `GET …/locations/{region}/vmSizes`.
fn list_sizes(opts: &ServerOptions, call: &Call) -> Answer {
    let region = call.segment(5);
    if region_key(region) != region_key(&opts.region) {
        return arm_error(
            404,
            "LocationNotAvailableForResourceType",
            &format!(
                "The provided location '{region}' is not available for resource type 'Microsoft.Compute/locations/vmSizes'. List of available regions for the resource type is '{}'.",
                opts.region
            ),
            None,
        );
    }
    let value: Vec<Value> = opts
        .sizes
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "numberOfCores": s.cores,
                "osDiskSizeInMB": 1_047_552,
                "resourceDiskSizeInMB": 0,
                "memoryInMB": s.memory_mib,
                "maxDataDiskCount": s.cores * 2,
            })
        })
        .collect();
    Answer::json(200, json!({"value": value}))
}

/// The ARM id a GET path names (`/subscriptions/…`, as sent).
fn path_id(call: &Call) -> String {
    format!("/{}", call.segments.join("/"))
}

/// `GET` of a managed image or gallery image version.
fn get_image(opts: &ServerOptions, call: &Call) -> Answer {
    let asked = path_id(call);
    let Some(id) = opts.images.iter().find(|i| i.eq_ignore_ascii_case(&asked)) else {
        let kind = if call.segments.len() > 9 {
            "Microsoft.Compute/galleries/podvm/images/versions"
        } else {
            "Microsoft.Compute/images"
        };
        return not_found(kind, call.last(), call.segment(3));
    };
    let name = id_name(id);
    let body = if call.segments.len() > 9 {
        json!({
            "name": name,
            "id": id,
            "type": "Microsoft.Compute/galleries/images/versions",
            "location": opts.region,
            "properties": {
                "publishingProfile": {
                    "targetRegions": [{"name": opts.region, "regionalReplicaCount": 1, "storageAccountType": "Standard_LRS"}],
                    "replicaCount": 1,
                    "excludeFromLatest": false,
                    "publishedDate": "2026-01-01T00:00:00.0000000+00:00",
                    "storageAccountType": "Standard_LRS",
                },
                "storageProfile": {"osDiskImage": {"sizeInGB": 30, "hostCaching": "ReadWrite"}},
                "provisioningState": "Succeeded",
            },
        })
    } else {
        json!({
            "name": name,
            "id": id,
            "type": "Microsoft.Compute/images",
            "location": opts.region,
            "properties": {
                "storageProfile": {
                    "osDisk": {"osType": "Linux", "osState": "Generalized", "diskSizeGB": 30, "caching": "ReadWrite", "storageAccountType": "Standard_LRS"},
                    "dataDisks": [],
                    "zoneResilient": false,
                },
                "provisioningState": "Succeeded",
                "hyperVGeneration": "V2",
            },
        })
    };
    Answer::json(200, body)
}

/// The subnet's address prefix: the /24 of the first NIC address.
fn subnet_prefix(opts: &ServerOptions) -> String {
    let first = opts
        .addresses
        .first()
        .copied()
        .unwrap_or(Ipv4Addr::new(127, 23, 0, 0));
    let [a, b, c, _] = first.octets();
    format!("{a}.{b}.{c}.0/24")
}

/// `GET …/virtualNetworks/{vnet}/subnets/{name}`.
fn get_subnet(opts: &ServerOptions, state: &State, call: &Call) -> Answer {
    if !path_id(call).eq_ignore_ascii_case(&opts.subnet_id) {
        return not_found(
            "Microsoft.Network/virtualNetworks/subnets",
            call.last(),
            call.segment(3),
        );
    }
    let configurations: Vec<Value> = state
        .nics
        .values()
        .map(
            |n| json!({"id": format!("{}/ipConfigurations/{}", nic_id(opts, &n.name), n.ipconfig)}),
        )
        .collect();
    Answer::json(
        200,
        json!({
            "name": id_name(&opts.subnet_id),
            "id": opts.subnet_id,
            "etag": "W/\"00000000-0000-0000-0000-000000000001\"",
            "type": "Microsoft.Network/virtualNetworks/subnets",
            "properties": {
                "provisioningState": "Succeeded",
                "addressPrefix": subnet_prefix(opts),
                "ipConfigurations": configurations,
                "delegations": [],
                "privateEndpointNetworkPolicies": "Disabled",
                "privateLinkServiceNetworkPolicies": "Enabled",
            },
        }),
    )
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

/// The inspection view of a VM.
fn server_vm(opts: &ServerOptions, state: &State, vm: &HeldVm) -> ServerVm {
    let nic = state.nics.get(&vm.nic);
    ServerVm {
        name: vm.name.clone(),
        id: vm_id(opts, &vm.name),
        tags: vm.tags.clone(),
        provisioning_state: vm.provisioning_state.clone(),
        power_state: power_of(state, vm).map(str::to_owned),
        size: vm.size.clone(),
        user_data: vm.user_data.clone(),
        private_ip: nic.map_or(Ipv4Addr::UNSPECIFIED, |n| n.address),
        public_ip: vm
            .public_ip
            .as_ref()
            .and_then(|k| state.ips.get(k))
            .map(|ip| ip.address),
        nic: nic.map_or_else(|| vm.nic.clone(), |n| n.name.clone()),
        os_disk: state
            .disks
            .get(&vm.disk)
            .map_or_else(|| vm.disk.clone(), |d| d.name.clone()),
        body: vm.body.clone(),
    }
}

/// A VM as GET answers it.
fn vm_body(
    shared: &Shared,
    state: &State,
    vm: &HeldVm,
    with_user_data: bool,
    with_instance_view: bool,
) -> Value {
    let opts = &shared.options;
    let sent = vm.body.get("properties").cloned().unwrap_or(json!({}));
    let mut properties = Map::new();
    properties.insert("hardwareProfile".into(), json!({"vmSize": vm.size.clone()}));
    // The storage profile as CRP completes it.
    let mut os_disk = sent
        .pointer("/storageProfile/osDisk")
        .cloned()
        .unwrap_or(json!({}));
    if let Some(disk) = state.disks.get(&vm.disk) {
        os_disk["name"] = json!(disk.name);
        os_disk["osType"] = json!("Linux");
        os_disk["caching"] = os_disk
            .get("caching")
            .cloned()
            .unwrap_or(json!("ReadWrite"));
        os_disk["createOption"] = json!("FromImage");
        os_disk["diskSizeGB"] = json!(disk.size_gb);
        os_disk["deleteOption"] = json!(if vm.disk_delete { "Delete" } else { "Detach" });
        let mut managed = os_disk.get("managedDisk").cloned().unwrap_or(json!({}));
        managed["id"] = json!(disk_id(opts, &disk.name));
        managed["storageAccountType"] = json!(disk.sku);
        os_disk["managedDisk"] = managed;
    }
    properties.insert(
        "storageProfile".into(),
        json!({
            "imageReference": sent.pointer("/storageProfile/imageReference").cloned().unwrap_or(Value::Null),
            "osDisk": os_disk,
            "dataDisks": [],
            "diskControllerType": "SCSI",
        }),
    );
    if let Some(os) = sent.get("osProfile") {
        let mut os = os.clone();
        if let Some(map) = os.as_object_mut() {
            // Never returned by CRP.
            map.remove("adminPassword");
            map.remove("customData");
            map.insert("secrets".into(), json!([]));
            map.entry("allowExtensionOperations").or_insert(json!(true));
            map.insert("requireGuestProvisionSignal".into(), json!(true));
        }
        properties.insert("osProfile".into(), os);
    }
    let nic_name = state
        .nics
        .get(&vm.nic)
        .map_or_else(|| vm.nic.clone(), |n| n.name.clone());
    let mut network = json!({
        "networkInterfaces": [{
            "id": nic_id(opts, &nic_name),
            "properties": {"primary": true, "deleteOption": if vm.nic_delete { "Delete" } else { "Detach" }},
        }],
    });
    for key in ["networkApiVersion", "networkInterfaceConfigurations"] {
        if let Some(v) = sent.pointer(&format!("/networkProfile/{key}")) {
            network[key] = v.clone();
        }
    }
    properties.insert("networkProfile".into(), network);
    for key in [
        "securityProfile",
        "diagnosticsProfile",
        "additionalCapabilities",
        "priority",
        "evictionPolicy",
        "billingProfile",
        "scheduledEventsProfile",
    ] {
        if let Some(v) = sent.get(key) {
            properties.insert(key.into(), v.clone());
        }
    }
    properties.insert("vmId".into(), json!(vm.vm_id));
    properties.insert("provisioningState".into(), json!(vm.provisioning_state));
    properties.insert("timeCreated".into(), json!(crp_time(vm.created)));
    if with_user_data && let Some(data) = &vm.user_data {
        properties.insert("userData".into(), json!(data));
    }
    if with_instance_view {
        properties.insert("instanceView".into(), instance_view(state, vm));
    }
    let mut body = json!({
        "name": vm.name,
        "id": vm_id(opts, &vm.name),
        "type": "Microsoft.Compute/virtualMachines",
        "location": opts.region,
        "properties": Value::Object(properties),
    });
    if !vm.tags.is_empty() {
        body["tags"] = json!(vm.tags);
    }
    for key in ["identity", "zones", "plan"] {
        if let Some(v) = vm.body.get(key) {
            body[key] = v.clone();
        }
    }
    body
}

/// The power state a VM's instance view shows (`PowerState/…` without the
/// prefix): `starting` while it is created or started, `stopping` while it
/// is deleted, none when provisioning failed, else the one it is in.
fn power_of(state: &State, vm: &HeldVm) -> Option<&'static str> {
    let starting = vm
        .op
        .as_ref()
        .and_then(|op| state.ops.get(op))
        .is_some_and(|o| o.kind == OpKind::Start && o.outcome.is_none());
    match vm.provisioning_state.as_str() {
        "Creating" => Some("starting"),
        "Deleting" => Some("stopping"),
        "Failed" => None,
        _ if starting => Some("starting"),
        _ => Some(match vm.power {
            Power::Running => "running",
            Power::Stopped => "stopped",
            Power::Deallocated => "deallocated",
        }),
    }
}

/// A VM's instance view (`$expand=instanceView`, `…/instanceView`).
fn instance_view(state: &State, vm: &HeldVm) -> Value {
    let state_code = vm.provisioning_state.to_ascii_lowercase();
    let mut statuses = vec![json!({
        "code": format!("ProvisioningState/{state_code}"),
        "level": if state_code == "failed" { "Error" } else { "Info" },
        "displayStatus": format!("Provisioning {state_code}"),
        "time": crp_time(vm.created),
    })];
    if let Some(power) = power_of(state, vm) {
        statuses.push(json!({
            "code": format!("PowerState/{power}"),
            "level": "Info",
            "displayStatus": format!("VM {power}"),
        }));
    }
    json!({
        "computerName": text(&vm.body, "/properties/osProfile/computerName").unwrap_or(&vm.name),
        "osName": "ubuntu",
        "osVersion": "24.04",
        "hyperVGeneration": "V2",
        "statuses": statuses,
    })
}

/// A NIC as GET answers it.
fn nic_body(shared: &Shared, state: &State, nic: &HeldNic) -> Value {
    let opts = &shared.options;
    let id = nic_id(opts, &nic.name);
    let mut ip_properties = json!({
        "provisioningState": "Succeeded",
        "privateIPAddress": nic.address.to_string(),
        "privateIPAllocationMethod": "Dynamic",
        "privateIPAddressVersion": "IPv4",
        "primary": true,
        "subnet": {"id": nic.subnet},
    });
    if let Some(ip) = nic.public_ip.as_ref().and_then(|k| state.ips.get(k)) {
        ip_properties["publicIPAddress"] = json!({"id": ip_id(opts, &ip.name)});
    }
    let mut properties = json!({
        "provisioningState": "Succeeded",
        "resourceGuid": uuid_of(&id),
        "ipConfigurations": [{
            "name": nic.ipconfig,
            "id": format!("{id}/ipConfigurations/{}", nic.ipconfig),
            "etag": "W/\"00000000-0000-0000-0000-000000000001\"",
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
            "properties": ip_properties,
        }],
        "dnsSettings": {"dnsServers": [], "appliedDnsServers": []},
        "enableAcceleratedNetworking": false,
        "enableIPForwarding": false,
        "primary": true,
        "nicType": "Standard",
    });
    if let Some(vm) = nic.vm.as_ref().and_then(|k| state.vms.get(k)) {
        properties["virtualMachine"] = json!({"id": vm_id(opts, &vm.name)});
        properties["macAddress"] = json!(mac_of(nic.address));
    }
    if let Some(nsg) = &nic.nsg {
        properties["networkSecurityGroup"] = json!({"id": nsg});
    }
    json!({
        "name": nic.name,
        "id": id,
        "etag": "W/\"00000000-0000-0000-0000-000000000001\"",
        "type": "Microsoft.Network/networkInterfaces",
        "location": opts.region,
        "properties": properties,
    })
}

/// A public IP address as GET answers it.
fn public_ip_body(opts: &ServerOptions, state: &State, ip: &HeldIp) -> Value {
    let mut properties = json!({
        "provisioningState": "Succeeded",
        "resourceGuid": uuid_of(&ip.name),
        "ipAddress": ip.address.to_string(),
        "publicIPAddressVersion": "IPv4",
        "publicIPAllocationMethod": "Static",
        "idleTimeoutInMinutes": 4,
        "ipTags": [],
    });
    if let Some(nic) = ip.nic.as_ref().and_then(|k| state.nics.get(k)) {
        properties["ipConfiguration"] = json!({
            "id": format!("{}/ipConfigurations/{}", nic_id(opts, &nic.name), nic.ipconfig)
        });
    }
    json!({
        "name": ip.name,
        "id": ip_id(opts, &ip.name),
        "etag": "W/\"00000000-0000-0000-0000-000000000001\"",
        "type": "Microsoft.Network/publicIPAddresses",
        "location": opts.region,
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": properties,
    })
}

/// A disk as GET answers it.
fn disk_body(opts: &ServerOptions, state: &State, disk: &HeldDisk) -> Value {
    let mut creation = json!({"createOption": "FromImage"});
    if let Some(id) = text(&disk.image, "/id") {
        if id.to_ascii_lowercase().contains("/galleries/") {
            creation["galleryImageReference"] = json!({"id": id});
        } else {
            creation["imageReference"] = json!({"id": id});
        }
    } else if let Some(id) = text(&disk.image, "/communityGalleryImageId") {
        creation["galleryImageReference"] = json!({"communityGalleryImageId": id});
    }
    let mut body = json!({
        "name": disk.name,
        "id": disk_id(opts, &disk.name),
        "type": "Microsoft.Compute/disks",
        "location": opts.region,
        "sku": {"name": disk.sku, "tier": if disk.sku.starts_with("Premium") { "Premium" } else { "Standard" }},
        "properties": {
            "osType": "Linux",
            "hyperVGeneration": "V2",
            "creationData": creation,
            "diskSizeGB": disk.size_gb,
            "diskSizeBytes": disk.size_gb << 30,
            "uniqueId": uuid_of(&disk.name),
            "provisioningState": "Succeeded",
            "diskState": disk_state(state, disk),
            "timeCreated": crp_time(disk.created),
            "encryption": {"type": "EncryptionAtRestWithPlatformKey"},
            "networkAccessPolicy": "AllowAll",
            "publicNetworkAccess": "Enabled",
        },
    });
    if let Some(vm) = disk.vm.as_ref().and_then(|k| state.vms.get(k)) {
        body["managedBy"] = json!(vm_id(opts, &vm.name));
    }
    body
}

/// A disk's `diskState`: `Attached` to a VM, `Reserved` by a deallocated
/// one, else `Unattached`.
fn disk_state(state: &State, disk: &HeldDisk) -> &'static str {
    match disk.vm.as_ref().and_then(|k| state.vms.get(k)) {
        Some(vm) if power_of(state, vm) == Some("deallocated") => "Reserved",
        Some(_) => "Attached",
        None if disk.vm.is_some() => "Attached",
        None => "Unattached",
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A MAC address derived from a NIC's address (Azure's format: dashes).
fn mac_of(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("00-0D-3A-{b:02X}-{c:02X}-{:02X}", d ^ a)
}

/// A stable GUID-shaped id derived from `seed`.
fn uuid_of(seed: &str) -> String {
    // FNV-1a, twice, for 128 bits.
    let hash = |salt: u64| {
        seed.bytes().fold(0xcbf2_9ce4_8422_2325 ^ salt, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0), hash(0x9e37_79b9_7f4a_7c15));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Percent-decodes a form or query string into pairs (`+` is a space).
fn parse_form(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(&k.replace('+', " ")), decode(&v.replace('+', " ")))
        })
        .collect()
}

/// Percent-decodes `s` (a path segment: `+` stays).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A random UUID (v4-shaped).
fn uuid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        0x8000 | fastrand::u16(..0x4000),
        fastrand::u64(..1 << 48)
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` in UTC: (year, month, day, hour, minute, second).
fn civil(t: SystemTime) -> (i64, i64, i64, u64, u64, u64) {
    let secs = unix(t);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `t` as CRP writes times: RFC 3339 with 7 fractional digits and `+00:00`.
fn crp_time(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    let ticks = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() / 100);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ticks:07}+00:00")
}

/// `t` as Entra ID's error bodies write it: `2026-01-01 00:00:00Z`.
fn entra_time(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

/// `t` as `x-ms-routing-request-id` writes it: `20260101T000000Z`.
fn compact_time(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> Route {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        route_of(method, &segments, false)
    }

    #[test]
    fn routes_are_case_insensitive() {
        let vm =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm";
        assert_eq!(route("PUT", vm), Route::PutVm);
        assert_eq!(route("GET", &vm.to_uppercase()), Route::GetVm);
        assert_eq!(route("DELETE", vm), Route::DeleteVm);
        assert_eq!(route("PATCH", vm), Route::Other);
        assert_eq!(route("POST", &format!("{vm}/Start")), Route::StartVm);
        assert_eq!(route("GET", &format!("{vm}/start")), Route::Other);
        assert_eq!(
            route("GET", &format!("{vm}/instanceView")),
            Route::GetVmInstanceView
        );
        assert_eq!(route("POST", &format!("{vm}/deallocate")), Route::Other);
        assert_eq!(
            route(
                "GET",
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g/images/i/versions/1.0.0"
            ),
            Route::GetImage
        );
        assert_eq!(route("POST", "/tenant/oauth2/v2.0/token"), Route::Token);
        assert_eq!(
            route("GET", "/tenant/v2.0/.well-known/openid-configuration"),
            Route::OpenIdConfiguration
        );
        assert_eq!(route("GET", "/"), Route::Other);
    }

    #[test]
    fn times_and_encodings() {
        let t = UNIX_EPOCH + Duration::new(1_767_225_600 + 3661, 123_456_700);
        assert_eq!(crp_time(t), "2026-01-01T01:01:01.1234567+00:00");
        assert_eq!(entra_time(t), "2026-01-01 01:01:01Z");
        assert_eq!(compact_time(t), "20260101T010101Z");
        assert_eq!(
            hex_decode(&hex_encode("podvm-a")).as_deref(),
            Some("podvm-a")
        );
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(decode("a%3Ab%"), "a:b%");
        assert_eq!(
            parse_form("scope=https%3A%2F%2Fx%2F.default&a=b+c"),
            vec![
                ("scope".into(), "https://x/.default".into()),
                ("a".into(), "b c".into())
            ]
        );
        assert_eq!(uuid_of("x"), uuid_of("x"));
        assert_eq!(uuid_of("x").len(), 36);
        assert_eq!(region_key("East US"), "eastus");
    }
}
