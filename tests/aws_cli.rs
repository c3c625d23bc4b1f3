//! `podvisor aws` as operators meet it: the reference's flags and variables
//! in the help, bad values refused at start naming flag and variable, and
//! credentials never echoed.

#![cfg(feature = "aws")]

use std::process::Command;
#[path = "common/cli.rs"]
mod cli;

use cli::run;

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
