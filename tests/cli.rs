//! The command line as operators meet it: help, versions, environment
//! fallbacks, and errors that name the flag.

use std::process::Command;
#[path = "common/cli.rs"]
mod cli;

use cli::run;

/// Tests must not inherit a developer's configuration.
fn podvisor() -> Command {
    cli::podvisor_without(
        &["NODE_NAME", "PROXY_TIMEOUT", "FORWARDER_PORT"],
        &["LOCAL_"],
    )
}

#[test]
fn help_explains_every_flag_with_its_environment_variable() {
    let (code, out, _) = run(podvisor().arg("--help"));
    assert_eq!(code, 0);
    for needle in [
        "--socket",
        "REMOTE_HYPERVISOR_ENDPOINT",
        "--pods-dir",
        "PODS_DIR",
        "--forwarder-port",
        "FORWARDER_PORT",
        "--proxy-timeout",
        "PROXY_TIMEOUT",
        "--peerpods-limit-per-node",
        "PEERPODS_LIMIT_PER_NODE",
        "--state-dir",
        "PODVISOR_STATE_DIR",
        "--admin-addr",
        "--grpc-addr",
        "--grpc-socket",
        "PODVISOR_GRPC_SOCKET",
        "--grpc-token-file",
        "PODVISOR_GRPC_TOKEN_FILE",
        "--node-name",
        "NODE_NAME",
        "--log-format",
        "local",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
    assert!(
        out.contains("Pod VMs as detached forwarder processes"),
        "the provider list describes each provider:\n{out}"
    );
    let (code, out, _) = run(podvisor().args(["local", "--help"]));
    assert_eq!(code, 0);
    for needle in [
        "--local-dir",
        "LOCAL_DIR",
        "--forwarder-bin",
        "--create-delay",
    ] {
        assert!(out.contains(needle), "local --help lacks {needle}:\n{out}");
    }
}

#[test]
fn version_works_as_a_flag_and_a_subcommand() {
    let (code, out, _) = run(podvisor().arg("version"));
    assert_eq!(
        (code, out.trim()),
        (
            0,
            format!("podvisor {}", env!("CARGO_PKG_VERSION")).as_str()
        )
    );
    let (code, out, _) = run(podvisor().arg("--version"));
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_values_fail_at_start_naming_the_flag_and_variable() {
    let (code, _, err) = run(podvisor().args(["--forwarder-port", "none", "local"]));
    assert_eq!(code, 2);
    assert!(err.contains("--forwarder-port"), "{err}");

    let (code, _, err) = run(podvisor().env("PROXY_TIMEOUT", "forever").arg("local"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--proxy-timeout") && err.contains("PROXY_TIMEOUT"),
        "{err}"
    );
    // Said once, not "error: error: ...".
    assert_eq!(err.matches("error:").count(), 1, "{err}");

    let (code, _, err) = run(podvisor()
        .env("TLS_MIN_VERSION", "VersionTLS10")
        .arg("local"));
    assert_eq!(code, 2);
    assert!(err.contains("--tls-min-version (TLS_MIN_VERSION)"), "{err}");

    let (code, _, err) = run(podvisor()
        .env(
            "TLS_CIPHER_SUITES",
            "TLS_AES_128_GCM_SHA256,TLS_RSA_WITH_RC4_128_SHA",
        )
        .arg("local"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--tls-cipher-suites (TLS_CIPHER_SUITES)")
            && err.contains("'TLS_RSA_WITH_RC4_128_SHA' is not a cipher suite"),
        "{err}"
    );
    let (code, _, err) = run(podvisor().env("PODVISOR_PROVIDER_RATE", "0").arg("local"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--provider-rate (PODVISOR_PROVIDER_RATE)"),
        "{err}"
    );
    let (code, _, err) = run(podvisor().env("PODVISOR_PROVIDER_BURST", "0").arg("local"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--provider-burst") && err.contains("PODVISOR_PROVIDER_BURST"),
        "{err}"
    );

    let (code, _, err) = run(podvisor().args(["local", "--forwarder-bin", "/nonexistent"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("--forwarder-bin (LOCAL_FORWARDER_BIN)"),
        "{err}"
    );

    let (code, _, err) = run(podvisor().arg("gcp"));
    assert_eq!(code, 2);
    assert!(err.contains("gcp"), "{err}");
}

#[test]
fn an_empty_environment_variable_counts_as_unset() {
    // FORWARDER_PORT="" must fall back to the default, not fail to parse;
    // the daemon then fails later for an unrelated, stated reason.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(podvisor()
        .env("FORWARDER_PORT", "")
        .env("PODVISOR_LOG_FORMAT", "")
        .args(["--state-dir", "/dev/null/x", "local"])
        .current_dir(dir.path()));
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("FORWARDER_PORT"), "{err}");
    assert!(err.contains("--state-dir /dev/null/x"), "{err}");
}

#[test]
fn go_style_single_dash_flags_work() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(podvisor()
        .args(["-state-dir=/dev/null/y", "-log-format", "json", "local"])
        .current_dir(dir.path()));
    assert_eq!(code, 1);
    assert!(err.contains("--state-dir /dev/null/y"), "{err}");
}
