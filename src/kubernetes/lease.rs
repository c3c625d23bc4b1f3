//! A `coordination.k8s.io/v1` Lease: which one daemon of the cluster
//! collects the pod VMs of deleted nodes ([`super::node_gone`]).
//!
//! The rules are client-go's leader election (`k8s.io/client-go/tools/
//! leaderelection`), kept small:
//! - A missing Lease is created with this daemon as `holderIdentity`.
//! - Another holder's Lease counts as expired once this daemon has seen
//!   the same record (its `resourceVersion`) unchanged for
//!   `leaseDurationSeconds` by its **own** clock, so nodes' clocks never
//!   need to agree. Then, or when the Lease is ours or has no holder, it is
//!   written back with this daemon as holder; the write carries the
//!   `resourceVersion` read, so of two daemons writing at once one gets
//!   409 Conflict and does not hold it.
//! - The holder renews every [`Lease::retry_period`] (a third of the
//!   duration); any failed renewal (an error, a conflict, the Lease
//!   taken) loses it at once. The caller bounds each try by the retry
//!   period ([`super::node_gone::hold`] does), so a holder cut off from the
//!   API stops believing it holds the Lease at most two retry periods after
//!   its last renewal — before any other daemon can take it (client-go's
//!   `renewDeadline`).
//! - At shutdown the holder gives it up (empty holder), so another daemon
//!   takes over without waiting for it to expire.
//!
//! So another daemon holds it at most the duration plus two retry periods
//! after the holder's last renewal. Two daemons can still both act under
//! it for a moment (a step begun just before the belief ended, a holder
//! whose clock or scheduler stalls); what they do under it must be safe to
//! do twice.

use super::{Kube, observe, observe_opt};
use k8s_openapi::api::coordination::v1::{Lease as LeaseObject, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use std::time::Duration;
use tokio::time::Instant;

/// One Lease, as seen and held by this daemon.
pub struct Lease {
    api: kube::Api<LeaseObject>,
    name: String,
    namespace: String,
    identity: String,
    duration: Duration,
    /// The last record read and when this daemon first saw it.
    observed: Option<(String, Instant)>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The Lease `namespace`/`name`, held as `identity` for `duration`
    /// (whole seconds, at least 1 s; Kubernetes keeps seconds).
    pub fn new(
        kube: &Kube,
        namespace: &str,
        name: &str,
        identity: String,
        duration: Duration,
    ) -> Self {
        Self {
            api: kube::Api::namespaced(kube.client(), namespace),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity,
            duration: Duration::from_secs(duration.as_secs().max(1)),
            observed: None,
        }
    }

    /// How often to try: a third of the duration.
    pub fn retry_period(&self) -> Duration {
        self.duration / 3
    }

    /// This daemon's `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// `Lease <namespace>/<name>`, for messages.
    fn what(&self) -> String {
        format!("Lease {}/{}", self.namespace, self.name)
    }

    /// Tries to take or renew the Lease at `now`: whether this daemon holds
    /// it now.
    ///
    /// # Errors
    /// The API's error as text; this daemon does not hold the Lease then.
    pub async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, String> {
        let what = self.what();
        let stamp = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let current = observe_opt("get", self.api.get_opt(&self.name).await)
            .map_err(|e| format!("GET {what}: {e}"))?;
        let Some(mut lease) = current else {
            let lease = LeaseObject {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match observe(
                "create",
                self.api.create(&PostParams::default(), &lease).await,
            ) {
                Ok(_) => Ok(true),
                // Another daemon made it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(format!("POST {what}: {e}")),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(v, _)| *v != version) {
            self.observed = Some((version, now));
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() {
            // A record without a duration, or with 0, is held for ours; a
            // holder's own is at least 1 s.
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(self.duration, Duration::from_secs);
            let seen_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
            if now.duration_since(seen_at) < held_for {
                return Ok(false);
            }
        }
        if !ours {
            spec.acquire_time = Some(stamp.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(stamp);
        spec.lease_duration_seconds = Some(seconds);
        // The resourceVersion read goes back: a write in between is a 409.
        match observe(
            "update",
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        ) {
            Ok(written) => {
                self.observed = written
                    .metadata
                    .resource_version
                    .map(|v| (v, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(format!("PUT {what}: {e}")),
        }
    }

    /// Gives the Lease up if it names this daemon (empty holder), so
    /// another daemon takes it at its next try; whether it was given up.
    /// Asked even when this daemon's last try failed: the Lease may still
    /// name it.
    ///
    /// # Errors
    /// The API's error as text (the Lease then expires on its own).
    pub async fn release(&self) -> Result<bool, String> {
        let what = self.what();
        let Some(mut lease) = observe_opt("get", self.api.get_opt(&self.name).await)
            .map_err(|e| format!("GET {what}: {e}"))?
        else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match observe(
            "update",
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        ) {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(format!("PUT {what}: {e}")),
        }
    }
}
