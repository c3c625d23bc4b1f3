//! `podvisor libvirt` as operators meet it: the reference's flags and
//! variables in the help, bad values refused at start naming flag and
//! variable, and the start-up verification against a real libvirt (the
//! in-process test driver, `test:///default`).

#![cfg(feature = "libvirt")]

use std::process::Command;
#[path = "common/cli.rs"]
mod cli;

use cli::run;

/// The variables `podvisor libvirt` reads; a test must not inherit them.
const LIBVIRT_VARS: &[&str] = &[
    "LIBVIRT_URI",
    "LIBVIRT_POOL",
    "LIBVIRT_NET",
    "LIBVIRT_VOL_NAME",
    "LIBVIRT_CPU",
    "LIBVIRT_MEMORY",
    "LIBVIRT_CPUSET",
    "LIBVIRT_ROOT_DISK_SIZE",
    "LIBVIRT_EFI_FIRMWARE",
    "LIBVIRT_LAUNCH_SECURITY",
    "DISABLECVM",
];

fn podvisor() -> Command {
    let mut c = cli::podvisor_without(LIBVIRT_VARS, &[]);
    c.env_remove("CLOUD_CONFIG_VERIFY");
    c
}

#[test]
fn libvirt_help_lists_the_reference_flags_and_variables() {
    let (code, out, _) = run(podvisor().arg("--help"));
    assert_eq!(code, 0);
    assert!(out.contains("libvirt"), "{out}");
    let (code, out, _) = run(podvisor().args(["libvirt", "--help"]));
    assert_eq!(code, 0);
    for needle in LIBVIRT_VARS.iter().copied().chain([
        "--uri",
        "--pool-name",
        "--network-name",
        "--vol-name",
        "--cpu",
        "--memory",
        "--cpuset",
        "--root-disk-size",
        "--firmware",
        "--launch-security",
        "--disable-cvm",
        "--data-dir",
        "podvm-base.qcow2",
    ]) {
        assert!(
            out.contains(needle),
            "libvirt --help lacks {needle}:\n{out}"
        );
    }
}

#[test]
fn bad_libvirt_values_fail_at_start_naming_the_flag_and_variable() {
    let (code, _, err) = run(podvisor().args(["libvirt", "--uri", "nowhere"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--uri (LIBVIRT_URI)"), "{err}");

    let (code, _, err) = run(podvisor().env("LIBVIRT_MEMORY", "64").arg("libvirt"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--memory (LIBVIRT_MEMORY)"), "{err}");

    let (code, _, err) = run(podvisor().env("LIBVIRT_CPU", "two").arg("libvirt"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--cpu") && err.contains("LIBVIRT_CPU"),
        "{err}"
    );

    let (code, _, err) = run(podvisor()
        .env("LIBVIRT_LAUNCH_SECURITY", "s390-pv")
        .arg("libvirt"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--launch-security (LIBVIRT_LAUNCH_SECURITY)"),
        "{err}"
    );

    // Go-style, as the reference's ConfigMaps and manifests write it.
    let (code, _, err) = run(podvisor().args(["libvirt", "-disable-cvm=maybe"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--disable-cvm"), "{err}");
}

#[test]
fn start_up_verification_names_the_missing_base_volume() {
    // The test driver has the pool and the network, but no base volume:
    // with --cloud-config-verify the daemon refuses to start, and says why.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(podvisor()
        .arg("--socket")
        .arg(dir.path().join("hypervisor.sock"))
        .arg("--pods-dir")
        .arg(dir.path().join("pods"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--cloud-config-verify",
            "libvirt",
            "--uri",
            "test:///default",
            "--pool-name",
            "default-pool",
        ]));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("--vol-name (LIBVIRT_VOL_NAME): base volume podvm-base.qcow2 is not in pool default-pool"),
        "{err}"
    );
}
