//! User data, both sides: what the daemon renders for a pod VM is what the
//! pod VM's `podvisor-userdata` accepts and writes — through the real binary,
//! reading a `cidata`-style file, into a temporary root.

use podvisor::userdata::{UserDataInputs, render};
use std::process::Command;

const INITDATA: &str = "YWxnb3JpdGhtID0gInNoYTM4NCIKdmVyc2lvbiA9ICIwLjEuMCIKCltkYXRhXQoiYWEudG9tbCIgPSAiIiIKW3Rva2VuX2NvbmZpZ3NdCiIiIgoicG9saWN5LnJlZ28iID0gInBhY2thZ2UgYWdlbnRfcG9saWN5Igo=";

fn userdata_binary() -> std::path::PathBuf {
    podvisor_podvm::testing::userdata_binary().unwrap()
}

#[test]
fn what_the_daemon_renders_the_pod_vm_writes() {
    let text = render(&UserDataInputs {
        pod_name: "we\"b",
        pod_namespace: "shop",
        initdata: Some(INITDATA),
        scratch_space: true,
        tls: None,
        tls_min_version: None,
        tls_cipher_suites: None,
        pod_network: None,
    });
    let files = podvisor_podvm::userdata::parse(&text).unwrap();
    let names: Vec<_> = files.iter().map(|f| f.name).collect();
    assert_eq!(names, ["apf.json", "initdata", "scratch-space.marker"]);

    let dir = tempfile::tempdir().unwrap();
    let cidata = dir.path().join("user-data");
    std::fs::write(&cidata, &text).unwrap();
    let root = dir.path().join("root");
    let out = Command::new(userdata_binary())
        .arg("--source")
        .arg(format!("cidata:{}", cidata.display()))
        .arg("--root")
        .arg(&root)
        .args(["--timeout", "5", "--retry-interval", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peerpod = root.join("run/peerpod");
    let apf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peerpod.join("apf.json")).unwrap()).unwrap();
    assert_eq!(apf["pod-name"], "we\"b");
    assert_eq!(apf["pod-namespace"], "shop");
    assert_eq!(
        std::fs::read_to_string(peerpod.join("initdata")).unwrap(),
        INITDATA
    );
    assert_eq!(
        std::fs::read_to_string(peerpod.join("initdata.digest")).unwrap(),
        "2c6e3923824751b4f0d907c0e0d1c6a49c1c12959f5ea667666966ff18706d814a49ef05d165bce9d7836b789de0d7d8"
    );
    assert!(peerpod.join("scratch-space.marker").exists());
    assert!(peerpod.join("policy.rego").exists());
    // Names in the log, never contents.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("apf.json") && !log.contains("shop"), "{log}");
}

#[test]
fn bad_user_data_fails_the_binary_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let run = |text: Option<&str>| {
        let cidata = dir.path().join("user-data");
        let _ = std::fs::remove_file(&cidata);
        if let Some(t) = text {
            std::fs::write(&cidata, t).unwrap();
        }
        let out = Command::new(userdata_binary())
            .arg("--source")
            .arg(format!("cidata:{}", cidata.display()))
            .arg("--root")
            .arg(&root)
            .args(["--timeout", "1", "--retry-interval", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(Some(
        "#cloud-config\nwrite_files:\n- path: /etc/shadow\n  content: x\n",
    ));
    assert!(
        e.contains("writes /etc/shadow, which is not one of the allowed"),
        "{e}"
    );
    let e = run(Some("#cloud-config\nwrite_files: [\n"));
    assert!(e.contains("The user data is malformed"), "{e}");
    let e = run(None);
    assert!(e.contains("No user data after"), "{e}");
    assert!(!root.exists(), "nothing written");
}
