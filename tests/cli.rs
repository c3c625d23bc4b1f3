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
    // Said once, not "error: error: ...", and the variable on the error's
    // own line, not after clap's hint.
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(
        err.lines().next().is_some_and(|l| l
            .starts_with("error: invalid value 'forever' for '--proxy-timeout")
            && l.ends_with("(from the environment variable PROXY_TIMEOUT)")),
        "{err}"
    );
    let (code, _, err) = run(podvisor().env("PODVISOR_LOG_FORMAT", "xml").arg("local"));
    assert_eq!(code, 2);
    assert_eq!(
        err.lines().next(),
        Some(
            "error: invalid value 'xml' for '--log-format <LOG_FORMAT>' (from the environment variable PODVISOR_LOG_FORMAT)"
        ),
        "{err}"
    );
    // A provider's flag, from its variable.
    let (code, _, err) = run(podvisor().env("LOCAL_CREATE_DELAY", "soon").arg("local"));
    assert_eq!(code, 2);
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.contains("--create-delay")
                && l.ends_with("(from the environment variable LOCAL_CREATE_DELAY)")),
        "{err}"
    );

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

    let (code, _, err) = run(podvisor().arg("vsphere"));
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "error: unknown provider 'vsphere': this build has {} (podvisor --help lists them)\n",
            built()
        ),
    );
}

/// The providers of this build, as the errors list them: `local, aws`.
fn built() -> String {
    let names: Vec<&str> = podvisor_providers::registry()
        .iter()
        .map(|m| m.name())
        .collect();
    names.join(", ")
}

/// A state directory the daemon cannot make: a run of the local provider
/// stops at once (exit 1) saying so, which no parse error does.
const UNMAKEABLE: &str = "/dev/null/x";

#[test]
fn cloud_provider_names_the_provider_when_the_command_line_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods");
    let pods = pods.to_str().unwrap();
    let podvisor = || {
        let mut c = podvisor();
        c.current_dir(dir.path());
        c
    };
    let (code, _, explicit) =
        run(podvisor().args(["--state-dir", UNMAKEABLE, "--pods-dir", pods, "local"]));
    assert_eq!(code, 1, "{explicit}");
    assert!(explicit.contains("--state-dir /dev/null/x"), "{explicit}");
    let last = |err: &str| err.lines().last().map(str::to_owned);

    // As `podvisor … local`.
    let (code, _, err) = run(podvisor().env("CLOUD_PROVIDER", "local").args([
        "--state-dir",
        UNMAKEABLE,
        "--pods-dir",
        pods,
    ]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(last(&err), last(&explicit));
    // With no argument at all: every setting from its variable, as a
    // DaemonSet of the reference gives them.
    let (code, _, err) = run(podvisor()
        .env("CLOUD_PROVIDER", "local")
        .env("PODVISOR_STATE_DIR", UNMAKEABLE)
        .env("PODS_DIR", pods));
    assert_eq!(code, 1, "{err}");
    assert_eq!(last(&err), last(&explicit));
    // The provider's flags come from their variables.
    let (code, _, err) = run(podvisor()
        .env("CLOUD_PROVIDER", "local")
        .env("LOCAL_CREATE_DELAY", "soon")
        .args(["--state-dir", UNMAKEABLE]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: invalid value 'soon' for '--create-delay")
            && err.contains("(from the environment variable LOCAL_CREATE_DELAY)"),
        "{err}"
    );
    // A provider on the command line wins.
    let (code, _, err) = run(podvisor().env("CLOUD_PROVIDER", "gcp").args([
        "--state-dir",
        UNMAKEABLE,
        "--pods-dir",
        pods,
        "local",
    ]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(last(&err), last(&explicit));
    // An unknown one says so, and where it came from.
    let (code, _, err) = run(podvisor()
        .env("CLOUD_PROVIDER", "gcp")
        .args(["--state-dir", UNMAKEABLE]));
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "error: unknown provider 'gcp' (from the environment variable CLOUD_PROVIDER): this build has {}; gcp is not available in podvisor yet\n",
            built()
        )
    );
    // Unset or empty, and no argument: the help, as before.
    for value in [None, Some("")] {
        let mut c = podvisor();
        if let Some(value) = value {
            c.env("CLOUD_PROVIDER", value);
        }
        let (code, out, err) = run(&mut c);
        assert_eq!(code, 2, "{value:?}: {err}");
        let help = out + &err;
        assert!(
            help.contains("Usage: podvisor [OPTIONS] <PROVIDER|COMMAND>")
                && help.contains("CLOUD_PROVIDER"),
            "{value:?}: {help}"
        );
    }
}

#[test]
fn an_unknown_provider_says_which_this_build_has_and_how_to_get_one() {
    let (code, _, err) = run(podvisor().args(["--state-dir", UNMAKEABLE, "gcp"]));
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "error: unknown provider 'gcp': this build has {}; gcp is not available in podvisor yet\n",
            built()
        )
    );
    // A provider of a feature this build lacks: the feature to build with.
    for name in ["local", "aws", "libvirt", "azure", "ibmcloud"] {
        if podvisor_providers::find_manager(name).is_none() {
            let (code, _, err) = run(podvisor().arg(name));
            assert_eq!(code, 2);
            assert_eq!(
                err,
                format!(
                    "error: unknown provider '{name}': this build has {}; {name} needs a build with --features {name}\n",
                    built()
                )
            );
        }
    }
}

#[test]
fn a_global_flag_after_the_provider_says_it_goes_before() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["local", "--state-dir", "/x"],
            "error: --state-dir is a global flag: global flags go before the provider name: podvisor --state-dir … local\n",
        ),
        // Go-style, as the reference's users write it.
        (
            &["local", "-state-dir", "/x"],
            "error: --state-dir is a global flag: global flags go before the provider name: podvisor --state-dir … local\n",
        ),
        (
            &[
                "--socket",
                "/tmp/k.sock",
                "local",
                "--create-delay",
                "1s",
                "-disable-tls",
            ],
            "error: --disable-tls is a global flag: global flags go before the provider name: podvisor --disable-tls local\n",
        ),
        (
            &["journal", "status", "--state-dir", "/x"],
            "error: --state-dir is a global flag: global flags go before the subcommand: podvisor --state-dir … journal …\n",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = run(podvisor().args(args));
        assert_eq!((code, err.as_str()), (2, want), "{args:?}");
    }
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
