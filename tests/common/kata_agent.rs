//! A fake kata agent that speaks the real agent protocol: ttrpc with Kata's
//! own `grpc.AgentService` and `grpc.Health` (generated from
//! `proto/kata/`), serving on a unix socket as the agent in a pod VM does.
//!
//! Its behaviour is real where the tests look: the processes a container
//! and its execs run are real host processes (the OCI process's `Args`,
//! `Env`, `Cwd`; no namespaces), so `ReadStdout` returns the bytes a real
//! program wrote, `WriteStdin` feeds a real program, and `WaitProcess`
//! returns its real exit status. Like Kata's agent: one sandbox per agent,
//! created first; the init process of a container is the one with an empty
//! exec id; a read at the end of the output returns no data.
//!
//! Methods it does not serve answer with ttrpc's own `NOT_FOUND`, as an
//! agent without them would.

#![allow(dead_code)]

use async_trait::async_trait;
use podvisor::protocols::ttrpc::kata::{agent, agent_ttrpc, health, health_ttrpc, oci};
use protobuf::well_known_types::empty::Empty;
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};
use ttrpc::r#async::TtrpcContext;

/// One process: a real child with its pipes.
struct Proc {
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    stdout: tokio::sync::Mutex<Option<ChildStdout>>,
    child: tokio::sync::Mutex<Child>,
    /// Its exit status, once reaped.
    status: tokio::sync::OnceCell<i32>,
}

/// One container: its spec as CreateContainer gave it, and its processes
/// (the init process under exec id "").
struct Container {
    spec: oci::Spec,
    processes: HashMap<String, Arc<Proc>>,
}

#[derive(Default)]
struct State {
    sandbox: Option<agent::CreateSandboxRequest>,
    containers: HashMap<String, Container>,
}

/// The fake agent's state, shared by its server and the test.
#[derive(Clone, Default)]
pub struct FakeAgent {
    state: Arc<Mutex<State>>,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

fn err(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// Kata's answer for a container it does not have.
fn no_container(id: &str) -> ttrpc::Error {
    err(ttrpc::Code::NOT_FOUND, format!("container {id} not found"))
}

impl FakeAgent {
    /// Serves `grpc.AgentService` and `grpc.Health` on the unix socket at
    /// `socket`.
    pub async fn serve(&self, socket: &Path) -> ttrpc::r#async::Server {
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .expect("bind the fake agent's socket")
            .register_service(agent_ttrpc::create_agent_service(Arc::new(self.clone())))
            .register_service(health_ttrpc::create_health(Arc::new(self.clone())));
        server.start().await.expect("start the fake agent");
        server
    }

    /// The spec annotations of container `id`, as the agent received them.
    pub fn annotations(&self, id: &str) -> Option<HashMap<String, String>> {
        let state = self.state.lock().expect("agent state");
        state
            .containers
            .get(id)
            .map(|c| c.spec.Annotations.clone().into_iter().collect())
    }

    /// The methods called so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("agent calls").clone()
    }

    fn called(&self, method: &'static str) {
        self.calls.lock().expect("agent calls").push(method);
    }

    fn process(&self, container: &str, exec: &str) -> ttrpc::Result<Arc<Proc>> {
        let state = self.state.lock().expect("agent state");
        let c = state
            .containers
            .get(container)
            .ok_or_else(|| no_container(container))?;
        c.processes.get(exec).cloned().ok_or_else(|| {
            err(
                ttrpc::Code::NOT_FOUND,
                format!("process {exec:?} of container {container} not found"),
            )
        })
    }

    fn spawn(process: &oci::Process) -> ttrpc::Result<Arc<Proc>> {
        let Some((program, args)) = process.Args.split_first() else {
            return Err(err(
                ttrpc::Code::INVALID_ARGUMENT,
                "the process has no Args",
            ));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for kv in &process.Env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        if !process.Cwd.is_empty() {
            cmd.current_dir(&process.Cwd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(ttrpc::Code::INTERNAL, format!("cannot run {program}: {e}")))?;
        Ok(Arc::new(Proc {
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            stdout: tokio::sync::Mutex::new(child.stdout.take()),
            child: tokio::sync::Mutex::new(child),
            status: tokio::sync::OnceCell::new(),
        }))
    }
}

#[async_trait]
impl agent_ttrpc::AgentService for FakeAgent {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: agent::CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("CreateSandbox");
        let mut state = self.state.lock().expect("agent state");
        if state.sandbox.is_some() {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                "the sandbox exists already",
            ));
        }
        state.sandbox = Some(req);
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("CreateContainer");
        let mut state = self.state.lock().expect("agent state");
        if state.sandbox.is_none() {
            return Err(err(ttrpc::Code::FAILED_PRECONDITION, "CreateSandbox first"));
        }
        if req.container_id.is_empty() {
            return Err(err(ttrpc::Code::INVALID_ARGUMENT, "empty container id"));
        }
        if state.containers.contains_key(&req.container_id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} exists already", req.container_id),
            ));
        }
        let Some(spec) = req.OCI.into_option() else {
            return Err(err(ttrpc::Code::INVALID_ARGUMENT, "no OCI spec"));
        };
        state.containers.insert(
            req.container_id,
            Container {
                spec,
                processes: HashMap::new(),
            },
        );
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("StartContainer");
        let mut state = self.state.lock().expect("agent state");
        let c = state
            .containers
            .get_mut(&req.container_id)
            .ok_or_else(|| no_container(&req.container_id))?;
        if c.processes.contains_key("") {
            return Err(err(ttrpc::Code::FAILED_PRECONDITION, "started already"));
        }
        let init = Self::spawn(&c.spec.Process)?;
        c.processes.insert(String::new(), init);
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("ExecProcess");
        if req.exec_id.is_empty() {
            return Err(err(ttrpc::Code::INVALID_ARGUMENT, "empty exec id"));
        }
        let mut state = self.state.lock().expect("agent state");
        let c = state
            .containers
            .get_mut(&req.container_id)
            .ok_or_else(|| no_container(&req.container_id))?;
        if c.processes.contains_key(&req.exec_id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} exists already", req.exec_id),
            ));
        }
        let p = Self::spawn(&req.process)?;
        c.processes.insert(req.exec_id, p);
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        self.called("WaitProcess");
        let p = self.process(&req.container_id, &req.exec_id)?;
        let status = p
            .status
            .get_or_try_init(|| async {
                let status = p
                    .child
                    .lock()
                    .await
                    .wait()
                    .await
                    .map_err(|e| err(ttrpc::Code::INTERNAL, format!("wait: {e}")))?;
                Ok::<_, ttrpc::Error>(status.code().unwrap_or(128))
            })
            .await?;
        Ok(agent::WaitProcessResponse {
            status: *status,
            ..Default::default()
        })
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        self.called("ReadStdout");
        let p = self.process(&req.container_id, &req.exec_id)?;
        let mut stdout = p.stdout.lock().await;
        let Some(out) = stdout.as_mut() else {
            return Ok(agent::ReadStreamResponse::default());
        };
        let mut data = vec![0u8; req.len.clamp(1, 1 << 20) as usize];
        let n = out
            .read(&mut data)
            .await
            .map_err(|e| err(ttrpc::Code::INTERNAL, format!("read: {e}")))?;
        data.truncate(n);
        Ok(agent::ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: agent::WriteStreamRequest,
    ) -> ttrpc::Result<agent::WriteStreamResponse> {
        self.called("WriteStdin");
        let p = self.process(&req.container_id, &req.exec_id)?;
        let mut stdin = p.stdin.lock().await;
        let Some(input) = stdin.as_mut() else {
            return Err(err(ttrpc::Code::FAILED_PRECONDITION, "stdin is closed"));
        };
        input
            .write_all(&req.data)
            .await
            .map_err(|e| err(ttrpc::Code::INTERNAL, format!("write: {e}")))?;
        Ok(agent::WriteStreamResponse {
            len: req.data.len() as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _: &TtrpcContext,
        req: agent::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("CloseStdin");
        let p = self.process(&req.container_id, &req.exec_id)?;
        p.stdin.lock().await.take();
        Ok(Empty::new())
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("SignalProcess");
        let p = self.process(&req.container_id, &req.exec_id)?;
        let child = p.child.lock().await;
        if let Some(pid) = child.id() {
            let signal = nix::sys::signal::Signal::try_from(req.signal as i32)
                .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
                .map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
        }
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("RemoveContainer");
        // Dropping the processes kills them (kill_on_drop).
        self.state
            .lock()
            .expect("agent state")
            .containers
            .remove(&req.container_id)
            .map(|_| Empty::new())
            .ok_or_else(|| no_container(&req.container_id))
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.called("DestroySandbox");
        let mut state = self.state.lock().expect("agent state");
        state.containers.clear();
        state.sandbox = None;
        Ok(Empty::new())
    }
}

#[async_trait]
impl health_ttrpc::Health for FakeAgent {
    async fn check(
        &self,
        _: &TtrpcContext,
        _: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        self.called("Check");
        Ok(health::HealthCheckResponse {
            status: health::health_check_response::ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _: &TtrpcContext,
        _: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        self.called("Version");
        Ok(health::VersionCheckResponse {
            grpc_version: "0.0.1".into(),
            agent_version: "fake-kata-agent".into(),
            ..Default::default()
        })
    }
}

/// A shim's view of the agent: the clients Kata's runtime uses.
#[derive(Clone)]
pub struct Shim {
    pub agent: agent_ttrpc::AgentServiceClient,
    pub health: health_ttrpc::HealthClient,
}

impl Shim {
    /// Connects to the ttrpc socket at `socket`.
    pub async fn connect(socket: &Path) -> ttrpc::Result<Self> {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
        Ok(Self {
            agent: agent_ttrpc::AgentServiceClient::new(c.clone()),
            health: health_ttrpc::HealthClient::new(c),
        })
    }

    /// CreateSandbox with `id` as the sandbox id.
    pub async fn create_sandbox(&self, id: &str) -> ttrpc::Result<()> {
        let req = agent::CreateSandboxRequest {
            hostname: "pod".into(),
            sandbox_id: id.into(),
            ..Default::default()
        };
        self.agent.create_sandbox(ctx(), &req).await.map(|_| ())
    }

    /// CreateContainer `id` running `args`, with `annotations` and mounts
    /// from `mounts`.
    pub async fn create_container(
        &self,
        id: &str,
        args: &[&str],
        annotations: &[(&str, &str)],
        mounts: &[&str],
    ) -> ttrpc::Result<()> {
        let mut spec = oci::Spec::new();
        spec.Process = Some(oci::Process {
            Args: args.iter().map(|a| (*a).to_owned()).collect(),
            Env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            Cwd: "/".into(),
            ..Default::default()
        })
        .into();
        spec.Annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        spec.Mounts = mounts
            .iter()
            .map(|m| oci::Mount {
                source: (*m).to_owned(),
                destination: format!("/mnt/{}", m.len()),
                type_: "bind".into(),
                ..Default::default()
            })
            .collect();
        let req = agent::CreateContainerRequest {
            container_id: id.into(),
            OCI: Some(spec).into(),
            ..Default::default()
        };
        self.agent.create_container(ctx(), &req).await.map(|_| ())
    }

    /// StartContainer `id`.
    pub async fn start_container(&self, id: &str) -> ttrpc::Result<()> {
        let req = agent::StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent.start_container(ctx(), &req).await.map(|_| ())
    }

    /// ExecProcess `exec` in container `id`, running `args`.
    pub async fn exec(&self, id: &str, exec: &str, args: &[&str]) -> ttrpc::Result<()> {
        let req = agent::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            process: Some(oci::Process {
                Args: args.iter().map(|a| (*a).to_owned()).collect(),
                Env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.agent.exec_process(ctx(), &req).await.map(|_| ())
    }

    /// One ReadStdout of at most `len` bytes.
    pub async fn read_stdout(&self, id: &str, exec: &str, len: u32) -> ttrpc::Result<Vec<u8>> {
        let req = agent::ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            len,
            ..Default::default()
        };
        self.agent.read_stdout(ctx(), &req).await.map(|r| r.data)
    }

    /// Everything the process writes to stdout, until its end.
    pub async fn read_all_stdout(&self, id: &str, exec: &str) -> ttrpc::Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let chunk = self.read_stdout(id, exec, 1 << 20).await?;
            if chunk.is_empty() {
                return Ok(all);
            }
            all.extend_from_slice(&chunk);
        }
    }

    /// WriteStdin `data`; returns the length the agent took.
    pub async fn write_stdin(&self, id: &str, exec: &str, data: &[u8]) -> ttrpc::Result<u32> {
        let req = agent::WriteStreamRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.agent.write_stdin(ctx(), &req).await.map(|r| r.len)
    }

    /// CloseStdin.
    pub async fn close_stdin(&self, id: &str, exec: &str) -> ttrpc::Result<()> {
        let req = agent::CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.agent.close_stdin(ctx(), &req).await.map(|_| ())
    }

    /// WaitProcess: the exit status.
    pub async fn wait(&self, id: &str, exec: &str) -> ttrpc::Result<i32> {
        let req = agent::WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.agent.wait_process(ctx(), &req).await.map(|r| r.status)
    }

    /// Health.Check: whether the agent is serving.
    pub async fn check(&self) -> ttrpc::Result<bool> {
        self.health
            .check(ctx(), &health::CheckRequest::default())
            .await
            .map(|r| {
                r.status.enum_value() == Ok(health::health_check_response::ServingStatus::SERVING)
            })
    }
}

/// A 30 s call context.
fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}
