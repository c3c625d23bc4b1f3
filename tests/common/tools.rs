//! External tools the chart's tests run (`tests/helm.rs`,
//! `tests/helm_install.rs`): found from the variables `scripts/helm-tools.sh`
//! and `scripts/kube-apiserver.sh` print, else on `PATH`; a test that cannot
//! find one says SKIPPED, or fails under `CI=true`.

#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Writes past libtest's capture, so a skip or a timing shows in a plain
/// `cargo test`.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Why `test` (of the test file `file`) cannot run: a SKIPPED line, or
/// under `CI=true` a failure.
pub fn skip(file: &str, test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{file}::{test} cannot run under CI=true: {reason}");
    }
    say(&format!("SKIPPED {file}::{test}: {reason}"));
}

/// The program the variable `var` names, else `default` (looked up on
/// `PATH`).
pub fn tool(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Whether `program args…` runs and succeeds; the reason when not.
pub fn runs(program: &Path, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{} cannot run: {e}", program.display())),
    }
}

/// A command's stdout then stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The Python that reads YAML: the one of `KUBERNETES_VALIDATE`'s
/// virtualenv (it has PyYAML), else `python3`.
pub fn yaml_python() -> PathBuf {
    tool("KUBERNETES_VALIDATE", "kubernetes-validate")
        .parent()
        .map(|dir| dir.join("python"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Every document of a YAML stream as JSON (null documents dropped), read
/// by `python`'s PyYAML.
pub fn yaml_docs(python: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("writing yaml");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "not YAML:\n{}\n{yaml}", text(&out));
    match serde_json::from_slice(&out.stdout).expect("python's JSON") {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}
