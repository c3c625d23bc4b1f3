//! The Kata-facing socket driven exactly as the real senders drive it —
//! not with clients generated from our own protos.
//!
//! The client here speaks ttrpc with **literal method paths**
//! (`/hypervisor.Hypervisor/CreateVM`, `/podvminfo.PodVMInfo/GetInfo`) and
//! encodes every message by its field numbers, so a name our codegen makes
//! up, or a field we number differently, fails here. The requests are the
//! senders' own, written from their source (kata-containers `7c6ba40`,
//! cloud-api-adaptor `fbdde75`):
//!
//! - **Go shim** (`src/runtime/virtcontainers/remote.go`): a new connection
//!   per call; CreateVM without a deadline and with all nine annotations,
//!   unset ones as `""` or `"0"`, vCPUs already rounded up
//!   (`RoundUpNumVCPUs`); StartVM with a 600 s deadline
//!   (`remote_hypervisor_timeout` of `configuration-remote.toml`); StopVM
//!   with the caller's context (no deadline). Under CRI-O its
//!   `io.kubernetes.cri.sandbox-name` holds CRI-O's sandbox name
//!   `k8s_<pod>_<ns>_<uid>_<attempt>` (`sandbox.go`,
//!   `setHypervisorConfigAnnotations`).
//! - **runtime-rs** (`src/runtime-rs/crates/hypervisor/src/remote/inner.rs`):
//!   one cached connection for every call; the same nine keys, vCPUs as its
//!   `f32` printed by Rust (`"1.5"`); StartVM with a 10,000 s deadline
//!   (`start_vm(10_000)` fed to `from_secs`); StopVM with a fixed 1 s
//!   deadline. Under CRI-O its sandbox name is CRI-O's plain `KubeName`.
//! - Both send `cc_init_data` as the raw TOML they decoded from the pod's
//!   gzip + base64 annotation (`oci/utils.go`,
//!   `addHypervisorInitdataOverrides`; `kata-types/src/initdata.rs`).
//! - The reference's PodVMInfo clients call `/podvminfo.PodVMInfo/GetInfo`
//!   (`podvminfo_ttrpc.pb.go`).
//!
//! Each request runs against the daemon as a process on the local provider,
//! end to end to a Running pod VM, whose provisioned files are then read
//! back and checked with tools that share no code with podvisor (`base64`,
//! `gzip`, `sha256sum`).

mod common;

use common::{Daemon, Setup, eventually, sandbox_id};
use protobuf::{CodedInputStream, CodedOutputStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const HYPERVISOR: &str = "hypervisor.Hypervisor";
const POD_VM_INFO: &str = "podvminfo.PodVMInfo";

/// Initdata as Kata's runtime hands it to the remote hypervisor: the TOML
/// decoded from the pod's annotation, byte for byte (multi-line strings
/// and all).
const INITDATA_TOML: &str = r#"algorithm = "sha256"
version = "0.1.0"

[data]
"aa.toml" = '''
[token_configs]
[token_configs.coco_as]
url = "http://127.0.0.1:8080"
'''

"cdh.toml" = '''
socket = 'unix:///run/confidential-containers/cdh.sock'
credentials = []
'''

"policy.rego" = '''
package agent_policy

default AllowRequestsFailingPolicy := true
'''
"#;

/// A ttrpc client that knows nothing of podvisor's protos.
struct WireClient {
    client: ttrpc::r#async::Client,
}

impl WireClient {
    async fn connect(socket: &Path) -> Self {
        let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:?}", socket.display()));
        Self { client }
    }

    /// Calls `/<service>/<method>` with `payload`; `deadline` is what the
    /// sender puts in `timeout_nano` (none: 0, as Go sends for a context
    /// without a deadline).
    async fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        deadline: Option<Duration>,
    ) -> ttrpc::Result<Vec<u8>> {
        let mut req = ttrpc::Request::new();
        req.service = service.to_owned();
        req.method = method.to_owned();
        req.payload = payload;
        req.timeout_nano = deadline.map_or(0, |d| d.as_nanos() as i64);
        self.client.request(req).await.map(|r| r.payload)
    }
}

/// Protobuf by field number: `string` fields and `map<string, string>`
/// entries (key = 1, value = 2), both always written, as Go writes them.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn string(mut self, field: u32, value: &str) -> Self {
        let mut os = CodedOutputStream::vec(&mut self.0);
        os.write_string(field, value).unwrap();
        os.flush().unwrap();
        drop(os);
        self
    }
    fn boolean(mut self, field: u32, value: bool) -> Self {
        let mut os = CodedOutputStream::vec(&mut self.0);
        os.write_bool(field, value).unwrap();
        os.flush().unwrap();
        drop(os);
        self
    }
    fn map_entry(self, field: u32, key: &str, value: &str) -> Self {
        let entry = Message::default().string(1, key).string(2, value).0;
        let mut out = self;
        let mut os = CodedOutputStream::vec(&mut out.0);
        os.write_bytes(field, &entry).unwrap();
        os.flush().unwrap();
        drop(os);
        out
    }
}

/// Field 1 of a response, a string (CreateVMResponse.agentSocketPath,
/// GetInfoResponse.VMID, VersionResponse.version).
fn first_string(payload: &[u8]) -> String {
    let mut is = CodedInputStream::from_bytes(payload);
    while let Some(tag) = is.read_raw_tag_or_eof().unwrap() {
        if tag == (1 << 3) | 2 {
            return is.read_string().unwrap();
        }
        is.skip_field(protobuf::rt::WireType::new(tag & 7).unwrap())
            .unwrap();
    }
    String::new()
}

/// How a sender connects and which deadlines it sets.
#[derive(Debug, Clone, Copy)]
enum Shim {
    /// Kata's Go shim, `virtcontainers/remote.go`.
    Go,
    /// Kata's runtime-rs, `hypervisor/src/remote/inner.rs`.
    RuntimeRs,
}

impl Shim {
    fn start_deadline(self) -> Duration {
        match self {
            Shim::Go => Duration::from_secs(600),
            Shim::RuntimeRs => Duration::from_secs(10_000),
        }
    }
    fn stop_deadline(self) -> Option<Duration> {
        match self {
            Shim::Go => None,
            Shim::RuntimeRs => Some(Duration::from_secs(1)),
        }
    }
}

/// The container runtime under the shim.
#[derive(Debug, Clone, Copy)]
enum Cri {
    Containerd,
    CriO,
}

/// One sender's CreateVM: the nine keys it always sends.
struct Sandbox {
    shim: Shim,
    cri: Cri,
    pod: &'static str,
    namespace: &'static str,
    /// `default_vcpus` as this sender writes it, and the whole vCPUs it means.
    vcpus: (&'static str, u32),
    initdata: Option<&'static str>,
}

impl Sandbox {
    /// A pod `name` in `default` under containerd, one vCPU, no initdata.
    fn plain(shim: Shim, pod: &'static str) -> Self {
        Self {
            shim,
            cri: Cri::Containerd,
            pod,
            namespace: "default",
            vcpus: ("1", 1),
            initdata: None,
        }
    }

    /// The annotation map, in the senders' own words.
    fn annotations(&self) -> Vec<(&'static str, String)> {
        let uid = "3f2a9c1b-5d7e-4c1a-9b8e-0a1b2c3d4e5f";
        let name = match (self.shim, self.cri) {
            (_, Cri::Containerd) => self.pod.to_owned(),
            // CRI-O's GenerateNameAndID: k8s_<pod>_<ns>_<uid>_<attempt>.
            (Shim::Go, Cri::CriO) => format!("k8s_{}_{}_{uid}_0", self.pod, self.namespace),
            // runtime-rs falls back to io.kubernetes.cri-o.KubeName.
            (Shim::RuntimeRs, Cri::CriO) => self.pod.to_owned(),
        };
        vec![
            ("io.kubernetes.cri.sandbox-name", name),
            (
                "io.kubernetes.cri.sandbox-namespace",
                self.namespace.to_owned(),
            ),
            (
                "io.katacontainers.config.hypervisor.machine_type",
                "".into(),
            ),
            ("io.katacontainers.config.hypervisor.image", "".into()),
            (
                "io.katacontainers.config.hypervisor.default_vcpus",
                self.vcpus.0.into(),
            ),
            (
                "io.katacontainers.config.hypervisor.default_memory",
                "2048".into(),
            ),
            (
                "io.katacontainers.config.hypervisor.cc_init_data",
                self.initdata.unwrap_or_default().into(),
            ),
            (
                "io.katacontainers.config.hypervisor.default_gpus",
                "0".into(),
            ),
            (
                "io.katacontainers.config.hypervisor.default_gpu_model",
                "".into(),
            ),
        ]
    }

    fn create_vm_request(&self, id: &str, netns: &str) -> Vec<u8> {
        let mut m = Message::default().string(1, id);
        for (key, value) in self.annotations() {
            m = m.map_entry(2, key, &value);
        }
        m.string(3, netns).0
    }
}

/// The shim's connections: Go dials per call, runtime-rs keeps one.
struct Connections {
    socket: PathBuf,
    cached: Option<WireClient>,
}

impl Connections {
    async fn new(shim: Shim, socket: &Path) -> Self {
        let cached = match shim {
            Shim::Go => None,
            Shim::RuntimeRs => Some(WireClient::connect(socket).await),
        };
        Self {
            socket: socket.to_owned(),
            cached,
        }
    }
    async fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        deadline: Option<Duration>,
    ) -> ttrpc::Result<Vec<u8>> {
        match &self.cached {
            Some(c) => c.call(service, method, payload, deadline).await,
            None => {
                WireClient::connect(&self.socket)
                    .await
                    .call(service, method, payload, deadline)
                    .await
            }
        }
    }
}

impl Connections {
    /// CreateVM as `sandbox`'s sender makes it: no deadline.
    async fn create_vm(&self, sandbox: &Sandbox, id: &str, netns: &str) -> ttrpc::Result<Vec<u8>> {
        let request = sandbox.create_vm_request(id, netns);
        self.call(HYPERVISOR, "CreateVM", request, None).await
    }
    /// StartVM with the sender's deadline.
    async fn start_vm(&self, shim: Shim, id: &str) -> ttrpc::Result<Vec<u8>> {
        let request = Message::default().string(1, id).0;
        self.call(HYPERVISOR, "StartVM", request, Some(shim.start_deadline()))
            .await
    }
    /// StopVM with the sender's deadline.
    async fn stop_vm(&self, shim: Shim, id: &str) -> ttrpc::Result<Vec<u8>> {
        let request = Message::default().string(1, id).0;
        self.call(HYPERVISOR, "StopVM", request, shim.stop_deadline())
            .await
    }
}

/// The files a pod VM's provisioning wrote, on the local provider.
fn peerpod_dir(setup: &Setup, instance_id: &str) -> PathBuf {
    setup
        .local_dir()
        .join("instances")
        .join(instance_id)
        .join("run/peerpod")
}

/// What the shell pipeline `script` prints for `input`, by the system's
/// own tools (no podvisor code).
fn pipe(script: &str, input: &[u8]) -> Vec<u8> {
    let out = Command::new("sh")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().expect("piped stdin").write_all(input)?;
            child.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    out.stdout
}

/// `base64 -d | gzip -d` of `encoded`.
fn gunzip_base64(encoded: &str) -> String {
    String::from_utf8(pipe("base64 -d | gzip -d", encoded.as_bytes())).expect("UTF-8 TOML")
}

/// `sha256sum` of `text`.
fn sha256sum(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doc");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("sha256sum").arg(&file).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Drives one sandbox's whole life as its sender does, and checks the pod
/// VM it got.
async fn drive(setup: &Setup, daemon: &Daemon, sandbox: &Sandbox) {
    let what = format!("{:?} + {:?} ({})", sandbox.shim, sandbox.cri, sandbox.pod);
    let conns = Connections::new(sandbox.shim, &setup.socket()).await;
    let id = sandbox_id();
    let netns = format!("/var/run/netns/cni-{}", &id[..8]);

    let reply = conns
        .create_vm(sandbox, &id, &netns)
        .await
        .unwrap_or_else(|e| panic!("{what}: CreateVM: {e:?}\n{}", daemon.log_text()));
    // The Go shim refuses an empty path; runtime-rs prefixes "remote://".
    assert_eq!(
        first_string(&reply),
        setup
            .pods_dir()
            .join(&id)
            .join("agent.ttrpc")
            .to_string_lossy(),
        "{what}"
    );

    conns
        .start_vm(sandbox.shim, &id)
        .await
        .unwrap_or_else(|e| panic!("{what}: StartVM: {e:?}\n{}", daemon.log_text()));

    let view = daemon.instance(&id).await.expect("the sandbox is known");
    assert_eq!(view["state"], "running", "{what}: {view}");
    assert_eq!(view["pod_name"], sandbox.pod, "{what}: {view}");
    assert_eq!(view["pod_namespace"], sandbox.namespace, "{what}: {view}");
    assert_eq!(
        view["instance_name"],
        format!("podvm-{}-{}", sandbox.pod, &id[..8]),
        "{what}"
    );
    assert_eq!(view["spec"]["vcpus"], sandbox.vcpus.1, "{what}: {view}");
    assert_eq!(view["spec"]["memory_mib"], 2048, "{what}: {view}");
    assert_eq!(view["spec"]["instance_type"], serde_json::Value::Null);
    assert_eq!(view["spec"]["image"], serde_json::Value::Null);
    let instance_id = view["instance_id"].as_str().unwrap().to_owned();

    // The pod VM's provisioned files.
    // Readiness completed a TLS handshake and closed it cleanly: the pod
    // VM's forwarder had nothing to warn about (a bare TCP probe used to
    // leave "TLS handshake refused" for every StartVM).
    let forwarder_log = std::fs::read_to_string(
        setup
            .local_dir()
            .join("instances")
            .join(&instance_id)
            .join("forwarder.log"),
    )
    .unwrap_or_default();
    assert!(
        forwarder_log.contains("INFO") && !forwarder_log.contains("WARN"),
        "{what}: the forwarder warned:\n{forwarder_log}"
    );
    let dir = peerpod_dir(setup, &instance_id);
    let apf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("apf.json")).unwrap()).unwrap();
    assert_eq!(apf["pod-name"], sandbox.pod, "{what}");
    assert_eq!(apf["pod-namespace"], sandbox.namespace, "{what}");
    match sandbox.initdata {
        Some(toml) => {
            // As the reference writes it: gzip + base64 of the exact TOML.
            let encoded = std::fs::read_to_string(dir.join("initdata")).unwrap();
            assert_eq!(gunzip_base64(&encoded), toml, "{what}");
            assert_eq!(
                std::fs::read_to_string(dir.join("initdata.digest")).unwrap(),
                sha256sum(toml),
                "{what}"
            );
            let policy = std::fs::read_to_string(dir.join("policy.rego")).unwrap();
            assert!(policy.contains("package agent_policy"), "{what}");
            assert!(dir.join("aa.toml").exists() && dir.join("cdh.toml").exists());
        }
        None => assert!(!dir.join("initdata").exists(), "{what}"),
    }

    // The reference's PodVMInfo client finds the pod by its real name.
    let vm = WireClient::connect(&setup.socket())
        .await
        .call(
            POD_VM_INFO,
            "GetInfo",
            Message::default()
                .string(1, sandbox.pod)
                .string(2, sandbox.namespace)
                .0,
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: GetInfo: {e:?}"));
    assert_eq!(first_string(&vm), instance_id, "{what}");

    let asked = Instant::now();
    conns
        .stop_vm(sandbox.shim, &id)
        .await
        .unwrap_or_else(|e| panic!("{what}: StopVM: {e:?}\n{}", daemon.log_text()));
    eprintln!("{what}: StopVM answered in {:?}", asked.elapsed());
    eventually(
        &format!("{what}: the pod VM deleted"),
        Duration::from_secs(30),
        async || daemon.instance(&id).await.is_none().then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_real_sender_gets_a_running_pod_vm_with_its_user_data() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let matrix = [
        Sandbox {
            shim: Shim::Go,
            cri: Cri::Containerd,
            pod: "web",
            namespace: "shop",
            vcpus: ("2", 2),
            initdata: Some(INITDATA_TOML),
        },
        Sandbox {
            shim: Shim::Go,
            cri: Cri::Containerd,
            pod: "plain",
            namespace: "default",
            vcpus: ("1", 1),
            initdata: None,
        },
        Sandbox {
            shim: Shim::Go,
            cri: Cri::CriO,
            pod: "nginx",
            namespace: "default",
            vcpus: ("1", 1),
            initdata: Some(INITDATA_TOML),
        },
        Sandbox {
            shim: Shim::Go,
            cri: Cri::CriO,
            pod: "nginx-bare",
            namespace: "default",
            vcpus: ("1", 1),
            initdata: None,
        },
        Sandbox {
            shim: Shim::RuntimeRs,
            cri: Cri::Containerd,
            pod: "fractional",
            namespace: "shop",
            vcpus: ("1.5", 2),
            initdata: Some(INITDATA_TOML),
        },
        Sandbox {
            shim: Shim::RuntimeRs,
            cri: Cri::Containerd,
            pod: "half",
            namespace: "shop",
            vcpus: ("0.5", 1),
            initdata: None,
        },
        Sandbox {
            shim: Shim::RuntimeRs,
            cri: Cri::CriO,
            pod: "kube-name",
            namespace: "crio-ns",
            vcpus: ("1", 1),
            initdata: Some(INITDATA_TOML),
        },
    ];
    for sandbox in &matrix {
        drive(&setup, &daemon, sandbox).await;
    }
    // The reference answers Version with "0.0.0"; neither shim calls it.
    let version = WireClient::connect(&setup.socket())
        .await
        .call(
            HYPERVISOR,
            "Version",
            Message::default().string(1, "0.0.0").0,
            None,
        )
        .await
        .unwrap();
    assert_eq!(first_string(&version), "0.0.0");
}

/// The global `INITDATA`, line-wrapped as `gzip | base64` writes it, reaches
/// a pod without its own initdata in the reference's form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_wrapped_initdata_setting_reaches_pods_without_their_own() {
    let wrapped = String::from_utf8(pipe("gzip -n | base64", INITDATA_TOML.as_bytes())).unwrap();
    assert!(wrapped.trim_end().contains('\n'), "wrapped: {wrapped}");
    let mut setup = Setup::new();
    setup.env.push(("INITDATA".into(), wrapped));
    let daemon = setup.start().await;
    let sandbox = Sandbox::plain(Shim::Go, "defaulted");
    let conns = Connections::new(sandbox.shim, &setup.socket()).await;
    let id = sandbox_id();
    conns.create_vm(&sandbox, &id, "").await.unwrap();
    conns
        .start_vm(sandbox.shim, &id)
        .await
        .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
    let view = daemon.instance(&id).await.unwrap();
    let dir = peerpod_dir(&setup, view["instance_id"].as_str().unwrap());
    let encoded = std::fs::read_to_string(dir.join("initdata")).unwrap();
    assert!(
        !encoded.contains('\n'),
        "one line, as the reference writes it"
    );
    assert_eq!(gunzip_base64(&encoded), INITDATA_TOML);
    assert_eq!(
        std::fs::read_to_string(dir.join("initdata.digest")).unwrap(),
        sha256sum(INITDATA_TOML)
    );
}

/// GetInfo under its wire name, as the reference's clients call it, with
/// and without `Wait`; the camel-cased name of earlier builds still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_info_answers_under_its_wire_name_with_and_without_wait() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let get_info = |pod: &'static str, wait: bool, service: &'static str| {
        let socket = setup.socket();
        async move {
            WireClient::connect(&socket)
                .await
                .call(
                    service,
                    "GetInfo",
                    Message::default()
                        .string(1, pod)
                        .string(2, "default")
                        .boolean(3, wait)
                        .0,
                    Some(Duration::from_secs(60)),
                )
                .await
                .map(|payload| first_string(&payload))
        }
    };
    let code = |r: ttrpc::Result<String>| match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("not an RPC status: {other:?}"),
    };

    // Unknown pod, no wait: NotFound (as the reference).
    assert_eq!(
        code(get_info("ghost", false, POD_VM_INFO).await),
        ttrpc::Code::NOT_FOUND
    );

    // A waiting call made before CreateVM returns once StartVM set the VM.
    let waiting = tokio::spawn(get_info("waited", true, POD_VM_INFO));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sandbox = Sandbox::plain(Shim::RuntimeRs, "waited");
    let conns = Connections::new(sandbox.shim, &setup.socket()).await;
    let id = sandbox_id();
    conns.create_vm(&sandbox, &id, "").await.unwrap();
    assert!(!waiting.is_finished(), "Wait returned before StartVM");
    conns
        .start_vm(sandbox.shim, &id)
        .await
        .unwrap_or_else(|e| panic!("StartVM: {e:?}\n{}", daemon.log_text()));
    let instance_id = daemon.instance(&id).await.unwrap()["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(waiting.await.unwrap().unwrap(), instance_id);

    // Without wait, once Running; and under the camel-cased alias.
    assert_eq!(
        get_info("waited", false, POD_VM_INFO).await.unwrap(),
        instance_id
    );
    assert_eq!(
        get_info("waited", false, "podvminfo.PodVmInfo")
            .await
            .unwrap(),
        instance_id
    );
    // A service nobody serves is still refused (by ttrpc-rust's router).
    match get_info("waited", false, "podvminfo.Nope").await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert!(s.message().contains("service does not exist"), "{s:?}");
        }
        other => panic!("an unknown service answered: {other:?}"),
    }
}
