//! The fake provider (feature `conformance`): an in-memory cloud for tests
//! and benchmarks, that passes the conformance suite like a real one.
//!
//! It answers at once, from a map of instances, and is scripted through
//! knobs:
//!
//! - [`FakeProvider::fail_next`]: the next call of a method returns the
//!   given error (a queue per method), before it has any effect;
//! - [`FakeProvider::hold`] / [`FakeProvider::release`]: calls of a method
//!   wait until released (a cloud that does not answer);
//! - [`FakeProvider::set_stopped`], [`FakeProvider::set_unaddressed`]: what
//!   finds and lists report (an instance whose VM died or whose create was
//!   torn by a crash; an instance that has no address yet);
//! - [`FakeProvider::seed`]: an instance the cloud holds already (made by
//!   an earlier try whose answer was lost).
//!
//! Every call is logged ([`FakeProvider::calls`]), also the ones that fail
//! or never finish.

use crate::error::ProviderError;
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider, TAG_TOKEN};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

/// A [`Provider`] method, as the call log and the scripts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// [`Provider::create_instance`].
    Create,
    /// [`Provider::delete_instance`].
    Delete,
    /// [`Provider::find_instance`].
    Find,
    /// [`Provider::list_instances`].
    List,
    /// [`Provider::verify_config`].
    Verify,
    /// [`Provider::teardown`].
    Teardown,
}

impl Method {
    /// Its name in the provider metrics' `operation` label: `create`,
    /// `delete`, `find`, `list`, `verify`, `teardown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Create => "create",
            Method::Delete => "delete",
            Method::Find => "find",
            Method::List => "list",
            Method::Verify => "verify",
            Method::Teardown => "teardown",
        }
    }
}

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The method called.
    pub method: Method,
    /// What it was called for: the sandbox id (create), the instance id
    /// (delete), the token (find), `key=value` (list); empty for verify and
    /// teardown.
    pub subject: String,
}

/// An in-memory cloud: instances are entries in a map, at 127.0.0.1 (where
/// a test or benchmark can listen as their agent), with ids `fake-1`,
/// `fake-2`, … in creation order. See the module documentation for its
/// knobs.
#[derive(Debug)]
pub struct FakeProvider {
    /// The instances, the scripts and the call log.
    state: Mutex<State>,
    /// The methods whose calls wait ([`FakeProvider::hold`]); a watch, so
    /// waiting calls see a release.
    held: watch::Sender<BTreeSet<Method>>,
}

/// What [`FakeProvider`] keeps under its lock.
#[derive(Debug, Default)]
struct State {
    /// The live instances, by id.
    instances: BTreeMap<String, Instance>,
    /// The live instances' ids, by their `podvisor.io/token` tag: a
    /// create or find by token is one lookup, as a cloud's idempotency
    /// index is, not a scan — a scan made the benches' thousands of
    /// sandboxes in flight quadratic in the fake, not in podvisor. More
    /// than one id only for instances seeded under one token; a lookup
    /// answers the lowest, as the scan of `instances` did.
    tokens: HashMap<String, BTreeSet<String>>,
    /// The last id number handed out.
    last_id: u64,
    /// Per method, the errors its next calls return.
    next_errors: BTreeMap<Method, VecDeque<ProviderError>>,
    /// Every call, in order.
    calls: Vec<Call>,
    /// Finds and lists report instances stopped.
    stopped: bool,
    /// Finds and lists report instances without addresses.
    unaddressed: bool,
    /// [`CreateRequest::earlier_attempt`] of every create, in order.
    earlier_attempts: Vec<bool>,
}

impl Default for FakeProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProvider {
    /// An empty cloud whose calls all succeed.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            held: watch::Sender::new(BTreeSet::new()),
        }
    }

    /// The [`CreateRequest::earlier_attempt`] of every create call so far,
    /// in order (also of the calls that failed or never finished).
    pub fn earlier_attempts(&self) -> Vec<bool> {
        self.state().earlier_attempts.clone()
    }

    /// The state; a test that panicked while holding it left nothing half
    /// changed, so a poisoned lock is taken as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next call of `method` returns `error` (after any queued before
    /// it), without doing anything.
    pub fn fail_next(&self, method: Method, error: ProviderError) {
        self.state()
            .next_errors
            .entry(method)
            .or_default()
            .push_back(error);
    }

    /// Calls of `method` wait, from now on, until
    /// [`release`](Self::release); each is logged when it starts.
    pub fn hold(&self, method: Method) {
        self.held.send_modify(|held| {
            held.insert(method);
        });
    }

    /// Lets the calls of `method` go on.
    pub fn release(&self, method: Method) {
        self.held.send_modify(|held| {
            held.remove(&method);
        });
    }

    /// Whether finds and lists report every instance as stopped. A create
    /// with an instance's token still returns it running (it starts it).
    pub fn set_stopped(&self, stopped: bool) {
        self.state().stopped = stopped;
    }

    /// Whether finds and lists report every instance without an address.
    /// A create still returns the address (it waits for one).
    pub fn set_unaddressed(&self, unaddressed: bool) {
        self.state().unaddressed = unaddressed;
    }

    /// Puts the instance of `request` in the cloud under the id `id` (one
    /// unlike the fake's own `fake-N`), as an earlier create would have,
    /// without logging a call; returns it.
    pub fn seed(&self, request: &CreateRequest, id: &str) -> Instance {
        let instance = made(request, id.to_owned());
        self.state().insert(instance.clone());
        instance
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The methods of every call so far, in order.
    pub fn methods(&self) -> Vec<Method> {
        self.state().calls.iter().map(|c| c.method).collect()
    }

    /// The live instances, by id.
    pub fn instances(&self) -> Vec<Instance> {
        self.state().instances.values().cloned().collect()
    }

    /// How many instances are live.
    pub fn len(&self) -> usize {
        self.state().instances.len()
    }

    /// Whether no instance is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Logs a call of `method`, waits while the method is held, then
    /// returns its next scripted error, if any.
    async fn begin(&self, method: Method, subject: String) -> Result<(), ProviderError> {
        self.state().calls.push(Call { method, subject });
        let mut held = self.held.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = held.wait_for(|held| !held.contains(&method)).await;
        match self
            .state()
            .next_errors
            .get_mut(&method)
            .and_then(VecDeque::pop_front)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// `instance` as finds and lists report it under the knobs.
    fn reported(state: &State, mut instance: Instance) -> Instance {
        if state.stopped {
            instance.status = InstanceStatus::Stopped;
        }
        if state.unaddressed {
            instance.ips.clear();
        }
        instance
    }
}

/// The instance a create of `request` makes, with the id `id`.
fn made(request: &CreateRequest, id: String) -> Instance {
    Instance {
        id,
        name: request.instance_name.clone(),
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        tags: request.tags.clone(),
        created_at: None,
        status: InstanceStatus::Running,
    }
}

/// The live instance carrying `token`.
fn by_token<'a>(state: &'a State, token: &str) -> Option<&'a Instance> {
    state
        .tokens
        .get(token)
        .and_then(BTreeSet::first)
        .and_then(|id| state.instances.get(id))
}

impl State {
    /// Makes `instance` live, indexed by its token (replacing an instance
    /// of the same id, and its token's entry).
    fn insert(&mut self, instance: Instance) {
        self.remove(&instance.id);
        if let Some(token) = instance.tags.get(TAG_TOKEN) {
            self.tokens
                .entry(token.clone())
                .or_default()
                .insert(instance.id.clone());
        }
        self.instances.insert(instance.id.clone(), instance);
    }

    /// Removes the live instance `id`, if any, and its token's entry.
    fn remove(&mut self, id: &str) {
        let Some(gone) = self.instances.remove(id) else {
            return;
        };
        if let Some(token) = gone.tags.get(TAG_TOKEN)
            && let Some(ids) = self.tokens.get_mut(token)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.tokens.remove(token);
            }
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    /// Its instances are records in memory, with no network.
    fn pod_network(&self) -> bool {
        false
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        self.state().earlier_attempts.push(request.earlier_attempt);
        self.begin(Method::Create, request.sandbox_id.clone())
            .await?;
        let mut state = self.state();
        if let Some(existing) = by_token(&state, &request.token) {
            return Ok(existing.clone());
        }
        state.last_id += 1;
        let instance = made(request, format!("fake-{}", state.last_id));
        state.insert(instance.clone());
        Ok(instance)
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.begin(Method::Delete, instance_id.to_owned()).await?;
        self.state().remove(instance_id);
        Ok(())
    }

    async fn find_instance(
        &self,
        token: &str,
        _name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        self.begin(Method::Find, token.to_owned()).await?;
        let state = self.state();
        Ok(by_token(&state, token).map(|i| Self::reported(&state, i.clone())))
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        self.begin(Method::List, format!("{key}={value}")).await?;
        let state = self.state();
        Ok(state
            .instances
            .values()
            .filter(|i| i.tags.get(key).map(String::as_str) == Some(value))
            .map(|i| Self::reported(&state, i.clone()))
            .collect())
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        self.begin(Method::Verify, String::new()).await
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        self.begin(Method::Teardown, String::new()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Fixture;
    use crate::error::ErrorClass;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn scripted_errors_come_in_order_per_method_and_do_nothing() {
        let p = FakeProvider::new();
        let request = Fixture::new("node-a").request(1);
        p.fail_next(Method::Create, ProviderError::transient("first"));
        p.fail_next(Method::Create, ProviderError::permanent("second"));
        p.fail_next(Method::Delete, ProviderError::not_found("gone"));
        let first = p.create_instance(&request).await.unwrap_err();
        let second = p.create_instance(&request).await.unwrap_err();
        assert_eq!(
            (first.class, second.class),
            (ErrorClass::Transient, ErrorClass::Permanent)
        );
        assert!(p.is_empty(), "a scripted error makes nothing");
        let made = p.create_instance(&request).await.unwrap();
        assert_eq!(made.id, "fake-1");
        let gone = p.delete_instance(&made.id).await.unwrap_err();
        assert_eq!(gone.class, ErrorClass::NotFound);
        assert_eq!(p.len(), 1, "a scripted error deletes nothing");
    }

    #[tokio::test]
    async fn a_token_finds_its_instance_until_deleted_even_when_two_share_it() {
        let p = FakeProvider::new();
        let fixture = Fixture::new("node-a");
        let (one, two) = (fixture.request(1), fixture.request(2));
        let made = p.create_instance(&one).await.unwrap();
        let other = p.create_instance(&two).await.unwrap();
        // A retried create answers with the instance of its token.
        assert_eq!(p.create_instance(&one).await.unwrap().id, made.id);
        assert_eq!(p.len(), 2);
        p.delete_instance(&made.id).await.unwrap();
        assert_eq!(p.find_instance(&one.token, "n").await.unwrap(), None);
        assert_eq!(
            p.find_instance(&two.token, "n")
                .await
                .unwrap()
                .map(|i| i.id),
            Some(other.id)
        );
        // Two seeded under one token: deleting the one found leaves the
        // other findable.
        let (a, b) = (p.seed(&one, "seed-a"), p.seed(&one, "seed-b"));
        let found = p.find_instance(&one.token, "n").await.unwrap().unwrap();
        p.delete_instance(&found.id).await.unwrap();
        let left = p.find_instance(&one.token, "n").await.unwrap().unwrap();
        assert_ne!(left.id, found.id);
        assert!([&a.id, &b.id].contains(&&left.id));
        p.delete_instance(&left.id).await.unwrap();
        assert_eq!(p.find_instance(&one.token, "n").await.unwrap(), None);
    }

    #[tokio::test]
    async fn every_call_is_logged_with_what_it_was_for() {
        let p = FakeProvider::new();
        let request = Fixture::new("node-a").request(1);
        p.fail_next(Method::Find, ProviderError::transient("lost"));
        let _ = p.find_instance(&request.token, "n").await;
        let made = p.create_instance(&request).await.unwrap();
        p.list_instances("k", "v").await.unwrap();
        p.delete_instance(&made.id).await.unwrap();
        p.verify_config().await.unwrap();
        p.teardown().await.unwrap();
        let call = |method, subject: &str| Call {
            method,
            subject: subject.to_owned(),
        };
        assert_eq!(
            p.calls(),
            [
                call(Method::Find, &request.token),
                call(Method::Create, &request.sandbox_id),
                call(Method::List, "k=v"),
                call(Method::Delete, "fake-1"),
                call(Method::Verify, ""),
                call(Method::Teardown, ""),
            ]
        );
        assert_eq!(
            p.methods().iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            ["find", "create", "list", "delete", "verify", "teardown"]
        );
    }

    #[tokio::test]
    async fn stopped_and_unaddressed_change_what_finds_and_lists_report_not_creates() {
        let p = FakeProvider::new();
        let request = Fixture::new("node-a").request(1);
        let seeded = p.seed(&request, "i-torn");
        p.set_stopped(true);
        p.set_unaddressed(true);
        let found = p
            .find_instance(&request.token, &request.instance_name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "i-torn");
        assert_eq!(found.status, InstanceStatus::Stopped);
        assert!(found.ips.is_empty());
        let listed = p.list_instances(TAG_TOKEN, &request.token).await.unwrap();
        assert_eq!(listed, [found]);
        let again = p.create_instance(&request).await.unwrap();
        assert_eq!(again, seeded, "the same instance, running and addressed");
        assert_eq!(p.methods(), [Method::Find, Method::List, Method::Create]);
    }

    #[tokio::test]
    async fn a_held_call_waits_logged_until_released() {
        let p = Arc::new(FakeProvider::new());
        p.hold(Method::Create);
        let request = Fixture::new("node-a").request(1);
        let call = tokio::spawn({
            let (p, request) = (p.clone(), request.clone());
            async move { p.create_instance(&request).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!call.is_finished(), "held");
        assert_eq!(p.methods(), [Method::Create], "logged when it started");
        p.find_instance("t", "n").await.unwrap();
        p.release(Method::Create);
        let made = call.await.unwrap().unwrap();
        assert_eq!(p.instances(), [made]);
    }
}
