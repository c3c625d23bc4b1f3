//! What the client commands print: tables for people, JSON for scripts.
//!
//! Every text that came from outside (pod names, errors, stored bytes) has
//! its control characters escaped in tables, so that a pod name cannot
//! move an operator's cursor or recolour the terminal; JSON output is
//! escaped by JSON itself.

use crate::protocols::grpc::admin;
use base64::Engine as _;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

/// `-o`: how a command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns (or `key: value` lines for one item).
    Table,
    /// The table with every column.
    Wide,
    /// JSON (one document; `watch`: one object per line).
    Json,
}

impl Output {
    /// `table`, `wide` or `json` (clap has checked it); anything else is a
    /// table.
    pub fn parse(text: &str) -> Self {
        match text {
            "wide" => Output::Wide,
            "json" => Output::Json,
            _ => Output::Table,
        }
    }
}

/// Longest last error shown in a (not wide) table, in characters.
const ERROR_WIDTH: usize = 60;

/// Sandbox ids are shown by their first 12 characters in a table, as
/// container ids are by `crictl`; `instance` takes such a prefix.
const SHORT_ID: usize = 12;

/// `text` with control characters escaped (`\n`, `\u{1b}`).
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// At most `width` characters of `text`, the cut marked with `…`.
fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
        short.push('…');
        short
    }
}

/// Columns separated by two spaces, each as wide as its widest cell (the
/// last one not padded); an empty cell shows as `-`.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |c: &String| {
        if c.is_empty() {
            "-".to_owned()
        } else {
            c.clone()
        }
    };
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell(c).chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let pad = w.saturating_sub(c.chars().count());
                let _ = write!(out, "{c}{}  ", " ".repeat(pad));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.iter().map(cell).collect()));
    }
    out
}

/// A duration as its largest unit: `42s`, `7m`, `3h`, `12d`.
fn age(millis: u64) -> String {
    let secs = millis / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Milliseconds since the epoch of an RFC 3339 time, if it is one.
fn rfc3339_millis(text: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// Milliseconds since the epoch as RFC 3339, to the second.
fn rfc3339(millis: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(millis)).to_string()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// A count field (`attempts`, `generation`) as text; 0 when absent.
fn count_of(v: &Value, key: &str) -> String {
    v[key].as_u64().unwrap_or(0).to_string()
}

fn ips_of(v: &Value) -> String {
    v["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn pod_of(namespace: &str, name: &str) -> String {
    clean(&format!("{namespace}/{name}"))
}

/// `podvisor instances`: the admin endpoint's `/v1/instances` items (the
/// JSON that `-o json` prints as it is).
pub fn instances(items: &[Value], output: Output, now_ms: u64) -> String {
    if output == Output::Json {
        return pretty(&json!(items));
    }
    if items.is_empty() {
        return "No pod VMs.\n".to_owned();
    }
    let wide = output == Output::Wide;
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let id = str_of(i, "sandbox_id");
            let since = rfc3339_millis(str_of(i, "created_at"))
                .map(|t| age(now_ms.saturating_sub(t)))
                .unwrap_or_default();
            let error = clean(str_of(i, "last_error"));
            let mut row = vec![
                clean(&if wide {
                    id.to_owned()
                } else {
                    id.chars().take(SHORT_ID).collect()
                }),
                pod_of(str_of(i, "pod_namespace"), str_of(i, "pod_name")),
                clean(str_of(i, "state")),
                clean(str_of(i, "instance_id")),
                clean(&ips_of(i)),
                since,
            ];
            if wide {
                row.extend([
                    clean(str_of(i, "instance_name")),
                    spec_text(&i["spec"]),
                    count_of(i, "attempts"),
                    count_of(i, "generation"),
                    error,
                ]);
            } else {
                row.push(shorten(&error, ERROR_WIDTH));
            }
            row
        })
        .collect();
    // As the rows: the wide columns before the last error.
    let mut header = vec!["SANDBOX", "POD", "STATE", "INSTANCE", "IPS", "AGE"];
    if wide {
        header.extend(["NAME", "SPEC", "ATTEMPTS", "GENERATION"]);
    }
    header.push("LAST ERROR");
    table(&header, &rows)
}

/// What a pod asked for, `key=value` joined by commas (`vcpus=2,memory_mib=4096`).
fn spec_text(spec: &Value) -> String {
    spec.as_object()
        .map(|fields| {
            fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .map(|s| clean(&s))
        .unwrap_or_default()
}

/// `podvisor instance <id>`: one `/v1/instances/{id}` item.
pub fn instance(i: &Value, output: Output) -> String {
    if output == Output::Json {
        return pretty(i);
    }
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let value = if value.is_empty() {
            "-".to_owned()
        } else {
            value
        };
        let _ = writeln!(out, "{key:<20}{value}");
    };
    line("Sandbox:", clean(str_of(i, "sandbox_id")));
    line(
        "Pod:",
        pod_of(str_of(i, "pod_namespace"), str_of(i, "pod_name")),
    );
    line("State:", clean(str_of(i, "state")));
    line("Instance:", clean(str_of(i, "instance_id")));
    line("Instance name:", clean(str_of(i, "instance_name")));
    line("IPs:", clean(&ips_of(i)));
    line("Spec:", spec_text(&i["spec"]));
    line("Network namespace:", clean(str_of(i, "network_namespace")));
    line(
        "VNI:",
        i["vni"].as_u64().map(|v| v.to_string()).unwrap_or_default(),
    );
    line("Tunnel:", tunnel_text(&i["tunnel"]));
    line("Attempts:", count_of(i, "attempts"));
    line("Last error:", clean(str_of(i, "last_error")));
    line("Generation:", count_of(i, "generation"));
    line("Idempotency token:", clean(str_of(i, "idempotency_token")));
    line("Created:", clean(str_of(i, "created_at")));
    line("Updated:", clean(str_of(i, "updated_at")));
    out
}

/// A pod's tunnel as one line: its state, and why it failed
/// (`failed: Cannot inspect …`); empty when the pod has none.
fn tunnel_text(tunnel: &Value) -> String {
    let state = clean(str_of(tunnel, "state"));
    match tunnel["error"].as_str() {
        Some(error) => format!("{state}: {}", clean(error)),
        None => state,
    }
}

/// `podvisor status`: `/v1/status` as `key: value` lines, nested keys
/// joined by dots (`journal.integrity.state: trusted`).
pub fn status(s: &Value, output: Output) -> String {
    if output == Output::Json {
        return pretty(s);
    }
    let mut lines = Vec::new();
    flatten("", s, &mut lines);
    // What an operator asks first, first; the rest as the daemon sorts it.
    let first = [
        "version",
        "provider",
        "node",
        "ready",
        "instances",
        "journal",
    ];
    lines.sort_by_key(|(k, _)| {
        first
            .iter()
            .position(|f| k == f || k.starts_with(&format!("{f}.")))
            .unwrap_or(first.len())
    });
    // The longest key, its colon and two spaces.
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$}{v}\n", format!("{k}:")))
        .collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(fields) if !fields.is_empty() => {
            for (k, v) in fields {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Object(_) => out.push((clean(prefix), "-".to_owned())),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            let text = items.iter().map(scalar).collect::<Vec<_>>().join(", ");
            out.push((clean(prefix), clean(&text)));
        }
        Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{n}]"), item, out);
            }
        }
        other => out.push((clean(prefix), clean(&scalar(other)))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// `podvisor watch`'s columns: a stream cannot size them to its rows, so
/// each has a fixed width (longer cells are cut; the IPs and the error
/// come last).
const WATCH_WIDTHS: [usize; 6] = [20, 7, SHORT_ID, 8, 24, 20];

fn watch_line(cells: [&str; 8]) -> String {
    let mut out = String::new();
    for (cell, width) in cells.iter().zip(WATCH_WIDTHS) {
        let _ = write!(out, "{:<width$}  ", shorten(cell, width));
    }
    let _ = write!(out, "{:<15}  {}", cells[6], cells[7]);
    out.trim_end().to_owned() + "\n"
}

/// `podvisor watch`'s column names.
pub fn watch_header() -> String {
    watch_line([
        "TIME",
        "EVENT",
        "SANDBOX",
        "STATE",
        "POD",
        "INSTANCE",
        "IPS",
        "LAST ERROR",
    ])
}

fn event_kind(event: &admin::InstanceEvent) -> &'static str {
    match admin::instance_event::Kind::try_from(event.kind) {
        Ok(admin::instance_event::Kind::Updated) => "updated",
        Ok(admin::instance_event::Kind::Removed) => "removed",
        _ => "unknown",
    }
}

/// One `WatchInstances` event: a line (`-o json`: one JSON object, the
/// instance under the admin endpoint's names).
pub fn watch_event(event: &admin::InstanceEvent, output: Output) -> String {
    let kind = event_kind(event);
    let default = admin::Instance::default();
    let i = event.instance.as_ref().unwrap_or(&default);
    if output == Output::Json {
        let instance = json!({
            "sandbox_id": i.sandbox_id,
            "pod_name": i.pod_name,
            "pod_namespace": i.pod_namespace,
            "state": i.state,
            "instance_id": (!i.instance_id.is_empty()).then_some(&i.instance_id),
            "instance_name": i.instance_name,
            "ips": i.ips,
            "attempts": i.attempts,
            "last_error": (!i.last_error.is_empty()).then_some(&i.last_error),
            "generation": i.generation,
            "created_at": rfc3339(i.created_at_unix_ms),
            "updated_at": rfc3339(i.updated_at_unix_ms),
        });
        return json!({ "event": kind, "instance": instance }).to_string() + "\n";
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            clean(s)
        }
    };
    watch_line([
        &rfc3339(i.updated_at_unix_ms),
        kind,
        &dash(&i.sandbox_id.chars().take(SHORT_ID).collect::<String>()),
        &dash(&i.state),
        &pod_of(&i.pod_namespace, &i.pod_name),
        &dash(&i.instance_id),
        &dash(&i.ips.join(",")),
        &dash(&shorten(&i.last_error, ERROR_WIDTH)),
    ])
}

fn quarantine_json(r: &admin::QuarantinedRecord, with_bytes: bool) -> Value {
    let mut v = json!({
        "id": r.id,
        "key": r.key,
        "reason": r.reason,
        "quarantined_at": rfc3339(r.quarantined_at_unix_ms),
        "size": r.bytes.len(),
    });
    if with_bytes {
        v["bytes_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&r.bytes));
    }
    v
}

/// `podvisor quarantine list`.
pub fn quarantine_list(
    records: &[admin::QuarantinedRecord],
    output: Output,
    now_ms: u64,
) -> String {
    if output == Output::Json {
        let items: Vec<Value> = records.iter().map(|r| quarantine_json(r, false)).collect();
        return pretty(&json!(items));
    }
    if records.is_empty() {
        return "The journal's quarantine is empty.\n".to_owned();
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                clean(&r.id),
                clean(&r.key),
                age(now_ms.saturating_sub(r.quarantined_at_unix_ms)),
                r.bytes.len().to_string(),
                shorten(&clean(&r.reason), ERROR_WIDTH),
            ]
        })
        .collect();
    table(&["ID", "SANDBOX", "AGE", "BYTES", "REASON"], &rows)
}

/// `podvisor quarantine show <id>`: the record, and its stored bytes as
/// text when they are UTF-8, else as a hex dump.
pub fn quarantine_show(r: &admin::QuarantinedRecord, output: Output, now_ms: u64) -> String {
    if output == Output::Json {
        return pretty(&quarantine_json(r, true));
    }
    let mut out = String::new();
    let _ = writeln!(out, "{:<14}{}", "Id:", clean(&r.id));
    let _ = writeln!(out, "{:<14}{}", "Sandbox:", clean(&r.key));
    let _ = writeln!(
        out,
        "{:<14}{} ({} ago)",
        "Quarantined:",
        rfc3339(r.quarantined_at_unix_ms),
        age(now_ms.saturating_sub(r.quarantined_at_unix_ms))
    );
    let _ = writeln!(out, "{:<14}{}", "Reason:", clean(&r.reason));
    match std::str::from_utf8(&r.bytes) {
        Ok(text) => {
            let _ = writeln!(out, "Stored bytes ({}, UTF-8 text):", r.bytes.len());
            for line in text.lines() {
                let _ = writeln!(out, "  {}", clean(line));
            }
        }
        Err(_) => {
            let _ = writeln!(out, "Stored bytes ({}, not UTF-8):", r.bytes.len());
            for (n, chunk) in r.bytes.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "  {:08x}  {}", n * 16, hex.join(" "));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, pod: &str, error: &str) -> Value {
        json!({
            "sandbox_id": id, "pod_name": pod, "pod_namespace": "shop", "state": "running",
            "instance_id": "i-0abc", "instance_name": "podvm-web-1", "ips": ["127.0.0.5", "::1"],
            "spec": {"vcpus": 2, "memory_mib": 4096, "instance_type": null},
            "attempts": 1, "last_error": error, "generation": 3,
            "idempotency_token": "tok", "created_at": "2026-12-01T10:00:00.000Z",
            "updated_at": "2026-12-01T10:05:00.000Z",
        })
    }

    fn now() -> u64 {
        rfc3339_millis("2026-12-01T12:00:00Z").unwrap()
    }

    #[test]
    fn the_instances_table_has_aligned_columns_short_ids_and_ages() {
        let long_error = "x".repeat(100);
        let text = instances(
            &[
                item(&"a".repeat(64), "web", ""),
                item(&"b".repeat(64), "database", &long_error),
            ],
            Output::Table,
            now(),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SANDBOX       POD            STATE    INSTANCE  IPS            AGE  LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "aaaaaaaaaaaa  shop/web       running  i-0abc    127.0.0.5,::1  2h   -"
        );
        assert!(
            lines[2].starts_with("bbbbbbbbbbbb  shop/database  running"),
            "{text}"
        );
        assert!(
            lines[2].ends_with(&format!("{}…", "x".repeat(59))),
            "{text}"
        );
        assert_eq!(lines.len(), 3);
        assert_eq!(instances(&[], Output::Table, now()), "No pod VMs.\n");
        assert_eq!(instances(&[], Output::Json, now()), "[]\n");
    }

    #[test]
    fn the_wide_table_has_every_column_and_the_full_id_and_error() {
        let text = instances(&[item(&"a".repeat(64), "web", "boom")], Output::Wide, now());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with(
                "NAME         SPEC                     ATTEMPTS  GENERATION  LAST ERROR"
            ),
            "{text}"
        );
        assert!(lines[1].starts_with(&"a".repeat(64)), "{text}");
        assert!(lines[1].contains("memory_mib=4096,vcpus=2"), "{text}");
        assert!(lines[1].ends_with("1         3           boom"), "{text}");
    }

    #[test]
    fn json_output_is_the_admin_endpoint_s_json() {
        let items = [item("abc", "web", "")];
        let text = instances(&items, Output::Json, now());
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, json!(items));
    }

    #[test]
    fn control_characters_from_outside_are_escaped_in_tables() {
        let text = instances(
            &[item("abc", "web\u{1b}[31m\nred", "")],
            Output::Table,
            now(),
        );
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("shop/web\\u{1b}[31m\\nred"), "{text}");
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn one_instance_is_key_value_lines() {
        let text = instance(&item("abc", "web", ""), Output::Table);
        assert!(text.contains("Sandbox:            abc\n"), "{text}");
        assert!(text.contains("Pod:                shop/web\n"), "{text}");
        assert!(text.contains("Last error:         -\n"), "{text}");
        assert!(
            text.contains("Spec:               memory_mib=4096,vcpus=2\n"),
            "{text}"
        );
        assert!(text.contains("VNI:                -\n"), "{text}");
        assert!(text.contains("Tunnel:             -\n"), "{text}");
    }

    #[test]
    fn a_pods_tunnel_shows_its_vni_state_and_error() {
        let mut i = item("abc", "web", "");
        i["network_namespace"] = json!("/var/run/netns/cni-1");
        i["vni"] = json!(555_000);
        i["tunnel"] = json!({"state": "failed", "error": "Cannot inspect the pod network: no IPv4", "since": "2026-12-02T10:00:00Z"});
        let text = instance(&i, Output::Table);
        assert!(
            text.contains("Network namespace:  /var/run/netns/cni-1\n"),
            "{text}"
        );
        assert!(text.contains("VNI:                555000\n"), "{text}");
        assert!(
            text.contains("Tunnel:             failed: Cannot inspect the pod network: no IPv4\n"),
            "{text}"
        );
    }

    #[test]
    fn status_flattens_nested_keys() {
        let s = json!({"version": "0.1.0", "journal": {"id": "j1", "integrity": {"state": "trusted"}},
                       "instances": {}, "tags": ["a", "b"], "ready": true});
        let text = status(&s, Output::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "version:                  0.1.0",
                "ready:                    true",
                "instances:                -",
                "journal.id:               j1",
                "journal.integrity.state:  trusted",
                "tags:                     a, b",
            ]
        );
    }

    #[test]
    fn ages_use_their_largest_unit() {
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(60_000), "1m");
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(age(3 * 86_400_000), "3d");
    }

    #[test]
    fn a_watch_event_is_one_line_or_one_json_object() {
        let event = admin::InstanceEvent {
            kind: admin::instance_event::Kind::Removed as i32,
            instance: Some(admin::Instance {
                sandbox_id: "c".repeat(64),
                pod_name: "web".into(),
                pod_namespace: "shop".into(),
                state: "deleting".into(),
                updated_at_unix_ms: now(),
                ..Default::default()
            }),
        };
        assert_eq!(
            watch_event(&event, Output::Table),
            "2026-12-01T12:00:00Z  removed  cccccccccccc  deleting  shop/web                  -                     -                -\n"
        );
        // Its columns start where the header's do.
        let header = watch_header();
        let line = watch_event(&event, Output::Table);
        for name in ["EVENT", "SANDBOX", "STATE", "POD", "INSTANCE", "IPS"] {
            let at = header.find(name).unwrap();
            assert_eq!(&line[at - 2..at], "  ", "{name}:\n{header}{line}");
            assert_ne!(&line[at..=at], " ", "{name}:\n{header}{line}");
        }
        let json: Value = serde_json::from_str(&watch_event(&event, Output::Json)).unwrap();
        assert_eq!(json["event"], "removed");
        assert_eq!(json["instance"]["sandbox_id"], "c".repeat(64));
        assert_eq!(json["instance"]["instance_id"], Value::Null);
        assert_eq!(json["instance"]["updated_at"], "2026-12-01T12:00:00Z");
    }

    #[test]
    fn a_quarantined_record_shows_text_or_a_hex_dump() {
        let mut r = admin::QuarantinedRecord {
            id: "abc@1".into(),
            key: "abc".into(),
            reason: "bad".into(),
            quarantined_at_unix_ms: now() - 120_000,
            bytes: b"{\"x\":\n1}".to_vec(),
        };
        let text = quarantine_show(&r, Output::Table, now());
        assert!(
            text.contains("Quarantined:  2026-12-01T11:58:00Z (2m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("Stored bytes (8, UTF-8 text):\n  {\"x\":\n  1}\n"),
            "{text}"
        );
        r.bytes = vec![0xff; 18];
        let text = quarantine_show(&r, Output::Table, now());
        assert!(
            text.contains(
                "  00000000  ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff\n  00000010  ff ff\n"
            ),
            "{text}"
        );
        let json: Value = serde_json::from_str(&quarantine_show(&r, Output::Json, now())).unwrap();
        assert_eq!(json["bytes_base64"], "////////////////////////");
        assert_eq!(json["size"], 18);
        let list = quarantine_list(std::slice::from_ref(&r), Output::Table, now());
        assert_eq!(
            list,
            "ID     SANDBOX  AGE  BYTES  REASON\nabc@1  abc      2m   18     bad\n"
        );
        assert_eq!(
            quarantine_list(&[], Output::Table, now()),
            "The journal's quarantine is empty.\n"
        );
    }
}
