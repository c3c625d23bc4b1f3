//! Reading instances from EC2: live instances by filter, every page, and
//! lookups by token batched so that the creates and finds of many sandboxes
//! at once share one `DescribeInstances` instead of making one each.

use super::errors::from_sdk;
use crate::error::ProviderError;
use crate::provider::{Instance, InstanceStatus, TAG_TOKEN};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use std::collections::{BTreeMap, HashMap};
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
}

impl InstanceReader {
    /// A reader through `client`.
    pub(crate) fn new(client: Client, use_public_ip: bool, page_size: i32) -> Self {
        Self {
            client: RwLock::new(Some(client)),
            use_public_ip,
            page_size: AtomicI32::new(page_size),
        }
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
    /// or lacks an id.
    pub(crate) fn to_instance(&self, i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
        let id = i.instance_id()?.to_owned();
        let status = match i.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Running) => InstanceStatus::Running,
            Some(InstanceStateName::Pending) | None => InstanceStatus::Starting,
            Some(InstanceStateName::Stopping | InstanceStateName::Stopped) => {
                InstanceStatus::Stopped
            }
            Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => return None,
            Some(_) => InstanceStatus::Starting,
        };
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
