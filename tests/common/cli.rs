//! The daemon's command line from tests: the binary without a developer's
//! configuration, and what it printed.

#![allow(dead_code)]

use std::process::Command;

/// The `podvisor` binary with podvisor's own variables (`PODVISOR_*`), those
/// starting with one of `prefixes` and those in `names` removed from its
/// environment — and `CLOUD_PROVIDER`, which would name a provider where a
/// test names none, and the in-cluster Kubernetes API of a CI pod, which no
/// test may reach.
pub fn podvisor_without(names: &[&str], prefixes: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PODVISOR_")
            || prefixes.iter().any(|p| k.starts_with(p))
            || names.contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
    c.env_remove("KUBERNETES_SERVICE_HOST");
    c.env_remove("CLOUD_PROVIDER");
    c
}

/// The line of `stderr` that starts with `prefix` (the daemon's last word
/// starts with `podvisor: `), or all of it when none does.
pub fn line_starting<'a>(stderr: &'a str, prefix: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or(stderr)
}

/// Runs `c`: its exit code (-1 if killed), stdout and stderr.
pub fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().expect("run podvisor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
