//! The metrics decorator around a [`Provider`]: times and counts every call.

use crate::metrics;
use async_trait::async_trait;
use podvisor_providers::{CreateRequest, Instance, Provider, ProviderError};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// A provider whose every call is timed and counted by outcome.
pub struct Metered {
    /// The real provider.
    inner: Arc<dyn Provider>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("provider", &self.inner.name())
            .finish_non_exhaustive()
    }
}

impl Metered {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Provider>) -> Arc<dyn Provider> {
        Arc::new(Self { inner })
    }

    /// Runs one call of `operation`, timing and counting it — also when
    /// it never finishes because the caller gave up (its time limit passed):
    /// that call counts with the outcome `cancelled`.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let mut unfinished = Unfinished {
            provider: self.inner.name(),
            operation,
            started: Instant::now(),
            armed: true,
        };
        let result = call.await;
        unfinished.armed = false;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.class.as_str(),
        };
        record(unfinished.provider, operation, unfinished.started, outcome);
        result
    }
}

fn record(
    provider: &'static str,
    operation: &'static str,
    started: Instant,
    outcome: &'static str,
) {
    // At trace only: one line per cloud call is too many for debug.
    tracing::trace!(
        provider,
        operation,
        outcome,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "provider call"
    );
    metrics::histogram!(metrics::PROVIDER_REQUEST_DURATION, "provider" => provider, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(metrics::PROVIDER_REQUESTS, "provider" => provider, "operation" => operation, "outcome" => outcome)
        .increment(1);
}

/// Counts a call dropped before it finished.
struct Unfinished {
    provider: &'static str,
    operation: &'static str,
    started: Instant,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.armed {
            record(self.provider, self.operation, self.started, "cancelled");
        }
    }
}

#[async_trait]
impl Provider for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn paces_requests(&self) -> bool {
        self.inner.paces_requests()
    }

    fn pod_network(&self) -> bool {
        self.inner.pod_network()
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        self.timed("create", self.inner.create_instance(request))
            .await
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        self.timed("delete", self.inner.delete_instance(instance_id))
            .await
    }

    async fn find_instance(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        self.timed("find", self.inner.find_instance(token, name))
            .await
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        self.timed("list", self.inner.list_instances(key, value))
            .await
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        self.timed("verify", self.inner.verify_config()).await
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        self.timed("teardown", self.inner.teardown()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use podvisor_providers::fake::{FakeProvider, Method};
    use std::time::Duration;

    #[test]
    fn every_call_is_counted_by_outcome_including_calls_cut_off_by_a_time_limit() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        ::metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                // A cloud that never answers a create.
                let fake = FakeProvider::new();
                fake.hold(Method::Create);
                fake.fail_next(Method::Delete, ProviderError::not_found("gone"));
                let p = Metered::wrap(Arc::new(fake));
                let request = podvisor_providers::conformance::Fixture::new("n").request(1);
                let cut =
                    tokio::time::timeout(Duration::from_millis(20), p.create_instance(&request))
                        .await;
                assert!(cut.is_err(), "the create hangs");
                p.delete_instance("i-1").await.unwrap_err();
                p.find_instance("t", "n").await.unwrap();
            });
        });
        let text = handle.render();
        for line in [
            r#"podvisor_provider_requests_total{provider="fake",operation="create",outcome="cancelled"} 1"#,
            r#"podvisor_provider_requests_total{provider="fake",operation="delete",outcome="not_found"} 1"#,
            r#"podvisor_provider_requests_total{provider="fake",operation="find",outcome="ok"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
