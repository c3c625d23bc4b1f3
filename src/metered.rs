//! The metrics decorator around a [`Provider`]: times and counts every call.

use crate::metrics;
use async_trait::async_trait;
use podvisor_providers::{CreateRequest, Instance, Provider, ProviderError};
use std::sync::Arc;
use std::time::Instant;

/// A provider whose every call is timed and counted by outcome.
pub struct Metered {
    /// The real provider.
    inner: Arc<dyn Provider>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Provider>) -> Arc<dyn Provider> {
        Arc::new(Self { inner })
    }

    fn record<T>(
        &self,
        operation: &'static str,
        started: Instant,
        result: &Result<T, ProviderError>,
    ) {
        let provider = self.inner.name();
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.class.as_str(),
        };
        metrics::histogram!(metrics::PROVIDER_REQUEST_DURATION, "provider" => provider, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(metrics::PROVIDER_REQUESTS, "provider" => provider, "operation" => operation, "outcome" => outcome)
            .increment(1);
    }
}

#[async_trait]
impl Provider for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        let t = Instant::now();
        let r = self.inner.create_instance(request).await;
        self.record("create", t, &r);
        r
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        let t = Instant::now();
        let r = self.inner.delete_instance(instance_id).await;
        self.record("delete", t, &r);
        r
    }

    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        let t = Instant::now();
        let r = self.inner.find_instance(token, name).await;
        self.record("find", t, &r);
        r
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        let t = Instant::now();
        let r = self.inner.list_instances(key, value).await;
        self.record("list", t, &r);
        r
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        let t = Instant::now();
        let r = self.inner.verify_config().await;
        self.record("verify", t, &r);
        r
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        let t = Instant::now();
        let r = self.inner.teardown().await;
        self.record("teardown", t, &r);
        r
    }
}
