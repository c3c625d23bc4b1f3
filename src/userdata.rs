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
}

/// The forwarder's settings, `/run/peerpod/apf.json` (the fields known so far).
#[derive(Serialize)]
struct ForwarderSettings<'a> {
    #[serde(rename = "pod-namespace")]
    pod_namespace: &'a str,
    #[serde(rename = "pod-name")]
    pod_name: &'a str,
}

/// Renders the cloud-config.
pub fn render(inputs: &UserDataInputs<'_>) -> String {
    let apf = serde_json::to_string(&ForwarderSettings {
        pod_namespace: inputs.pod_namespace,
        pod_name: inputs.pod_name,
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
        // A JSON string is a valid YAML double-quoted scalar: no escaping
        // rules of our own.
        let content = serde_json::to_string(&content).expect("a string always serializes");
        out.push_str(&format!("- path: {path}\n  content: {content}\n"));
    }
    out
}

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
        });
        assert!(text.starts_with("#cloud-config\nwrite_files:\n"));
        assert!(text.contains("- path: /run/peerpod/apf.json\n  content: \"{\\\"pod-namespace\\\":\\\"default\\\",\\\"pod-name\\\":\\\"we\\\\\\\"b\\\"}\"\n"), "{text}");
        assert!(text.contains("- path: /run/peerpod/initdata\n  content: \"H4sI\"\n"));
        assert!(text.contains("- path: /run/peerpod/scratch-space.marker\n  content: \"\"\n"));
    }
}
