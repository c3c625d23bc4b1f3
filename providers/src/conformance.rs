//! The provider conformance suite: what every provider must do, checked
//! against the real provider (and its real cloud, or that cloud's emulator).
//!
//! A provider's test calls [`run`] with a provider and a [`Fixture`]:
//!
//! ```text
//! create (a first attempt) → find → list by the node tag and by the
//! cluster tag → idempotent re-create
//! with the same token (an earlier attempt) returns the same instance →
//! delete → delete again is fine → find returns none
//! ```

use crate::provider::{CreateRequest, Provider, TAG_CLUSTER, TAG_NODE, TAG_SANDBOX, TAG_TOKEN};
use podvisor_state::{InstanceSpec, idempotency_token, instance_name};
use std::collections::BTreeMap;

/// What the suite needs to know about the environment.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The node name instances are tagged with.
    pub node_name: String,
    /// A sandbox id unique to this run (the provider's cloud may be shared).
    pub sandbox_id: String,
    /// The cluster identity instances are tagged with (a UID, as
    /// `kube-system`'s), unique to this run.
    pub cluster_id: String,
    /// The spec to request (an image or type the test cloud accepts).
    pub spec: InstanceSpec,
}

impl Fixture {
    /// A fixture for `node_name` with a fresh sandbox id. The id is random
    /// from its first character: the instance name takes its first 8, and
    /// clouds whose names are unique (libvirt domains) need fixtures that
    /// run at once to differ there.
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.to_owned(),
            sandbox_id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            cluster_id: uid(),
            spec: InstanceSpec::default(),
        }
    }

    /// The create request the suite sends, for generation `generation`: a
    /// first attempt (`earlier_attempt: false`, as the daemon sends for a
    /// fresh token).
    pub fn request(&self, generation: u64) -> CreateRequest {
        let token = idempotency_token(&self.sandbox_id, generation);
        let mut tags = BTreeMap::new();
        tags.insert(TAG_NODE.to_owned(), self.node_name.clone());
        tags.insert(TAG_SANDBOX.to_owned(), self.sandbox_id.clone());
        tags.insert(TAG_TOKEN.to_owned(), token.clone());
        tags.insert(TAG_CLUSTER.to_owned(), self.cluster_id.clone());
        CreateRequest {
            sandbox_id: self.sandbox_id.clone(),
            pod_name: "conformance".into(),
            pod_namespace: "default".into(),
            instance_name: instance_name("conformance", &self.sandbox_id),
            token,
            earlier_attempt: false,
            spec: self.spec.clone(),
            user_data: "#cloud-config\nwrite_files: []\n".into(),
            tags,
        }
    }
}

/// A random UID in Kubernetes' form (8-4-4-4-12 lowercase hex).
fn uid() -> String {
    let hex = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Runs the suite; panics with the failed step and what was seen.
pub async fn run(provider: &dyn Provider, fixture: &Fixture) {
    let name = provider.name();
    let request = fixture.request(1);

    // Nothing exists for this token yet.
    let before = provider
        .find_instance(&request.token, &request.instance_name)
        .await;
    assert!(
        matches!(before, Ok(None)),
        "[{name}] find before create: {before:?}"
    );

    // create
    let created = provider
        .create_instance(&request)
        .await
        .unwrap_or_else(|e| panic!("[{name}] create: {e}"));
    assert!(
        !created.id.is_empty(),
        "[{name}] create returned an empty id"
    );
    assert!(
        !created.ips.is_empty(),
        "[{name}] create returned no address"
    );
    assert_eq!(
        created.name, request.instance_name,
        "[{name}] instance name"
    );

    // find, by token
    let found = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap_or_else(|e| panic!("[{name}] find: {e}"));
    assert_eq!(
        found.as_ref().map(|i| i.id.as_str()),
        Some(created.id.as_str()),
        "[{name}] find by token"
    );

    // list by the node tag, carrying every podvisor tag
    let listed = provider
        .list_instances(TAG_NODE, &fixture.node_name)
        .await
        .unwrap_or_else(|e| panic!("[{name}] list: {e}"));
    let mine: Vec<_> = listed.iter().filter(|i| i.id == created.id).collect();
    assert_eq!(mine.len(), 1, "[{name}] list by node tag: {listed:?}");
    for key in [TAG_NODE, TAG_SANDBOX, TAG_TOKEN] {
        assert_eq!(
            mine[0].tags.get(key),
            request.tags.get(key),
            "[{name}] tag {key}"
        );
    }
    let elsewhere = provider
        .list_instances(TAG_NODE, "some-other-node")
        .await
        .unwrap_or_else(|e| panic!("[{name}] list other node: {e}"));
    assert!(
        elsewhere.iter().all(|i| i.id != created.id),
        "[{name}] listed under another node"
    );

    // list by the cluster tag (the node-gone collector's listing), with
    // the node tag it judges by
    let in_cluster = provider
        .list_instances(TAG_CLUSTER, &fixture.cluster_id)
        .await
        .unwrap_or_else(|e| panic!("[{name}] list by cluster tag: {e}"));
    let mine: Vec<_> = in_cluster.iter().filter(|i| i.id == created.id).collect();
    assert_eq!(
        mine.len(),
        1,
        "[{name}] list by cluster tag: {in_cluster:?}"
    );
    for key in [TAG_CLUSTER, TAG_NODE] {
        assert_eq!(
            mine[0].tags.get(key),
            request.tags.get(key),
            "[{name}] tag {key}"
        );
    }
    let other_cluster = provider
        .list_instances(TAG_CLUSTER, &uid())
        .await
        .unwrap_or_else(|e| panic!("[{name}] list other cluster: {e}"));
    assert!(
        other_cluster.iter().all(|i| i.id != created.id),
        "[{name}] listed under another cluster"
    );

    // idempotent re-create: the retry of a create whose answer was lost
    let retry = CreateRequest {
        earlier_attempt: true,
        ..request.clone()
    };
    let again = provider
        .create_instance(&retry)
        .await
        .unwrap_or_else(|e| panic!("[{name}] re-create: {e}"));
    assert_eq!(
        again.id, created.id,
        "[{name}] a second create with one token made another instance"
    );
    let listed = provider
        .list_instances(TAG_TOKEN, &request.token)
        .await
        .unwrap_or_else(|e| panic!("[{name}] list by token: {e}"));
    assert_eq!(
        listed.len(),
        1,
        "[{name}] instances with one token: {listed:?}"
    );

    // delete, twice
    provider
        .delete_instance(&created.id)
        .await
        .unwrap_or_else(|e| panic!("[{name}] delete: {e}"));
    provider
        .delete_instance(&created.id)
        .await
        .unwrap_or_else(|e| panic!("[{name}] a second delete must succeed: {e}"));

    // gone
    let after = provider
        .find_instance(&request.token, &request.instance_name)
        .await
        .unwrap_or_else(|e| panic!("[{name}] find after delete: {e}"));
    assert!(after.is_none(), "[{name}] find after delete: {after:?}");
    let listed = provider
        .list_instances(TAG_NODE, &fixture.node_name)
        .await
        .unwrap_or_else(|e| panic!("[{name}] list after delete: {e}"));
    assert!(
        listed.iter().all(|i| i.id != created.id),
        "[{name}] listed after delete"
    );

    // A new generation is a new instance.
    let next = fixture.request(2);
    let second = provider
        .create_instance(&next)
        .await
        .unwrap_or_else(|e| panic!("[{name}] create generation 2: {e}"));
    assert_ne!(
        second.id, created.id,
        "[{name}] generation 2 reused generation 1's instance"
    );
    provider
        .delete_instance(&second.id)
        .await
        .unwrap_or_else(|e| panic!("[{name}] delete generation 2: {e}"));
}
