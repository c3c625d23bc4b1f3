//! Test support (feature `conformance`): moto's EC2 server on loopback, a
//! test network whose addresses are loopback addresses, and a small HTTP
//! proxy in front of the server that counts EC2 calls and injects faults.
//!
//! Nothing here connects outside 127.0.0.0/8: the server listens on
//! 127.0.0.1, and the test VPC is 127.16.0.0/16, so instances' private IPs
//! are loopback addresses a test's forwarder can bind.

/// The SDK, for tests in other crates that read the server directly.
pub use aws_sdk_ec2 as ec2;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Filter, Instance};
use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The fake credentials every test uses (moto accepts any).
pub const ACCESS_KEY_ID: &str = "AKIDPODVISORTEST";
/// The fake secret every test uses; tests grep logs for it.
pub const SECRET_ACCESS_KEY: &str = "podvisor-test-secret-never-logged";
/// The region of the tests.
pub const REGION: &str = "us-east-1";

/// A free port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// One moto EC2 server, a child process on 127.0.0.1; killed on drop.
pub struct Moto {
    /// The server process.
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Moto {
    /// Starts `moto_server` (or `$MOTO_SERVER`) on a free port and waits for
    /// it to answer. Panics, saying how to install it, when it is missing.
    pub async fn start() -> Self {
        let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {program} ({e}): the AWS tests need moto's EC2 server; \
                     install it with `python3 -m pip install 'moto[server]'` (scripts/test.sh does)"
                )
            });
        let mut moto = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("{program} exited ({status}) before answering on port {port}");
            }
            if http_post(port, "/moto-api/reset").await.is_ok() {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not answer on 127.0.0.1:{port} in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forgets everything the server holds.
    pub async fn reset(&self) {
        http_post(self.port, "/moto-api/reset")
            .await
            .unwrap_or_else(|e| panic!("resetting moto: {e}"));
    }

    /// An SDK client for the server (the test's own view of "the cloud").
    pub fn client(&self) -> Client {
        client_for(&self.endpoint())
    }

    /// A VPC and subnet in 127.16.0.0/16 (so instances get loopback private
    /// IPs), a security group, a key pair and an image.
    pub async fn network(&self) -> TestNetwork {
        let ec2 = self.client();
        let vpc = ec2
            .create_vpc()
            .cidr_block("127.16.0.0/16")
            .send()
            .await
            .expect("create VPC");
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("VPC id")
            .to_owned();
        // A random /24, so servers of tests running at once differ.
        let third = fastrand::u8(1..=254);
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("127.16.{third}.0/24"))
            .send()
            .await
            .expect("create subnet");
        let subnet_id = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .expect("subnet id")
            .to_owned();
        let group = ec2
            .create_security_group()
            .group_name("podvisor-test")
            .description("podvisor tests")
            .vpc_id(&vpc_id)
            .send()
            .await
            .expect("create security group");
        let security_group_id = group.group_id().expect("group id").to_owned();
        ec2.create_key_pair()
            .key_name("podvisor-test")
            .send()
            .await
            .expect("create key pair");
        let images = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .expect("describe images");
        let image_id = images
            .images()
            .iter()
            .filter_map(|i| i.image_id())
            .min()
            .expect("moto has images")
            .to_owned();
        TestNetwork {
            vpc_id,
            subnet_id,
            security_group_id,
            key_name: "podvisor-test".into(),
            image_id,
        }
    }

    /// The instances on the server that are not terminated or shutting
    /// down, optionally only those with tag `key=value`.
    pub async fn live_instances(&self, tag: Option<(&str, &str)>) -> Vec<Instance> {
        let mut request = self.client().describe_instances().filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        );
        if let Some((k, v)) = tag {
            request = request.filters(Filter::builder().name(format!("tag:{k}")).values(v).build());
        }
        let out = request.send().await.expect("describe instances");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What [`Moto::network`] made.
#[derive(Debug, Clone)]
pub struct TestNetwork {
    /// The VPC (127.16.0.0/16).
    pub vpc_id: String,
    /// The subnet (a /24 of it).
    pub subnet_id: String,
    /// A security group in the VPC.
    pub security_group_id: String,
    /// A key pair.
    pub key_name: String,
    /// An AMI the server knows.
    pub image_id: String,
}

/// An SDK client for `endpoint` with the fake credentials, no retries.
pub fn client_for(endpoint: &str) -> Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "podvisor-tests",
        ))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

/// The first private IPv4 of an instance.
pub fn private_ip(instance: &Instance) -> Option<Ipv4Addr> {
    instance.private_ip_address()?.parse().ok()
}

/// A one-shot HTTP/1.0 POST to the server (moto's admin API).
async fn http_post(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let request =
        format!("POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    if response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200") {
        Ok(response)
    } else {
        Err(format!(
            "unexpected answer: {}",
            response.lines().next().unwrap_or("")
        ))
    }
}

/// What the proxy does to requests of one EC2 action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward the request, then drop the response (the client sees the
    /// connection close): the call happened, the caller cannot know.
    DropResponse,
    /// Never forward the request, never answer (a hung cloud).
    Stall,
}

/// Faults and counts, shared with the proxy's tasks.
#[derive(Default)]
struct ProxyState {
    /// Action → how many requests of it reached the proxy.
    calls: HashMap<String, usize>,
    /// Action → the form-encoded bodies of its requests.
    bodies: HashMap<String, Vec<String>>,
    /// Action → the fault to apply, and how many more times (None: always).
    faults: HashMap<String, (Fault, Option<usize>)>,
}

/// An HTTP proxy in front of the EC2 server: one request per connection
/// (moto answers HTTP/1.0 and closes), counting EC2 actions and applying
/// faults. Stops on drop.
pub struct Ec2Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Counts and faults.
    state: Arc<Mutex<ProxyState>>,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

impl Ec2Proxy {
    /// A proxy to the server on `upstream_port`.
    pub async fn start(upstream_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream_port, state).await;
                });
            }
        });
        Self { port, state, task }
    }

    /// The proxy's URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `times` requests of `action` (None: all).
    pub fn fault(&self, action: &str, fault: Fault, times: Option<usize>) {
        self.lock().faults.insert(action.to_owned(), (fault, times));
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// How many requests of each action reached the proxy.
    pub fn calls(&self) -> HashMap<String, usize> {
        self.lock().calls.clone()
    }

    /// The form-encoded bodies of the requests of `action`, decoded
    /// enough to search (`CpuOptions.AmdSevSnp=enabled`).
    pub fn bodies(&self, action: &str) -> Vec<String> {
        self.lock().bodies.get(action).cloned().unwrap_or_default()
    }

    /// Forgets the counts and bodies.
    pub fn reset_calls(&self) {
        let mut s = self.lock();
        s.calls.clear();
        s.bodies.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays one request and its response.
async fn relay(
    mut client: TcpStream,
    upstream_port: u16,
    state: Arc<Mutex<ProxyState>>,
) -> std::io::Result<()> {
    let request = read_request(&mut client).await?;
    let action = action_of(&request).unwrap_or_else(|| "?".into());
    let fault = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        *s.calls.entry(action.clone()).or_default() += 1;
        let body = find(&request, b"\r\n\r\n")
            .map(|end| String::from_utf8_lossy(&request[end + 4..]).replace("%2F", "/"))
            .unwrap_or_default();
        s.bodies.entry(action.clone()).or_default().push(body);
        match s.faults.get_mut(&action) {
            Some((fault, Some(left))) if *left > 0 => {
                *left -= 1;
                Some(*fault)
            }
            Some((fault, None)) => Some(*fault),
            _ => None,
        }
    };
    if fault == Some(Fault::Stall) {
        // Hold the connection open, answer nothing.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    upstream.write_all(&request).await?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response).await?;
    if fault == Some(Fault::DropResponse) {
        return Ok(()); // the client's connection closes unanswered
    }
    client.write_all(&response).await?;
    client.shutdown().await
}

/// Reads one HTTP request (headers and a Content-Length body).
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(buf);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `Action=` of an EC2 query request.
fn action_of(request: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(request);
    let start = text.find("Action=")? + "Action=".len();
    let action: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!action.is_empty()).then_some(action)
}

/// A small EC2 instance metadata service (IMDSv2) on 127.0.0.1: a session
/// token on `PUT /latest/api/token`, then the given paths. Stops on drop.
pub struct MetadataStub {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Paths asked for, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// The accept loop.
    task: tokio::task::JoinHandle<()>,
}

/// The session token the stub hands out and expects.
const METADATA_TOKEN: &str = "podvisor-test-imds-token";

impl MetadataStub {
    /// A stub answering `paths` (path → body); anything else is 404.
    pub async fn start(paths: HashMap<String, String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the metadata stub");
        let port = listener.local_addr().expect("stub address").port();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = requests.clone();
        let paths = Arc::new(paths);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let paths = paths.clone();
                tokio::spawn(async move {
                    let Ok(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&request).into_owned();
                    let mut first = head.lines().next().unwrap_or("").split_whitespace();
                    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                    let has_token = head
                        .to_ascii_lowercase()
                        .contains(&format!("x-aws-ec2-metadata-token: {METADATA_TOKEN}"));
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{method} {path}"));
                    let (status, extra, body) = match (method, path) {
                        ("PUT", "/latest/api/token") => (
                            "200 OK",
                            "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
                            METADATA_TOKEN.to_owned(),
                        ),
                        ("GET", _) if !has_token => ("401 Unauthorized", "", String::new()),
                        ("GET", p) => match paths.get(p) {
                            Some(body) => ("200 OK", "", body.clone()),
                            None => ("404 Not Found", "", String::new()),
                        },
                        _ => ("405 Method Not Allowed", "", String::new()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self {
            port,
            requests,
            task,
        }
    }

    /// The endpoint, for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The requests seen so far (`GET /latest/meta-data/...`).
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for MetadataStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The metadata of a node in `net`: its region, MAC, subnet, security group
/// and key pair, as the stub serves them.
pub fn node_metadata(net: &TestNetwork) -> HashMap<String, String> {
    let mac = "0e:49:61:0f:c3:11";
    let base = format!("/latest/meta-data/network/interfaces/macs/{mac}");
    HashMap::from([
        ("/latest/meta-data/placement/region".into(), REGION.into()),
        ("/latest/meta-data/mac".into(), mac.into()),
        (format!("{base}/subnet-id"), net.subnet_id.clone()),
        (
            format!("{base}/security-group-ids"),
            net.security_group_id.clone(),
        ),
        (
            "/latest/meta-data/public-keys/".into(),
            format!("0={}", net.key_name),
        ),
    ])
}
