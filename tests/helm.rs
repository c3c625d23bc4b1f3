//! The Helm chart in `deploy/helm/podvisor`, offline: `helm lint --strict`
//! and `helm template` for the defaults and every provider, every rendered
//! object validated strictly against the Kubernetes schemas, bad values
//! refused with a message naming the value, the chart's configuration keys
//! against the daemon's flags (both ways), and the chart's copies of the
//! dashboard files identical to `dashboards/`.
//!
//! Tools: `HELM` (Helm 4) and `KUBERNETES_VALIDATE` name them, else they
//! are looked up on `PATH`; `scripts/helm-tools.sh` installs both and prints
//! the assignments (`eval "$(scripts/helm-tools.sh)"`; `scripts/test.sh`
//! does it). YAML is read with the Python of `kubernetes-validate`'s
//! virtualenv (it brings PyYAML), else `python3`. Without the tools a test
//! says SKIPPED and passes, except under `CI=true`, where it fails.

#[path = "common/tools.rs"]
mod tools;

use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use tools::{root, runs, skip, text, tool};

const CHART: &str = "deploy/helm/podvisor";
/// This test file, as SKIPPED lines name it.
const FILE: &str = "helm";
/// The providers the chart has a values block for.
const PROVIDERS: &[&str] = &["local", "aws", "azure", "ibmcloud", "libvirt"];
/// Variables the chart sets in the container that are no daemon flag's:
/// `HOST_IP` is only expanded into `PODVISOR_ADMIN_ADDR`.
const NOT_DAEMON_VARIABLES: &[&str] = &["HOST_IP"];
/// Read by the CLI itself (the provider when none is named), no flag's.
const CLOUD_PROVIDER: &str = "CLOUD_PROVIDER";
/// API groups of CRDs `kubernetes-validate` has no schema for.
const CRD_GROUPS: &[&str] = &["monitoring.coreos.com/"];
/// The oldest and newest Kubernetes schemas `kubernetes-validate` has.
const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.37.0"];

fn chart() -> PathBuf {
    root().join(CHART)
}

struct Tools {
    helm: PathBuf,
    validate: PathBuf,
    python: PathBuf,
}

/// The tools, or `None` after saying why the test is skipped.
fn tools(test: &str) -> Option<Tools> {
    let helm = tool("HELM", "helm");
    let validate = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    let python = tools::yaml_python();
    let found = runs(&helm, &["version", "--short"])
        .and_then(|()| runs(&validate, &["--version"]))
        .and_then(|()| runs(&python, &["-c", "import yaml"]));
    match found {
        Ok(()) => Some(Tools {
            helm,
            validate,
            python,
        }),
        Err(why) => {
            skip(
                FILE,
                test,
                &format!(
                    "{why}; install helm and kubernetes-validate with scripts/helm-tools.sh \
                     and export what it prints (eval \"$(scripts/helm-tools.sh)\")"
                ),
            );
            None
        }
    }
}

impl Tools {
    fn helm(&self, args: &[&str]) -> Output {
        Command::new(&self.helm)
            .args(args)
            .current_dir(root())
            .output()
            .expect("running helm")
    }

    /// `helm template` with these values (a JSON file is a YAML file).
    fn template(&self, values: &Value, extra: &[&str]) -> Output {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), values.to_string()).expect("writing values");
        let path = file.path().to_str().expect("utf-8 path");
        let mut args = vec!["template", "podvisor", CHART, "--namespace", "peerpods"];
        args.extend(["--values", path]);
        args.extend(extra);
        self.helm(&args)
    }

    /// The rendered objects, or a failure naming the values.
    fn render(&self, values: &Value) -> Vec<Value> {
        self.render_with(values, &[])
    }

    /// [`Tools::render`] with `extra` arguments for `helm template`.
    fn render_with(&self, values: &Value, extra: &[&str]) -> Vec<Value> {
        let out = self.template(values, extra);
        assert!(
            out.status.success(),
            "helm template with {values} failed:\n{}",
            text(&out)
        );
        self.yaml_docs(&String::from_utf8_lossy(&out.stdout))
    }

    /// Every document of a YAML stream as JSON (null documents dropped).
    fn yaml_docs(&self, yaml: &str) -> Vec<Value> {
        tools::yaml_docs(&self.python, yaml)
    }

    fn values_yaml(&self) -> Value {
        let text = std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml");
        self.yaml_docs(&text).remove(0)
    }
}

fn kind(doc: &Value) -> (&str, &str) {
    (
        doc["apiVersion"].as_str().unwrap_or(""),
        doc["kind"].as_str().unwrap_or(""),
    )
}

fn find<'a>(docs: &'a [Value], kind_name: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d).1 == kind_name).collect()
}

fn one<'a>(docs: &'a [Value], kind_name: &str, name: &str) -> &'a Value {
    let found: Vec<_> = find(docs, kind_name)
        .into_iter()
        .filter(|d| d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind_name} {name} in {docs:?}");
    found[0]
}

fn keys(map: &Value) -> BTreeSet<String> {
    map.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Values that a provider needs to render (its required variables).
fn provider_values(provider: &str) -> Value {
    match provider {
        "aws" => json!({"provider": "aws",
            "providers": {"aws": {"env": {"PODVM_AMI_ID": "ami-0123456789abcdef0"}}}}),
        "azure" => json!({"provider": "azure",
            "providers": {"azure": {"env": {
                "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
                "AZURE_REGION": "eastus",
                "AZURE_RESOURCE_GROUP": "peerpods",
                "AZURE_SUBNET_ID": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/peerpods/providers/Microsoft.Network/virtualNetworks/vnet/subnets/podvms",
                "AZURE_IMAGE_ID": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/peerpods/providers/Microsoft.Compute/galleries/podvm/images/podvm/versions/0.1.0"},
              "secretEnv": {"AZURE_CLIENT_SECRET": "not-a-real-secret"}}}}),
        "ibmcloud" => json!({"provider": "ibmcloud",
            "providers": {"ibmcloud": {"env": {
                "IBMCLOUD_PODVM_IMAGE_ID": "r006-image-amd64",
                "IBMCLOUD_ZONE": "us-south-1",
                "IBMCLOUD_VPC_ID": "r006-vpc",
                "IBMCLOUD_VPC_SUBNET_ID": "0717-subnet",
                "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME": "bx2-2x8"},
              "secretEnv": {"IBMCLOUD_API_KEY": "not-a-real-key"}}}}),
        other => json!({ "provider": other }),
    }
}

/// Everything optional switched on.
fn everything_on(provider: &str) -> Value {
    let mut values = provider_values(provider);
    let extra = json!({
        "admin": {"bindHostIP": true},
        "metrics": {"podMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
                    "grafanaDashboard": {"enabled": true}},
        "runtimeClass": {"create": true, "nodeSelector": {"peerpods": "true"}},
        "config": {"env": {"PODVISOR_SOCKET_GROUP": "kata"}},
        "imagePullSecrets": [{"name": "registry"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        "tolerations": [{"operator": "Exists"}],
        "extraArgs": ["--disable-tls"],
        "extraVolumes": [{"name": "libvirt", "hostPath": {"path": "/run/libvirt"}}],
        "extraVolumeMounts": [{"name": "libvirt", "mountPath": "/run/libvirt"}],
    });
    merge(&mut values, &extra);
    // A flag of the provider's own, which has no variable.
    let provider_args = match provider {
        "libvirt" => json!(["--firmware", ""]),
        "aws" => json!(["--aws-profile", "peerpods"]),
        "ibmcloud" => json!(["--poll-interval", "5s"]),
        "azure" => json!(["--ssh-key-path", "/etc/podvisor/ssh/id_ed25519.pub"]),
        _ => json!(["--address-range", "127.64.0.0/12"]),
    };
    merge(&mut values, &json!({ "providerArgs": provider_args }));
    if provider == "azure" {
        merge(
            &mut values,
            &json!({"providers": {"azure": {"workloadIdentity":
                {"enabled": true, "clientId": "11111111-1111-1111-1111-111111111111"}}}}),
        );
    }
    values
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// The value sets the chart must render: the defaults, each provider's
/// minimal values, each provider with everything on.
fn value_sets() -> Vec<(String, Value)> {
    let mut sets = vec![("defaults".to_string(), json!({}))];
    for p in PROVIDERS {
        sets.push((format!("provider {p}"), provider_values(p)));
        sets.push((format!("provider {p}, everything on"), everything_on(p)));
    }
    sets
}

#[test]
fn the_charts_dashboard_files_are_copies_of_dashboards() {
    for file in ["alerts.yaml", "podvisor.json"] {
        let original = std::fs::read(root().join("dashboards").join(file)).expect("dashboards/");
        let copy = std::fs::read(chart().join("files").join(file))
            .unwrap_or_else(|e| panic!("{CHART}/files/{file}: {e}"));
        assert!(
            original == copy,
            "{CHART}/files/{file} differs from dashboards/{file}: \
             cp dashboards/{file} {CHART}/files/{file}"
        );
    }
}

#[test]
fn helm_lint_strict_passes_for_the_defaults_and_every_provider() {
    let Some(tools) = tools("helm_lint_strict_passes_for_the_defaults_and_every_provider") else {
        return;
    };
    for (what, values) in value_sets() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), values.to_string()).expect("values");
        let path = file.path().to_str().expect("utf-8 path");
        let out = tools.helm(&["lint", "--strict", CHART, "--values", path]);
        assert!(
            out.status.success(),
            "helm lint --strict ({what}) failed:\n{}",
            text(&out)
        );
    }
}

#[test]
fn every_rendered_object_validates_strictly() {
    let Some(tools) = tools("every_rendered_object_validates_strictly") else {
        return;
    };
    for (what, values) in value_sets() {
        // With crds/: the PeerPod CRD is validated as the other objects.
        let docs = tools.render_with(&values, &["--include-crds"]);
        assert!(!docs.is_empty(), "{what}: nothing rendered");
        assert!(
            docs.iter()
                .any(|d| kind(d) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")),
            "{what}: no PeerPod CRD"
        );
        let (crds, builtin): (Vec<&Value>, Vec<&Value>) = docs
            .iter()
            .partition(|d| CRD_GROUPS.iter().any(|g| kind(d).0.starts_with(g)));
        // CRDs kubernetes-validate does not know: well formed, at least.
        for doc in &crds {
            let (api, k) = kind(doc);
            assert!(
                ["PodMonitor", "PrometheusRule"].contains(&k) && api.ends_with("/v1"),
                "{what}: unexpected {api} {k}"
            );
            assert!(doc["metadata"]["name"].is_string() && doc["spec"].is_object());
        }
        // Every other object: strictly against the Kubernetes schemas (one
        // JSON document per file: JSON is YAML).
        let dir = tempfile::tempdir().expect("temp dir");
        let mut files = Vec::new();
        for (i, doc) in builtin.iter().enumerate() {
            let path = dir.path().join(format!("{i}.yaml"));
            std::fs::write(&path, doc.to_string()).expect("writing object");
            files.push(path);
        }
        for version in KUBERNETES_VERSIONS {
            let out = Command::new(&tools.validate)
                .args(["--strict", "--kubernetes-version", version])
                .args(&files)
                .output()
                .expect("running kubernetes-validate");
            let report = text(&out);
            assert!(
                out.status.success() && !report.contains("Couldn't find schema"),
                "kubernetes-validate --strict -k {version} ({what}) failed:\n{report}"
            );
            assert_eq!(
                report.matches(" passed for resource ").count(),
                builtin.len(),
                "{what}: not every object was validated against {version}:\n{report}"
            );
        }
    }
}

#[test]
fn bad_values_fail_naming_the_value() {
    let Some(tools) = tools("bad_values_fail_naming_the_value") else {
        return;
    };
    let cases: &[(&str, Value, &[&str], &str)] = &[
        (
            "an unknown provider",
            json!({"provider": "gcp"}),
            &[],
            "/provider",
        ),
        (
            "aws without an AMI",
            json!({"provider": "aws"}),
            &[],
            "/providers/aws/env/PODVM_AMI_ID",
        ),
        (
            "aws without an AMI, past the schema",
            json!({"provider": "aws"}),
            &["--skip-schema-validation"],
            "providers.aws.env.PODVM_AMI_ID is required",
        ),
        (
            "azure without its subnet",
            json!({"provider": "azure"}),
            &[],
            "/providers/azure/env/AZURE_SUBNET_ID",
        ),
        (
            "azure without its subscription, past the schema",
            json!({"provider": "azure"}),
            &["--skip-schema-validation"],
            "providers.azure.env.AZURE_SUBSCRIPTION_ID is required",
        ),
        (
            "an azure client secret in the ConfigMap",
            json!({"providers": {"azure": {"env": {"AZURE_CLIENT_SECRET": "x"}}}}),
            &[],
            "AZURE_CLIENT_SECRET",
        ),
        (
            "ibmcloud without its zone",
            json!({"provider": "ibmcloud"}),
            &[],
            "/providers/ibmcloud/env/IBMCLOUD_ZONE",
        ),
        (
            "ibmcloud without its image, past the schema",
            json!({"provider": "ibmcloud"}),
            &["--skip-schema-validation"],
            "providers.ibmcloud.env.IBMCLOUD_PODVM_IMAGE_ID is required",
        ),
        (
            "a variable the provider does not have",
            json!({"providers": {"local": {"env": {"LOCAL_NO_SUCH_THING": "1"}}}}),
            &[],
            "LOCAL_NO_SUCH_THING",
        ),
        (
            "a daemon variable the chart sets itself",
            json!({"config": {"env": {"PODVISOR_STATE_DIR": "/elsewhere"}}}),
            &[],
            "PODVISOR_STATE_DIR",
        ),
        (
            "a grace period the drain does not fit in",
            json!({"terminationGracePeriodSeconds": 25, "shutdownGraceSeconds": 20}),
            &[],
            "terminationGracePeriodSeconds (25) must be larger than shutdownGraceSeconds (20) + 5",
        ),
        (
            "a flag the chart sets itself, in extraArgs",
            json!({"extraArgs": ["--disable-tls", "--state-dir=/elsewhere"]}),
            &[],
            "extraArgs: --state-dir is set by the chart",
        ),
        (
            "a PodMonitor for a loopback endpoint",
            json!({"metrics": {"podMonitor": {"enabled": true}}}),
            &[],
            "admin.bindHostIP",
        ),
    ];
    for (what, values, extra, message) in cases {
        let out = tools.template(values, extra);
        let said = text(&out);
        assert!(!out.status.success(), "{what}: helm template succeeded");
        assert!(
            said.contains(message),
            "{what}: the error does not say {message:?}:\n{said}"
        );
    }
}

/// With a launch template (USE_PODVM_LAUNCHTEMPLATE true, in any spelling
/// the daemon takes) the template names the image, so no PODVM_AMI_ID is
/// needed — in the schema and in the template alike; false still needs it.
#[test]
fn aws_with_a_launch_template_needs_no_ami() {
    let Some(tools) = tools("aws_with_a_launch_template_needs_no_ami") else {
        return;
    };
    for on in [json!("true"), json!("Yes"), json!("1"), json!(true)] {
        let values = json!({"provider": "aws", "providers": {"aws": {"env": {
            "USE_PODVM_LAUNCHTEMPLATE": on, "PODVM_LAUNCHTEMPLATE_NAME": "peerpods"}}}});
        for extra in [&[][..], &["--skip-schema-validation"][..]] {
            let out = tools.template(&values, extra);
            assert!(
                out.status.success(),
                "USE_PODVM_LAUNCHTEMPLATE={on} {extra:?}: {}",
                text(&out)
            );
        }
    }
    let values = json!({"provider": "aws", "providers": {"aws": {"env": {
        "USE_PODVM_LAUNCHTEMPLATE": "false"}}}});
    for (extra, message) in [
        (&[][..], "/providers/aws/env/PODVM_AMI_ID"),
        (
            &["--skip-schema-validation"][..],
            "providers.aws.env.PODVM_AMI_ID is required",
        ),
    ] {
        let out = tools.template(&values, extra);
        assert!(!out.status.success(), "launch template off {extra:?}");
        assert!(text(&out).contains(message), "{}", text(&out));
    }
}

/// Azure workload identity: the pod label the webhook selects on and the
/// ServiceAccount's client id, only with provider azure and only when
/// enabled; the client secret only ever in the Secret.
#[test]
fn azure_workload_identity_labels_the_pod_and_annotates_the_service_account() {
    let Some(tools) =
        tools("azure_workload_identity_labels_the_pod_and_annotates_the_service_account")
    else {
        return;
    };
    const USE: &str = "azure.workload.identity/use";
    const CLIENT_ID: &str = "azure.workload.identity/client-id";
    const ID: &str = "11111111-1111-1111-1111-111111111111";
    let identity = |enabled: bool, client_id: &str| {
        json!({"providers": {"azure": {"workloadIdentity":
            {"enabled": enabled, "clientId": client_id}}}})
    };
    let render = |values: Value| {
        let docs = tools.render(&values);
        let ds = find(&docs, "DaemonSet")[0];
        let label = ds["spec"]["template"]["metadata"]["labels"][USE].clone();
        let sa = find(&docs, "ServiceAccount")[0];
        let annotation = sa["metadata"]["annotations"][CLIENT_ID].clone();
        (label, annotation, docs)
    };

    let mut on = provider_values("azure");
    merge(&mut on, &identity(true, ID));
    merge(
        &mut on,
        &json!({"serviceAccount": {"annotations": {"team": "peerpods"}}}),
    );
    let (label, annotation, docs) = render(on);
    assert_eq!(label, json!("true"), "the pod label");
    assert_eq!(annotation, json!(ID), "the client id annotation");
    assert_eq!(
        find(&docs, "ServiceAccount")[0]["metadata"]["annotations"]["team"],
        "peerpods",
        "serviceAccount.annotations are kept beside the client id"
    );
    // The secret is in the Secret, base64, and not in the ConfigMap.
    let cm = one(&docs, "ConfigMap", "peer-pods-cm");
    assert!(cm["data"]["AZURE_CLIENT_SECRET"].is_null(), "{cm}");
    let secret = one(&docs, "Secret", "peer-pods-secret");
    assert_eq!(
        secret["data"]["AZURE_CLIENT_SECRET"],
        json!("bm90LWEtcmVhbC1zZWNyZXQ="),
        "{secret}"
    );

    // Enabled without a client id: the label, no annotation (the client id
    // may come from AZURE_CLIENT_ID or the user's own annotations).
    let mut no_id = provider_values("azure");
    merge(&mut no_id, &identity(true, ""));
    let (label, annotation, _) = render(no_id);
    assert_eq!(label, json!("true"));
    assert!(annotation.is_null(), "{annotation}");

    // Off, or another provider: neither.
    let mut off = provider_values("azure");
    merge(&mut off, &identity(false, ID));
    let mut other = provider_values("aws");
    merge(&mut other, &identity(true, ID));
    for values in [off, other] {
        let (label, annotation, _) = render(values);
        assert!(
            label.is_null() && annotation.is_null(),
            "{label} {annotation}"
        );
    }
}

/// Every `[env: NAME…]` of `podvisor [provider] --help`.
fn daemon_variables(provider: Option<&str>) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(provider)
        .arg("--help")
        .env_clear()
        .output()
        .expect("running podvisor --help");
    assert!(out.status.success(), "podvisor --help: {}", text(&out));
    // Help wraps lines: `[env:` and the name may be on two lines.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(
        names.iter().all(|n| !n.is_empty()),
        "an unreadable [env: ] in podvisor {provider:?} --help"
    );
    names
}

fn env_names(container: &Value) -> BTreeSet<String> {
    container["env"]
        .as_array()
        .expect("the container's env")
        .iter()
        .map(|e| e["name"].as_str().expect("env name").to_string())
        .collect()
}

fn schema_keys(schema: &Value, path: &[&str]) -> BTreeSet<String> {
    let mut node = schema;
    for part in path {
        node = &node["properties"][part];
    }
    assert_eq!(
        node["additionalProperties"],
        json!(false),
        "values.schema.json: {} must refuse unknown keys",
        path.join(".")
    );
    keys(&node["properties"])
}

#[test]
fn the_chart_sets_only_what_the_daemon_reads_and_can_set_all_of_it() {
    let Some(tools) = tools("the_chart_sets_only_what_the_daemon_reads_and_can_set_all_of_it")
    else {
        return;
    };
    let global = daemon_variables(None);
    let values = tools.values_yaml();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("values.schema.json")).expect("schema"),
    )
    .expect("values.schema.json is JSON");

    // The providers of the chart are the providers of this build.
    let chart_providers = keys(&values["providers"]);
    let help = String::from_utf8_lossy(
        &Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("--help")
            .output()
            .expect("podvisor --help")
            .stdout,
    )
    .into_owned();
    let section = help
        .split(
            "Providers (run the daemon), then commands (talk to a running one, or to its journal):",
        )
        .nth(1)
        .expect("a Providers section");
    let built: BTreeSet<String> = section
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        // The providers come first; the commands from `version` on.
        .take_while(|name| *name != "version")
        .map(str::to_string)
        .collect();
    assert_eq!(
        chart_providers, built,
        "the chart's provider blocks are not the providers podvisor --help lists"
    );
    assert_eq!(
        schema["properties"]["provider"]["enum"],
        json!(PROVIDERS),
        "values.schema.json's provider enum"
    );

    let shared = keys(&values["config"]["env"]);
    assert_eq!(
        shared,
        schema_keys(&schema, &["config", "env"]),
        "config.env"
    );
    for provider in PROVIDERS {
        let daemon: BTreeSet<String> = global
            .iter()
            .cloned()
            .chain(daemon_variables(Some(provider)))
            .collect();
        let block = &values["providers"][provider];
        let env = keys(&block["env"]);
        let secret = keys(&block["secretEnv"]);
        assert_eq!(
            env,
            schema_keys(&schema, &["providers", provider, "env"]),
            "providers.{provider}.env of values.yaml and values.schema.json"
        );
        assert_eq!(
            secret,
            schema_keys(&schema, &["providers", provider, "secretEnv"]),
            "providers.{provider}.secretEnv"
        );

        // Every key set to something: the ConfigMap and Secret carry each.
        let mut all = provider_values(provider);
        let fill = |names: &BTreeSet<String>| -> Value {
            Value::Object(
                names
                    .iter()
                    .map(|n| (n.clone(), json!("x")))
                    .collect::<Map<_, _>>(),
            )
        };
        merge(
            &mut all,
            &json!({"config": {"env": fill(&shared)},
                    "providers": {*provider: {"env": fill(&env), "secretEnv": fill(&secret)}}}),
        );
        let docs = tools.render(&all);
        let cm = keys(&one(&docs, "ConfigMap", "peer-pods-cm")["data"]);
        let sec = keys(&one(&docs, "Secret", "peer-pods-secret")["data"]);
        let expected_cm: BTreeSet<String> = shared
            .iter()
            .chain(&env)
            .cloned()
            .chain([CLOUD_PROVIDER.to_string()])
            .collect();
        assert_eq!(cm, expected_cm, "{provider}: the ConfigMap's keys");
        assert_eq!(sec, secret, "{provider}: the Secret's keys");
        let ds = &find(&docs, "DaemonSet")[0];
        let set_by_chart: BTreeSet<String> =
            env_names(&ds["spec"]["template"]["spec"]["containers"][0])
                .into_iter()
                .chain(env_names(
                    &find(&tools.render(&everything_on(provider)), "DaemonSet")[0]["spec"]
                        ["template"]["spec"]["containers"][0],
                ))
                .filter(|n| !NOT_DAEMON_VARIABLES.contains(&n.as_str()))
                .collect();

        // Nothing the daemon ignores (CLOUD_PROVIDER: the CLI reads it).
        for name in cm.iter().chain(&sec).chain(&set_by_chart) {
            assert!(
                daemon.contains(name) || name == CLOUD_PROVIDER,
                "{provider}: the chart sets {name}, which no flag of podvisor \
                 (or podvisor {provider}) reads"
            );
        }
        // Every variable the daemon reads: settable in values, or set by
        // the chart from its own values (host paths, admin address, grace).
        for name in &daemon {
            assert!(
                cm.contains(name) || sec.contains(name) || set_by_chart.contains(name),
                "{provider}: {name} (podvisor{} --help) cannot be set through the chart: \
                 add it to values.yaml and values.schema.json",
                if global.contains(name) {
                    String::new()
                } else {
                    format!(" {provider}")
                }
            );
        }
        // What the chart sets itself cannot also be set in the ConfigMap.
        for name in &set_by_chart {
            assert!(
                !cm.contains(name),
                "{provider}: {name} is both in the ConfigMap and set by the chart"
            );
        }
    }
}

#[test]
fn the_daemonset_is_one_daemon_per_node_with_tight_privileges_and_rbac() {
    let Some(tools) = tools("the_daemonset_is_one_daemon_per_node_with_tight_privileges_and_rbac")
    else {
        return;
    };
    for (what, values) in value_sets() {
        let docs = tools.render(&values);
        let ds = find(&docs, "DaemonSet")[0];
        let spec = &ds["spec"];
        assert_eq!(
            spec["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            "{what}: two daemons must never run on one node"
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["hostNetwork"], json!(true), "{what}: hostNetwork");
        let c = &pod["containers"][0];
        let env = |name: &str| {
            c["env"]
                .as_array()
                .expect("env")
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("{what}: no {name}"))
                .clone()
        };
        assert_eq!(
            env("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        assert_eq!(
            env("POD_UID")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.uid",
            "{what}: the daemon's name in the node's owner annotation"
        );
        let grace: u64 = env("PODVISOR_SHUTDOWN_GRACE")["value"]
            .as_str()
            .and_then(|s| s.strip_suffix('s'))
            .and_then(|s| s.parse().ok())
            .expect("PODVISOR_SHUTDOWN_GRACE in seconds");
        let kill = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        assert!(kill > grace, "{what}: {kill}s to stop, {grace}s drain");
        assert_eq!(
            c["envFrom"],
            json!([{"configMapRef": {"name": "peer-pods-cm"}},
                   {"secretRef": {"name": "peer-pods-secret", "optional": true}}]),
            "{what}: envFrom"
        );

        // The arguments: extraArgs, the provider, providerArgs — and the
        // daemon knows every flag (clap refuses an unknown one before it
        // honours --help; values are checked only when the daemon starts).
        let provider = values["provider"].as_str().unwrap_or("local");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut args = strings(&values["extraArgs"]);
        args.push(provider.to_string());
        args.extend(strings(&values["providerArgs"]));
        assert_eq!(c["args"], json!(args), "{what}: args");
        let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .args(&args)
            .arg("--help")
            .output()
            .expect("podvisor");
        assert!(
            out.status.success(),
            "{what}: podvisor refuses the chart's arguments {args:?}: {}",
            text(&out)
        );
        // extraVolumes and extraVolumeMounts are in the pod, beside the chart's own.
        for (list, extra) in [
            (&pod["volumes"], &values["extraVolumes"]),
            (&c["volumeMounts"], &values["extraVolumeMounts"]),
        ] {
            let list = list.as_array().expect("a list");
            for item in extra.as_array().into_iter().flatten() {
                assert!(list.contains(item), "{what}: {item} not in {list:?}");
            }
        }

        // Capabilities: NET_ADMIN and SYS_ADMIN (CHOWN only for a socket group).
        let sc = &c["securityContext"];
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
        let mut caps = vec!["NET_ADMIN", "SYS_ADMIN"];
        if values["config"]["env"]["PODVISOR_SOCKET_GROUP"].is_string() {
            caps.push("CHOWN");
        }
        assert_eq!(sc["capabilities"]["add"], json!(caps), "{what}");
        assert_ne!(sc["privileged"], json!(true), "{what}: privileged");
        assert_eq!(sc["allowPrivilegeEscalation"], json!(false), "{what}");

        // Host paths.
        let host_paths: BTreeSet<&str> = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        for path in ["/run/peerpod", "/var/lib/podvisor", "/run/netns"] {
            assert!(host_paths.contains(path), "{what}: no hostPath {path}");
        }

        // Probes on the admin endpoint.
        let bind_host = values["admin"]["bindHostIP"] == json!(true);
        let addr = env("PODVISOR_ADMIN_ADDR")["value"].clone();
        for (probe, path) in [
            ("startupProbe", "/livez"),
            ("livenessProbe", "/livez"),
            ("readinessProbe", "/startup"),
        ] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            assert_eq!(get["port"], json!(9797), "{what}: {probe}");
            if bind_host {
                assert!(get["host"].is_null(), "{what}: {probe} on the node's IP");
            } else {
                assert_eq!(get["host"], "127.0.0.1", "{what}: {probe}");
            }
        }
        if bind_host {
            assert_eq!(addr, "$(HOST_IP):9797", "{what}");
        } else {
            assert_eq!(addr, "127.0.0.1:9797", "{what}");
        }

        // RBAC: get on what src/pull_secrets.rs reads, the node's
        // capacity patches (src/kubernetes/node.rs), the node's pod list
        // (src/kubernetes/stale.rs), the cluster's identity and node list
        // (src/kubernetes/node_gone.rs) and the PeerPods'
        // (src/kubernetes/peerpods.rs) apply, list and delete; nothing else.
        let role = find(&docs, "ClusterRole")[0];
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": [""], "resources": ["pods", "serviceaccounts", "secrets"],
                 "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch"]},
                {"apiGroups": [""], "resources": ["namespaces"],
                 "resourceNames": ["kube-system"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
                {"apiGroups": ["confidentialcontainers.org"], "resources": ["peerpods"],
                 "verbs": ["list", "create", "patch", "delete"]},
            ]),
            "{what}: the ClusterRole"
        );
        // The node-gone Lease, by name, in the release's namespace, where
        // the daemon is told to keep it.
        let lease_role = find(&docs, "Role")[0];
        assert_eq!(
            lease_role["rules"],
            json!([
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "resourceNames": [format!("podvisor-{provider}-node-gone")],
                 "verbs": ["get", "update"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "verbs": ["create"]},
            ]),
            "{what}: the Role"
        );
        assert_eq!(
            env("PODVISOR_LEASE_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace",
            "{what}: the Lease's namespace is the Role's"
        );
        let lease_binding = find(&docs, "RoleBinding")[0];
        assert_eq!(
            lease_binding["roleRef"]["name"], lease_role["metadata"]["name"],
            "{what}"
        );
        let binding = find(&docs, "ClusterRoleBinding")[0];
        let account = find(&docs, "ServiceAccount")[0];
        assert_eq!(
            binding["subjects"][0]["name"], account["metadata"]["name"],
            "{what}"
        );
        assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    }
}

#[test]
fn monitoring_objects_carry_the_dashboard_files() {
    let Some(tools) = tools("monitoring_objects_carry_the_dashboard_files") else {
        return;
    };
    let docs = tools.render(&everything_on("local"));
    let alerts = std::fs::read_to_string(root().join("dashboards/alerts.yaml")).expect("alerts");
    let rule = find(&docs, "PrometheusRule")[0];
    assert_eq!(
        rule["spec"],
        tools.yaml_docs(&alerts)[0],
        "the PrometheusRule's spec is not dashboards/alerts.yaml"
    );
    let dashboard =
        std::fs::read_to_string(root().join("dashboards/podvisor.json")).expect("dashboard");
    let cm = one(&docs, "ConfigMap", "podvisor-dashboard");
    assert_eq!(
        cm["data"]["podvisor.json"].as_str().map(str::trim_end),
        Some(dashboard.trim_end()),
        "the dashboard ConfigMap is not dashboards/podvisor.json"
    );
    let monitor = find(&docs, "PodMonitor")[0];
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    assert_eq!(
        find(&docs, "RuntimeClass")[0]["handler"],
        "kata-remote",
        "the RuntimeClass"
    );
    // Off by default.
    let defaults = tools.render(&json!({}));
    for k in ["PodMonitor", "PrometheusRule", "RuntimeClass"] {
        assert!(find(&defaults, k).is_empty(), "{k} rendered by default");
    }
}
