//! Reading instances from EC2: live instances by filter, every page, and
//! lookups by token batched so that the creates and finds of many sandboxes
//! at once share one `DescribeInstances` instead of making one each.
//!
//! Every instance read is also checked for an Elastic IP (see
//! [`may_hold_elastic_ip`]): the ids seen with one are remembered, so that
//! a delete looks up addresses (`DescribeAddresses`) only for those.

use super::errors::from_sdk;
use crate::error::ProviderError;
use crate::provider::{Instance, InstanceStatus, TAG_TOKEN};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// The states of an instance that is not on its way out.
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];
/// Tokens per batched `DescribeInstances` (EC2 takes up to 200 values per filter).
const TOKENS_PER_CALL: usize = 100;

/// Reads instances; shared by the provider and its batched lookups.
pub(crate) struct InstanceReader {
    /// The EC2 client; `None` after teardown.
    client: RwLock<Option<Client>>,
    /// Put the public address first (public-IP mode).
    use_public_ip: bool,
    /// Instances per `DescribeInstances` page (5 to 1000).
    page_size: AtomicI32,
    /// Ids of the instances last seen holding an Elastic IP (or an address
    /// whose owner EC2 did not say): their deletes release addresses first.
    with_elastic_ip: Mutex<HashSet<String>>,
}

/// The `IpOwnerId` EC2 gives a public address from Amazon's pool (one
/// auto-assigned at launch); an Elastic IP's is the owner's account id.
const AMAZON_OWNED: &str = "amazon";

/// Whether EC2's view of an instance shows, or cannot rule out, an Elastic
/// IP on it: an address association (on a network interface or one of its
/// private addresses) whose `IpOwnerId` is not `amazon`, or a public
/// address no association accounts for. An instance with no public address
/// has none. Errs towards `true`: the cost of a wrong `true` is one
/// `DescribeAddresses` at its delete.
pub(crate) fn may_hold_elastic_ip(i: &aws_sdk_ec2::types::Instance) -> bool {
    let mut associations = Vec::new();
    for interface in i.network_interfaces() {
        associations.extend(interface.association());
        associations.extend(
            interface
                .private_ip_addresses()
                .iter()
                .filter_map(aws_sdk_ec2::types::InstancePrivateIpAddress::association),
        );
    }
    if associations
        .iter()
        .any(|a| a.ip_owner_id() != Some(AMAZON_OWNED))
    {
        return true;
    }
    i.public_ip_address()
        .is_some_and(|public| !associations.iter().any(|a| a.public_ip() == Some(public)))
}

impl InstanceReader {
    /// A reader through `client`.
    pub(crate) fn new(client: Client, use_public_ip: bool, page_size: i32) -> Self {
        Self {
            client: RwLock::new(Some(client)),
            use_public_ip,
            page_size: AtomicI32::new(page_size),
            with_elastic_ip: Mutex::new(HashSet::new()),
        }
    }

    /// Whether instance `id` was last seen holding an Elastic IP (or an
    /// address of unknown owner). An instance never read since this
    /// process started is not: see `AwsProvider::delete_instance`.
    pub(crate) fn seen_with_elastic_ip(&self, id: &str) -> bool {
        self.elastic_ips().contains(id)
    }

    /// Forgets instance `id` (deleted).
    pub(crate) fn forget(&self, id: &str) {
        self.elastic_ips().remove(id);
    }

    fn elastic_ips(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.with_elastic_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the page size.
    pub(crate) fn set_page_size(&self, page_size: i32) {
        self.page_size
            .store(page_size.clamp(5, 1000), Ordering::Relaxed);
    }

    /// The client, unless torn down.
    pub(crate) fn client(&self) -> Result<Client, ProviderError> {
        self.client
            .read()
            .map_err(|_| ProviderError::transient("The EC2 client lock is poisoned"))?
            .clone()
            .ok_or_else(|| ProviderError::permanent("The AWS provider has been torn down"))
    }

    /// Drops the client (and with it, its connection pool).
    pub(crate) fn close(&self) {
        if let Ok(mut client) = self.client.write() {
            client.take();
        }
    }

    /// Every live instance matching `filters`, every page.
    pub(crate) async fn describe(
        &self,
        mut filters: Vec<Filter>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let client = self.client()?;
        filters.push(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    LIVE_STATES
                        .iter()
                        .map(std::string::ToString::to_string)
                        .collect(),
                ))
                .build(),
        );
        let mut pages = client
            .describe_instances()
            .set_filters(Some(filters))
            .max_results(self.page_size.load(Ordering::Relaxed))
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| from_sdk("DescribeInstances", &e))?;
            for reservation in page.reservations() {
                found.extend(
                    reservation
                        .instances()
                        .iter()
                        .filter_map(|i| self.to_instance(i)),
                );
            }
        }
        Ok(found)
    }

    /// An EC2 instance as the daemon sees it; `None` if it is on its way out
    /// or lacks an id. Notes whether it holds an Elastic IP now.
    pub(crate) fn to_instance(&self, i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
        let id = i.instance_id()?.to_owned();
        let status = match i.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Running) => InstanceStatus::Running,
            Some(InstanceStateName::Pending) | None => InstanceStatus::Starting,
            Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => {
                InstanceStatus::Stopped
            }
            Some(InstanceStateName::ShuttingDown) => return None,
            Some(InstanceStateName::Terminated) => {
                // EC2 has disassociated its addresses.
                self.forget(&id);
                return None;
            }
            Some(_) => InstanceStatus::Starting,
        };
        if may_hold_elastic_ip(i) {
            self.elastic_ips().insert(id.clone());
        } else {
            self.forget(&id);
        }
        let tags: BTreeMap<String, String> = i
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or("").to_owned())))
            .collect();
        let private = i
            .private_ip_address()
            .and_then(|a| a.parse::<IpAddr>().ok());
        let public = i.public_ip_address().and_then(|a| a.parse::<IpAddr>().ok());
        let ips = if self.use_public_ip {
            public.into_iter().chain(private).collect()
        } else {
            private.into_iter().chain(public).collect()
        };
        Some(Instance {
            name: tags.get("Name").cloned().unwrap_or_default(),
            id,
            ips,
            tags,
            created_at: i
                .launch_time()
                .and_then(|t| t.to_millis().ok())
                .and_then(|ms| u64::try_from(ms).ok()),
            status,
        })
    }
}

/// One lookup waiting for its batch.
type Waiter = (
    String,
    oneshot::Sender<Result<Option<Instance>, ProviderError>>,
);

/// Lookups by token, batched: the first lookup of an empty queue schedules
/// a batch after a short window; every lookup queued by then shares it.
pub(crate) struct TokenLookups {
    /// What the batch reads with.
    reader: Arc<InstanceReader>,
    /// Lookups waiting for the next batch.
    pending: Arc<Mutex<Vec<Waiter>>>,
    /// How long a batch waits for company.
    window: Duration,
}

impl TokenLookups {
    /// Batches over `reader`, each gathering lookups for `window`.
    pub(crate) fn new(reader: Arc<InstanceReader>, window: Duration) -> Self {
        Self {
            reader,
            pending: Arc::default(),
            window,
        }
    }

    /// Sets how long a batch waits for company.
    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// The live instance carrying `token`, if any (the oldest, should a
    /// server that ignores `ClientToken` have made two).
    pub(crate) async fn find(&self, token: &str) -> Result<Option<Instance>, ProviderError> {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.push((token.to_owned(), tx));
            pending.len() == 1
        };
        if first {
            // A task of its own, so that a caller cancelled at its timeout
            // does not take the others' answers with it.
            let (reader, pending, window) =
                (self.reader.clone(), self.pending.clone(), self.window);
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                let batch = std::mem::take(
                    &mut *pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                answer(&reader, batch).await;
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(ProviderError::transient(
                "The batched instance lookup was abandoned",
            ))
        })
    }
}

/// Looks up every token of `batch` and answers each waiter.
async fn answer(reader: &InstanceReader, batch: Vec<Waiter>) {
    let mut tokens: Vec<String> = batch.iter().map(|(t, _)| t.clone()).collect();
    tokens.sort();
    tokens.dedup();
    let mut by_token: HashMap<String, Vec<Instance>> = HashMap::new();
    let mut failure = None;
    for chunk in tokens.chunks(TOKENS_PER_CALL) {
        let filter = Filter::builder()
            .name(format!("tag:{TAG_TOKEN}"))
            .set_values(Some(chunk.to_vec()))
            .build();
        match reader.describe(vec![filter]).await {
            Ok(found) => {
                for instance in found {
                    if let Some(token) = instance.tags.get(TAG_TOKEN).cloned() {
                        by_token.entry(token).or_default().push(instance);
                    }
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    for (token, tx) in batch {
        let result = match &failure {
            Some(e) => Err(e.clone()),
            None => Ok(by_token.get(&token).and_then(|found| {
                if found.len() > 1 {
                    tracing::warn!(
                        token,
                        count = found.len(),
                        "several instances carry one token; using the oldest"
                    );
                }
                found
                    .iter()
                    .min_by_key(|i| (i.created_at, i.id.clone()))
                    .cloned()
            })),
        };
        let _ = tx.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        Instance as Ec2Instance, InstanceNetworkInterface, InstanceNetworkInterfaceAssociation,
        InstancePrivateIpAddress,
    };

    fn association(owner: Option<&str>, ip: &str) -> InstanceNetworkInterfaceAssociation {
        InstanceNetworkInterfaceAssociation::builder()
            .set_ip_owner_id(owner.map(str::to_owned))
            .public_ip(ip)
            .build()
    }

    fn with_interface(public: Option<&str>, interface: InstanceNetworkInterface) -> Ec2Instance {
        Ec2Instance::builder()
            .instance_id("i-0123456789abcdef0")
            .private_ip_address("10.0.0.5")
            .set_public_ip_address(public.map(str::to_owned))
            .network_interfaces(interface)
            .build()
    }

    #[test]
    fn an_address_of_amazons_pool_is_no_elastic_ip_and_an_accounts_is() {
        let amazon = with_interface(
            Some("3.4.5.6"),
            InstanceNetworkInterface::builder()
                .association(association(Some("amazon"), "3.4.5.6"))
                .build(),
        );
        assert!(!may_hold_elastic_ip(&amazon));
        let elastic = with_interface(
            Some("3.4.5.6"),
            InstanceNetworkInterface::builder()
                .association(association(Some("123456789012"), "3.4.5.6"))
                .build(),
        );
        assert!(may_hold_elastic_ip(&elastic));
        // A secondary address with an Elastic IP, the primary's Amazon's.
        let secondary = with_interface(
            Some("3.4.5.6"),
            InstanceNetworkInterface::builder()
                .association(association(Some("amazon"), "3.4.5.6"))
                .private_ip_addresses(
                    InstancePrivateIpAddress::builder()
                        .private_ip_address("10.0.0.6")
                        .association(association(Some("123456789012"), "3.9.9.9"))
                        .build(),
                )
                .build(),
        );
        assert!(may_hold_elastic_ip(&secondary));
    }

    #[test]
    fn an_address_of_unknown_owner_counts_as_elastic_and_no_address_as_none() {
        let unsaid = with_interface(
            Some("3.4.5.6"),
            InstanceNetworkInterface::builder()
                .association(association(None, "3.4.5.6"))
                .build(),
        );
        assert!(may_hold_elastic_ip(&unsaid));
        let unaccounted = Ec2Instance::builder()
            .instance_id("i-0123456789abcdef0")
            .public_ip_address("3.4.5.6")
            .build();
        assert!(may_hold_elastic_ip(&unaccounted));
        let private = with_interface(None, InstanceNetworkInterface::builder().build());
        assert!(!may_hold_elastic_ip(&private));
    }

    #[test]
    fn the_reader_remembers_the_instances_last_seen_with_an_elastic_ip() {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .build();
        let reader = InstanceReader::new(Client::from_conf(config), false, 1000);
        let id = "i-0123456789abcdef0";
        let elastic = with_interface(
            Some("3.4.5.6"),
            InstanceNetworkInterface::builder()
                .association(association(Some("123456789012"), "3.4.5.6"))
                .build(),
        );
        assert!(!reader.seen_with_elastic_ip(id), "never read");
        assert!(reader.to_instance(&elastic).is_some());
        assert!(reader.seen_with_elastic_ip(id));
        // Read again without it: detached since.
        let plain = with_interface(None, InstanceNetworkInterface::builder().build());
        reader.to_instance(&plain);
        assert!(!reader.seen_with_elastic_ip(id));
        reader.to_instance(&elastic);
        reader.forget(id);
        assert!(!reader.seen_with_elastic_ip(id), "forgotten once deleted");
    }
}
