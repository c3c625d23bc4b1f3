//! A small typed client of the IBM Cloud VPC, Global Tagging and Global
//! Search REST APIs: only the calls and fields the provider needs.
//!
//! Every VPC request carries `version=` [`VPC_API_VERSION`] and
//! `generation=2` (IBM Cloud VPC API, "API versioning"). Every request
//! draws a token of its class from the daemon's pacer first (lookups and
//! listings read, everything else mutating) and tells the bucket whether
//! it was throttled. A 401 is retried once with a fresh IAM token. Listing
//! pages are followed by their cursor only (`start=` of VPC's `next.href`,
//! Global Search's `search_cursor`), never by a URL the server gave, so a
//! listing cannot be sent elsewhere.

use super::errors;
use super::iam::Iam;
use crate::error::ProviderError;
use crate::pacing::{Pacer, RequestClass};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The VPC API version every request asks for (a date; IBM keeps each
/// version's behaviour). Pinned: a newer one is adopted by changing it here
/// and re-running the tests.
pub const VPC_API_VERSION: &str = "2025-04-08";
/// Instances per VPC listing page (the API's maximum is 100).
const PAGE: u32 = 100;
/// Results per Global Search page (the API's maximum is 1000).
const SEARCH_PAGE: u32 = 1000;
/// Pages one listing follows at most: a server whose cursors cycle cannot
/// hold a call forever (100 pages of 100 instances is far beyond a VPC's
/// quota of instances).
const MAX_PAGES: usize = 1000;

/// The base URLs of the four services.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// VPC, with its `/v1` (`https://us-south.iaas.cloud.ibm.com/v1`).
    pub vpc: String,
    /// Global Tagging, without a path.
    pub tagging: String,
    /// Global Search, without a path.
    pub search: String,
}

/// An HTTP client of the VPC, Global Tagging and Global Search APIs.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    iam: Arc<Iam>,
    endpoints: Endpoints,
    pacer: Arc<Pacer>,
}

/// A reference by id (`{"id": "…"}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ById {
    /// The id.
    pub id: String,
}

/// A reference by name (`{"name": "…"}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ByName {
    /// The name.
    #[serde(default)]
    pub name: String,
}

/// `InstancePrototypeInstanceByImage`: the body of `POST /instances`.
#[derive(Debug, Clone, Serialize)]
pub struct InstancePrototype {
    /// The instance name (unique in the region).
    pub name: String,
    /// The profile (`bx2-2x8`).
    pub profile: ByName,
    /// The image.
    pub image: ById,
    /// The zone.
    pub zone: ByName,
    /// The VPC.
    pub vpc: ById,
    /// The primary network interface.
    pub primary_network_interface: NetworkInterfacePrototype,
    /// SSH keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<ById>,
    /// Cloud-init user data (at most 64 KiB).
    pub user_data: String,
    /// The metadata service, which the pod VM reads its user data from.
    pub metadata_service: MetadataService,
    /// The resource group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<ById>,
    /// The boot volume: its name carries the idempotency token.
    pub boot_volume_attachment: BootVolumeAttachment,
    /// `tdx` for a confidential VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidential_compute_mode: Option<String>,
    /// Secure boot (with TDX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_secure_boot: Option<bool>,
    /// A dedicated host or host group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement_target: Option<ById>,
}

/// The primary network interface of a new instance.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInterfacePrototype {
    /// Its subnet.
    pub subnet: ById,
    /// Its security groups (none: the VPC's default group).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<ById>,
}

/// `{"enabled": true, "protocol": "http"}`.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataService {
    /// Whether the instance may reach the metadata service.
    pub enabled: bool,
    /// `http` (the pod VM's `podvisor-userdata` speaks plain HTTP to
    /// `169.254.169.254`, as the reference sets it).
    pub protocol: String,
}

/// The boot volume of a new instance.
#[derive(Debug, Clone, Serialize)]
pub struct BootVolumeAttachment {
    /// The volume.
    pub volume: BootVolumePrototype,
    /// The volume goes with the instance.
    pub delete_volume_on_instance_delete: bool,
}

/// The boot volume's name and profile.
#[derive(Debug, Clone, Serialize)]
pub struct BootVolumePrototype {
    /// Its name: the idempotency token.
    pub name: String,
    /// Its storage profile (`general-purpose`).
    pub profile: ByName,
}

/// An instance, as VPC answers it (only the fields podvisor reads).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VpcInstance {
    /// Its id.
    pub id: String,
    /// Its CRN, which Global Tagging and Global Search name it by.
    pub crn: String,
    /// Its name.
    pub name: String,
    /// `pending`, `starting`, `running`, `stopping`, `stopped`,
    /// `deleting`, `failed`, … .
    pub status: String,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
    /// The primary network interface (API versions before network
    /// attachments).
    #[serde(default)]
    pub primary_network_interface: Option<NetworkInterfaceRef>,
    /// The boot volume.
    #[serde(default)]
    pub boot_volume_attachment: Option<VolumeAttachmentRef>,
    /// Its profile.
    #[serde(default)]
    pub profile: ByName,
}

/// A network interface reference.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct NetworkInterfaceRef {
    /// Its primary IP; `0.0.0.0` until one is allocated.
    #[serde(default)]
    pub primary_ip: Option<ReservedIpRef>,
}

/// A reserved IP reference.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ReservedIpRef {
    /// The address.
    pub address: String,
}

/// A volume attachment reference.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VolumeAttachmentRef {
    /// The volume.
    #[serde(default)]
    pub volume: Option<ByName>,
}

impl VpcInstance {
    /// The primary address, once allocated (not `0.0.0.0`).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.primary_network_interface
            .as_ref()?
            .primary_ip
            .as_ref()?
            .address
            .parse::<std::net::IpAddr>()
            .ok()
            .filter(|ip| !ip.is_unspecified())
    }

    /// The boot volume's name: the token the instance was made with.
    pub fn boot_volume_name(&self) -> Option<&str> {
        Some(
            self.boot_volume_attachment
                .as_ref()?
                .volume
                .as_ref()?
                .name
                .as_str(),
        )
    }

    /// Whether the instance counts as gone (deleted or being deleted).
    pub fn is_gone(&self) -> bool {
        self.status == "deleting"
    }
}

#[derive(Debug, Deserialize)]
struct InstancePage {
    #[serde(default)]
    instances: Vec<VpcInstance>,
    next: Option<Href>,
}

#[derive(Debug, Deserialize)]
struct Href {
    href: String,
}

/// An image's architecture, from `GET /images/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    /// Its id.
    pub id: String,
    /// `available`, `pending`, `deprecated`, …
    #[serde(default)]
    pub status: String,
    /// Its operating system.
    pub operating_system: Option<OperatingSystem>,
}

/// An image's operating system.
#[derive(Debug, Clone, Deserialize)]
pub struct OperatingSystem {
    /// `amd64`, `s390x`.
    pub architecture: String,
}

/// One instance profile, from `GET /instance/profiles`.
#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    /// Its name (`bx2-2x8`).
    pub name: String,
    /// vCPUs.
    pub vcpu_count: Option<Value>,
    /// Memory in GiB.
    pub memory: Option<Value>,
    /// The vCPUs' architecture.
    pub vcpu_architecture: Option<StringValue>,
    /// GPUs.
    #[serde(default)]
    pub gpu_count: Option<Value>,
}

/// A fixed number (`{"type": "fixed", "value": 2}`); ranges and
/// dependent values read as absent.
#[derive(Debug, Clone, Deserialize)]
pub struct Value {
    /// The value.
    pub value: Option<u64>,
}

/// A fixed string (`{"type": "fixed", "value": "amd64"}`).
#[derive(Debug, Clone, Deserialize)]
pub struct StringValue {
    /// The value.
    pub value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ProfilePage {
    #[serde(default)]
    profiles: Vec<Profile>,
}

/// One Global Search result.
#[derive(Debug, Clone, Deserialize)]
pub struct SearchItem {
    /// The resource's CRN.
    pub crn: String,
    /// Its user tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SearchPage {
    #[serde(default)]
    items: Vec<SearchItem>,
    search_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InZone {
    zone: ByName,
}

#[derive(Debug, Deserialize)]
struct TagPage {
    #[serde(default)]
    items: Vec<TagItem>,
}

#[derive(Debug, Deserialize)]
struct TagItem {
    name: String,
}

#[derive(Debug, Deserialize)]
struct AttachAnswer {
    #[serde(default)]
    results: Vec<AttachResult>,
}

#[derive(Debug, Deserialize)]
struct AttachResult {
    #[serde(default)]
    is_error: bool,
}

/// An answer: status and body.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Client {
    /// A client of `endpoints` with tokens from `iam`, paced by `pacer`.
    pub fn new(
        http: reqwest::Client,
        iam: Arc<Iam>,
        endpoints: Endpoints,
        pacer: Arc<Pacer>,
    ) -> Self {
        Self {
            http,
            iam,
            endpoints,
            pacer,
        }
    }

    /// The IAM token source.
    pub fn iam(&self) -> &Iam {
        &self.iam
    }

    /// Sends one request: a pacer token, an IAM token, and one retry with a
    /// fresh IAM token after a 401. Non-2xx answers become errors, except
    /// those in `accept` (a 404 a lookup expects), which are returned.
    async fn send(
        &self,
        class: RequestClass,
        what: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        accept: &[StatusCode],
    ) -> Result<Answer, ProviderError> {
        let mut refreshed = false;
        loop {
            let token = self.iam.token().await?;
            self.pacer.take(class).await;
            let answer = build(&self.http)
                .bearer_auth(token.expose())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| errors::from_transport(what, &e))?;
            let status = answer.status();
            let retry_after = answer
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(3600)));
            let body = answer
                .bytes()
                .await
                .map_err(|e| errors::from_transport(what, &e))?
                .to_vec();
            let bucket = self.pacer.bucket(class);
            if status == StatusCode::TOO_MANY_REQUESTS {
                bucket.throttled();
            } else {
                bucket.accepted();
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                self.iam.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if status.is_success() || accept.contains(&status) {
                return Ok(Answer { status, body });
            }
            return Err(errors::from_response(
                what,
                status.as_u16(),
                &body,
                retry_after,
            ));
        }
    }

    fn vpc(&self, path: &str) -> String {
        format!("{}{path}", self.endpoints.vpc.trim_end_matches('/'))
    }

    fn versioned(builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        builder.query(&[("version", VPC_API_VERSION), ("generation", "2")])
    }

    /// `GET <vpc><path>` (versioned), its answer parsed as `T`.
    async fn vpc_get<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
    ) -> Result<T, ProviderError> {
        let url = self.vpc(path);
        let answer = self
            .send(
                RequestClass::Read,
                what,
                |http| Self::versioned(http.get(&url)),
                &[],
            )
            .await?;
        parse(what, &answer.body)
    }

    /// `POST /instances`.
    ///
    /// # Errors
    /// The classified answer; `validation_unique_failed` (code) when the
    /// name or the boot volume name is taken.
    pub async fn create_instance(
        &self,
        body: &InstancePrototype,
    ) -> Result<VpcInstance, ProviderError> {
        let what = format!("create instance {}", body.name);
        let url = self.vpc("/instances");
        let answer = self
            .send(
                RequestClass::Mutating,
                &what,
                |http| Self::versioned(http.post(&url)).json(body),
                &[],
            )
            .await?;
        parse(&what, &answer.body)
    }

    /// `GET /instances/{id}`; `None` when it does not exist.
    ///
    /// # Errors
    /// The classified answer.
    pub async fn get_instance(&self, id: &str) -> Result<Option<VpcInstance>, ProviderError> {
        let what = format!("get instance {id}");
        let url = self.vpc(&format!("/instances/{id}"));
        let answer = self
            .send(
                RequestClass::Read,
                &what,
                |http| Self::versioned(http.get(&url)),
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        parse(&what, &answer.body).map(Some)
    }

    /// `GET /instances?name=<name>`: the instances of that name in the
    /// region (a live one and any being deleted), every page.
    ///
    /// # Errors
    /// The classified answer of any page.
    pub async fn instances_named(&self, name: &str) -> Result<Vec<VpcInstance>, ProviderError> {
        let what = "list instances";
        let url = self.vpc("/instances");
        let mut all = Vec::new();
        let mut start: Option<String> = None;
        let mut pages = 0;
        loop {
            let answer = self
                .send(
                    RequestClass::Read,
                    what,
                    |http| {
                        let mut b = Self::versioned(http.get(&url))
                            .query(&[("limit", PAGE)])
                            .query(&[("name", name)]);
                        if let Some(start) = &start {
                            b = b.query(&[("start", start)]);
                        }
                        b
                    },
                    &[],
                )
                .await?;
            let page: InstancePage = parse(what, &answer.body)?;
            all.extend(page.instances);
            let next = page.next.and_then(|n| start_of(&n.href));
            match next {
                Some(cursor) if Some(&cursor) != start.as_ref() => start = Some(cursor),
                _ => return Ok(all),
            }
            pages += 1;
            if pages >= MAX_PAGES {
                return Err(too_many_pages(what));
            }
        }
    }

    /// `DELETE /instances/{id}`; `false` when it did not exist.
    ///
    /// # Errors
    /// The classified answer (409 while the instance cannot be deleted yet
    /// is transient).
    pub async fn delete_instance(&self, id: &str) -> Result<bool, ProviderError> {
        let what = format!("delete instance {id}");
        let url = self.vpc(&format!("/instances/{id}"));
        let answer = self
            .send(
                RequestClass::Mutating,
                &what,
                |http| Self::versioned(http.delete(&url)),
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        Ok(answer.status != StatusCode::NOT_FOUND)
    }

    /// `POST /instances/{id}/actions` `{"type": "start"}`.
    ///
    /// # Errors
    /// The classified answer.
    pub async fn start_instance(&self, id: &str) -> Result<(), ProviderError> {
        let what = format!("start instance {id}");
        let url = self.vpc(&format!("/instances/{id}/actions"));
        let body = serde_json::json!({ "type": "start" });
        self.send(
            RequestClass::Mutating,
            &what,
            |http| Self::versioned(http.post(&url)).json(&body),
            &[],
        )
        .await
        .map(drop)
    }

    /// `GET /images/{id}`.
    ///
    /// # Errors
    /// The classified answer (`NotFound` for an unknown image).
    pub async fn get_image(&self, id: &str) -> Result<Image, ProviderError> {
        self.vpc_get(&format!("get image {id}"), &format!("/images/{id}"))
            .await
    }

    /// `GET /instance/profiles`: every profile of the region.
    ///
    /// # Errors
    /// The classified answer.
    pub async fn list_profiles(&self) -> Result<Vec<Profile>, ProviderError> {
        let page: ProfilePage = self
            .vpc_get("list instance profiles", "/instance/profiles")
            .await?;
        Ok(page.profiles)
    }

    /// `GET /subnets/{id}`: whether the subnet exists.
    ///
    /// # Errors
    /// The classified answer (`NotFound` for an unknown subnet).
    pub async fn get_subnet(&self, id: &str) -> Result<(), ProviderError> {
        self.vpc_get::<serde::de::IgnoredAny>(
            &format!("get subnet {id}"),
            &format!("/subnets/{id}"),
        )
        .await
        .map(drop)
    }

    /// The zone of a dedicated host (`GET /dedicated_hosts/{id}`) or, with
    /// `group`, of a dedicated host group (`GET /dedicated_host/groups/{id}`).
    ///
    /// # Errors
    /// The classified answer (`NotFound` for an unknown id).
    pub async fn dedicated_host_zone(
        &self,
        id: &str,
        group: bool,
    ) -> Result<String, ProviderError> {
        let (what, path) = if group {
            (
                format!("get dedicated host group {id}"),
                format!("/dedicated_host/groups/{id}"),
            )
        } else {
            (
                format!("get dedicated host {id}"),
                format!("/dedicated_hosts/{id}"),
            )
        };
        let parsed: InZone = self.vpc_get(&what, &path).await?;
        Ok(parsed.zone.name)
    }

    /// Global Tagging `POST /v3/tags/attach?tag_type=user`: attaches
    /// `tags` to the resource `crn` (attaching a tag it has is a no-op).
    ///
    /// # Errors
    /// The classified answer; `Transient` when the answer reports the
    /// resource's attach failed.
    pub async fn attach_tags(&self, crn: &str, tags: &[String]) -> Result<(), ProviderError> {
        let what = "attach tags";
        let url = format!(
            "{}/v3/tags/attach",
            self.endpoints.tagging.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "resources": [{ "resource_id": crn }],
            "tag_names": tags,
        });
        let answer = self
            .send(
                RequestClass::Mutating,
                what,
                |http| http.post(&url).query(&[("tag_type", "user")]).json(&body),
                &[],
            )
            .await?;
        let parsed: AttachAnswer = parse(what, &answer.body)?;
        if parsed.results.iter().any(|r| r.is_error) {
            return Err(ProviderError::transient(format!(
                "IBM Cloud {what}: Global Tagging reported a failure for {crn}"
            )));
        }
        Ok(())
    }

    /// Global Tagging `GET /v3/tags?attached_to=<crn>&tag_type=user`: the
    /// user tags of one resource (a resource has at most a few dozen; one
    /// page of 1000 holds them).
    ///
    /// # Errors
    /// The classified answer.
    pub async fn list_tags(&self, crn: &str) -> Result<Vec<String>, ProviderError> {
        let what = "list tags";
        let url = format!("{}/v3/tags", self.endpoints.tagging.trim_end_matches('/'));
        let answer = self
            .send(
                RequestClass::Read,
                what,
                |http| {
                    http.get(&url).query(&[
                        ("attached_to", crn),
                        ("tag_type", "user"),
                        ("limit", "1000"),
                    ])
                },
                &[],
            )
            .await?;
        let page: TagPage = parse(what, &answer.body)?;
        Ok(page.items.into_iter().map(|t| t.name).collect())
    }

    /// Global Search `POST /v3/resources/search`: every resource matching
    /// the Lucene `query`, with its CRN and tags, every page.
    ///
    /// # Errors
    /// The classified answer of any page.
    pub async fn search(&self, query: &str) -> Result<Vec<SearchItem>, ProviderError> {
        let what = "search resources";
        let url = format!(
            "{}/v3/resources/search",
            self.endpoints.search.trim_end_matches('/')
        );
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut body = serde_json::json!({ "query": query, "fields": ["crn", "name", "tags"] });
            if let Some(cursor) = &cursor {
                body["search_cursor"] = serde_json::Value::String(cursor.clone());
            }
            let answer = self
                .send(
                    RequestClass::Read,
                    what,
                    |http| http.post(&url).query(&[("limit", SEARCH_PAGE)]).json(&body),
                    &[],
                )
                .await?;
            let page: SearchPage = parse(what, &answer.body)?;
            // The last page has no cursor, or (when the one before was
            // full) no items.
            let empty = page.items.is_empty();
            all.extend(page.items);
            match page.search_cursor {
                Some(next) if !empty && Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(all),
            }
            pages += 1;
            if pages >= MAX_PAGES {
                return Err(too_many_pages(what));
            }
        }
    }
}

/// An answer's body parsed as `T`, or [`errors::malformed`].
fn parse<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| errors::malformed(what, &e))
}

fn too_many_pages(what: &str) -> ProviderError {
    ProviderError::transient(format!(
        "IBM Cloud {what}: more than {MAX_PAGES} pages; the server's cursors do not end"
    ))
}

/// The `start` cursor of a VPC `next.href`.
fn start_of(href: &str) -> Option<String> {
    let url = reqwest::Url::parse(href).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == "start")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cursor_of_a_next_link_is_kept() {
        assert_eq!(
            start_of("https://evil.example/v1/instances?limit=1&start=r006-abc&version=x"),
            Some("r006-abc".into())
        );
        assert_eq!(start_of("https://x/v1/instances?limit=1"), None);
        assert_eq!(start_of("not a url"), None);
    }

    #[test]
    fn an_instance_has_an_address_once_it_is_not_0_0_0_0() {
        let mut i: VpcInstance = serde_json::from_value(serde_json::json!({
            "id": "0717_a", "crn": "crn:v1:x", "name": "podvm-a", "status": "pending",
            "primary_network_interface": {"primary_ip": {"address": "0.0.0.0"}},
            "boot_volume_attachment": {"volume": {"name": "pv-abc-g1"}},
        }))
        .unwrap();
        assert_eq!(i.address(), None);
        assert_eq!(i.boot_volume_name(), Some("pv-abc-g1"));
        i.primary_network_interface = Some(NetworkInterfaceRef {
            primary_ip: Some(ReservedIpRef {
                address: "10.240.0.4".into(),
            }),
        });
        assert_eq!(i.address(), Some("10.240.0.4".parse().unwrap()));
    }
}
