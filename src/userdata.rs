//! The cloud-config a pod VM reads at boot: `write_files` only, as the
//! reference's `process-user-data` expects; and the create request that
//! carries it to the provider, with the tags that tie the instance to its
//! node, sandbox, token and journal.

use podvisor_podvm::network::config::PodNetwork;
use podvisor_providers::{
    CreateRequest, TAG_CLUSTER, TAG_JOURNAL, TAG_JOURNAL_SEQ, TAG_NODE, TAG_SANDBOX, TAG_TOKEN,
};
use podvisor_state::{InstanceRecord, Journal};
use serde::Serialize;
use std::collections::BTreeMap;

/// What goes into one pod VM's user data.
#[derive(Debug, Clone)]
pub struct UserDataInputs<'a> {
    /// The pod's name.
    pub pod_name: &'a str,
    /// The pod's namespace.
    pub pod_namespace: &'a str,
    /// Initdata: the pod's annotation, else the daemon's `--initdata`.
    pub initdata: Option<&'a str>,
    /// `--enable-scratch-space`.
    pub scratch_space: bool,
    /// The pod VM's TLS identity (`None`: TLS disabled, or certificates
    /// baked into the image).
    pub tls: Option<&'a crate::tls::ServerIdentity>,
    /// `--tls-min-version`, passed on to the forwarder.
    pub tls_min_version: Option<&'a str>,
    /// `--tls-cipher-suites`, passed on to the forwarder.
    pub tls_cipher_suites: Option<&'a str>,
    /// The pod's network for the pod VM to rebuild (`None`: no tunnel).
    pub pod_network: Option<&'a PodNetwork>,
}

/// The forwarder's settings, `/run/peerpod/apf.json`, keys in CAA's order.
#[derive(Serialize)]
struct ForwarderSettings<'a> {
    #[serde(rename = "pod-network", skip_serializing_if = "Option::is_none")]
    pod_network: Option<&'a PodNetwork>,
    #[serde(rename = "pod-namespace")]
    pod_namespace: &'a str,
    #[serde(rename = "pod-name")]
    pod_name: &'a str,
    #[serde(rename = "tls-server-cert", skip_serializing_if = "Option::is_none")]
    tls_server_cert: Option<&'a str>,
    #[serde(rename = "tls-server-key", skip_serializing_if = "Option::is_none")]
    tls_server_key: Option<&'a str>,
    #[serde(rename = "tls-client-ca", skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<&'a str>,
    #[serde(rename = "tls-min-version", skip_serializing_if = "Option::is_none")]
    tls_min_version: Option<&'a str>,
    #[serde(rename = "tls-cipher-suites", skip_serializing_if = "Option::is_none")]
    tls_cipher_suites: Option<&'a str>,
}

/// Renders the cloud-config.
pub fn render(inputs: &UserDataInputs<'_>) -> String {
    let apf = serde_json::to_string(&ForwarderSettings {
        pod_network: inputs.pod_network,
        pod_namespace: inputs.pod_namespace,
        pod_name: inputs.pod_name,
        tls_server_cert: inputs.tls.map(|t| t.cert_pem.as_str()),
        tls_server_key: inputs.tls.map(|t| t.key_pem.as_str()),
        tls_client_ca: inputs.tls.map(|t| t.client_ca_pem.as_str()),
        tls_min_version: inputs.tls_min_version,
        tls_cipher_suites: inputs.tls_cipher_suites,
    })
    .expect("forwarder settings always serialize");
    let mut files: Vec<(&str, String)> = vec![("/run/peerpod/apf.json", apf)];
    if let Some(initdata) = inputs.initdata {
        files.push(("/run/peerpod/initdata", initdata.to_owned()));
    }
    if inputs.scratch_space {
        files.push(("/run/peerpod/scratch-space.marker", String::new()));
    }
    let mut out = String::from("#cloud-config\nwrite_files:\n");
    for (path, content) in files {
        add_file(&mut out, path, &content);
    }
    out
}

/// Adds one `write_files` entry to rendered user data.
pub fn add_file(user_data: &mut String, path: &str, content: &str) {
    // A JSON string is a valid YAML double-quoted scalar: no escaping rules
    // of our own.
    let content = serde_json::to_string(content).expect("a string always serializes");
    user_data.push_str(&format!("- path: {path}\n  content: {content}\n"));
}

/// Where the registry credentials go in the pod VM.
pub const AUTH_JSON_PATH: &str = "/run/peerpod/auth.json";

/// What the daemon adds to every create request besides the pod VM's own
/// record: its flags, its TLS authority and its journal.
#[derive(Clone, Copy)]
pub struct RequestInputs<'a> {
    /// This node's name, for the node tag.
    pub node_name: &'a str,
    /// The cluster's identity (the `kube-system` namespace's UID), for the
    /// cluster tag; `None` without a Kubernetes API or before it answered.
    pub cluster_id: Option<&'a str>,
    /// `--initdata`, for pods without their own.
    pub default_initdata: Option<&'a str>,
    /// `--enable-scratch-space`.
    pub scratch_space: bool,
    /// Issues the pod VM's server certificate (`None`: `--disable-tls`).
    pub pki: Option<&'a crate::tls::Pki>,
    /// `--tls-min-version`, passed on to the forwarder.
    pub tls_min_version: Option<&'a str>,
    /// `--tls-cipher-suites`, passed on to the forwarder.
    pub tls_cipher_suites: Option<&'a str>,
    /// The journal whose id and durable write sequence the instance is
    /// tagged with.
    pub journal: &'a dyn Journal,
}

impl std::fmt::Debug for RequestInputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The initdata may hold secrets: only whether there is one.
        f.debug_struct("RequestInputs")
            .field("node_name", &self.node_name)
            .field("cluster_id", &self.cluster_id)
            .field("default_initdata", &self.default_initdata.is_some())
            .field("scratch_space", &self.scratch_space)
            .field("tls", &self.pki.is_some())
            .field("tls_min_version", &self.tls_min_version)
            .field("tls_cipher_suites", &self.tls_cipher_suites)
            .finish_non_exhaustive()
    }
}

/// The create request of the pod VM whose record is `record` (its token,
/// names, spec and initdata): user data with the forwarder's settings and,
/// with TLS, a fresh server certificate for the instance name; tags naming
/// the node, sandbox, token, journal and journal sequence. Registry
/// credentials are added later, at call time
/// ([`crate::pull_secrets::PullSecrets::add_auth_json`]).
///
/// `earlier_attempt` becomes [`CreateRequest::earlier_attempt`]: `true`
/// unless the state machine knows this is the token's first create
/// (`Command::Ensure { first_attempt: true }`: the token was made by the
/// StartVM being served, in this process, and no create with it has been
/// sent). A retry and the recovery of a `Creating` record set it.
///
/// # Errors
///
/// The pod VM's TLS certificate cannot be issued; the message says why.
/// Nothing can be created without it, so the caller reports it as a
/// permanent failure.
///
/// `pod_network`: the pod's network for apf.json's `pod-network`, when the
/// daemon builds the sandbox's tunnel.
pub fn create_request(
    record: &InstanceRecord,
    inputs: &RequestInputs<'_>,
    earlier_attempt: bool,
    pod_network: Option<&PodNetwork>,
) -> Result<CreateRequest, String> {
    let token = record.token.clone().unwrap_or_default();
    let identity = match inputs.pki {
        Some(pki) => pki
            .server_identity(&record.instance_name)
            .map_err(|e| format!("Cannot issue the pod VM's TLS certificate: {e}"))?,
        None => None,
    };
    let user_data = render(&UserDataInputs {
        pod_name: &record.pod_name,
        pod_namespace: &record.pod_namespace,
        initdata: record.initdata.as_deref().or(inputs.default_initdata),
        scratch_space: inputs.scratch_space,
        tls: identity.as_ref(),
        tls_min_version: inputs.tls_min_version,
        tls_cipher_suites: inputs.tls_cipher_suites,
        pod_network,
    });
    let mut tags = BTreeMap::from([
        (TAG_NODE.to_owned(), inputs.node_name.to_owned()),
        (TAG_SANDBOX.to_owned(), record.sandbox_id.clone()),
        (TAG_TOKEN.to_owned(), token.clone()),
        (TAG_JOURNAL.to_owned(), inputs.journal.identity().id),
        (
            TAG_JOURNAL_SEQ.to_owned(),
            inputs.journal.durable_sequence().to_string(),
        ),
    ]);
    if let Some(cluster) = inputs.cluster_id {
        tags.insert(TAG_CLUSTER.to_owned(), cluster.to_owned());
    }
    Ok(CreateRequest {
        sandbox_id: record.sandbox_id.clone(),
        pod_name: record.pod_name.clone(),
        pod_namespace: record.pod_namespace.clone(),
        instance_name: record.instance_name.clone(),
        token,
        earlier_attempt,
        spec: record.spec.clone(),
        user_data,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_state::{InstanceSpec, SledJournal};

    #[test]
    fn a_create_request_carries_the_record_its_user_data_and_its_tags() {
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(dir.path()).unwrap();
        let mut record =
            InstanceRecord::pending("sb1", "web", "default", InstanceSpec::default(), 1);
        record.token = Some("tok-1".into());
        let mut inputs = RequestInputs {
            node_name: "node-a",
            cluster_id: None,
            default_initdata: Some("H4sIdefault"),
            scratch_space: false,
            pki: None,
            tls_min_version: None,
            tls_cipher_suites: None,
            journal: &journal,
        };
        let request = create_request(&record, &inputs, false, None).unwrap();
        assert_eq!(request.sandbox_id, "sb1");
        assert!(!request.earlier_attempt);
        assert!(
            create_request(&record, &inputs, true, None)
                .unwrap()
                .earlier_attempt
        );
        assert_eq!(request.instance_name, record.instance_name);
        assert_eq!(request.token, "tok-1");
        // The pod's own initdata wins over the daemon's.
        assert!(
            request.user_data.contains("H4sIdefault"),
            "{}",
            request.user_data
        );
        record.initdata = Some("H4sIpod".into());
        let own = create_request(&record, &inputs, false, None).unwrap();
        assert!(own.user_data.contains("H4sIpod") && !own.user_data.contains("H4sIdefault"));
        let tag = |key: &str| request.tags.get(key).map(String::as_str);
        assert_eq!(tag(TAG_NODE), Some("node-a"));
        assert_eq!(tag(TAG_SANDBOX), Some("sb1"));
        assert_eq!(tag(TAG_TOKEN), Some("tok-1"));
        assert_eq!(tag(TAG_JOURNAL), Some(journal.identity().id.as_str()));
        let seq = journal.durable_sequence().to_string();
        assert_eq!(tag(TAG_JOURNAL_SEQ), Some(seq.as_str()));
        // No cluster known: no cluster tag (never collected as a node-gone
        // instance); once known, every create carries it.
        assert_eq!(tag(TAG_CLUSTER), None);
        inputs.cluster_id = Some("0b6c1c4e-8e0e-4a0f-9d1c-2f3f0e6b9a11");
        let tagged = create_request(&record, &inputs, false, None).unwrap();
        assert_eq!(
            tagged.tags.get(TAG_CLUSTER).map(String::as_str),
            inputs.cluster_id
        );
    }

    #[test]
    fn the_pod_network_goes_first_in_apf_json_and_reads_back() {
        let network = PodNetwork {
            pod_ip: Some("10.244.1.5/24".parse().unwrap()),
            interface: "eth0".into(),
            tunnel_type: "vxlan".into(),
            vxlan_id: 555_000,
            vxlan_port: 4789,
            mtu: 1450,
            ..Default::default()
        };
        let text = render(&UserDataInputs {
            pod_name: "web",
            pod_namespace: "default",
            initdata: None,
            scratch_space: false,
            tls: None,
            tls_min_version: None,
            tls_cipher_suites: None,
            pod_network: Some(&network),
        });
        let files = podvisor_podvm::userdata::parse(&text).unwrap();
        let apf = &files[0].content;
        assert!(
            apf.starts_with("{\"pod-network\":{\"podip\":\"10.244.1.5/24\""),
            "{apf}"
        );
        let back = podvisor_podvm::network::config::from_apf_json(apf).unwrap();
        assert_eq!(back, Some(network));
    }

    #[test]
    fn renders_write_files_with_escaped_content() {
        let text = render(&UserDataInputs {
            pod_name: "we\"b",
            pod_namespace: "default",
            initdata: Some("H4sI"),
            scratch_space: true,
            tls: None,
            tls_min_version: None,
            tls_cipher_suites: None,
            pod_network: None,
        });
        assert!(text.starts_with("#cloud-config\nwrite_files:\n"));
        assert!(text.contains("- path: /run/peerpod/apf.json\n  content: \"{\\\"pod-namespace\\\":\\\"default\\\",\\\"pod-name\\\":\\\"we\\\\\\\"b\\\"}\"\n"), "{text}");
        assert!(text.contains("- path: /run/peerpod/initdata\n  content: \"H4sI\"\n"));
        assert!(text.contains("- path: /run/peerpod/scratch-space.marker\n  content: \"\"\n"));
    }
}
