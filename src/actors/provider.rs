//! The provider actor: one per provider. It bounds the calls in flight,
//! keeps calls under the token bucket of their class (mutating, read:
//! [`Pacer`]) whose rate halves at each throttle and climbs back slowly
//! (AIMD), retries transient failures a bounded number of times, and
//! throttled ones until the cloud accepts, each wait longer (jittered
//! exponential backoff). The logic lives in [`ProviderCalls`]; the actor
//! only hands messages to it.

use crate::metrics;
use actix::prelude::*;
use podvisor_providers::pacing::{Pacer, RequestClass as Class};
use podvisor_providers::{
    CreateRequest, ErrorClass, Instance, InstanceStatus, Provider, ProviderError,
};
use podvisor_state::{Backoff, Ensured};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Limits and retry policy of provider calls.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    /// Most calls in flight.
    pub max_inflight: u32,
    /// Tries of one call on transient errors (throttles do not count).
    pub attempts: u32,
    /// Time limit of one try.
    pub timeout: Duration,
    /// Delay between tries; a throttled call's waits grow to its cap.
    pub backoff: Backoff,
}

/// Provider calls under the policy.
pub struct ProviderCalls {
    /// The (metered) provider.
    provider: Arc<dyn Provider>,
    /// Bounds calls in flight.
    inflight: Semaphore,
    /// The token buckets of cloud requests, shared with the provider.
    pacer: Arc<Pacer>,
    /// The provider paces each of its requests through `pacer` itself
    /// ([`Provider::paces_requests`]): no token per call here.
    self_paced: bool,
    /// Limits and retries.
    policy: CallPolicy,
}

impl ProviderCalls {
    /// Whether the provider's instances can carry a pod's network
    /// ([`Provider::pod_network`]).
    pub fn pod_network(&self) -> bool {
        self.provider.pod_network()
    }
}

impl std::fmt::Debug for ProviderCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderCalls")
            .field("provider", &self.provider.name())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ProviderCalls {
    /// Calls to `provider` under `policy`, paced by `pacer` (the one the
    /// provider was built with).
    pub fn new(provider: Arc<dyn Provider>, policy: CallPolicy, pacer: Arc<Pacer>) -> Self {
        let calls = Self {
            inflight: Semaphore::new(policy.max_inflight as usize),
            self_paced: provider.paces_requests(),
            pacer,
            provider,
            policy,
        };
        calls.publish_rates();
        calls
    }

    /// Sets [`metrics::PROVIDER_RATE`] of each class to its bucket's rate.
    fn publish_rates(&self) {
        for class in [Class::Mutating, Class::Read] {
            metrics::gauge!(metrics::PROVIDER_RATE, "class" => class.as_str())
                .set(self.pacer.bucket(class).rate());
        }
    }

    /// Waits before the next try of `operation` after `error`: the
    /// backoff's delay for retry `n` (the `n`-th throttle when `throttled`,
    /// else the `n`-th failed try), and at least as long as the cloud asked.
    async fn wait_before_retry(
        &self,
        operation: &'static str,
        n: u32,
        throttled: bool,
        error: &ProviderError,
    ) {
        let mut delay = self.policy.backoff.delay(n, fastrand::f64());
        if let Some(min) = error.retry_after {
            delay = delay.max(min);
        }
        if throttled {
            tracing::info!(operation, throttles = n, error = %error, ?delay, "retrying provider call");
        } else {
            tracing::info!(operation, attempt = n, error = %error, ?delay, "retrying provider call");
        }
        metrics::counter!(metrics::OPERATION_RETRIES, "operation" => operation).increment(1);
        tokio::time::sleep(delay).await;
    }

    /// Waits for a token of `class`, unless the provider paces its own
    /// requests.
    async fn pace(&self, class: Class) {
        if !self.self_paced {
            self.pacer.take(class).await;
        }
    }

    /// The provider's name.
    pub fn provider_name(&self) -> &'static str {
        self.provider.name()
    }

    async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        class: Class,
        mut attempt_fn: F,
    ) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(|_| ProviderError::transient("The provider is shutting down"))?;
        let mut attempt = 1;
        let mut throttles = 0;
        loop {
            self.pace(class).await;
            let result = match tokio::time::timeout(self.policy.timeout, attempt_fn()).await {
                Ok(r) => r,
                Err(_) => Err(ProviderError::transient(format!(
                    "{} {operation} timed out after {:?}",
                    self.provider.name(),
                    self.policy.timeout
                ))),
            };
            if self.self_paced {
                // The provider told the buckets of each request's answer.
                self.publish_rates();
            } else {
                let bucket = self.pacer.bucket(class);
                let rate = match &result {
                    Err(e) if e.class == ErrorClass::Throttled => Some(bucket.throttled()),
                    Err(_) => None,
                    Ok(_) => Some(bucket.accepted()),
                };
                if let Some(rate) = rate {
                    metrics::gauge!(metrics::PROVIDER_RATE, "class" => class.as_str()).set(rate);
                }
            }
            match result {
                // The cloud asks to slow down: it is not failing this call.
                // Wait longer at each throttle (and at least as long as
                // asked), without spending the call's tries.
                Err(e) if e.class == ErrorClass::Throttled => {
                    throttles += 1;
                    self.wait_before_retry(operation, throttles, true, &e).await;
                }
                Err(e) if e.is_retryable() && attempt < self.policy.attempts => {
                    self.wait_before_retry(operation, attempt, false, &e).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Creates the instance of `request`. When
    /// [`CreateRequest::earlier_attempt`] is set, and on every retry of a
    /// failed try (whose create may have happened), it looks the instance
    /// up by token first and adopts what it finds, and the provider is told
    /// so (`earlier_attempt: true`). A first attempt's first try makes one
    /// call, the create, with `earlier_attempt: false`.
    ///
    /// # Errors
    /// The provider's last [`ProviderError`] once it is not retryable or
    /// [`CallPolicy::attempts`] tries are spent; a try that outlives
    /// [`CallPolicy::timeout`] counts as a transient "timed out" error.
    pub async fn ensure(&self, request: &CreateRequest) -> Result<Ensured, ProviderError> {
        let retried = CreateRequest {
            earlier_attempt: true,
            ..request.clone()
        };
        let lookup_first = AtomicBool::new(request.earlier_attempt);
        self.call("create", Class::Mutating, || async {
            // After any try, the create may have happened: look before making.
            let earlier = lookup_first.swap(true, Ordering::SeqCst);
            if earlier {
                // A request of its own, a read: paced as one.
                self.pace(Class::Read).await;
                match self
                    .provider
                    .find_instance(&request.token, &request.instance_name)
                    .await?
                {
                    // Made by an earlier try, not stopped, addressed:
                    // adopt it.
                    Some(found)
                        if found.status != InstanceStatus::Stopped && !found.ips.is_empty() =>
                    {
                        return Ok(Ensured {
                            instance: found.to_ref(),
                            adopted: true,
                        });
                    }
                    // Made, but stopped (a create torn by a crash) or not
                    // yet addressed: the same idempotent create brings that
                    // instance up and waits for its address.
                    Some(found) => tracing::info!(
                        instance = %found.id,
                        status = ?found.status,
                        addressed = !found.ips.is_empty(),
                        "found the instance; the create with its token completes it"
                    ),
                    None => {}
                }
            }
            let made = self
                .provider
                .create_instance(if earlier { &retried } else { request })
                .await?;
            Ok(Ensured {
                instance: made.to_ref(),
                adopted: false,
            })
        })
        .await
    }

    /// Deletes an instance; "not found" is success.
    ///
    /// # Errors
    /// The provider's last [`ProviderError`] once it is not retryable or
    /// [`CallPolicy::attempts`] tries are spent; a try that outlives
    /// [`CallPolicy::timeout`] counts as a transient "timed out" error.
    pub async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        match self
            .call("delete", Class::Mutating, || {
                self.provider.delete_instance(instance_id)
            })
            .await
        {
            Err(e) if e.class == podvisor_providers::ErrorClass::NotFound => Ok(()),
            other => other,
        }
    }

    /// Looks an instance up by token (or name); `Ok(None)` when there is
    /// none.
    ///
    /// # Errors
    /// The provider's last [`ProviderError`] once it is not retryable or
    /// [`CallPolicy::attempts`] tries are spent; a try that outlives
    /// [`CallPolicy::timeout`] counts as a transient "timed out" error.
    pub async fn find(&self, token: &str, name: &str) -> Result<Option<Instance>, ProviderError> {
        self.call("find", Class::Read, || {
            self.provider.find_instance(token, name)
        })
        .await
    }

    /// Lists the instances carrying a tag.
    ///
    /// # Errors
    /// The provider's last [`ProviderError`] once it is not retryable or
    /// [`CallPolicy::attempts`] tries are spent; a try that outlives
    /// [`CallPolicy::timeout`] counts as a transient "timed out" error.
    pub async fn list(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        self.call("list", Class::Read, || {
            self.provider.list_instances(key, value)
        })
        .await
    }

    /// Verifies the configuration against the cloud.
    ///
    /// # Errors
    /// The provider's last [`ProviderError`] once it is not retryable or
    /// [`CallPolicy::attempts`] tries are spent; a try that outlives
    /// [`CallPolicy::timeout`] counts as a transient "timed out" error.
    /// A wrong setting is `Config`, naming its flag (see
    /// [`Provider::verify_config`]).
    pub async fn verify(&self) -> Result<(), ProviderError> {
        self.call("verify", Class::Read, || self.provider.verify_config())
            .await
    }

    /// Releases the provider's resources (tried once, without retries).
    ///
    /// # Errors
    /// The provider's [`ProviderError`] when it cannot release them.
    pub async fn teardown(&self) -> Result<(), ProviderError> {
        self.provider.teardown().await
    }
}

/// The actor shell around [`ProviderCalls`].
#[derive(Debug)]
pub struct ProviderActor {
    /// Shared with the futures that run the calls.
    calls: Arc<ProviderCalls>,
}

impl ProviderActor {
    /// An actor calling `calls`.
    pub fn new(calls: Arc<ProviderCalls>) -> Self {
        Self { calls }
    }
}

impl Actor for ProviderActor {
    type Context = Context<Self>;
}

/// Runs a call on the multi-threaded runtime (provider futures are `Send`,
/// and signing or parsing cloud responses should not occupy the actor thread).
fn off_thread<T: Send + 'static>(
    fut: impl Future<Output = Result<T, ProviderError>> + Send + 'static,
) -> ResponseFuture<Result<T, ProviderError>> {
    Box::pin(async move {
        tokio::spawn(fut).await.unwrap_or_else(|e| {
            Err(ProviderError::transient(format!(
                "Provider call panicked: {e}"
            )))
        })
    })
}

/// Create (or adopt) the instance of a request.
#[derive(Debug, Message)]
#[rtype(result = "Result<Ensured, ProviderError>")]
pub struct EnsureInstance {
    /// What to create; its [`CreateRequest::earlier_attempt`] says whether
    /// an earlier create may have made it.
    pub request: CreateRequest,
}

impl Handler<EnsureInstance> for ProviderActor {
    type Result = ResponseFuture<Result<Ensured, ProviderError>>;
    fn handle(&mut self, msg: EnsureInstance, _: &mut Context<Self>) -> Self::Result {
        let calls = self.calls.clone();
        off_thread(async move { calls.ensure(&msg.request).await })
    }
}

/// Delete an instance.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), ProviderError>")]
pub struct DeleteInstance(pub String);

impl Handler<DeleteInstance> for ProviderActor {
    type Result = ResponseFuture<Result<(), ProviderError>>;
    fn handle(&mut self, msg: DeleteInstance, _: &mut Context<Self>) -> Self::Result {
        let calls = self.calls.clone();
        off_thread(async move { calls.delete(&msg.0).await })
    }
}

/// Find an instance by token and name.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Instance>, ProviderError>")]
pub struct FindInstance {
    /// The idempotency token.
    pub token: String,
    /// The instance name.
    pub name: String,
}

impl Handler<FindInstance> for ProviderActor {
    type Result = ResponseFuture<Result<Option<Instance>, ProviderError>>;
    fn handle(&mut self, msg: FindInstance, _: &mut Context<Self>) -> Self::Result {
        let calls = self.calls.clone();
        off_thread(async move { calls.find(&msg.token, &msg.name).await })
    }
}

/// List instances by tag.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Instance>, ProviderError>")]
pub struct ListInstances {
    /// Tag key.
    pub key: String,
    /// Tag value.
    pub value: String,
}

impl Handler<ListInstances> for ProviderActor {
    type Result = ResponseFuture<Result<Vec<Instance>, ProviderError>>;
    fn handle(&mut self, msg: ListInstances, _: &mut Context<Self>) -> Self::Result {
        let calls = self.calls.clone();
        off_thread(async move { calls.list(&msg.key, &msg.value).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_providers::fake::{FakeProvider, Method};

    fn policy() -> CallPolicy {
        CallPolicy {
            max_inflight: 4,
            attempts: 3,
            timeout: Duration::from_secs(5),
            backoff: Backoff {
                base: Duration::from_millis(1),
                cap: Duration::from_millis(2),
            },
        }
    }

    fn limits() -> podvisor_providers::CallLimits {
        podvisor_providers::CallLimits {
            rate: 1000.0,
            burst: 100,
            read_rate: 1000.0,
            read_burst: 100,
        }
    }

    fn pacer() -> Arc<Pacer> {
        Arc::new(Pacer::new(limits()))
    }

    fn request() -> CreateRequest {
        podvisor_providers::CreateRequest {
            sandbox_id: "s".into(),
            pod_name: "p".into(),
            pod_namespace: "n".into(),
            instance_name: "podvm-p-s".into(),
            token: "t".into(),
            earlier_attempt: false,
            spec: Default::default(),
            user_data: String::new(),
            tags: [(podvisor_providers::TAG_TOKEN.to_owned(), "t".to_owned())].into(),
        }
    }

    /// The request of a create that is not its token's first.
    fn earlier() -> CreateRequest {
        CreateRequest {
            earlier_attempt: true,
            ..request()
        }
    }

    #[tokio::test]
    async fn a_first_create_makes_one_call_and_says_it_is_the_first() {
        let p = Arc::new(FakeProvider::new());
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        let e = calls.ensure(&request()).await.unwrap();
        assert!(!e.adopted);
        assert_eq!(p.methods(), [Method::Create]);
        assert_eq!(p.earlier_attempts(), [false]);
    }

    #[tokio::test]
    async fn a_retried_create_looks_up_first_and_adopts() {
        let p = Arc::new(FakeProvider::new());
        p.seed(&request(), "i-made-by-first-try");
        p.fail_next(
            Method::Create,
            ProviderError::transient("timeout after the VM was made"),
        );
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        let e = calls.ensure(&request()).await.unwrap();
        assert_eq!(e.instance.id, "i-made-by-first-try");
        assert!(e.adopted);
        assert_eq!(p.methods(), [Method::Create, Method::Find]);
        assert_eq!(p.earlier_attempts(), [false]);
    }

    #[tokio::test]
    async fn a_recovered_create_looks_up_before_creating() {
        let p = Arc::new(FakeProvider::new());
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        let e = calls.ensure(&earlier()).await.unwrap();
        assert!(!e.adopted);
        assert_eq!(p.methods(), [Method::Find, Method::Create]);
        assert_eq!(
            p.earlier_attempts(),
            [true],
            "the provider is told an earlier create may have happened"
        );
    }

    #[tokio::test]
    async fn a_stopped_instance_is_not_adopted_but_created_again_with_its_token() {
        let p = Arc::new(FakeProvider::new());
        p.seed(&request(), "i-torn");
        p.set_stopped(true);
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        let e = calls.ensure(&earlier()).await.unwrap();
        assert!(
            !e.adopted,
            "a stopped instance is brought up, not adopted as is"
        );
        assert_eq!(p.methods(), [Method::Find, Method::Create]);
    }

    #[tokio::test]
    async fn an_instance_found_before_its_address_is_completed_by_the_create() {
        let p = Arc::new(FakeProvider::new());
        p.seed(&request(), "i-booting");
        p.set_unaddressed(true);
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        let e = calls.ensure(&earlier()).await.unwrap();
        assert!(!e.adopted, "no address: the create waits for one");
        assert!(!e.instance.ips.is_empty());
        assert_eq!(p.methods(), [Method::Find, Method::Create]);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_attempts_are_bounded() {
        let p = Arc::new(FakeProvider::new());
        p.fail_next(Method::Create, ProviderError::permanent("bad AMI"));
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        assert_eq!(
            calls.ensure(&request()).await.unwrap_err().message,
            "bad AMI"
        );
        assert_eq!(p.calls().len(), 1);

        let p = Arc::new(FakeProvider::new());
        for _ in 0..3 {
            p.fail_next(Method::Create, ProviderError::transient("503"));
        }
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        assert!(calls.ensure(&request()).await.unwrap_err().is_retryable());
        assert_eq!(
            p.methods(),
            [
                Method::Create,
                Method::Find,
                Method::Create,
                Method::Find,
                Method::Create
            ]
        );
        assert_eq!(
            p.earlier_attempts(),
            [false, true, true],
            "every retry may follow a create that happened"
        );
    }

    #[tokio::test]
    async fn throttles_slow_the_bucket_and_do_not_spend_the_tries() {
        let p = Arc::new(FakeProvider::new());
        // Twice the tries the policy allows, all throttled, then accepted.
        for _ in 0..6 {
            p.fail_next(
                Method::Delete,
                ProviderError::throttled("RequestLimitExceeded", None),
            );
        }
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        calls.delete("i-1").await.unwrap();
        assert_eq!(p.methods(), [Method::Delete; 7]);
        // 1000/s halved six times, then one accepted call's step back up.
        let rate = calls.pacer.bucket(Class::Mutating).rate();
        assert!((rate - (1000.0 / 64.0 + 50.0)).abs() < 1e-6, "{rate}");

        // Each wait is longer than the one before, up to the cap: the
        // backoff of the n-th throttle, not a fixed retry delay.
        let slow = CallPolicy {
            backoff: Backoff {
                base: Duration::from_millis(20),
                cap: Duration::from_millis(80),
            },
            ..policy()
        };
        let p = Arc::new(FakeProvider::new());
        for _ in 0..4 {
            p.fail_next(Method::Delete, ProviderError::throttled("slow down", None));
        }
        let calls = ProviderCalls::new(p.clone(), slow, pacer());
        let t = std::time::Instant::now();
        calls.delete("i-2").await.unwrap();
        // At least half of each full delay (the jitter's floor): 10 + 20 +
        // 40 + 40 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(110),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_throttled_read_slows_the_reads_not_the_creates() {
        let p = Arc::new(FakeProvider::new());
        p.fail_next(Method::Find, ProviderError::throttled("slow", None));
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        assert!(calls.find("t", "n").await.unwrap().is_none());
        assert_eq!(calls.pacer.bucket(Class::Mutating).rate(), 1000.0);
        assert_eq!(calls.pacer.bucket(Class::Read).rate(), 500.0 + 50.0);
    }

    #[tokio::test]
    async fn reads_and_a_creates_lookup_draw_read_tokens() {
        // One read token, and (almost) no refill: the second read waits.
        let pacer = || {
            Arc::new(Pacer::new(podvisor_providers::CallLimits {
                read_rate: 0.001,
                read_burst: 1,
                ..limits()
            }))
        };
        let p = Arc::new(FakeProvider::new());
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        calls.list("k", "v").await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(200), calls.find("t", "n"));
        assert!(second.await.is_err(), "a second read waits for a token");
        // Creates have their own bucket: a first create needs no read...
        let calls = ProviderCalls::new(p.clone(), policy(), pacer());
        calls.list("k", "v").await.unwrap();
        calls.ensure(&request()).await.unwrap();
        // ...but a create after an earlier attempt looks up first, a read.
        let request = earlier();
        let again = tokio::time::timeout(Duration::from_millis(200), calls.ensure(&request));
        assert!(
            again.await.is_err(),
            "the create's lookup waits for a read token"
        );
    }

    #[tokio::test]
    async fn not_found_on_delete_is_success() {
        let p = Arc::new(FakeProvider::new());
        p.fail_next(Method::Delete, ProviderError::not_found("gone"));
        let calls = ProviderCalls::new(p, policy(), pacer());
        calls.delete("i-gone").await.unwrap();
    }
}
