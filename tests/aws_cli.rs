//! `podvisor aws` as operators meet it: the reference's flags and variables
//! in the help, bad values refused at start naming flag and variable, and
//! credentials never echoed.

#![cfg(feature = "aws")]

use std::path::Path;
use std::process::Command;
#[path = "common/cli.rs"]
mod cli;

use cli::{line_starting, run};
use podvisor_providers::aws::testing::{AwsBed, SECRET_ACCESS_KEY};

/// The variables `podvisor aws` reads; a test must not inherit them.
const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "PODVM_AMI_ID",
    "PODVM_INSTANCE_TYPE",
    "PODVM_INSTANCE_TYPES",
    "AWS_SUBNET_ID",
    "AWS_SG_IDS",
    "SSH_KP_NAME",
    "USE_PODVM_LAUNCHTEMPLATE",
    "PODVM_LAUNCHTEMPLATE_NAME",
    "USE_PUBLIC_IP",
    "ROOT_VOLUME_SIZE",
    "DISABLECVM",
    "TAGS",
];

fn podvisor() -> Command {
    cli::podvisor_without(AWS_VARS, &[])
}

#[test]
fn aws_help_lists_the_reference_flags_and_variables_but_no_secret_values() {
    let (code, out, _) = run(podvisor().arg("--help"));
    assert_eq!(code, 0);
    assert!(out.contains("aws"), "{out}");
    let (code, out, _) = run(podvisor()
        .env("AWS_SECRET_ACCESS_KEY", "help-must-not-show-this")
        .args(["aws", "--help"]));
    assert_eq!(code, 0);
    for needle in AWS_VARS.iter().copied().chain([
        "--aws-access-key-id",
        "--aws-secret-key",
        "--aws-session-token",
        "--aws-profile",
        "--aws-region",
        "--aws-endpoint",
        "--imageid",
        "--instance-type",
        "--instance-types",
        "--subnetid",
        "--securitygroupids",
        "--keyname",
        "--use-lt",
        "--aws-lt-name",
        "--use-public-ip",
        "--root-volume-size",
        "--disable-cvm",
        "--tags",
        "m6a.large",
    ]) {
        assert!(out.contains(needle), "aws --help lacks {needle}:\n{out}");
    }
    assert!(!out.contains("help-must-not-show-this"), "{out}");
}

#[test]
fn bad_aws_values_fail_at_start_naming_the_flag_and_variable() {
    let (code, _, err) = run(podvisor().arg("aws"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--imageid (PODVM_AMI_ID): is required"),
        "{err}"
    );

    let (code, _, err) = run(podvisor()
        .env("PODVM_AMI_ID", "ami-03cf127a")
        .env("AWS_SUBNET_ID", "net-1")
        .arg("aws"));
    assert_eq!(code, 2);
    assert!(err.contains("--subnetid (AWS_SUBNET_ID)"), "{err}");

    let (code, _, err) = run(podvisor()
        .env("PODVM_AMI_ID", "ami-03cf127a")
        .env("AWS_ACCESS_KEY_ID", "AKIDONLYHALF")
        .arg("aws"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--aws-secret-key (AWS_SECRET_ACCESS_KEY)"),
        "{err}"
    );
    assert!(!err.contains("AKIDONLYHALF"), "{err}");

    let (code, _, err) = run(podvisor()
        .env("PODVM_AMI_ID", "ami-03cf127a")
        .env("ROOT_VOLUME_SIZE", "lots")
        .arg("aws"));
    assert_eq!(code, 2);
    assert!(
        err.contains("--root-volume-size") && err.contains("ROOT_VOLUME_SIZE"),
        "{err}"
    );
}

/// `podvisor … aws` as a daemon with its files under `dir`, and no AWS
/// credentials anywhere: no `AWS_*` variable, an empty `HOME` (no
/// `~/.aws`), and the instance metadata service on a closed loopback port.
/// Nothing it may reach is outside 127.0.0.0/8.
fn daemon_without_credentials(dir: &Path) -> Command {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut c = cli::podvisor_without(AWS_VARS, &["AWS_"]);
    c.env("HOME", &home)
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{}", podvisor_podvm::testing::free_port()),
        )
        .env("PODVM_AMI_ID", "ami-03cf127a")
        .current_dir(dir)
        .args([
            "--state-dir",
            "state",
            "--socket",
            "hv.sock",
            "--pods-dir",
            "pods",
        ])
        .args([
            "--node-name",
            "node-a",
            "--admin-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--cloud-config-verify", "--provider-call-attempts", "1"]);
    c
}

/// An error an operator reads: sentences, not a Rust `Debug` dump, and
/// the provider's part of it (after the daemon's step) short.
fn assert_sentences(line: &str) {
    for debug in ["{", "Some(", "kind:", "source:", "DispatchFailure"] {
        assert!(!line.contains(debug), "{debug} in: {line}");
    }
    let provider = ["cannot be built: ", "(--cloud-config-verify): "]
        .iter()
        .find_map(|step| line.split_once(step))
        .map_or(line, |(_, error)| error);
    assert!(
        provider.len() < 300,
        "{} characters: {provider}",
        provider.len()
    );
}

/// How the credentials error says to give them: the reference's ways.
const GIVE_CREDENTIALS: &str = "give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE (~/.aws), IRSA (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE) or an instance profile";

#[test]
fn no_aws_credentials_is_a_configuration_error_at_start_that_says_how_to_give_them() {
    let dir = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}", podvisor_podvm::testing::free_port());
    // A region and an endpoint (closed, on loopback): only the credentials
    // are missing. With the metadata service off, and on a closed port.
    for metadata_off in [true, false] {
        let mut c = daemon_without_credentials(dir.path());
        c.env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &closed);
        if metadata_off {
            c.env("AWS_EC2_METADATA_DISABLED", "true");
        }
        let started = std::time::Instant::now();
        let (code, _, err) = run(c.arg("aws"));
        // A configuration error, as the command line's are: exit 2, before
        // any endpoint is served.
        assert_eq!(code, 2, "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        let line = line_starting(&err, "podvisor: ");
        assert!(
            line.starts_with("podvisor: Provider aws cannot be built: no AWS credentials (")
                && line.contains("no providers in chain provided credentials")
                && line.ends_with(&format!("): {GIVE_CREDENTIALS}")),
            "{line}"
        );
        assert_sentences(line);
        // Not an endpoint trouble tried again and again.
        assert!(
            !err.contains("cannot reach") && !err.contains("retrying"),
            "{err}"
        );
    }
    // No region either (off EC2): both at once.
    let (code, _, err) = run(daemon_without_credentials(dir.path()).arg("aws"));
    assert_eq!(code, 2, "{err}");
    let line = line_starting(&err, "podvisor: ");
    assert!(
        line.starts_with("podvisor: Provider aws cannot be built: no AWS credentials (")
            && line.ends_with(&format!("{GIVE_CREDENTIALS}; set AWS_REGION too")),
        "{line}"
    );
    assert_sentences(line);
    assert!(
        !err.contains("cannot reach") && !err.contains("retrying"),
        "{err}"
    );
}

#[test]
fn the_metadata_service_s_error_is_sentences_not_a_debug_dump() {
    let dir = tempfile::tempdir().unwrap();
    // Credentials, but no region and no metadata service to give it.
    let (code, _, err) = run(daemon_without_credentials(dir.path())
        .env("AWS_ACCESS_KEY_ID", "AKIDPODVISORTEST")
        .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .arg("aws"));
    // A setting to give: a configuration error, exit 2.
    assert_eq!(code, 2, "{err}");
    let line = line_starting(&err, "podvisor: ");
    assert!(
        line.starts_with("podvisor: Provider aws cannot be built: --aws-region (AWS_REGION): not set, and the instance metadata service did not give it (failed to load IMDS session token: ")
            && line.ends_with("); set it when not on EC2"),
        "{line}"
    );
    assert_sentences(line);
    assert!(!err.contains(SECRET_ACCESS_KEY), "{err}");
}

#[tokio::test]
async fn ec2_s_errors_are_sentences_not_debug_dumps() {
    let bed = AwsBed::start().await;
    let dir = tempfile::tempdir().unwrap();
    // An image EC2 does not have: its API error, at the start-up check.
    let mut flags = bed.flags(&bed.moto.endpoint());
    let image = flags.iter().position(|f| f == "--imageid").unwrap() + 1;
    flags[image] = "ami-0123456789abcdef0".into();
    let (code, _, err) = run(daemon_without_credentials(dir.path()).args(&flags));
    assert_eq!(code, 1, "{err}");
    let line = line_starting(&err, "podvisor: ");
    assert!(
        line.starts_with("podvisor: Provider aws: the configuration does not verify (--cloud-config-verify): --imageid (PODVM_AMI_ID): EC2 DescribeImages failed: InvalidAMIID.NotFound: "),
        "{line}"
    );
    assert_sentences(line);
    // An endpoint that does not answer (a closed loopback port).
    let closed = format!("http://127.0.0.1:{}", podvisor_podvm::testing::free_port());
    let (code, _, err) = run(daemon_without_credentials(dir.path()).args(bed.flags(&closed)));
    assert_eq!(code, 1, "{err}");
    let line = line_starting(&err, "podvisor: ");
    assert!(
        line.contains("cannot reach the endpoint: dispatch failure: io error: ")
            && line.ends_with("; check the network and --aws-endpoint (AWS_ENDPOINT_URL)"),
        "{line}"
    );
    assert_sentences(line);
    assert!(!err.contains(SECRET_ACCESS_KEY), "{err}");
}
