//! The client subcommands: `podvisor [global flags] <command>` talks to a
//! running daemon, through the endpoint each command names, found by the
//! same global flags and environment variables the daemon reads:
//!
//! | command | endpoint |
//! | --- | --- |
//! | `instances`, `instance <id>`, `status` | admin HTTP, `--admin-addr` (`/v1/instances`, `/v1/status`) |
//! | `watch` | admin gRPC over TCP, `--grpc-addr` (`WatchInstances`) |
//! | `quarantine list\|show\|drop` | admin gRPC on the unix socket, `--grpc-socket` (operator-only RPCs) |
//! | `create`, `start`, `stop` | the Kata socket, `--socket` (`hypervisor.Hypervisor`, as Kata's shims call it) |
//!
//! Every command prints its result on stdout (`-o json` where it has one,
//! for scripts) and its errors on stderr, each saying which endpoint it
//! could not reach and how to point the client at the daemon. Exit codes:
//! 0 done, 1 the daemon refused or could not be reached, 2 a command line
//! that cannot run (clap's).

mod render;

use crate::cli::GlobalArgs;
use crate::kata_annotations as annotation;
use crate::protocols::grpc::admin::{self, admin_client::AdminClient};
use crate::protocols::ttrpc::{hypervisor, hypervisor_ttrpc::HypervisorClient};
use clap::{Arg, ArgAction, ArgMatches, Command};
use podvisor_providers::duration::parse_duration;
use podvisor_state::report;
use render::Output;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The names of the client subcommands, as [`commands`] declares them.
pub const NAMES: [&str; 8] = [
    "instances",
    "instance",
    "watch",
    "status",
    "quarantine",
    "create",
    "start",
    "stop",
];

/// How long an HTTP request to the admin endpoint may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The client subcommands, for [`crate::cli::command`].
pub fn commands() -> Vec<Command> {
    let output = |formats: &'static [&'static str]| {
        Arg::new("output")
            .short('o')
            .long("output")
            .value_name("FORMAT")
            .value_parser(clap::builder::PossibleValuesParser::new(formats))
            .default_value("table")
            .help("Output format")
    };
    let sandbox = || {
        Arg::new("sandbox")
            .value_name("SANDBOX_ID")
            .required(true)
            .help("The sandbox id (Kata's)")
    };
    let timeout = |default: &'static str| {
        Arg::new("timeout")
            .long("timeout")
            .value_name("DURATION")
            .default_value(default)
            .value_parser(parse_duration)
            .help("Longest wait for the daemon's answer")
    };
    vec![
        Command::new("instances")
            .about("List the daemon's pod VMs (admin HTTP, --admin-addr)")
            .arg(output(&["table", "wide", "json"])),
        Command::new("instance")
            .about("Show one pod VM, by sandbox id or a unique prefix of it (admin HTTP, --admin-addr)")
            .arg(Arg::new("sandbox").value_name("SANDBOX_ID").required(true).help("The sandbox id, or a unique prefix of it"))
            .arg(output(&["table", "json"])),
        Command::new("watch")
            .about("Print every durable state change of the daemon's pod VMs as it happens, after the current ones (admin gRPC, --grpc-addr); ends when the daemon shuts down")
            .arg(
                Arg::new("changes-only")
                    .long("changes-only")
                    .action(ArgAction::SetTrue)
                    .help("Do not print the current pod VMs first"),
            )
            .arg(output(&["table", "json"])),
        Command::new("status")
            .about("Show the daemon's version, node, provider, journal and instance counts (admin HTTP, --admin-addr)")
            .arg(output(&["table", "json"])),
        Command::new("quarantine")
            .about("The journal's quarantine: records the daemon could not read, kept aside; while a sandbox has one, the GC never deletes its instance (admin gRPC on the unix socket, --grpc-socket)")
            .subcommand_required(true)
            .subcommand(Command::new("list").about("List the quarantined records").arg(output(&["table", "json"])))
            .subcommand(
                Command::new("show")
                    .about("Show one quarantined record, with its stored bytes")
                    .arg(Arg::new("id").value_name("ID").required(true).help("The record's id, as `quarantine list` shows it"))
                    .arg(output(&["table", "json"])),
            )
            .subcommand(
                Command::new("drop")
                    .about("Remove a quarantined record for good; once its sandbox has none left, the GC treats that sandbox's instance as an orphan and deletes it after --gc-grace-period unless a journal record owns it")
                    .arg(Arg::new("id").value_name("ID").required(true).help("The record's id, as `quarantine list` shows it"))
                    .arg(Arg::new("yes").long("yes").short('y').action(ArgAction::SetTrue).help("Do not ask for confirmation")),
            ),
        Command::new("create")
            .about("CreateVM, as Kata's shim sends it, for a pod VM driven by hand (the Kata socket, --socket); prints the sandbox id")
            .arg(Arg::new("sandbox").value_name("SANDBOX_ID").help("The sandbox id [default: a new random one, 64 hex digits as containerd makes them]"))
            .arg(Arg::new("pod").long("pod").value_name("NAME").required(true).help("The pod's name (annotation io.kubernetes.cri.sandbox-name)"))
            .arg(Arg::new("namespace").long("namespace").short('n').value_name("NAMESPACE").default_value("default").help("The pod's namespace (annotation io.kubernetes.cri.sandbox-namespace)"))
            .arg(Arg::new("vcpus").long("vcpus").value_name("N").value_parser(clap::value_parser!(u32).range(1..)).help("vCPUs the pod VM needs (annotation io.katacontainers.config.hypervisor.default_vcpus)"))
            .arg(Arg::new("memory").long("memory").value_name("MIB").value_parser(clap::value_parser!(u32).range(1..)).help("Memory the pod VM needs, in MiB (annotation io.katacontainers.config.hypervisor.default_memory)"))
            .arg(Arg::new("initdata-file").long("initdata-file").value_name("PATH").value_parser(clap::value_parser!(PathBuf)).help("Initdata TOML for the pod VM, sent as Kata's runtime sends it (annotation io.katacontainers.config.hypervisor.cc_init_data)"))
            .arg(Arg::new("annotation").long("annotation").value_name("KEY=VALUE").action(ArgAction::Append).help("Any other annotation, as Kata would pass it (repeatable)"))
            .arg(Arg::new("netns").long("netns").value_name("PATH").help("The pod's network namespace (CreateVM's networkNamespacePath)"))
            .arg(timeout("1m")),
        Command::new("start")
            .about("StartVM: create the pod VM and wait until it is ready (the Kata socket, --socket)")
            .arg(sandbox())
            .arg(timeout("10m")),
        Command::new("stop")
            .about("StopVM: delete the pod VM (the Kata socket, --socket; a sandbox the admin endpoint, --admin-addr, does not know is refused)")
            .arg(sandbox())
            .arg(timeout("1m")),
    ]
}

/// Where the daemon is, from the global flags (or their variables).
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// `--admin-addr`.
    pub admin: SocketAddr,
    /// `--grpc-addr`.
    pub grpc: SocketAddr,
    /// `--grpc-socket`, or its default next to `--socket`.
    pub grpc_socket: PathBuf,
    /// `--socket`.
    pub kata_socket: PathBuf,
}

impl From<&GlobalArgs> for Endpoints {
    fn from(g: &GlobalArgs) -> Self {
        Self {
            admin: g.endpoints.admin_addr,
            grpc: g.endpoints.grpc_addr,
            grpc_socket: g.grpc_socket_path(),
            kata_socket: g.kata.socket.clone(),
        }
    }
}

/// Why a client command did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection to the endpoint.
    #[error(
        "cannot reach the daemon at {endpoint} ({flag}): {reason}. Is podvisor running, and given the same {flag}?"
    )]
    Unreachable {
        /// The address or socket path.
        endpoint: String,
        /// The flag and variable that name it.
        flag: &'static str,
        /// Why, as sentences.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The operator's own input cannot be used (an unreadable file, an
    /// unconfirmed drop).
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    fn unreachable_socket(path: &Path, flag: &'static str, reason: String) -> Self {
        let reason = if reason.contains("ermission denied") {
            format!(
                "{reason} (the socket is mode 0660, group --socket-group: run as root or as a member of that group)"
            )
        } else {
            reason
        };
        ClientError::Unreachable {
            endpoint: path.display().to_string(),
            flag,
            reason,
        }
    }
}

const ADMIN_FLAG: &str = "--admin-addr (PODVISOR_ADMIN_ADDR)";
const GRPC_FLAG: &str = "--grpc-addr (PODVISOR_GRPC_ADDR)";
const GRPC_SOCKET_FLAG: &str = "--grpc-socket (PODVISOR_GRPC_SOCKET)";
const KATA_FLAG: &str = "--socket (REMOTE_HYPERVISOR_ENDPOINT)";

/// Runs the client subcommand `name` (one of [`NAMES`]); prints its result,
/// or its error on stderr.
pub fn run(name: &str, matches: &ArgMatches, endpoints: &Endpoints) -> ExitCode {
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(dispatch(name, matches, endpoints)),
        Err(e) => Err(ClientError::Input(format!(
            "cannot start the client's runtime: {e}"
        ))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    name: &str,
    m: &ArgMatches,
    endpoints: &Endpoints,
) -> Result<ExitCode, ClientError> {
    let output = || output_of(m);
    let text = |name: &str| arg::<String>(m, name).unwrap_or_default();
    let timeout = || arg::<Duration>(m, "timeout").unwrap_or(Duration::from_secs(60));
    match name {
        "instances" => {
            let list = http_get(endpoints.admin, "/v1/instances").await?;
            let instances = list["instances"].as_array().cloned().unwrap_or_default();
            print(&render::instances(&instances, output(), now_millis()));
        }
        "instance" => {
            let one = instance(endpoints.admin, &text("sandbox")).await?;
            print(&render::instance(&one, output()));
        }
        "status" => {
            let status = http_get(endpoints.admin, "/v1/status").await?;
            print(&render::status(&status, output()));
        }
        "watch" => return watch(endpoints.grpc, !flag(m, "changes-only"), output()).await,
        "quarantine" => return quarantine(m, &endpoints.grpc_socket).await,
        "create" => create(m, &endpoints.kata_socket, timeout()).await?,
        "start" => {
            let id = text("sandbox");
            let hv = kata(&endpoints.kata_socket).await?;
            let req = hypervisor::StartVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            hv.start_vm(ttrpc_context(timeout()), &req)
                .await
                .map_err(|e| refused("StartVM", &e))?;
            println!(
                "Sandbox {id} is running: its pod VM answered the readiness check (with TLS, a mutual-TLS handshake with its forwarder)."
            );
        }
        "stop" => {
            let id = text("sandbox");
            known_or_unchecked(endpoints.admin, &id).await?;
            let hv = kata(&endpoints.kata_socket).await?;
            let req = hypervisor::StopVMRequest {
                id: id.clone(),
                ..Default::default()
            };
            hv.stop_vm(ttrpc_context(timeout()), &req)
                .await
                .map_err(|e| refused("StopVM", &e))?;
            println!(
                "StopVM of sandbox {id} done: its pod VM is deleted, or being deleted (`podvisor watch` shows when)."
            );
        }
        other => {
            return Err(ClientError::Input(format!(
                "'{other}' is not a client command"
            )));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to stop a sandbox the daemon does not know: StopVM answers OK
/// for one (as Kata needs), which would tell an operator who mistyped an id
/// that a pod VM was deleted. When the admin endpoint cannot be asked, the
/// stop goes ahead unchecked.
///
/// # Errors
/// [`ClientError::Refused`] when the admin endpoint answers that the
/// sandbox is not known.
async fn known_or_unchecked(admin: SocketAddr, id: &str) -> Result<(), ClientError> {
    match exact_instance(admin, id).await {
        Err(ClientError::Refused(_)) => Err(ClientError::Refused(format!(
            "no pod VM has sandbox id {id}: nothing stopped; `podvisor instances` lists them"
        ))),
        _ => Ok(()),
    }
}

/// The value of the argument `name`, if this command has it and it was
/// given (or defaulted): never clap's panic for an argument the command
/// does not declare.
fn arg<T: Clone + Send + Sync + 'static>(m: &ArgMatches, name: &str) -> Option<T> {
    m.try_get_one::<T>(name).ok().flatten().cloned()
}

/// `-o`, or a table for a command that has none.
fn output_of(m: &ArgMatches) -> Output {
    arg::<String>(m, "output").map_or(Output::Table, |o| Output::parse(&o))
}

/// Whether the flag `name` was given (`false` if the command has none).
fn flag(m: &ArgMatches, name: &str) -> bool {
    arg::<bool>(m, name).unwrap_or(false)
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// GET `path` on the admin endpoint: its JSON, or the daemon's error.
async fn http_get(addr: SocketAddr, path: &str) -> Result<Value, ClientError> {
    let url = format!("http://{addr}{path}");
    let answer = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .build()
            .into();
        let mut resp = agent.get(&url).call().map_err(|e| match e {
            // ureq shows these as `io: …`.
            ureq::Error::Io(io) => io.to_string(),
            other => report(&other),
        })?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().map_err(|e| report(&e));
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|e| ClientError::Input(format!("the HTTP request did not finish: {e}")))?;
    let unreachable = |reason| ClientError::Unreachable {
        endpoint: addr.to_string(),
        flag: ADMIN_FLAG,
        reason,
    };
    let (status, body) = answer.map_err(unreachable)?;
    let body = body.map_err(unreachable)?;
    let json: Value = serde_json::from_str(&body).map_err(|e| {
        ClientError::Refused(format!(
            "the admin endpoint at {addr} answered {status} with something that is not JSON ({e}): is {ADMIN_FLAG} podvisor's?"
        ))
    })?;
    if status == 200 {
        Ok(json)
    } else {
        let why = json["error"].as_str().unwrap_or("no reason given");
        Err(ClientError::Refused(format!(
            "the daemon answered {status}: {why}"
        )))
    }
}

/// `/v1/instances/{id}`: the instance's JSON; [`ClientError::Refused`]
/// when the daemon does not know it.
async fn exact_instance(admin: SocketAddr, id: &str) -> Result<Value, ClientError> {
    if id.is_empty() {
        return Err(ClientError::Input("the sandbox id is empty".to_owned()));
    }
    http_get(admin, &format!("/v1/instances/{}", path_segment(id))).await
}

/// One instance's JSON, by sandbox id or a unique prefix of it.
async fn instance(admin: SocketAddr, id: &str) -> Result<Value, ClientError> {
    let exact = exact_instance(admin, id).await;
    let Err(ClientError::Refused(_)) = exact else {
        return exact;
    };
    let list = http_get(admin, "/v1/instances").await?;
    let matching: Vec<Value> = list["instances"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|i| i["sandbox_id"].as_str().is_some_and(|s| s.starts_with(id)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    match matching.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ClientError::Refused(format!(
            "no pod VM has sandbox id {id} (or an id starting with it); `podvisor instances` lists them"
        ))),
        many => Err(ClientError::Input(format!(
            "{id} is the start of {} sandbox ids ({}): give more of it",
            many.len(),
            many.iter()
                .filter_map(|i| i["sandbox_id"].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `text` as one URL path segment: every byte but the unreserved ones
/// (RFC 3986 §2.3) percent-encoded.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The admin service over TCP.
async fn admin_tcp(
    addr: SocketAddr,
) -> Result<AdminClient<tonic::transport::Channel>, ClientError> {
    AdminClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| ClientError::Unreachable {
            endpoint: addr.to_string(),
            flag: GRPC_FLAG,
            reason: report(&e),
        })
}

/// The admin service on the unix socket.
async fn admin_unix(path: &Path) -> Result<AdminClient<tonic::transport::Channel>, ClientError> {
    socket_present(path, GRPC_SOCKET_FLAG)?;
    AdminClient::connect(format!("unix://{}", path.display()))
        .await
        .map_err(|e| ClientError::unreachable_socket(path, GRPC_SOCKET_FLAG, report(&e)))
}

/// A gRPC error status as the daemon's refusal.
fn status_error(call: &str, s: &tonic::Status) -> ClientError {
    ClientError::Refused(format!("{call} refused ({:?}): {}", s.code(), s.message()))
}

async fn watch(
    addr: SocketAddr,
    include_existing: bool,
    output: Output,
) -> Result<ExitCode, ClientError> {
    let mut admin = admin_tcp(addr).await?;
    let mut stream = admin
        .watch_instances(admin::WatchInstancesRequest { include_existing })
        .await
        .map_err(|s| status_error("WatchInstances", &s))?
        .into_inner();
    if output == Output::Table {
        print(&render::watch_header());
    }
    loop {
        match stream.message().await {
            Ok(Some(event)) => print(&render::watch_event(&event, output)),
            Ok(None) => {
                eprintln!("The daemon ended the watch (it is shutting down).");
                return Ok(ExitCode::SUCCESS);
            }
            Err(s) => return Err(status_error("WatchInstances", &s)),
        }
    }
}

async fn quarantine(m: &ArgMatches, socket: &Path) -> Result<ExitCode, ClientError> {
    let Some((action, args)) = m.subcommand() else {
        return Err(ClientError::Input(
            "name what to do: quarantine list, show <id> or drop <id>".to_owned(),
        ));
    };
    let output = output_of(args);
    let id = arg::<String>(args, "id").unwrap_or_default();
    let mut admin = admin_unix(socket).await?;
    let records = admin
        .list_quarantined(admin::ListQuarantinedRequest {})
        .await
        .map_err(|s| status_error("ListQuarantined", &s))?
        .into_inner()
        .records;
    let now = now_millis();
    if action == "list" {
        print(&render::quarantine_list(&records, output, now));
        return Ok(ExitCode::SUCCESS);
    }
    let Some(record) = records.iter().find(|r| r.id == id) else {
        return Err(ClientError::Refused(format!(
            "no quarantined record has the id {id}; `podvisor quarantine list` shows the ids"
        )));
    };
    if action == "show" {
        print(&render::quarantine_show(record, output, now));
        return Ok(ExitCode::SUCCESS);
    }
    let others = records
        .iter()
        .any(|r| r.key == record.key && r.id != record.id);
    let consequence = gc_after_drop(&record.key, others);
    if !flag(args, "yes") {
        eprint!(
            "Drop quarantined record {id} (sandbox {}, {} bytes, {})? It is removed for good. After the drop: {consequence}\nType 'yes' to drop it: ",
            record.key,
            record.bytes.len(),
            record.reason
        );
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "yes" | "y") {
            return Err(ClientError::Input(
                "nothing dropped (not confirmed; --yes skips the question)".to_owned(),
            ));
        }
    }
    let dropped = admin
        .drop_quarantined(admin::DropQuarantinedRequest { id: id.clone() })
        .await
        .map_err(|s| status_error("DropQuarantined", &s))?
        .into_inner();
    let key = dropped.record.map(|r| r.key).unwrap_or(record.key.clone());
    let after = gc_after_drop(&key, dropped.sandbox_still_quarantined);
    println!("Dropped quarantined record {id}. {after}");
    Ok(ExitCode::SUCCESS)
}

/// What the GC does about sandbox `key`'s instance once a drop leaves the
/// sandbox with (`still_quarantined`) or without records in the quarantine.
fn gc_after_drop(key: &str, still_quarantined: bool) -> String {
    if still_quarantined {
        format!(
            "Sandbox {key} still has records in the quarantine: the GC still spares its instance."
        )
    } else {
        format!(
            "Sandbox {key} has no record left in the quarantine: the GC treats its instance as an orphan and deletes it after --gc-grace-period, unless a journal record owns it."
        )
    }
}

/// That the control socket `path` (named by `flag`) exists: a missing or
/// unreadable one says so plainly, before the client library's own words
/// ("transport error").
fn socket_present(path: &Path, flag: &'static str) -> Result<(), ClientError> {
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| ClientError::unreachable_socket(path, flag, e.to_string()))
}

/// The Kata socket's `hypervisor.Hypervisor`.
async fn kata(socket: &Path) -> Result<HypervisorClient, ClientError> {
    socket_present(socket, KATA_FLAG)?;
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| ClientError::unreachable_socket(socket, KATA_FLAG, ttrpc_text(&e)))?;
    Ok(HypervisorClient::new(client))
}

fn ttrpc_context(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

fn ttrpc_text(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
        other => other.to_string(),
    }
}

fn refused(call: &str, e: &ttrpc::Error) -> ClientError {
    ClientError::Refused(format!("{call} refused: {}", ttrpc_text(e)))
}

/// A new sandbox id: 64 hex digits, as containerd makes them.
fn new_sandbox_id() -> String {
    (0..4)
        .map(|_| format!("{:016x}", fastrand::u64(..)))
        .collect()
}

/// CreateVM's annotations, as Kata's runtime sends them, from the
/// command's flags.
///
/// # Errors
/// [`ClientError::Input`] when the initdata file cannot be read or is not
/// UTF-8, or an `--annotation` has no `=`.
fn create_annotations(m: &ArgMatches) -> Result<HashMap<String, String>, ClientError> {
    let mut annotations = HashMap::new();
    for extra in m
        .try_get_many::<String>("annotation")
        .ok()
        .flatten()
        .into_iter()
        .flatten()
    {
        let Some((key, value)) = extra.split_once('=') else {
            return Err(ClientError::Input(format!(
                "--annotation {extra}: write it KEY=VALUE"
            )));
        };
        annotations.insert(key.to_owned(), value.to_owned());
    }
    let text = |name: &str| arg::<String>(m, name).unwrap_or_default();
    annotations.insert(annotation::SANDBOX_NAME.to_owned(), text("pod"));
    annotations.insert(annotation::SANDBOX_NAMESPACE.to_owned(), text("namespace"));
    if let Some(vcpus) = arg::<u32>(m, "vcpus") {
        annotations.insert(annotation::DEFAULT_VCPUS.to_owned(), vcpus.to_string());
    }
    if let Some(memory) = arg::<u32>(m, "memory") {
        annotations.insert(annotation::DEFAULT_MEMORY.to_owned(), memory.to_string());
    }
    if let Some(path) = arg::<PathBuf>(m, "initdata-file") {
        let bytes = std::fs::read(&path)
            .map_err(|e| ClientError::Input(format!("--initdata-file {}: {e}", path.display())))?;
        let toml = String::from_utf8(bytes).map_err(|_| {
            ClientError::Input(format!(
                "--initdata-file {}: not UTF-8 text (initdata is TOML)",
                path.display()
            ))
        })?;
        annotations.insert(annotation::CC_INIT_DATA.to_owned(), toml);
    }
    Ok(annotations)
}

async fn create(m: &ArgMatches, socket: &Path, timeout: Duration) -> Result<(), ClientError> {
    let annotations = create_annotations(m)?;
    let id = arg::<String>(m, "sandbox").unwrap_or_else(new_sandbox_id);
    let hv = kata(socket).await?;
    let req = hypervisor::CreateVMRequest {
        id: id.clone(),
        annotations,
        networkNamespacePath: arg::<String>(m, "netns").unwrap_or_default(),
        ..Default::default()
    };
    let answer = hv
        .create_vm(ttrpc_context(timeout), &req)
        .await
        .map_err(|e| refused("CreateVM", &e))?;
    eprintln!(
        "CreateVM done: Kata's agent socket is {}; `podvisor start {id}` creates the pod VM.",
        answer.agentSocketPath
    );
    println!("{id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(args: &[&str]) -> ArgMatches {
        let cmd = Command::new("podvisor").subcommands(commands());
        let m = cmd
            .try_get_matches_from(std::iter::once("podvisor").chain(args.iter().copied()))
            .unwrap();
        m.subcommand().unwrap().1.clone()
    }

    #[test]
    fn create_sends_the_annotations_kata_s_runtime_sends() {
        let dir = tempfile::tempdir().unwrap();
        let initdata = dir.path().join("initdata.toml");
        std::fs::write(&initdata, "version = \"0.1.0\"\nalgorithm = \"sha256\"\n").unwrap();
        let m = matches(&[
            "create",
            "--pod",
            "web",
            "--namespace",
            "shop",
            "--vcpus",
            "2",
            "--memory",
            "4096",
            "--initdata-file",
            initdata.to_str().unwrap(),
            "--annotation",
            "io.katacontainers.config.hypervisor.machine_type=t3.small",
        ]);
        let a = create_annotations(&m).unwrap();
        let expected = HashMap::from([
            ("io.kubernetes.cri.sandbox-name", "web"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
            ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
            ("io.katacontainers.config.hypervisor.default_memory", "4096"),
            (
                "io.katacontainers.config.hypervisor.cc_init_data",
                "version = \"0.1.0\"\nalgorithm = \"sha256\"\n",
            ),
            (
                "io.katacontainers.config.hypervisor.machine_type",
                "t3.small",
            ),
        ]);
        let expected: HashMap<String, String> = expected
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(a, expected);
    }

    #[test]
    fn create_s_namespace_defaults_to_default_and_its_input_errors_are_clear() {
        let a = create_annotations(&matches(&["create", "--pod", "web"])).unwrap();
        assert_eq!(a["io.kubernetes.cri.sandbox-namespace"], "default");
        assert_eq!(a.len(), 2);
        let e = create_annotations(&matches(&[
            "create",
            "--pod",
            "w",
            "--annotation",
            "novalue",
        ]))
        .unwrap_err();
        assert_eq!(e.to_string(), "--annotation novalue: write it KEY=VALUE");
        let e = create_annotations(&matches(&[
            "create",
            "--pod",
            "w",
            "--initdata-file",
            "/nonexistent/initdata.toml",
        ]))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--initdata-file /nonexistent/initdata.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_new_sandbox_id_is_64_hex_digits() {
        let id = new_sandbox_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_ne!(id, new_sandbox_id());
    }

    #[test]
    fn a_path_segment_cannot_leave_the_instances_path() {
        assert_eq!(path_segment("3f2a-9c_1.b~"), "3f2a-9c_1.b~");
        assert_eq!(path_segment("../status"), "..%2Fstatus");
        assert_eq!(path_segment("a?b#c d"), "a%3Fb%23c%20d");
    }
}
