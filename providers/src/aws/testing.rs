//! Test support (feature `conformance`): moto's EC2 server on loopback, a
//! test network whose addresses are loopback addresses, the [`AwsBed`] every
//! AWS test starts from (the two, and the provider settings and flags for
//! them), and a small HTTP proxy in front of the server that counts EC2
//! calls and injects faults.
//!
//! Nothing here connects outside 127.0.0.0/8: the server listens on
//! 127.0.0.1, and the test VPC is 127.16.0.0/16, so instances' private IPs
//! are loopback addresses a test's forwarder can bind.

/// The SDK, for tests in other crates that read the server directly.
pub use aws_sdk_ec2 as ec2;

use super::{AwsManager, AwsProvider, AwsSettings};
use crate::manager::{CloudManager, ProviderContext};
use crate::provider::Provider;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Filter, Instance};
use std::collections::HashMap;
use std::net::Ipv4Addr;
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

pub use podvisor_podvm::testing::free_port;

/// One moto EC2 server, a child process on 127.0.0.1; killed on drop.
#[derive(Debug)]
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

/// The AWS test bed every AWS test starts from: a moto server on
/// 127.0.0.1 with the test network in it ([`Moto::network`]), and the
/// settings and `podvisor aws` flags that point a provider or a daemon at it.
///
/// ```no_run
/// # async fn example() {
/// use podvisor_providers::aws::testing::AwsBed;
/// let bed = AwsBed::start().await;
/// let proxy = bed.proxy().await;
/// let provider = bed.provider(&proxy.endpoint(), bed.settings());
/// # }
/// ```
#[derive(Debug)]
pub struct AwsBed {
    /// The server (killed when the bed is dropped).
    pub moto: Moto,
    /// The VPC, subnet, security group, key pair and image made in it.
    pub net: TestNetwork,
}

impl AwsBed {
    /// Starts moto and makes the test network in it; panics, saying why,
    /// when either fails.
    pub async fn start() -> Self {
        let moto = Moto::start().await;
        let net = moto.network().await;
        Self { moto, net }
    }

    /// A fault-injecting, call-counting proxy in front of the server.
    pub async fn proxy(&self) -> Ec2Proxy {
        Ec2Proxy::start(self.moto.port).await
    }

    /// The provider's settings for the test network: its image, subnet,
    /// group and key, `m6a.large`, a 30 GiB root volume, AMD SEV-SNP on.
    pub fn settings(&self) -> AwsSettings {
        self.net.settings()
    }

    /// The provider built directly with `settings`, talking to `endpoint`
    /// (the server's, or a proxy's).
    pub fn provider(&self, endpoint: &str, settings: AwsSettings) -> AwsProvider {
        AwsProvider::new(client_for(endpoint), settings)
    }

    /// The `podvisor aws` flags (subcommand first) for the server at
    /// `endpoint`: region, credentials, and the test network's image,
    /// subnet, group and key.
    pub fn flags(&self, endpoint: &str) -> Vec<String> {
        self.net.flags(endpoint)
    }

    /// The `podvisor aws` flags naming only the endpoint, the credentials
    /// and the image: region, subnet, groups and key are left to the
    /// instance metadata service.
    pub fn flags_without_network(&self, endpoint: &str) -> Vec<String> {
        [
            "aws",
            "--aws-endpoint",
            endpoint,
            "--aws-access-key-id",
            ACCESS_KEY_ID,
            "--aws-secret-key",
            SECRET_ACCESS_KEY,
            "--imageid",
            &self.net.image_id,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The provider as `podvisor aws` builds it from [`flags`](Self::flags)
    /// plus `extra` (SDK settings included), for node `node-a`; panics when
    /// the flags do not configure.
    pub async fn provider_from_flags(&self, endpoint: &str, extra: &[&str]) -> Arc<dyn Provider> {
        self.net.provider_from_flags(endpoint, extra).await
    }
}

impl TestNetwork {
    /// The provider's settings for this network (see [`AwsBed::settings`]).
    pub fn settings(&self) -> AwsSettings {
        AwsSettings {
            region: REGION.into(),
            image_id: Some(self.image_id.clone()),
            instance_type: "m6a.large".into(),
            instance_types: Vec::new(),
            subnet_id: Some(self.subnet_id.clone()),
            security_group_ids: vec![self.security_group_id.clone()],
            key_name: Some(self.key_name.clone()),
            launch_template: None,
            use_public_ip: false,
            root_volume_gib: 30,
            disable_cvm: false,
            tags: Vec::new(),
        }
    }

    /// The `podvisor aws` flags for this network (see [`AwsBed::flags`]).
    pub fn flags(&self, endpoint: &str) -> Vec<String> {
        [
            "aws",
            "--aws-endpoint",
            endpoint,
            "--aws-region",
            REGION,
            "--aws-access-key-id",
            ACCESS_KEY_ID,
            "--aws-secret-key",
            SECRET_ACCESS_KEY,
            "--imageid",
            &self.image_id,
            "--subnetid",
            &self.subnet_id,
            "--securitygroupids",
            &self.security_group_id,
            "--keyname",
            &self.key_name,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The provider as `podvisor aws` builds it from this network's flags
    /// (see [`AwsBed::provider_from_flags`]).
    pub async fn provider_from_flags(&self, endpoint: &str, extra: &[&str]) -> Arc<dyn Provider> {
        self.provider_from_flags_paced(endpoint, extra, Arc::new(crate::pacing::Pacer::unlimited()))
            .await
    }

    /// [`provider_from_flags`](Self::provider_from_flags), pacing its
    /// requests through `pacer`.
    pub async fn provider_from_flags_paced(
        &self,
        endpoint: &str,
        extra: &[&str],
        pacer: Arc<crate::pacing::Pacer>,
    ) -> Arc<dyn Provider> {
        let mut args = self.flags(endpoint);
        args.extend(extra.iter().map(std::string::ToString::to_string));
        let matches = AwsManager
            .command()
            .try_get_matches_from(args)
            .unwrap_or_else(|e| panic!("the test's aws flags do not parse: {e}"));
        let config = AwsManager
            .configure(&matches)
            .unwrap_or_else(|e| panic!("the test's aws flags do not configure: {}", e.message));
        let context = ProviderContext {
            node_name: "node-a".into(),
            forwarder_port: 15150,
            state_dir: std::env::temp_dir(),
            pacer,
        };
        config
            .build(&context)
            .await
            .unwrap_or_else(|e| panic!("the test's aws provider does not build: {e}"))
    }
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
    /// Never forward the request; answer as EC2 does when the account is
    /// over its API request rate: HTTP 503 with `RequestLimitExceeded`.
    Throttle,
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
    /// Action → how many of its requests met a fault.
    faulted: HashMap<String, usize>,
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

impl std::fmt::Debug for Ec2Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Proxy")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
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

    /// How many requests of each action reached the proxy (faulted or not).
    pub fn calls(&self) -> HashMap<String, usize> {
        self.lock().calls.clone()
    }

    /// How many requests of `action` met a fault (were throttled, stalled,
    /// or lost their response).
    pub fn faulted(&self, action: &str) -> usize {
        self.lock().faulted.get(action).copied().unwrap_or(0)
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
        s.faulted.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let mut s = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *s.calls.entry(action.clone()).or_default() += 1;
        let body = String::from_utf8_lossy(&request.body).replace("%2F", "/");
        s.bodies.entry(action.clone()).or_default().push(body);
        let fault = match s.faults.get_mut(&action) {
            Some((fault, Some(left))) if *left > 0 => {
                *left -= 1;
                Some(*fault)
            }
            Some((fault, None)) => Some(*fault),
            _ => None,
        };
        if fault.is_some() {
            *s.faulted.entry(action.clone()).or_default() += 1;
        }
        fault
    };
    match fault {
        Some(Fault::Stall) => {
            // Hold the connection open, answer nothing.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
        Some(Fault::Throttle) => {
            client.write_all(&throttling_response()).await?;
            return client.shutdown().await;
        }
        Some(Fault::DropResponse) | None => {}
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    upstream.write_all(&request.raw).await?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response).await?;
    if fault == Some(Fault::DropResponse) {
        return Ok(()); // the client's connection closes unanswered
    }
    client.write_all(&response).await?;
    client.shutdown().await
}

/// EC2's answer to a request over the account's API request rate: HTTP 503
/// and the query API's XML error document, as EC2 sends them.
fn throttling_response() -> Vec<u8> {
    let request_id = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..),
        fastrand::u16(..),
        fastrand::u64(..) & 0xffff_ffff_ffff
    );
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
         <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>\
         </Error></Errors><RequestID>{request_id}</RequestID></Response>"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/xml;charset=UTF-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nServer: AmazonEC2\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One HTTP request as read off the connection.
#[derive(Debug, Default)]
struct HttpRequest {
    /// The bytes as they came (relayed unchanged).
    raw: Vec<u8>,
    /// The request line and headers, without the blank line.
    head: String,
    /// The body, de-chunked when it came chunked.
    body: Vec<u8>,
}

/// Reads more of the connection into `buf`; false at its end.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// Reads one HTTP/1.x request: headers, then a body of `Content-Length`
/// bytes or in `Transfer-Encoding: chunked` chunks. A connection that ends
/// early yields what came.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<HttpRequest> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        if !fill(stream, &mut buf).await? {
            return Ok(HttpRequest {
                head: String::from_utf8_lossy(&buf).into_owned(),
                raw: buf,
                body: Vec::new(),
            });
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let header = |name: &str| {
        lower
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let mut at = end + 4;
    let mut body = Vec::new();
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        loop {
            // The chunk's size line: hex digits, maybe `;extensions`.
            let line_end = loop {
                if let Some(i) = find(&buf[at..], b"\r\n") {
                    break at + i;
                }
                if !fill(stream, &mut buf).await? {
                    return Ok(HttpRequest {
                        raw: buf,
                        head,
                        body,
                    });
                }
            };
            let line = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
            let digits = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(digits, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size line {line:?}"),
                )
            })?;
            at = line_end + 2;
            if size == 0 {
                // Trailer lines, up to a blank one.
                loop {
                    match find(&buf[at..], b"\r\n") {
                        Some(0) => {
                            at += 2;
                            break;
                        }
                        Some(i) => at += i + 2,
                        None if !fill(stream, &mut buf).await? => break,
                        None => {}
                    }
                }
                buf.truncate(at.min(buf.len()));
                return Ok(HttpRequest {
                    raw: buf,
                    head,
                    body,
                });
            }
            while buf.len() < at + size + 2 {
                if !fill(stream, &mut buf).await? {
                    break;
                }
            }
            let chunk_end = (at + size).min(buf.len());
            body.extend_from_slice(&buf[at..chunk_end]);
            at = (at + size + 2).min(buf.len());
        }
    }
    let length: usize = header("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < at + length {
        if !fill(stream, &mut buf).await? {
            break;
        }
    }
    body.extend_from_slice(&buf[at.min(buf.len())..(at + length).min(buf.len())]);
    Ok(HttpRequest {
        raw: buf,
        head,
        body,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `Action` of an EC2 query request: a parameter of the form-encoded
/// body (the SDK's POST), else of the request line's query string.
fn action_of(request: &HttpRequest) -> Option<String> {
    let body = String::from_utf8_lossy(&request.body);
    let query = request
        .head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|target| target.split_once('?'))
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    [body.as_ref(), query.as_str()]
        .into_iter()
        .flat_map(|params| params.split('&'))
        .find_map(|pair| pair.strip_prefix("Action="))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()))
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

impl std::fmt::Debug for MetadataStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataStub")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

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
                    let head = request.head;
                    let mut first = head.lines().next().unwrap_or("").split_whitespace();
                    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                    let has_token = head
                        .to_ascii_lowercase()
                        .contains(&format!("x-aws-ec2-metadata-token: {METADATA_TOKEN}"));
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `request` to the proxy and returns its whole answer.
    async fn exchange(port: u16, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the proxy");
        stream.write_all(request).await.expect("send the request");
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .expect("read the answer");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn throttled_actions_get_ec2s_503_whether_the_body_is_chunked_or_not() {
        // The upstream is a closed port: a throttled request never reaches it.
        let proxy = Ec2Proxy::start(free_port()).await;
        proxy.fault("RunInstances", Fault::Throttle, Some(2));
        let chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
            Content-Type: application/x-www-form-urlencoded\r\n\r\n\
            7\r\nAction=\r\nd;ext=1\r\nRunInstances&\r\n10\r\nVersion=2016-11-\r\n3\r\n15&\r\n0\r\n\r\n";
        let sized = b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 38\r\n\r\n\
            Version=2016-11-15&Action=RunInstances";
        for request in [&chunked[..], &sized[..]] {
            let answer = exchange(proxy.port, request).await;
            assert!(
                answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{answer}"
            );
            assert!(
                answer.contains("<Code>RequestLimitExceeded</Code>")
                    && answer.contains("<Message>Request limit exceeded.</Message>")
                    && answer.contains("<RequestID>"),
                "{answer}"
            );
        }
        assert_eq!(proxy.faulted("RunInstances"), 2);
        assert_eq!(
            proxy.bodies("RunInstances")[0],
            "Action=RunInstances&Version=2016-11-15&"
        );
        // The fault is spent: the third request is relayed (to a closed
        // port, so the client sees the connection close unanswered).
        assert_eq!(exchange(proxy.port, sized).await, "");
        assert_eq!(proxy.calls().get("RunInstances"), Some(&3));
        assert_eq!(proxy.faulted("RunInstances"), 2);
    }

    #[tokio::test]
    async fn the_action_comes_from_the_form_body_or_the_query_string_only() {
        let proxy = Ec2Proxy::start(free_port()).await;
        // A parameter whose name ends in `Action` is not the action.
        exchange(
            proxy.port,
            b"POST / HTTP/1.1\r\nContent-Length: 39\r\n\r\nShutdownAction=Stop&Action=DescribeTags",
        )
        .await;
        exchange(
            proxy.port,
            b"GET /?Version=2016-11-15&Action=DescribeRegions HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        exchange(proxy.port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        let calls = proxy.calls();
        assert_eq!(calls.get("DescribeTags"), Some(&1), "{calls:?}");
        assert_eq!(calls.get("DescribeRegions"), Some(&1), "{calls:?}");
        assert_eq!(calls.get("?"), Some(&1), "{calls:?}");
    }
}
