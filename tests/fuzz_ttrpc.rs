//! Bad requests, fuzzed: proptest-generated CreateVM, StartVM, StopVM,
//! GetInfo and Version calls, and raw junk frames, sent through the real
//! ttrpc client to ONE daemon child process on the local provider.
//!
//! Every answer must be a success or a ttrpc status with a non-empty
//! message and a code that makes sense for the call (never INTERNAL or
//! UNKNOWN); a refusal of a malformed id or annotation set must be
//! INVALID_ARGUMENT and carry the reason the library functions give
//! (`validate_sandbox_id`, `annotations::parse`). Afterwards the daemon is
//! alive, `/livez` and `/readyz` answer, no request was counted as
//! `internal`, its log holds no panic, and once every sandbox is stopped
//! no instance is left.
//!
//! Each proptest case is a short sequence of calls, sent one after another
//! or all at once. The number of cases is proptest's `PROPTEST_CASES`
//! (default here: 80 cases, about 400 calls, a few seconds). A long run:
//!
//! ```sh
//! PROPTEST_CASES=3000 cargo test --release --test fuzz_ttrpc -- --nocapture
//! ```

mod common;

use common::*;
use podvisor::api::annotations::{DEFAULT_MEMORY, DEFAULT_VCPUS, MACHINE_TYPE};
use podvisor::api::{annotations, validate_sandbox_id};
use podvisor::protocols::ttrpc::{
    hypervisor, hypervisor_ttrpc::HypervisorClient, podvminfo, podvminfo_ttrpc::PodVmInfoClient,
};
use proptest::collection::{hash_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use ttrpc::Code;

/// Every annotation the parser reads.
const KEYS: [&str; 10] = annotations::KNOWN;
const PODS: [&str; 3] = ["web", "db", "cache"];
const NAMESPACES: [&str; 2] = ["shop", "default"];

/// One call.
#[derive(Debug, Clone)]
enum Op {
    Create {
        id: String,
        annotations: HashMap<String, String>,
        netns: String,
    },
    Start(String),
    Stop(String),
    Info {
        pod: String,
        namespace: String,
        wait: bool,
    },
    Version,
    /// Bytes written to a fresh connection to the socket, then closed.
    Junk(Vec<u8>),
}

impl Op {
    fn method(&self) -> &'static str {
        match self {
            Op::Create { .. } => "CreateVM",
            Op::Start(_) => "StartVM",
            Op::Stop(_) => "StopVM",
            Op::Info { .. } => "GetInfo",
            Op::Version => "Version",
            Op::Junk(_) => "junk",
        }
    }
}

fn id_strategy(pool: &[String]) -> BoxedStrategy<String> {
    prop_oneof![
        // A few hot ids, so calls meet the same sandbox in every state;
        // more than the node's limit in all.
        5 => select(pool[..4].to_vec()),
        3 => select(pool[4..].to_vec()),
        1 => any::<String>(),
        1 => "[A-Za-z0-9._-]{1,130}",
        1 => ".{125,135}",
        1 => select(vec!["", ".", "..", "...", "../../etc", "a/b", "a b", "ü", "-", "\0"])
            .prop_map(String::from),
    ]
    .boxed()
}

fn value_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ ]?[+-]?[0-9]{0,22}(\\.[0-9]{0,3})?([eE][+-]?[0-9]{1,3})?[ ]?",
        2 => any::<String>(),
        1 => select(vec!["", " ", "NaN", "inf", "-1", "1.5", "8Gi", "0", "2.0", "99999", "m6a\nlarge",
                         "YWxnb3JpdGhtID0gInNoYTI1NiIK", "H4sIAAAAAAAA", "/w==", "!!!"])
            .prop_map(String::from),
        1 => (0usize..20_000).prop_map(|n| "9".repeat(n)),
    ]
}

fn annotations_strategy() -> impl Strategy<Value = HashMap<String, String>> {
    let valid = (
        select(PODS.to_vec()),
        select(NAMESPACES.to_vec()),
        option::of(1u32..=16),
        option::of(512u64..=65536),
        option::of(select(vec!["m6a.large", "t3.small"])),
    )
        .prop_map(|(pod, ns, vcpus, memory, machine)| {
            let mut m = pod_annotations(pod, ns);
            if let Some(v) = vcpus {
                m.insert(DEFAULT_VCPUS.into(), v.to_string());
            }
            if let Some(v) = memory {
                m.insert(DEFAULT_MEMORY.into(), format!("{v}.0"));
            }
            if let Some(v) = machine {
                m.insert(MACHINE_TYPE.into(), v.into());
            }
            m
        });
    let key = prop_oneof![
        6 => select(KEYS.to_vec()).prop_map(String::from),
        1 => any::<String>(),
        1 => "io\\.katacontainers\\.config\\.hypervisor\\.[a-z_]{1,16}",
    ];
    let arbitrary = (
        option::weighted(0.6, (select(PODS.to_vec()), select(NAMESPACES.to_vec()))),
        hash_map(key, value_strategy(), 0..8),
    )
        .prop_map(|(identity, extra)| {
            let mut m = identity
                .map(|(pod, ns)| pod_annotations(pod, ns))
                .unwrap_or_default();
            m.extend(extra);
            m
        });
    prop_oneof![
        5 => valid,
        3 => arbitrary,
        1 => Just(HashMap::new()),
    ]
}

fn op_strategy(pool: &[String]) -> impl Strategy<Value = Op> {
    let id = id_strategy(pool);
    let netns = prop_oneof![
        Just(String::new()),
        "/var/run/netns/cni-[0-9a-f]{8}",
        any::<String>(),
    ];
    let name = prop_oneof![
        4 => select(PODS.to_vec()).prop_map(String::from),
        1 => any::<String>(),
        1 => Just(String::new()),
    ];
    let namespace = prop_oneof![
        4 => select(NAMESPACES.to_vec()).prop_map(String::from),
        1 => any::<String>(),
        1 => Just(String::new()),
    ];
    let junk = prop_oneof![
        vec(any::<u8>(), 0..64),
        // A ttrpc frame header (length, stream id, type, flags) with any
        // fields, then some payload.
        (
            any::<u32>(),
            any::<u32>(),
            0u8..4,
            any::<u8>(),
            vec(any::<u8>(), 0..64)
        )
            .prop_map(|(len, stream, kind, flags, payload)| {
                let mut b = Vec::with_capacity(10 + payload.len());
                b.extend(len.to_be_bytes());
                b.extend(stream.to_be_bytes());
                b.extend([kind, flags]);
                b.extend(payload);
                b
            }),
    ];
    prop_oneof![
        4 => (id.clone(), annotations_strategy(), netns).prop_map(|(id, annotations, netns)| Op::Create {
            id,
            annotations,
            netns
        }),
        3 => id.clone().prop_map(Op::Start),
        2 => id.prop_map(Op::Stop),
        2 => (name, namespace, prop::bool::weighted(0.15))
            .prop_map(|(pod, namespace, wait)| Op::Info { pod, namespace, wait }),
        1 => Just(Op::Version),
        1 => junk.prop_map(Op::Junk),
    ]
}

/// What a call came back with.
#[derive(Debug)]
enum Outcome {
    /// Success, with CreateVM's socket path or GetInfo's VM id.
    Ok(String),
    /// A ttrpc status.
    Status(Code, String),
    /// Anything else (transport, client-side deadline).
    Other(String),
}

#[derive(Clone)]
struct Clients {
    hv: HypervisorClient,
    info: PodVmInfoClient,
    socket: PathBuf,
}

fn outcome<T>(r: ttrpc::Result<T>, ok: impl FnOnce(T) -> String) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(ok(v)),
        Err(ttrpc::Error::RpcStatus(s)) => Outcome::Status(s.code(), s.message().to_owned()),
        Err(e) => Outcome::Other(e.to_string()),
    }
}

async fn send(c: &Clients, op: &Op) -> Outcome {
    match op {
        Op::Create {
            id,
            annotations,
            netns,
        } => {
            let req = hypervisor::CreateVMRequest {
                id: id.clone(),
                annotations: annotations.clone(),
                networkNamespacePath: netns.clone(),
                ..Default::default()
            };
            outcome(c.hv.create_vm(ctx(10), &req).await, |r| r.agentSocketPath)
        }
        Op::Start(id) => {
            let req = hypervisor::StartVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            outcome(c.hv.start_vm(ctx(60), &req).await, |_| String::new())
        }
        Op::Stop(id) => {
            let req = hypervisor::StopVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            outcome(c.hv.stop_vm(ctx(5), &req).await, |_| String::new())
        }
        Op::Info {
            pod,
            namespace,
            wait,
        } => {
            let req = podvminfo::GetInfoRequest {
                PodName: pod.clone(),
                PodNamespace: namespace.clone(),
                Wait: *wait,
                ..Default::default()
            };
            let deadline = ttrpc::context::with_duration(Duration::from_millis(if *wait {
                300
            } else {
                5000
            }));
            outcome(c.info.get_info(deadline, &req).await, |r| r.VMID)
        }
        Op::Version => {
            let req = hypervisor::VersionRequest {
                version: "0.0.0".into(),
                ..Default::default()
            };
            outcome(c.hv.version(ctx(5), &req).await, |r| r.version)
        }
        Op::Junk(bytes) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            match tokio::net::UnixStream::connect(&c.socket).await {
                Ok(mut s) => {
                    let _ = s.write_all(bytes).await;
                    let _ = s.shutdown().await;
                    // Read whatever comes back (an error frame, or EOF) for
                    // a moment, so the server handles the frame while we
                    // are connected.
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await;
                    Outcome::Ok(String::new())
                }
                Err(e) => Outcome::Other(format!("cannot connect: {e}")),
            }
        }
    }
}

/// The checks every answer must pass.
fn check(op: &Op, out: &Outcome, pods_dir: &Path) -> Result<(), TestCaseError> {
    if let Outcome::Status(code, msg) = out {
        prop_assert!(
            !msg.trim().is_empty(),
            "{op:?}: status {code:?} without a message"
        );
    }
    let status = |out: &Outcome| match out {
        Outcome::Status(code, msg) => Some((*code, msg.clone())),
        _ => None,
    };
    match op {
        Op::Create {
            id, annotations, ..
        } => {
            if let Err(e) = validate_sandbox_id(id) {
                prop_assert_eq!(
                    status(out),
                    Some((Code::INVALID_ARGUMENT, e.to_string())),
                    "{:?}",
                    op
                );
                return Ok(());
            }
            if let Err(why) = annotations::parse(annotations) {
                let s = status(out);
                prop_assert!(
                    s.as_ref().is_some_and(
                        |(code, msg)| *code == Code::INVALID_ARGUMENT && msg.contains(&why)
                    ),
                    "{op:?}: expected INVALID_ARGUMENT with {why:?}, got {out:?}"
                );
                return Ok(());
            }
            // A unix socket path holds at most 107 bytes: a longer agent
            // socket path is refused, naming --pods-dir.
            let want = pods_dir.join(id).join("agent.ttrpc");
            if want.as_os_str().len() > 107 {
                let s = status(out);
                prop_assert!(
                    s.as_ref()
                        .is_some_and(|(code, msg)| *code == Code::FAILED_PRECONDITION
                            && msg.contains("--pods-dir")),
                    "{op:?}: expected FAILED_PRECONDITION naming --pods-dir, got {out:?}"
                );
                return Ok(());
            }
            match out {
                Outcome::Ok(path) => {
                    prop_assert_eq!(Path::new(path), want.as_path());
                }
                Outcome::Status(code, _) => prop_assert!(
                    matches!(code, Code::ALREADY_EXISTS | Code::RESOURCE_EXHAUSTED),
                    "{op:?}: {out:?}"
                ),
                Outcome::Other(e) => prop_assert!(false, "{op:?}: not a status: {e}"),
            }
        }
        Op::Start(id) | Op::Stop(id) => {
            if let Err(e) = validate_sandbox_id(id) {
                prop_assert_eq!(
                    status(out),
                    Some((Code::INVALID_ARGUMENT, e.to_string())),
                    "{:?}",
                    op
                );
                return Ok(());
            }
            match (op, out) {
                (_, Outcome::Ok(_)) => {}
                (Op::Start(_), Outcome::Status(code, _)) => prop_assert!(
                    matches!(
                        code,
                        Code::NOT_FOUND | Code::FAILED_PRECONDITION | Code::UNAVAILABLE
                    ),
                    "{op:?}: {out:?}"
                ),
                _ => prop_assert!(false, "{op:?}: {out:?}"),
            }
        }
        Op::Info {
            pod,
            namespace,
            wait,
        } => {
            if pod.is_empty()
                || namespace.is_empty()
                || !annotations::is_pod_identity(pod, namespace)
            {
                prop_assert_eq!(
                    status(out).map(|s| s.0),
                    Some(Code::INVALID_ARGUMENT),
                    "{:?}",
                    op
                );
                return Ok(());
            }
            match out {
                Outcome::Ok(vmid) => prop_assert!(!vmid.is_empty(), "{op:?}: empty VMID"),
                Outcome::Status(code, _) => prop_assert!(
                    matches!(code, Code::NOT_FOUND | Code::FAILED_PRECONDITION)
                        || (*wait && *code == Code::DEADLINE_EXCEEDED),
                    "{op:?}: {out:?}"
                ),
                // The server's deadline is the client's: the client may
                // give up first.
                Outcome::Other(e) => {
                    prop_assert!(*wait && e.contains("deadline"), "{op:?}: not a status: {e}");
                }
            }
        }
        Op::Version => {
            prop_assert!(
                matches!(out, Outcome::Ok(v) if v == "0.0.0"),
                "{op:?}: {out:?}"
            );
        }
        Op::Junk(_) => prop_assert!(matches!(out, Outcome::Ok(_)), "{op:?}: {out:?}"),
    }
    Ok(())
}

/// Per method and code, how many answers.
type Tally = BTreeMap<(&'static str, String), u64>;

fn code_name(out: &Outcome) -> String {
    match out {
        Outcome::Ok(_) => "OK".into(),
        Outcome::Status(code, _) => format!("{code:?}"),
        Outcome::Other(_) => "client-side".into(),
    }
}

/// Runs one case: its calls in order, or all at once; then stops every
/// sandbox it created outside the pool, so the node's limit is not used up
/// by one-off ids.
async fn run_case(
    clients: &Clients,
    pool: &[String],
    pods_dir: &Path,
    tally: &Mutex<Tally>,
    (ops, concurrent): (Vec<Op>, bool),
) -> Result<(), TestCaseError> {
    let outcomes: Vec<Outcome> = if concurrent {
        let tasks: Vec<_> = ops
            .iter()
            .map(|op| {
                let (c, op) = (clients.clone(), op.clone());
                tokio::spawn(async move { send(&c, &op).await })
            })
            .collect();
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.expect("a call task panicked"));
        }
        outs
    } else {
        let mut outs = Vec::new();
        for op in &ops {
            outs.push(send(clients, op).await);
        }
        outs
    };
    for (op, out) in ops.iter().zip(&outcomes) {
        *tally
            .lock()
            .unwrap()
            .entry((op.method(), code_name(out)))
            .or_default() += 1;
        check(op, out, pods_dir)?;
    }
    for (op, out) in ops.iter().zip(&outcomes) {
        if let (Op::Create { id, .. }, Outcome::Ok(_)) = (op, out)
            && !pool.contains(id)
        {
            let stop = Op::Stop(id.clone());
            let out = send(clients, &stop).await;
            prop_assert!(matches!(out, Outcome::Ok(_)), "cleanup {stop:?}: {out:?}");
        }
    }
    // The daemon still answers on a connection that saw all of this.
    let out = send(clients, &Op::Version).await;
    prop_assert!(
        matches!(out, Outcome::Ok(_)),
        "Version after the case: {out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_requests_get_sensible_answers_and_the_daemon_survives() {
    let setup = Setup::new();
    let daemon = setup.start().await;
    let pods_dir = setup.pods_dir();
    let conn = ttrpc::r#async::Client::connect(&format!("unix://{}", daemon.socket.display()))
        .await
        .unwrap();
    let clients = Clients {
        hv: HypervisorClient::new(conn.clone()),
        info: PodVmInfoClient::new(conn),
        socket: daemon.socket.clone(),
    };
    // More sandboxes than the default per-node limit (10), so it is hit.
    let pool: Vec<String> = (0..12).map(|_| sandbox_id()).collect();

    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 80;
    }
    // Shrinking replays calls against a daemon whose state moved on; a
    // failure is reported with its case as generated.
    config.max_shrink_iters = 0;
    config.failure_persistence = None;
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let strategy = (vec(op_strategy(&pool), 1..10), prop::bool::weighted(0.25));
    let tally = Mutex::new(Tally::new());
    let started = Instant::now();
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |case| {
            handle.block_on(run_case(&clients, &pool, &pods_dir, &tally, case))
        })
    });
    let elapsed = started.elapsed();
    let tally = tally.into_inner().unwrap();
    let calls: u64 = tally.values().sum();
    eprintln!("{cases} cases, {calls} calls in {elapsed:.1?}:");
    for ((method, code), n) in &tally {
        eprintln!("  {method:9} {code:20} {n}");
    }
    if let Err(e) = result {
        panic!("{e}\n--- daemon log ---\n{}", daemon.log_text());
    }

    // Afterwards: alive, live, ready, no internal errors, no panic.
    assert!(
        alive(daemon.pid()),
        "the daemon died:\n{}",
        daemon.log_text()
    );
    assert_eq!(daemon.get("/livez").await.unwrap().0, 200);
    assert_eq!(daemon.get("/readyz").await.unwrap().0, 200);
    assert_eq!(
        daemon
            .metric("podvisor_api_requests_total", &[("code", "internal")])
            .await,
        0.0
    );
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "a panic in the daemon:\n{log}");

    // Stop everything; every record goes (no instance is left behind).
    for id in &pool {
        let out = send(&clients, &Op::Stop(id.clone())).await;
        assert!(matches!(out, Outcome::Ok(_)), "StopVM {id}: {out:?}");
    }
    eventually(
        "every sandbox stopped and removed",
        Duration::from_secs(60),
        async || match daemon.get("/v1/instances").await {
            Ok((200, v)) if v["instances"].as_array().is_some_and(Vec::is_empty) => Some(()),
            _ => None,
        },
    )
    .await;
    let instances = setup.local_dir().join("instances");
    let left: Vec<_> = std::fs::read_dir(&instances)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "instances left in {}: {left:?}",
        instances.display()
    );
}
