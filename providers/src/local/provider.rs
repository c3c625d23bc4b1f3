//! The local provider's `Provider` implementation.
//!
//! Layout under the local directory:
//! `instances/<id>/instance.json` (what a cloud's API would report),
//! `instances/<id>/user-data` and `instances/<id>/forwarder.log`.
//! The instance id is derived from the idempotency token, and the directory
//! is created with an atomic `mkdir`, so a second create with the same token
//! finds the first instance instead of making another.

use super::config::AddressRange;
use super::vm_network::{POD_NETNS_FILE, VmNetwork};
use crate::error::ProviderError;
use crate::provider::{CreateRequest, Instance, InstanceStatus, Provider};
use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podvisor_state::{UnixMillis, now_millis};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a new forwarder gets to bind its address.
const SPAWN_GRACE: Duration = Duration::from_secs(10);
/// Addresses tried when a forwarder cannot bind (someone else holds it).
const ADDRESS_TRIES: u32 = 3;
/// Seconds a forwarder's connection waits for the agent socket. A pod VM's
/// forwarder waits longer (its agent may still be booting); a local
/// instance has no boot, so an absent socket is a missing agent, and the
/// call fails at once instead of waiting out the shim's deadline.
const AGENT_WAIT_SECS: u64 = 1;

/// What `instance.json` holds: the "cloud's" view of one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceFile {
    id: String,
    name: String,
    token: String,
    tags: BTreeMap<String, String>,
    ip: Ipv4Addr,
    port: u16,
    pid: Option<u32>,
    created_at: UnixMillis,
}

/// Pod VMs as local forwarder processes.
#[derive(Debug)]
pub struct LocalProvider {
    /// The local directory; instances live in `instances/` under it.
    dir: PathBuf,
    /// The forwarder binary each instance runs.
    forwarder: PathBuf,
    /// The port every forwarder listens on, each on its own address.
    port: u16,
    /// What each forwarder relays to.
    agent_socket: PathBuf,
    /// Where instance addresses come from.
    range: AddressRange,
    /// Simulated create latency.
    create_delay: Duration,
    /// Simulated delete latency.
    delete_delay: Duration,
    /// Simulated latency of lookups and listings.
    lookup_delay: Duration,
    /// Serializes address allocation so concurrent creates never share one.
    allocation: Mutex<()>,
    /// `--netns-per-vm`: each instance in its own network namespace on
    /// this "cloud" network, instead of on a loopback address.
    vm_network: Option<VmNetwork>,
}

/// The instance id the local provider gives the instance of `token`.
pub fn instance_id_for_token(token: &str) -> String {
    format!(
        "lvm-{}",
        &hex::encode(Sha256::digest(token.as_bytes()))[..16]
    )
}

fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("lvm-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A failed file or process call of the local "cloud": transient, with the
/// OS error's name as the code.
fn io_error(what: impl std::fmt::Display, e: &io::Error) -> ProviderError {
    with_os_code(ProviderError::transient(format!("{what}: {e}")), e)
}

/// `error`, carrying the name of the OS error behind `cause` (`ENOENT`,
/// `EACCES`) as its code, the local provider's equivalent of a cloud's
/// error code; unchanged when no OS call failed.
fn with_os_code(error: ProviderError, cause: &io::Error) -> ProviderError {
    match cause.raw_os_error() {
        Some(raw) => error.with_code(format!("{:?}", nix::errno::Errno::from_raw(raw))),
        None => error,
    }
}

impl LocalProvider {
    /// A provider keeping its instances under `dir`, running `forwarder`
    /// on `port`.
    ///
    /// # Errors
    /// The I/O error when `<dir>/instances` cannot be created.
    pub fn new(dir: PathBuf, forwarder: PathBuf, port: u16) -> io::Result<Self> {
        {
            // Instances' user data holds pods' initdata: owner only.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join("instances"))?;
        }
        Ok(Self {
            dir,
            forwarder,
            port,
            agent_socket: PathBuf::from("/run/kata-containers/agent.sock"),
            range: "127.64.0.0/10".parse().expect("the default range is valid"),
            create_delay: Duration::ZERO,
            delete_delay: Duration::ZERO,
            lookup_delay: Duration::ZERO,
            allocation: Mutex::new(()),
            vm_network: None,
        })
    }

    /// Sets the agent socket the forwarders relay to.
    pub fn with_agent_socket(mut self, path: PathBuf) -> Self {
        self.agent_socket = path;
        self
    }

    /// Sets the address range.
    pub fn with_address_range(mut self, range: AddressRange) -> Self {
        self.range = range;
        self
    }

    /// Sets simulated cloud latencies.
    pub fn with_delays(mut self, create: Duration, delete: Duration) -> Self {
        self.create_delay = create;
        self.delete_delay = delete;
        self
    }

    /// Sets the simulated latency of lookups and listings.
    pub fn with_lookup_delay(mut self, lookup: Duration) -> Self {
        self.lookup_delay = lookup;
        self
    }

    /// Runs every instance in a network namespace of its own, plugged into
    /// `network`'s bridge, with addresses from its subnet.
    pub fn with_vm_network(mut self, network: VmNetwork) -> Self {
        self.vm_network = Some(network);
        self
    }

    fn instances_dir(&self) -> PathBuf {
        self.dir.join("instances")
    }

    /// Every instance file, read off the thread pool.
    async fn load_all(&self) -> Result<Vec<InstanceFile>, ProviderError> {
        let dir = self.instances_dir();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(io_error(format!("Cannot list {}", dir.display()), &e)),
            };
            for entry in entries.flatten() {
                // A directory without a readable instance.json is a create in
                // progress (or torn by a crash): not an instance yet.
                if let Ok(bytes) = std::fs::read(entry.path().join("instance.json"))
                    && let Ok(file) = serde_json::from_slice::<InstanceFile>(&bytes)
                {
                    out.push(file);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| ProviderError::transient(format!("Instance scan panicked: {e}")))?
    }

    async fn read_instance(&self, id: &str) -> Result<Option<InstanceFile>, ProviderError> {
        let path = self.instances_dir().join(id).join("instance.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ProviderError::permanent(format!("{} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(format!("Cannot read {}", path.display()), &e)),
        }
    }

    async fn write_instance(&self, file: &InstanceFile) -> Result<(), ProviderError> {
        let path = self.instances_dir().join(&file.id).join("instance.json");
        let bytes = serde_json::to_vec_pretty(file).expect("an InstanceFile always serializes");
        let target = path.clone();
        tokio::task::spawn_blocking(move || podvisor_state::write_atomically(&target, &bytes, None))
            .await
            .map_err(|e| ProviderError::transient(format!("Instance write panicked: {e}")))?
            .map_err(|e| io_error(format!("Cannot write {}", path.display()), &e))
    }

    fn to_instance(file: &InstanceFile) -> Instance {
        let status = match file.pid {
            Some(pid) if process_alive(pid) => InstanceStatus::Running,
            // Not running, and nothing will start it but a create with its
            // token: a process that died, or a create torn before launch.
            Some(_) | None => InstanceStatus::Stopped,
        };
        Instance {
            id: file.id.clone(),
            name: file.name.clone(),
            ips: vec![IpAddr::V4(file.ip)],
            tags: file.tags.clone(),
            created_at: Some(file.created_at),
            status,
        }
    }

    /// Picks a free address: first the token's own, then the next free ones.
    fn pick_address(
        &self,
        token: &str,
        used: &BTreeSet<Ipv4Addr>,
        skip: &BTreeSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let digest = Sha256::digest(token.as_bytes());
        let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let (usable, nth): (u32, &dyn Fn(u32) -> Ipv4Addr) = match &self.vm_network {
            Some(net) => (net.usable(), &|n| net.nth(n)),
            None => (self.range.usable(), &|n| self.range.nth(n)),
        };
        (0..usable.min(1 << 16))
            .map(|i| nth(start.wrapping_add(i)))
            .find(|ip| !used.contains(ip) && !skip.contains(ip))
    }

    /// Provisions the instance from its user data, as a pod VM does at
    /// boot (`podvisor-userdata`, with the instance directory as its root),
    /// then starts the forwarder and waits until it listens.
    async fn launch(&self, file: &mut InstanceFile) -> Result<(), ProviderError> {
        let dir = self.instances_dir().join(&file.id);
        let user_data = dir.join("user-data");
        let text = tokio::fs::read_to_string(&user_data)
            .await
            .map_err(|e| io_error(format!("Cannot read {}", user_data.display()), &e))?;
        let root = dir.clone();
        tokio::task::spawn_blocking(move || {
            let files = podvisor_podvm::userdata::parse(&text)?;
            podvisor_podvm::userdata::apply(&files, &root)
        })
        .await
        .map_err(|e| ProviderError::transient(format!("provisioning task: {e}")))?
        .map_err(|e| ProviderError::permanent(format!("Instance {}: {e}", file.id)))?;
        let settings = dir
            .join(podvisor_podvm::userdata::PEERPOD_DIR)
            .join("apf.json");
        let log_path = dir.join("forwarder.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| io_error(format!("Cannot create {}", log_path.display()), &e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| io_error(format!("Cannot open {}", log_path.display()), &e))?;
        let listen = SocketAddr::new(IpAddr::V4(file.ip), file.port);
        // A launch torn by a crash may have left this instance's forwarder
        // running with its pid unrecorded: never start a second one beside
        // it (it could not bind, and the first would answer for it).
        for pid in instance_processes(&file.id) {
            stop_process(pid, &file.id).await?;
        }
        let mut command = tokio::process::Command::new(&self.forwarder);
        command
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--agent-socket")
            .arg(&self.agent_socket)
            .arg("--agent-wait-secs")
            .arg(AGENT_WAIT_SECS.to_string())
            .arg("--instance-id")
            .arg(&file.id)
            .arg("--config")
            .arg(&settings)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: signals meant for the daemon's group
            // (a terminal's Ctrl-C) do not reach the "VM".
            .process_group(0)
            .kill_on_drop(false);
        let spawned = match &self.vm_network {
            None => command.spawn(),
            Some(net) => {
                // The pod VM side of the pod network builds the pod's
                // namespace here (bind-mounted), as a VM's /run/netns/podns.
                command.arg("--pod-netns").arg(dir.join(POD_NETNS_FILE));
                // What an earlier launch of this instance left: its pod
                // namespace's mount, its veth.
                net.destroy(&file.id, &dir).await?;
                let vm = net.create(&file.id, file.ip).await?;
                // Started from a thread inside the instance's namespace, the
                // forwarder runs there (a child inherits its creator
                // thread's namespaces); tokio's reaper needs its runtime.
                let runtime = tokio::runtime::Handle::current();
                vm.run(move || {
                    let _entered = runtime.enter();
                    command.spawn()
                })
                .map_err(|e| {
                    ProviderError::transient(format!(
                        "Cannot start the forwarder of {} in its namespace: {e}",
                        file.id
                    ))
                })?
            }
        };
        let mut child = spawned.map_err(|e| {
            with_os_code(
                ProviderError::permanent(format!("Cannot run {}: {e}", self.forwarder.display())),
                &e,
            )
        })?;
        file.pid = child.id();
        self.write_instance(file).await?;

        let deadline = Instant::now() + SPAWN_GRACE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = tail_of(&log_path);
                return Err(ProviderError::transient(format!(
                    "The forwarder of {} exited ({status}) before listening on {listen}: {tail}",
                    file.id
                )));
            }
            let probe = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(listen),
            );
            if let Ok(Ok(_)) = probe.await {
                // The answer must come from this child, still running.
                if let Ok(None) = child.try_wait() {
                    // Dropping the handle leaves the process running; tokio
                    // reaps it when it exits while this daemon lives.
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::transient(format!(
                    "The forwarder of {} did not listen on {listen} within {}s",
                    file.id,
                    SPAWN_GRACE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops an instance's processes — the recorded one and any whose
    /// launch a crash tore before its pid was recorded — and removes its
    /// directory.
    async fn destroy(&self, file: &InstanceFile) -> Result<(), ProviderError> {
        for pid in file.pid.into_iter().chain(instance_processes(&file.id)) {
            stop_process(pid, &file.id).await?;
        }
        let dir = self.instances_dir().join(&file.id);
        if let Some(net) = &self.vm_network {
            net.destroy(&file.id, &dir).await?;
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(format!("Cannot remove {}", dir.display()), &e)),
        }
    }
}

/// The last lines of a log, for error messages.
fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    if lines.is_empty() {
        "no output".into()
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// True if `pid` runs and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The live forwarder processes of instance `id`, found by their command
/// line (`--instance-id <id>`), whatever instance.json recorded.
fn instance_processes(id: &str) -> Vec<u32> {
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--instance-id" && w[1] == id.as_bytes())
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Kills the forwarder of instance `id`, if `pid` still is that forwarder.
async fn stop_process(pid: u32, id: &str) -> Result<(), ProviderError> {
    // The pid may have been reused since: only kill what runs this instance.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = cmdline.split(|b| *b == 0).any(|arg| arg == id.as_bytes());
    if !ours || !process_alive(pid) {
        return Ok(());
    }
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(());
    };
    match kill(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            return Err(ProviderError::transient(format!(
                "Cannot stop process {pid} of {id}: {e}"
            ))
            .with_code(format!("{e:?}")));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return Err(ProviderError::transient(format!(
                "Process {pid} of {id} survived SIGKILL"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    /// Only with `--netns-per-vm`: otherwise an instance is a process on a
    /// loopback address, with no network to join a pod's to.
    fn pod_network(&self) -> bool {
        self.vm_network.is_some()
    }

    async fn create_instance(&self, request: &CreateRequest) -> Result<Instance, ProviderError> {
        if request.token.is_empty() {
            return Err(ProviderError::permanent(
                "A create needs an idempotency token",
            ));
        }
        tokio::time::sleep(self.create_delay).await;
        let id = instance_id_for_token(&request.token);
        let dir = self.instances_dir().join(&id);

        // The instance this token made, if a create got that far. (The
        // daemon never runs two creates of one token at once.)
        if let Some(mut existing) = self.read_instance(&id).await? {
            if existing.token != request.token {
                return Err(ProviderError::permanent(format!(
                    "Instance {id} belongs to another token"
                )));
            }
            if !existing.pid.is_some_and(process_alive) {
                // A create torn by a crash after instance.json, or a VM
                // that died: start it again, on its own address.
                self.launch(&mut existing).await?;
            }
            return Ok(Self::to_instance(&existing));
        }

        let mut skip = BTreeSet::new();
        for _ in 0..ADDRESS_TRIES {
            let mut file = {
                let _allocating = self.allocation.lock().await;
                match tokio::fs::create_dir(&dir).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if let Some(existing) = self.read_instance(&id).await? {
                            if existing.token != request.token {
                                return Err(ProviderError::permanent(format!(
                                    "Instance {id} belongs to another token"
                                )));
                            }
                            // The same token: this is the instance it made.
                            return Ok(Self::to_instance(&existing));
                        }
                        // A create torn by a crash before instance.json: finish it.
                    }
                    Err(e) => return Err(io_error(format!("Cannot create {}", dir.display()), &e)),
                }
                let used: BTreeSet<Ipv4Addr> =
                    self.load_all().await?.iter().map(|f| f.ip).collect();
                let Some(ip) = self.pick_address(&request.token, &used, &skip) else {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    return Err(ProviderError::transient(
                        "No free address in the local range",
                    ));
                };
                let user_data = dir.join("user-data");
                tokio::fs::write(&user_data, &request.user_data)
                    .await
                    .map_err(|e| io_error(format!("Cannot write {}", user_data.display()), &e))?;
                let file = InstanceFile {
                    id: id.clone(),
                    name: request.instance_name.clone(),
                    token: request.token.clone(),
                    tags: request.tags.clone(),
                    ip,
                    port: self.port,
                    pid: None,
                    created_at: now_millis(),
                };
                // Written before the process starts, so the address is taken.
                self.write_instance(&file).await?;
                file
            };
            match self.launch(&mut file).await {
                Ok(()) => return Ok(Self::to_instance(&file)),
                Err(e) => {
                    tracing::warn!(instance = %id, ip = %file.ip, error = %e, "local instance did not start; trying another address");
                    skip.insert(file.ip);
                    self.destroy(&file).await?;
                    if skip.len() as u32 == ADDRESS_TRIES {
                        return Err(e);
                    }
                }
            }
        }
        Err(ProviderError::transient(format!(
            "Instance {id} could not start"
        )))
    }

    async fn delete_instance(&self, instance_id: &str) -> Result<(), ProviderError> {
        tokio::time::sleep(self.delete_delay).await;
        if !is_instance_id(instance_id) {
            // No such id can exist here (and it must never become a path).
            return Ok(());
        }
        match self.read_instance(instance_id).await {
            Ok(Some(file)) => self.destroy(&file).await,
            Ok(None) => {
                // No instance.json: a torn create, or already gone.
                let dir = self.instances_dir().join(instance_id);
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_error(format!("Cannot remove {}", dir.display()), &e)),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn find_instance(
        &self,
        token: &str,
        _name: &str,
    ) -> Result<Option<Instance>, ProviderError> {
        if !self.lookup_delay.is_zero() {
            tokio::time::sleep(self.lookup_delay).await;
        }
        if token.is_empty() {
            return Ok(None);
        }
        let id = instance_id_for_token(token);
        Ok(self
            .read_instance(&id)
            .await?
            .filter(|f| f.token == token)
            .map(|f| Self::to_instance(&f)))
    }

    async fn list_instances(&self, key: &str, value: &str) -> Result<Vec<Instance>, ProviderError> {
        if !self.lookup_delay.is_zero() {
            tokio::time::sleep(self.lookup_delay).await;
        }
        Ok(self
            .load_all()
            .await?
            .iter()
            .filter(|f| f.tags.get(key).map(String::as_str) == Some(value))
            .map(Self::to_instance)
            .collect())
    }

    async fn verify_config(&self) -> Result<(), ProviderError> {
        let meta = std::fs::metadata(&self.forwarder).map_err(|e| {
            with_os_code(
                ProviderError::config(format!("Forwarder {}: {e}", self.forwarder.display())),
                &e,
            )
        })?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(ProviderError::config(format!(
                "Forwarder {} is not an executable file",
                self.forwarder.display()
            )));
        }
        let probe = self.dir.join(".write-test");
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                with_os_code(
                    ProviderError::config(format!(
                        "Local dir {} is not writable: {e}",
                        self.dir.display()
                    )),
                    &e,
                )
            })
    }

    async fn teardown(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_derived_from_tokens_and_validated() {
        let id = instance_id_for_token("pv-abc-g1");
        assert!(is_instance_id(&id), "{id}");
        assert_eq!(id, instance_id_for_token("pv-abc-g1"));
        assert_ne!(id, instance_id_for_token("pv-abc-g2"));
        for bad in [
            "",
            "lvm-",
            "lvm-../../etc/xx",
            "i-0123456789abcdef",
            "lvm-0123456789abcdeg",
        ] {
            assert!(!is_instance_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_process_check_sees_this_process_and_not_a_dead_pid() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }
}
