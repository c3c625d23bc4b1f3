//! The instance record: everything the daemon must remember about one pod VM
//! to finish its life after a crash. Records are versioned.

use crate::lifecycle::State;
use crate::naming;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The schema version this build writes. A record with a higher version is
/// quarantined rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch: timestamps in records and events.
pub type UnixMillis = u64;

/// The wall clock now, in milliseconds since the Unix epoch.
///
/// A clock set before 1970 reads as 0; one past the year 584 million
/// saturates at `u64::MAX`. The state machine never calls this: its callers
/// pass `now` in, so it stays pure.
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the pod asked for, from its annotations. Every field is optional:
/// the provider fills in its defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// An explicit instance type (`machine_type` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Requested vCPUs (`default_vcpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Requested memory in MiB (`default_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Requested GPUs (`default_gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Requested GPU model (`default_gpu_model`), for selection only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// Image override (`image`): an AMI id, an Azure image id, a libvirt volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The cloud instance behind a record, as the provider reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRef {
    /// The provider's id (EC2 instance id, libvirt UUID, ...).
    pub id: String,
    /// The instance's addresses; the first is the agent endpoint.
    pub ips: Vec<IpAddr>,
}

/// One pod VM, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The version of this layout; see [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Kata's sandbox id: the journal key.
    pub sandbox_id: String,
    /// The pod's name (`io.kubernetes.cri.sandbox-name`).
    pub pod_name: String,
    /// The pod's namespace (`io.kubernetes.cri.sandbox-namespace`).
    pub pod_namespace: String,
    /// The pod's network namespace path as CreateVM sent it.
    #[serde(default)]
    pub network_namespace_path: String,
    /// The VXLAN network identifier of the pod's tunnel, allocated when
    /// CreateVM recorded the sandbox and kept until the record is gone, so
    /// retries and recovery reuse it and no two live sandboxes share one.
    /// `None`: the sandbox has no tunnel (or was recorded before VNIs were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// What the pod asked for.
    #[serde(default)]
    pub spec: InstanceSpec,
    /// The `cc_init_data` annotation (gzip + base64 TOML), for user data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initdata: Option<String>,
    /// Where the pod VM is in its life.
    pub state: State,
    /// Counts creation series; part of the idempotency token.
    pub generation: u64,
    /// The idempotency token of the current generation, once StartVM began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The deterministic instance name (`podvm-<pod>-<id8>`).
    pub instance_name: String,
    /// The cloud instance, once the provider returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceRef>,
    /// For `Failed`: the instance (if any) is confirmed gone.
    #[serde(default)]
    pub released: bool,
    /// Attempts of the current operation (creation, or deletion); for
    /// `Failed`, the creation attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// The last error an operation met, kept for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When CreateVM recorded the sandbox.
    pub created_at: UnixMillis,
    /// When the record last changed.
    pub updated_at: UnixMillis,
}

impl InstanceRecord {
    /// A new `Pending` record, as CreateVM makes it.
    pub fn pending(
        sandbox_id: &str,
        pod_name: &str,
        pod_namespace: &str,
        spec: InstanceSpec,
        now: UnixMillis,
    ) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            sandbox_id: sandbox_id.to_owned(),
            pod_name: pod_name.to_owned(),
            pod_namespace: pod_namespace.to_owned(),
            network_namespace_path: String::new(),
            vni: None,
            spec,
            initdata: None,
            state: State::Pending,
            generation: 0,
            token: None,
            instance_name: naming::instance_name(pod_name, sandbox_id),
            instance: None,
            released: false,
            attempts: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Encodes the record for the journal.
    pub fn encode(&self) -> Vec<u8> {
        // A record holds only strings, numbers and enums: encoding cannot fail.
        serde_json::to_vec(self).expect("an InstanceRecord always serializes")
    }

    /// Decodes a journal value, refusing what this build cannot read safely.
    ///
    /// # Errors
    /// [`DecodeError::NewerSchema`] when a newer podvisor wrote it;
    /// [`DecodeError::Malformed`] when the bytes are not JSON of a record,
    /// or the record is in the `Removed` state (never stored).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let newer = |found: u32| DecodeError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        };
        // One parse in the common case (recovery decodes every record); the
        // version alone is read only to explain a record that does not parse.
        let record: Self = match serde_json::from_slice(bytes) {
            Ok(record) => record,
            Err(e) => {
                return Err(match serde_json::from_slice::<Version>(bytes) {
                    Ok(v) if v.schema_version > SCHEMA_VERSION => newer(v.schema_version),
                    _ => DecodeError::Malformed(e.to_string()),
                });
            }
        };
        if record.schema_version > SCHEMA_VERSION {
            return Err(newer(record.schema_version));
        }
        if record.state == State::Removed {
            return Err(DecodeError::Malformed(
                "a stored record cannot be removed".into(),
            ));
        }
        Ok(record)
    }
}

/// Why a journal value could not be read as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a record of any known layout.
    #[error("Malformed record: {0}")]
    Malformed(String),
    /// A newer podvisor wrote it.
    #[error("Record schema version {found} is newer than this build understands ({known})")]
    NewerSchema {
        /// The version in the record.
        found: u32,
        /// The newest version this build reads.
        known: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InstanceRecord {
        let mut r = InstanceRecord::pending(
            "abc123",
            "web",
            "default",
            InstanceSpec {
                vcpus: Some(2),
                memory_mib: Some(4096),
                ..Default::default()
            },
            1_700_000_000_000,
        );
        r.state = State::Running;
        r.generation = 1;
        r.vni = Some(555_001);
        r.token = Some(naming::idempotency_token("abc123", 1));
        r.instance = Some(InstanceRef {
            id: "i-1".into(),
            ips: vec!["127.0.0.2".parse().unwrap()],
        });
        r
    }

    #[test]
    fn a_record_written_before_vnis_reads_as_one_without_a_tunnel() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        assert_eq!(v["vni"], 555_001);
        v.as_object_mut().unwrap().remove("vni");
        let r = InstanceRecord::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(r.vni, None);
        assert!(!String::from_utf8(r.encode()).unwrap().contains("vni"));
    }

    #[test]
    fn record_round_trips_through_its_encoding() {
        let r = sample();
        assert_eq!(InstanceRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn garbage_and_truncation_are_malformed() {
        let bytes = sample().encode();
        assert!(matches!(
            InstanceRecord::decode(&bytes[..bytes.len() / 2]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            InstanceRecord::decode(b"\xff\x00"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            InstanceRecord::decode(b"{}"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_newer_schema_is_refused_not_misread() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        v["schema_version"] = 99.into();
        let newer = v.clone();
        // A newer layout that this build cannot even parse: still named as
        // newer, not as malformed.
        v["state"] = 7.into();
        for record in [newer, v] {
            let err = InstanceRecord::decode(&serde_json::to_vec(&record).unwrap()).unwrap_err();
            assert_eq!(
                err,
                DecodeError::NewerSchema {
                    found: 99,
                    known: SCHEMA_VERSION
                },
                "{record}"
            );
        }
    }

    #[test]
    fn a_stored_removed_state_is_malformed() {
        let mut r = sample();
        r.state = State::Removed;
        assert!(matches!(
            InstanceRecord::decode(&r.encode()),
            Err(DecodeError::Malformed(_))
        ));
    }
}
