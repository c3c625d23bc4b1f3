//! The cloud-config a pod VM reads at boot: `write_files` only, as the
//! reference's `process-user-data` expects.

use serde::Serialize;

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
}

/// The forwarder's settings, `/run/peerpod/apf.json` (the fields known so far).
#[derive(Serialize)]
struct ForwarderSettings<'a> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        });
        assert!(text.starts_with("#cloud-config\nwrite_files:\n"));
        assert!(text.contains("- path: /run/peerpod/apf.json\n  content: \"{\\\"pod-namespace\\\":\\\"default\\\",\\\"pod-name\\\":\\\"we\\\\\\\"b\\\"}\"\n"), "{text}");
        assert!(text.contains("- path: /run/peerpod/initdata\n  content: \"H4sI\"\n"));
        assert!(text.contains("- path: /run/peerpod/scratch-space.marker\n  content: \"\"\n"));
    }
}
