//! The Grafana dashboard and the Prometheus alerting rules in `dashboards/`:
//! they query only metrics that `src/metrics.rs` defines, the dashboard is
//! well formed, and `promtool` accepts the rules and passes their unit tests.
//!
//! `promtool` comes with the Debian package `prometheus`; `PROMTOOL` may name
//! another binary.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn path(rel: &str) -> PathBuf {
    root().join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Runs promtool in the package directory; fails the test if it is missing.
fn promtool(args: &[&str]) -> Output {
    let bin = std::env::var_os("PROMTOOL").unwrap_or_else(|| "promtool".into());
    match Command::new(&bin).args(args).current_dir(root()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool ({}) was not found: install the Debian package `prometheus` \
             (apt-get install prometheus), or set PROMTOOL to its path",
            bin.to_string_lossy()
        ),
        Err(e) => panic!("running promtool: {e}"),
    }
}

fn assert_promtool_ok(args: &[&str]) {
    let out = promtool(args);
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metrics `src/metrics.rs` defines: every `pub const X: &str =
/// "podvisor_…"`, and whether the doc comment above it calls it a histogram.
fn defined_metrics() -> BTreeMap<String, bool> {
    let source = read("src/metrics.rs");
    let mut metrics = BTreeMap::new();
    let mut doc = String::new();
    for line in source.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            if doc.is_empty() {
                doc = text.trim().to_string();
            }
            continue;
        }
        if line.starts_with("pub const ") && line.contains(": &str = \"podvisor_") {
            let name = line
                .split('"')
                .nth(1)
                .unwrap_or_else(|| panic!("no metric name in {line:?}"));
            metrics.insert(name.to_string(), doc.starts_with("Histogram"));
        }
        doc.clear();
    }
    assert!(
        metrics.contains_key("podvisor_ready") && metrics.len() > 10,
        "found too few metrics in src/metrics.rs: {metrics:?}"
    );
    metrics
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `podvisor_…` name in `text` that starts a word.
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("podvisor_") {
        if text[..at].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let end = text[at..]
            .find(|c: char| !is_name_char(c))
            .map_or(text.len(), |n| at + n);
        names.insert(text[at..end].to_string());
    }
    names
}

/// The defined metric a series name belongs to: itself, or the histogram
/// whose `_bucket`, `_sum` or `_count` series it is.
fn metric_of(name: &str, defined: &BTreeMap<String, bool>) -> Option<String> {
    if defined.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        defined
            .get(base)
            .copied()
            .unwrap_or(false)
            .then(|| base.to_string())
    })
}

/// Checks that `text` names only defined metrics; returns those it uses.
fn check_names(what: &str, text: &str, defined: &BTreeMap<String, bool>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for name in referenced_names(text) {
        match metric_of(&name, defined) {
            Some(metric) => {
                used.insert(metric);
            }
            None => unknown.push(name),
        }
    }
    assert!(
        unknown.is_empty(),
        "{what} uses metrics that src/metrics.rs does not define: {unknown:?} \
         (defined: {:?})",
        defined.keys().collect::<Vec<_>>()
    );
    used
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/podvisor.json"))
        .unwrap_or_else(|e| panic!("dashboards/podvisor.json is not JSON: {e}"))
}

/// Every panel, with the panels of collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().expect("panels is an array") {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

/// (panel id, refId, expr) of every query.
fn exprs(dashboard: &Value) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard).into_iter().filter(|p| !is_row(p)) {
        let id = p["id"].as_u64().unwrap_or_default();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                id,
                t["refId"].as_str().unwrap_or_default().to_string(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

fn title(panel: &Value) -> String {
    format!("panel {} ({})", panel["id"], panel["title"])
}

#[test]
fn dashboard_has_a_datasource_and_an_instance_variable() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["uid"], "podvisor");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` template variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let instance = var("instance");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], "${datasource}");
    let query = instance["query"]
        .get("query")
        .unwrap_or(&instance["query"])
        .as_str()
        .expect("instance variable query");
    assert_eq!(query, "label_values(podvisor_build_info, instance)");
}

#[test]
fn dashboard_panels_are_well_formed() {
    let d = dashboard();
    let all = panels(&d);
    assert!(all.len() > 10, "only {} panels", all.len());

    let mut ids = BTreeSet::new();
    for p in &all {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{} has no numeric id", title(p)));
        assert!(ids.insert(id), "panel id {id} is used twice");
    }

    for p in all.iter().filter(|p| !is_row(p)) {
        let name = title(p);
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name} has no title"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{name} datasource");
        let targets = p["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "{name} has no targets"
        );
        for t in targets.into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{name} has a target without expr");
            assert!(
                t["refId"].as_str().is_some_and(|r| !r.is_empty()),
                "{name} has a target without refId"
            );
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{name} target datasource"
            );
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{name} does not filter by the instance variable: {expr}"
            );
        }
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "{name} has no unit"
        );
    }
}

#[test]
fn dashboard_panels_fit_the_grid_without_overlapping() {
    let d = dashboard();
    let rects: Vec<(String, [u64; 4])> = panels(&d)
        .into_iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| {
                g[k].as_u64()
                    .unwrap_or_else(|| panic!("{} has no gridPos.{k}", title(p)))
            };
            (title(p), [n("x"), n("y"), n("w"), n("h")])
        })
        .collect();
    for (name, [x, _, w, h]) in &rects {
        assert!(*w > 0 && *h > 0 && x + w <= 24, "{name} is off the grid");
    }
    for (i, (a, [ax, ay, aw, ah])) in rects.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &rects[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "{a} and {b} overlap");
        }
    }
}

#[test]
fn dashboard_uses_only_defined_metrics_and_shows_them_all() {
    let defined = defined_metrics();
    let d = dashboard();
    let mut used = BTreeSet::new();
    for (id, ref_id, expr) in exprs(&d) {
        used.extend(check_names(
            &format!("panel {id} query {ref_id}"),
            &expr,
            &defined,
        ));
    }
    let instance_query = d["templating"]["list"].to_string();
    check_names("the template variables", &instance_query, &defined);
    let missing: Vec<_> = defined.keys().filter(|m| !used.contains(*m)).collect();
    assert!(missing.is_empty(), "no dashboard panel shows {missing:?}");
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool checks the queries as recording rules, with Grafana's
    // variables replaced by values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (id, ref_id, expr) in exprs(&dashboard()) {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".+");
        assert!(
            !expr.contains('$'),
            "panel {id} query {ref_id} uses an unknown variable: {expr}"
        );
        let quoted = serde_json::to_string(&expr).expect("quote expr");
        rules.push_str(&format!(
            "      - record: dashboard:panel_{id}:{}\n        expr: {quoted}\n",
            ref_id.to_lowercase()
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, rules).expect("write rules");
    assert_promtool_ok(&["check", "rules", file.to_str().expect("utf-8 path")]);
}

/// (name, text of its rule) for every alert in alerts.yaml.
fn alerts(text: &str) -> Vec<(String, String)> {
    text.split("- alert: ")
        .skip(1)
        .map(|block| {
            let name = block.lines().next().unwrap_or_default().trim().to_string();
            (name, block.to_string())
        })
        .collect()
}

#[test]
fn alerts_use_only_defined_metrics() {
    let defined = defined_metrics();
    let used = check_names(
        "dashboards/alerts.yaml",
        &read("dashboards/alerts.yaml"),
        &defined,
    );
    assert!(!used.is_empty(), "the alerts query no podvisor metric");
    check_names(
        "dashboards/alerts_test.yaml",
        &read("dashboards/alerts_test.yaml"),
        &defined,
    );
}

#[test]
fn every_alert_has_severity_annotations_a_runbook_a_test_and_a_readme_line() {
    let text = read("dashboards/alerts.yaml");
    let tests = read("dashboards/alerts_test.yaml");
    let readme = read("dashboards/README.md");
    let all = alerts(&text);
    assert!(all.len() >= 10, "only {} alerts", all.len());
    let mut names = BTreeSet::new();
    for (name, rule) in &all {
        assert!(names.insert(name), "alert {name} is defined twice");
        assert!(
            ["critical", "warning", "info"]
                .iter()
                .any(|s| rule.contains(&format!("severity: {s}\n"))),
            "{name} has no severity critical, warning or info"
        );
        for key in ["summary: ", "description: "] {
            assert!(rule.contains(key), "{name} has no {key}annotation");
        }
        let runbook = format!("runbook_url: docs/operations.md#{}\n", name.to_lowercase());
        assert!(rule.contains(&runbook), "{name} lacks `{}`", runbook.trim());
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "dashboards/alerts_test.yaml has no case for {name}"
        );
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "dashboards/README.md does not explain {name}"
        );
    }
}

#[test]
fn promtool_accepts_the_alerting_rules() {
    assert_promtool_ok(&["check", "rules", "dashboards/alerts.yaml"]);
}

#[test]
fn promtool_unit_tests_of_the_alerting_rules_pass() {
    assert_promtool_ok(&["test", "rules", "dashboards/alerts_test.yaml"]);
}

/// GitHub's anchor of a markdown heading: lower case, spaces to `-`, every
/// other character but letters, digits, `-` and `_` dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_runbook_link_has_its_heading_in_operations_md() {
    let rules = read("dashboards/alerts.yaml");
    let anchors: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url:"))
        .map(|url| {
            let url = url.trim().trim_matches(|c| c == '"' || c == '\'');
            let anchor = url.strip_prefix("docs/operations.md#");
            anchor.unwrap_or_else(|| panic!("runbook_url {url:?} is not docs/operations.md#…"))
        })
        .collect();
    assert!(
        anchors.len() >= alerts(&rules).len(),
        "fewer runbook_url annotations ({}) than alerts",
        anchors.len()
    );

    let doc = read("docs/operations.md");
    let mut headings = BTreeSet::new();
    let mut in_code = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let text = line.trim_start_matches('#');
        if text.len() < line.len() && text.starts_with(' ') {
            headings.insert(github_anchor(text));
        }
    }
    let missing: Vec<_> = anchors.iter().filter(|a| !headings.contains(**a)).collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md has no heading for the runbook anchors {missing:?}"
    );
}
