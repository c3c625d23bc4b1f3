//! The command line: `podvisor [global flags] <provider> [provider flags]`.
//!
//! Global flags keep the reference's names and environment variables, so an
//! existing peer-pods ConfigMap works unchanged: a flag wins, then a
//! non-empty environment variable, then the default. Go-style single-dash
//! long flags (`-socket /x`) are accepted as the reference's users write them.
//!
//! [`GlobalArgs`] gathers the flags in groups ([`KataArgs`], [`TlsArgs`], …),
//! flattened into one command; `--help` lists them in the order they are
//! declared, the reference's flags first. Nothing here names a provider:
//! each declares its own defaults ([`CloudManager::default_call_limits`]).

use crate::network::vni::MAX_VNI;
use clap::builder::BoolishValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, ValueEnum};
use podvisor_providers::duration::parse_duration;
use podvisor_providers::{
    CallLimits, CloudManager, ConfigError, KNOWN_PROVIDERS, ProviderConfig, registry,
};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Global flags, before the provider name.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "podvisor",
    version,
    about = "Peer-pods node daemon: creates Kata pod VMs on a cloud provider and never loses track of them",
    subcommand_required = true,
    arg_required_else_help = true,
    subcommand_value_name = "PROVIDER|COMMAND",
    subcommand_help_heading = "Providers (run the daemon), then commands (talk to a running one, or to its journal)",
    after_help = "With no provider name, the environment variable CLOUD_PROVIDER names it (the reference's variable); a name on the command line wins."
)]
pub struct GlobalArgs {
    /// Kata's socket, the agent sockets and the forwarder they reach.
    #[command(flatten)]
    pub kata: KataArgs,

    /// TLS to the pod VMs' forwarders.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Where pods' CSI volumes and image pull secrets are found.
    #[command(flatten)]
    pub pod_inputs: PodInputArgs,

    /// The node-to-pod-VM tunnel.
    #[command(flatten)]
    pub tunnel: TunnelArgs,

    /// Group that may connect to the Kata socket (name or number); the socket is mode 0660 [default: the daemon's own group]
    #[arg(
        long = "socket-group",
        env = "PODVISOR_SOCKET_GROUP",
        value_name = "GROUP"
    )]
    pub socket_group: Option<String>,

    /// What pod VMs get and how many may run.
    #[command(flatten)]
    pub pod_vms: PodVmArgs,

    /// Directory of the journal and other durable state
    #[arg(
        long = "state-dir",
        env = "PODVISOR_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/podvisor"
    )]
    pub state_dir: PathBuf,

    /// The admin and gRPC endpoints.
    #[command(flatten)]
    pub endpoints: EndpointArgs,

    /// This node's name; pod VMs are tagged with it [default: the host name]
    #[arg(long = "node-name", env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Logging.
    #[command(flatten)]
    pub logging: LogArgs,

    /// The lifecycle's time limits and retries.
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,

    /// The orphan GC.
    #[command(flatten)]
    pub gc: GcArgs,

    /// How hard the daemon drives the cloud.
    #[command(flatten)]
    pub provider_calls: ProviderCallArgs,

    /// At SIGTERM: longest wait for operations under way to reach a journaled state
    #[arg(long = "shutdown-grace", env = "PODVISOR_SHUTDOWN_GRACE", value_name = "DURATION",
          default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Most connections open at once on each endpoint (the Kata socket, each gRPC endpoint, the admin endpoint, each agent socket); more are closed as soon as they are accepted
    #[arg(long = "max-connections-per-endpoint", env = "PODVISOR_MAX_CONNECTIONS", value_name = "N",
          default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_endpoint: u32,
}

/// Kata's side of the daemon: the socket the Kata runtime calls, the agent
/// sockets its shims dial, and how the agent proxy behind each reaches the
/// pod VM's forwarder.
#[derive(Args, Debug, Clone)]
pub struct KataArgs {
    /// Unix socket of the Kata remote hypervisor API (ttrpc)
    #[arg(
        long,
        env = "REMOTE_HYPERVISOR_ENDPOINT",
        value_name = "PATH",
        default_value = "/run/peerpod/hypervisor.sock"
    )]
    pub socket: PathBuf,

    /// Directory of per-sandbox agent sockets (<pods-dir>/<id>/agent.ttrpc)
    // The comment is also `--help` text, where the angle brackets are
    // placeholders, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(
        long = "pods-dir",
        env = "PODS_DIR",
        value_name = "DIR",
        default_value = "/run/peerpod/pods"
    )]
    pub pods_dir: PathBuf,

    /// Port of the forwarder in each pod VM
    #[arg(long = "forwarder-port", env = "FORWARDER_PORT", value_name = "PORT", default_value_t = 15150,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub forwarder_port: u16,

    /// How long to wait for a pod VM's forwarder to answer (Go duration)
    #[arg(long = "proxy-timeout", env = "PROXY_TIMEOUT", value_name = "DURATION", default_value = "5m",
          value_parser = parse_duration)]
    pub proxy_timeout: Duration,
}

/// TLS between the agent proxy and the pod VMs' forwarders: whose
/// certificates (the operator's files, else the daemon's own), and which
/// versions and cipher suites.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// CA certificate that signs the pod VMs' server certificates [default: auto]
    #[arg(long = "ca-cert-file", env = "CACERT_FILE", value_name = "PATH")]
    pub ca_cert_file: Option<PathBuf>,

    /// Client certificate presented to the forwarders [default: auto]
    #[arg(long = "cert-file", env = "CERT_FILE", value_name = "PATH")]
    pub cert_file: Option<PathBuf>,

    /// Key of the client certificate [default: auto]
    #[arg(long = "cert-key", env = "CERT_KEY", value_name = "PATH")]
    pub cert_key: Option<PathBuf>,

    /// Do not verify the forwarders' certificates
    #[arg(long = "tls-skip-verify", env = "TLS_SKIP_VERIFY", value_parser = BoolishValueParser::new())]
    pub tls_skip_verify: bool,

    /// Talk to the forwarders without TLS
    #[arg(long = "disable-tls")]
    pub disable_tls: bool,

    /// Least TLS version: VersionTLS12 or VersionTLS13 [default: VersionTLS12]
    #[arg(
        long = "tls-min-version",
        env = "TLS_MIN_VERSION",
        value_name = "VERSION"
    )]
    pub tls_min_version: Option<String>,

    /// Comma-separated IANA cipher suite names
    #[arg(
        long = "tls-cipher-suites",
        env = "TLS_CIPHER_SUITES",
        value_name = "LIST"
    )]
    pub tls_cipher_suites: Option<String>,
}

/// Where the daemon finds what a pod brings beyond its spec: the CSI
/// volumes Kata publishes, and the image pull secrets in the Kubernetes
/// API.
#[derive(Args, Debug, Clone)]
pub struct PodInputArgs {
    /// Kata's direct-volumes directory: CSI volumes published there get the
    /// reference's target-path annotation on CreateContainer
    #[arg(
        long = "kata-direct-volumes-dir",
        env = "PODVISOR_KATA_DIRECT_VOLUMES_DIR",
        value_name = "PATH",
        default_value = crate::proxy::hook::DEFAULT_DIRECT_VOLUMES_DIR
    )]
    pub kata_direct_volumes_dir: PathBuf,

    /// Kubeconfig file for the Kubernetes API, its current context (for
    /// development; wins over --kube-api-server and in-cluster)
    #[arg(long = "kubeconfig", env = "PODVISOR_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API (image pull secrets, the node's peer pod capacity,
    /// stale sandboxes) [default: in-cluster, from KUBERNETES_SERVICE_HOST]
    #[arg(
        long = "kube-api-server",
        env = "PODVISOR_KUBE_API_SERVER",
        value_name = "URL"
    )]
    pub kube_api_server: Option<String>,

    /// Bearer token file for the Kubernetes API
    #[arg(long = "kube-token-file", env = "PODVISOR_KUBE_TOKEN_FILE", value_name = "PATH",
          default_value = crate::kubernetes::IN_CLUSTER_TOKEN)]
    pub kube_token_file: PathBuf,

    /// CA certificate of the Kubernetes API
    #[arg(long = "kube-ca-file", env = "PODVISOR_KUBE_CA_FILE", value_name = "PATH",
          default_value = crate::kubernetes::IN_CLUSTER_CA)]
    pub kube_ca_file: PathBuf,

    /// This daemon's pod UID: names it in the node's kata.peerpods.io/caa-owner annotation [default: podvisor-<node>]
    #[arg(long = "pod-uid", env = "POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,

    /// Stop a Running or Failed sandbox whose pod has been missing from the node's pod list this long (needs the Kubernetes API; 0s: never)
    #[arg(long = "stale-sandbox-grace", env = "PODVISOR_STALE_SANDBOX_GRACE", value_name = "DURATION",
          default_value = "5m", value_parser = parse_duration)]
    pub stale_sandbox_grace: Duration,

    /// Delete the pod VMs of a node that has been gone from the cluster this long; one daemon of the cluster does it, under a Lease (needs the Kubernetes API; 0s: never, and no Lease is taken)
    #[arg(long = "node-gone-grace", env = "PODVISOR_NODE_GONE_GRACE", value_name = "DURATION",
          default_value = "10m", value_parser = parse_duration)]
    pub node_gone_grace: Duration,

    /// How long the node-gone Lease is held without renewal (whole seconds, at least 3s; renewed every third of it)
    #[arg(long = "lease-duration", env = "PODVISOR_LEASE_DURATION", value_name = "DURATION",
          default_value = "60s", value_parser = parse_lease_duration)]
    pub lease_duration: Duration,

    /// Namespace of the node-gone Lease (podvisor-<provider>-node-gone) [default: the daemon's own namespace in a pod, else default]
    #[arg(
        long = "lease-namespace",
        env = "PODVISOR_LEASE_NAMESPACE",
        value_name = "NAMESPACE"
    )]
    pub lease_namespace: Option<String>,

    /// Write no PeerPod objects (confidentialcontainers.org, one per Running sandbox, owned by its pod; needs the Kubernetes API and the PeerPod CRD)
    #[arg(long = "disable-peerpods", env = "PODVISOR_DISABLE_PEERPODS", value_parser = BoolishValueParser::new())]
    pub disable_peerpods: bool,
}

/// The network tunnel between the node and its pod VMs (accepted for the
/// reference's ConfigMaps; not used yet).
#[derive(Args, Debug, Clone)]
pub struct TunnelArgs {
    /// Tunnel between the node and the pod VM (only vxlan)
    #[arg(
        long = "tunnel-type",
        env = "TUNNEL_TYPE",
        value_name = "TYPE",
        default_value = "vxlan"
    )]
    pub tunnel_type: String,

    /// VXLAN UDP port
    #[arg(
        long = "vxlan-port",
        env = "VXLAN_PORT",
        value_name = "PORT",
        default_value_t = 4789
    )]
    pub vxlan_port: u16,

    /// Lowest VXLAN network identifier
    #[arg(long = "vxlan-min-id", value_name = "VNI", default_value_t = 555000)]
    pub vxlan_min_id: u32,

    /// Node interface for the tunnel [default: the default route's]
    #[arg(long = "host-interface", value_name = "NAME")]
    pub host_interface: Option<String>,
}

/// The reference's pod VM flags: what every pod VM gets, how many may run,
/// and whether the provider's configuration must verify before any is
/// made.
#[derive(Args, Debug, Clone)]
pub struct PodVmArgs {
    /// Default initdata for pod VMs without their own: the TOML, gzip-compressed and base64-encoded (`gzip | base64`; line breaks are ignored)
    #[arg(long, env = "INITDATA", value_name = "BASE64")]
    pub initdata: Option<String>,

    /// Fail start-up if the provider's configuration does not verify against the cloud
    #[arg(long = "cloud-config-verify", env = "CLOUD_CONFIG_VERIFY", value_parser = BoolishValueParser::new())]
    pub cloud_config_verify: bool,

    /// Most live pod VMs on this node (0 or negative: no limit)
    #[arg(
        long = "peerpods-limit-per-node",
        env = "PEERPODS_LIMIT_PER_NODE",
        value_name = "N",
        default_value_t = 10,
        allow_negative_numbers = true
    )]
    pub peerpods_limit_per_node: i64,

    /// Give pod VMs scratch space
    #[arg(long = "enable-scratch-space", env = "ENABLE_SCRATCH_SPACE", value_parser = BoolishValueParser::new())]
    pub enable_scratch_space: bool,

    /// Route external traffic through the pod VM (experimental)
    #[arg(long = "ext-network-via-podvm", env = "EXTERNAL_NETWORK_VIA_PODVM", value_parser = BoolishValueParser::new())]
    pub ext_network_via_podvm: bool,

    /// Pod subnets routed via the node when ext-network-via-podvm is on
    #[arg(
        long = "pod-subnet-cidrs",
        env = "POD_SUBNET_CIDRS",
        value_name = "LIST"
    )]
    pub pod_subnet_cidrs: Option<String>,
}

impl PodVmArgs {
    /// `--pod-subnet-cidrs` parsed: comma-separated IPv4 CIDRs, spaces
    /// around each ignored and empty items skipped (the reference splits on
    /// `,` and trims: CAA `pkg/podnetwork/tunneler/config.go`).
    ///
    /// # Errors
    /// The first item that is not an IPv4 prefix (`10.244.0.0/16`), or one
    /// with host bits set.
    pub fn pod_subnets(&self) -> Result<Vec<ipnet::Ipv4Net>, String> {
        let Some(list) = &self.pod_subnet_cidrs else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                let net: ipnet::Ipv4Net = item
                    .parse()
                    .map_err(|_| format!("'{item}' is not an IPv4 CIDR such as 10.244.0.0/16"))?;
                if net.trunc() != net {
                    return Err(format!(
                        "'{item}' has host bits set (the subnet is {})",
                        net.trunc()
                    ));
                }
                Ok(net)
            })
            .collect()
    }
}

/// The operator's endpoints: admin HTTP, and gRPC over TCP and on a unix
/// socket.
#[derive(Args, Debug, Clone)]
pub struct EndpointArgs {
    /// Admin HTTP endpoint (/metrics, /livez, /readyz, /startup, /v1/instances)
    #[arg(
        long = "admin-addr",
        env = "PODVISOR_ADMIN_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:9797",
        value_parser = parse_socket_addr
    )]
    pub admin_addr: SocketAddr,

    /// Serve only the startup probe, GET /startup, on this port of every address (the reference's probe port; off when unset)
    #[arg(long = "probe-port", env = "PROBE_PORT", value_name = "PORT")]
    pub probe_port: Option<u16>,

    /// Admin HTTP: longest wait for a request's headers, from a connection's opening or a later request's first byte (hidden: for tests)
    #[arg(long = "admin-header-timeout", value_name = "DURATION", hide = true,
          default_value = "10s", value_parser = parse_duration)]
    pub admin_header_timeout: Duration,

    /// Admin HTTP: longest wait of a kept-alive connection for its next request, and of an answer the client does not read (hidden: for tests)
    #[arg(long = "admin-idle-timeout", value_name = "DURATION", hide = true,
          default_value = "1m", value_parser = parse_duration)]
    pub admin_idle_timeout: Duration,

    /// gRPC endpoint over TCP: podvisor.admin.v1.Admin (read-only, no authentication); hypervisor.Hypervisor as well only with --grpc-token-file
    #[arg(
        long = "grpc-addr",
        env = "PODVISOR_GRPC_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:9798",
        value_parser = parse_socket_addr
    )]
    pub grpc_addr: SocketAddr,

    /// Unix socket of the gRPC endpoint with hypervisor.Hypervisor and podvisor.admin.v1.Admin; mode 0660, group --socket-group, as the Kata socket [default: podvisor-grpc.sock next to --socket]
    #[arg(
        long = "grpc-socket",
        env = "PODVISOR_GRPC_SOCKET",
        value_name = "PATH"
    )]
    pub grpc_socket: Option<PathBuf>,

    /// File with a bearer token (its content, trimmed): hypervisor.Hypervisor is then served on --grpc-addr too, to calls with `authorization: Bearer <token>`
    #[arg(
        long = "grpc-token-file",
        env = "PODVISOR_GRPC_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub grpc_token_file: Option<PathBuf>,
}

/// What the daemon logs on stderr, and how.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format
    #[arg(
        long = "log-format",
        env = "PODVISOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. info or podvisor=debug)
    #[arg(
        long = "log-level",
        env = "PODVISOR_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log_level: String,
}

/// The pod VM lifecycle's time limits and retries.
#[derive(Args, Debug, Clone)]
pub struct LifecycleArgs {
    /// How long a sandbox may wait between CreateVM and StartVM
    #[arg(long = "pending-ttl", env = "PODVISOR_PENDING_TTL", value_name = "DURATION", default_value = "15m",
          value_parser = parse_duration)]
    pub pending_ttl: Duration,

    /// How long a failed sandbox stays visible if StopVM never comes
    #[arg(long = "failed-ttl", env = "PODVISOR_FAILED_TTL", value_name = "DURATION", default_value = "1h",
          value_parser = parse_duration)]
    pub failed_ttl: Duration,

    /// Creation attempts before a pod VM is marked failed
    #[arg(long = "create-attempts", env = "PODVISOR_CREATE_ATTEMPTS", value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub create_attempts: u32,

    /// First delay between retries of a failed operation (doubles, with jitter)
    #[arg(long = "retry-base", env = "PODVISOR_RETRY_BASE", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration)]
    pub retry_base: Duration,

    /// Longest delay between retries
    #[arg(long = "retry-cap", env = "PODVISOR_RETRY_CAP", value_name = "DURATION", default_value = "1m",
          value_parser = parse_duration)]
    pub retry_cap: Duration,
}

/// The orphan GC: how often, and how old an unowned instance must be.
#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// How often the orphan GC runs
    #[arg(long = "gc-interval", env = "PODVISOR_GC_INTERVAL", value_name = "DURATION", default_value = "5m",
          value_parser = parse_duration)]
    pub gc_interval: Duration,

    /// Age an unowned, node-tagged instance must reach before the GC deletes it
    #[arg(long = "gc-grace-period", env = "PODVISOR_GC_GRACE_PERIOD", value_name = "DURATION", default_value = "10m",
          value_parser = parse_duration)]
    pub gc_grace_period: Duration,
}

/// How hard the daemon may drive the cloud: calls in flight, the token
/// bucket of mutating calls, and each call's tries and time limit.
#[derive(Args, Debug, Clone)]
pub struct ProviderCallArgs {
    /// Most provider calls in flight at once
    #[arg(long = "provider-max-inflight", env = "PODVISOR_PROVIDER_MAX_INFLIGHT", value_name = "N",
          default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub provider_max_inflight: u32,

    /// Sustained rate of mutating provider calls (creates, deletes) per second
    #[arg(
        long = "provider-rate",
        env = "PODVISOR_PROVIDER_RATE",
        value_name = "PER_SECOND",
        allow_negative_numbers = true
    )]
    pub provider_rate: Option<f64>,

    /// Burst of mutating provider calls above the rate
    #[arg(long = "provider-burst", env = "PODVISOR_PROVIDER_BURST", value_name = "N",
          allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub provider_burst: Option<u32>,

    /// Sustained rate of provider reads (lookups, listings) per second
    #[arg(
        long = "provider-read-rate",
        env = "PODVISOR_PROVIDER_READ_RATE",
        value_name = "PER_SECOND",
        allow_negative_numbers = true
    )]
    pub provider_read_rate: Option<f64>,

    /// Burst of provider reads above the read rate
    #[arg(long = "provider-read-burst", env = "PODVISOR_PROVIDER_READ_BURST", value_name = "N",
          allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub provider_read_burst: Option<u32>,

    /// Tries of one provider call on transient errors (throttled tries do not count: they wait longer each time)
    #[arg(long = "provider-call-attempts", env = "PODVISOR_PROVIDER_CALL_ATTEMPTS", value_name = "N",
          default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub provider_call_attempts: u32,

    /// Time limit of one provider call
    #[arg(long = "provider-call-timeout", env = "PODVISOR_PROVIDER_CALL_TIMEOUT", value_name = "DURATION",
          default_value = "10m", value_parser = parse_duration)]
    pub provider_call_timeout: Duration,
}

/// The gRPC socket's file name when `--grpc-socket` is not given: it sits
/// next to the Kata socket, in the directory the operator already keeps
/// for whoever may drive pod VMs.
pub const GRPC_SOCKET_NAME: &str = "podvisor-grpc.sock";

impl GlobalArgs {
    /// The gRPC unix socket: `--grpc-socket` (flag, else environment), else
    /// [`GRPC_SOCKET_NAME`] in the directory of `--socket`.
    pub fn grpc_socket_path(&self) -> PathBuf {
        self.endpoints
            .grpc_socket
            .clone()
            .unwrap_or_else(|| self.kata.socket.with_file_name(GRPC_SOCKET_NAME))
    }
}

impl ProviderCallArgs {
    /// The token buckets of provider calls: each of `--provider-rate`,
    /// `--provider-burst`, `--provider-read-rate` and
    /// `--provider-read-burst` (flag, else environment) when given, else
    /// the provider's default.
    pub fn call_limits(&self, provider_default: CallLimits) -> CallLimits {
        CallLimits {
            rate: self.provider_rate.unwrap_or(provider_default.rate),
            burst: self.provider_burst.unwrap_or(provider_default.burst),
            read_rate: self
                .provider_read_rate
                .unwrap_or(provider_default.read_rate),
            read_burst: self
                .provider_read_burst
                .unwrap_or(provider_default.read_burst),
        }
    }
}

/// What the command line asked for.
pub enum Invocation {
    /// Run the daemon with this provider.
    Run {
        /// The global flags.
        global: Box<GlobalArgs>,
        /// The provider's manager.
        manager: &'static dyn CloudManager,
        /// The provider's validated configuration.
        provider: Box<dyn ProviderConfig>,
    },
    /// `podvisor version`.
    Version,
    /// A client command (`instances`, `create`, … — [`crate::client::NAMES`]):
    /// talks to a running daemon.
    Client {
        /// The command's name.
        name: String,
        /// Its arguments.
        matches: clap::ArgMatches,
        /// Where the daemon is, from the global flags.
        endpoints: crate::client::Endpoints,
    },
    /// `podvisor journal status|accept-loss`: the journal in `state_dir`,
    /// with the daemon stopped.
    Journal {
        /// What to do.
        action: JournalAction,
        /// `--state-dir`.
        state_dir: std::path::PathBuf,
    },
}

// By hand: a `CloudManager` is shown by its name. The provider
// configuration's own `Debug` redacts its secrets.
impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invocation::Run {
                global,
                manager,
                provider,
            } => f
                .debug_struct("Run")
                .field("global", global)
                .field("manager", &manager.name())
                .field("provider", provider)
                .finish(),
            Invocation::Version => f.write_str("Version"),
            Invocation::Client {
                name, endpoints, ..
            } => f
                .debug_struct("Client")
                .field("name", name)
                .field("endpoints", endpoints)
                .finish_non_exhaustive(),
            Invocation::Journal { action, state_dir } => f
                .debug_struct("Journal")
                .field("action", action)
                .field("state_dir", state_dir)
                .finish(),
        }
    }
}

/// What `podvisor journal` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalAction {
    /// Print the journal's identity and integrity verdict.
    Status,
    /// Accept that the journal lost records: its orphan GC may delete this
    /// journal's unowned instances again.
    AcceptLoss,
    /// Take an instance the journal lost back under a record, so that it is
    /// recovered (found by its token) at the next start and deleted by its
    /// pod's StopVM like any other.
    Adopt {
        /// The instance's `podvisor.io/sandbox` tag.
        sandbox: String,
        /// Its `podvisor.io/token` tag.
        token: String,
        /// Its pod, `<namespace>/<name>`.
        pod: String,
    },
}

/// The whole command, with one subcommand per compiled-in provider.
pub fn command() -> clap::Command {
    let mut cmd = with_provider_defaults(GlobalArgs::command(), &registry());
    for manager in registry() {
        cmd = cmd.subcommand(manager.command());
    }
    cmd.subcommand(clap::Command::new("version").about("Print the version"))
        .subcommands(crate::client::commands())
        .subcommand(
            clap::Command::new("journal")
                .about("Inspect the journal in --state-dir, with the daemon stopped")
                .subcommand_required(true)
                .subcommand(
                    clap::Command::new("status")
                        .about("Print the journal's id and whether it may have lost records"),
                )
                .subcommand(clap::Command::new("accept-loss").about(
                    "Accept that the journal lost records: from the next start the orphan GC deletes this journal's instances that no record owns (after --gc-grace-period)",
                ))
                .subcommand(
                    clap::Command::new("adopt")
                        .about("Keep an instance the journal lost: record it again, from the tags the log names, so the next start recovers it and its pod's StopVM deletes it")
                        .arg(clap::Arg::new("sandbox").long("sandbox").required(true).value_name("ID").help("The instance's podvisor.io/sandbox tag"))
                        .arg(clap::Arg::new("token").long("token").required(true).value_name("TOKEN").help("The instance's podvisor.io/token tag"))
                        .arg(clap::Arg::new("pod").long("pod").required(true).value_name("NAMESPACE/NAME").help("The pod the instance serves")),
                ),
        )
}

/// Ends the help of `--provider-rate`, `--provider-burst` and their read
/// twins with each
/// provider's default, as the providers declare them
/// ([`CloudManager::default_call_limits`]).
fn with_provider_defaults(cmd: clap::Command, managers: &[&dyn CloudManager]) -> clap::Command {
    let rate = providers_defaults(managers, |l| l.rate.to_string());
    let burst = providers_defaults(managers, |l| l.burst.to_string());
    let read_rate = providers_defaults(managers, |l| l.read_rate.to_string());
    let read_burst = providers_defaults(managers, |l| l.read_burst.to_string());
    let append = |defaults: String| {
        move |arg: clap::Arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [default: the provider's; {defaults}]"))
        }
    };
    cmd.mut_arg("provider_rate", append(rate))
        .mut_arg("provider_burst", append(burst))
        .mut_arg("provider_read_rate", append(read_rate))
        .mut_arg("provider_read_burst", append(read_burst))
}

/// One call limit's default per provider, `aws 2, local and libvirt 5`:
/// providers with the same value share it, and the values a provider
/// declares for itself come before [`CallLimits::DEFAULT`]'s.
fn providers_defaults(
    managers: &[&dyn CloudManager],
    value: impl Fn(CallLimits) -> String,
) -> String {
    let shared = value(CallLimits::DEFAULT);
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for m in managers {
        let v = value(m.default_call_limits());
        match groups.iter_mut().find(|(g, _)| *g == v) {
            Some((_, names)) => names.push(m.name()),
            None => groups.push((v, vec![m.name()])),
        }
    }
    // A stable sort: in registry order within "own" and "shared".
    groups.sort_by_key(|(v, _)| *v == shared);
    groups
        .iter()
        .map(|(v, names)| {
            let names = match names.split_last() {
                Some((last, [])) => (*last).to_owned(),
                Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                None => String::new(),
            };
            format!("{names} {v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command line that cannot run.
#[derive(Debug)]
pub enum CliError {
    /// clap's own error (also `--help` and `--version`, which it prints).
    Clap(clap::Error),
    /// A value that parsed but is not acceptable.
    Config(ConfigError),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{e}"),
            // Said once, even by a provider that kept clap's own prefix.
            CliError::Config(e) => {
                let message = e.message.trim_start();
                write!(
                    f,
                    "error: {}",
                    message.strip_prefix("error: ").unwrap_or(message)
                )
            }
        }
    }
}

/// The environment variable that names the provider when the command line
/// names none: the reference's, so a migrated DaemonSet runs as it did.
pub const CLOUD_PROVIDER: &str = "CLOUD_PROVIDER";

/// Parses a command line (the first item is the program name).
///
/// # Errors
/// [`CliError::Clap`] for what clap refuses (an unknown or malformed flag,
/// a missing subcommand) and for `--help`/`--version`, which it prints;
/// [`CliError::Config`] naming the flag and its variable when a value
/// parses but is not acceptable (a TLS version or cipher suite, the tunnel
/// type, a call rate, retry timings, or the provider's own flags).
pub fn parse<I, T>(args: I) -> Result<Invocation, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cmd = ignore_empty_env(command());
    let mut args = go_style_flags(&cmd, args.into_iter().map(Into::into).collect());
    let matches = match cmd.clone().try_get_matches_from(&args) {
        Ok(matches) => matches,
        Err(e) if names_no_subcommand(&e) => {
            // No provider on the command line: CLOUD_PROVIDER's, if set.
            let Some(name) = std::env::var_os(CLOUD_PROVIDER).filter(|v| !v.is_empty()) else {
                return Err(CliError::Clap(e));
            };
            let known = name
                .to_str()
                .is_some_and(|n| registry().iter().any(|m| m.name() == n));
            if !known {
                let name = name.to_string_lossy();
                return Err(CliError::Clap(unknown_provider(&cmd, &name, true)));
            }
            // After the global flags, where the provider name goes.
            args.push(name);
            cmd.clone()
                .try_get_matches_from(&args)
                .map_err(|e| CliError::Clap(explain(e, &cmd, &args)))?
        }
        Err(e) => return Err(CliError::Clap(explain(e, &cmd, &args))),
    };
    let Some((name, sub)) = matches.subcommand() else {
        // clap requires one; said as it would be.
        return Err(CliError::Clap(cmd.clone().error(
            clap::error::ErrorKind::MissingSubcommand,
            format!("no provider given: name one after the global flags, or set {CLOUD_PROVIDER}"),
        )));
    };
    if name == "version" {
        return Ok(Invocation::Version);
    }
    let global = GlobalArgs::from_arg_matches(&matches).map_err(CliError::Clap)?;
    if crate::client::NAMES.contains(&name) {
        return Ok(Invocation::Client {
            name: name.to_owned(),
            matches: sub.clone(),
            endpoints: crate::client::Endpoints::from(&global),
        });
    }
    if name == "journal" {
        let action = match sub.subcommand() {
            Some(("accept-loss", _)) => JournalAction::AcceptLoss,
            Some(("adopt", args)) => {
                let arg = |name: &str| args.get_one::<String>(name).cloned().unwrap_or_default();
                JournalAction::Adopt {
                    sandbox: arg("sandbox"),
                    token: arg("token"),
                    pod: arg("pod"),
                }
            }
            _ => JournalAction::Status,
        };
        return Ok(Invocation::Journal {
            action,
            state_dir: global.state_dir,
        });
    }
    validate(&global).map_err(CliError::Config)?;
    let Some(manager) = registry().into_iter().find(|m| m.name() == name) else {
        // clap accepts only the subcommands it was given.
        return Err(CliError::Clap(unknown_provider(&cmd, name, false)));
    };
    let provider = manager.configure(sub).map_err(CliError::Config)?;
    Ok(Invocation::Run {
        global: Box::new(global),
        manager,
        provider,
    })
}

/// An endpoint's address, `IP:port`: host names are not resolved, so
/// `localhost:9797` is refused with the form to use instead.
///
/// # Errors
/// A message naming the expected form, for clap to show with the flag.
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        "use IP:port, for example 127.0.0.1:9797 or [::1]:9797 (host names are not resolved)"
            .to_owned()
    })
}

/// Checks what clap's types cannot express.
fn validate(g: &GlobalArgs) -> Result<(), ConfigError> {
    ConfigError::check_directory("state-dir", "PODVISOR_STATE_DIR", &g.state_dir)?;
    ConfigError::check_directory("pods-dir", "PODS_DIR", &g.kata.pods_dir)?;
    if let Some(v) = &g.tls.tls_min_version
        && !matches!(v.as_str(), "VersionTLS12" | "VersionTLS13")
    {
        return Err(ConfigError::flag(
            "tls-min-version",
            Some("TLS_MIN_VERSION"),
            format!("'{v}' is not VersionTLS12 or VersionTLS13"),
        ));
    }
    if let Some(list) = &g.tls.tls_cipher_suites {
        podvisor_podvm::tls::TlsPolicy::new(g.tls.tls_min_version.as_deref(), Some(list))
            .map_err(|e| ConfigError::flag("tls-cipher-suites", Some("TLS_CIPHER_SUITES"), e))?;
    }
    if g.tunnel.tunnel_type != "vxlan" {
        return Err(ConfigError::flag(
            "tunnel-type",
            Some("TUNNEL_TYPE"),
            format!(
                "'{}' is not supported; the only tunnel type is vxlan",
                g.tunnel.tunnel_type
            ),
        ));
    }
    if !(1..=MAX_VNI).contains(&g.tunnel.vxlan_min_id) {
        return Err(ConfigError::flag(
            "vxlan-min-id",
            None,
            format!(
                "{} is not a VXLAN network identifier (1 to {MAX_VNI}: 24 bits, RFC 7348)",
                g.tunnel.vxlan_min_id
            ),
        ));
    }
    if g.tunnel.vxlan_port == 0 {
        return Err(ConfigError::flag(
            "vxlan-port",
            Some("VXLAN_PORT"),
            "0 is not a UDP port",
        ));
    }
    if g.pod_vms.ext_network_via_podvm {
        return Err(ConfigError::flag(
            "ext-network-via-podvm",
            Some("EXTERNAL_NETWORK_VIA_PODVM"),
            "routing the pod's external traffic through the pod VM (experimental in the \
             reference) is not supported: unset it or set it to false",
        ));
    }
    g.pod_vms
        .pod_subnets()
        .map_err(|e| ConfigError::flag("pod-subnet-cidrs", Some("POD_SUBNET_CIDRS"), e))?;
    for (rate, flag, env) in [
        (
            g.provider_calls.provider_rate,
            "provider-rate",
            "PODVISOR_PROVIDER_RATE",
        ),
        (
            g.provider_calls.provider_read_rate,
            "provider-read-rate",
            "PODVISOR_PROVIDER_READ_RATE",
        ),
    ] {
        if let Some(rate) = rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(ConfigError::flag(
                flag,
                Some(env),
                format!("{rate} is not a positive number of calls per second"),
            ));
        }
    }
    if g.lifecycle.retry_base.is_zero() || g.lifecycle.retry_cap < g.lifecycle.retry_base {
        return Err(ConfigError::flag(
            "retry-cap",
            Some("PODVISOR_RETRY_CAP"),
            format!(
                "must be at least --retry-base, and --retry-base above zero ({:?} / {:?})",
                g.lifecycle.retry_cap, g.lifecycle.retry_base
            ),
        ));
    }
    if g.kata.proxy_timeout.is_zero() {
        return Err(ConfigError::flag(
            "proxy-timeout",
            Some("PROXY_TIMEOUT"),
            "must be above zero",
        ));
    }
    if g.gc.gc_interval.is_zero() {
        return Err(ConfigError::flag(
            "gc-interval",
            Some("PODVISOR_GC_INTERVAL"),
            "must be above zero",
        ));
    }
    for (flag, timeout) in [
        ("admin-header-timeout", g.endpoints.admin_header_timeout),
        ("admin-idle-timeout", g.endpoints.admin_idle_timeout),
    ] {
        if timeout.is_zero() {
            return Err(ConfigError::flag(flag, None, "must be above zero"));
        }
    }
    if let Some(data) = &g.pod_vms.initdata {
        crate::api::annotations::initdata_setting(data)
            .map_err(|why| ConfigError::flag("initdata", Some("INITDATA"), why))?;
    }
    if let Some(node) = &g.node_name
        && node.trim().is_empty()
    {
        return Err(ConfigError::flag(
            "node-name",
            Some("NODE_NAME"),
            "is empty",
        ));
    }
    if g.grpc_socket_path() == g.kata.socket {
        return Err(ConfigError::flag(
            "grpc-socket",
            Some("PODVISOR_GRPC_SOCKET"),
            format!(
                "{} is the Kata socket (--socket); the gRPC socket needs a path of its own",
                g.kata.socket.display()
            ),
        ));
    }
    let tls = &g.tls;
    if (tls.cert_file.is_some() || tls.cert_key.is_some() || tls.ca_cert_file.is_some())
        && !(tls.cert_file.is_some() && tls.cert_key.is_some() && tls.ca_cert_file.is_some())
    {
        return Err(ConfigError::flag(
            "cert-file",
            Some("CERT_FILE"),
            "--ca-cert-file, --cert-file and --cert-key go together",
        ));
    }
    Ok(())
}

/// Unbinds environment variables that are set but empty: the reference
/// treats them as unset, clap would read them as an empty value.
fn ignore_empty_env(cmd: clap::Command) -> clap::Command {
    let ids: Vec<_> = cmd
        .get_arguments()
        .filter(|a| {
            a.get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| v.is_empty())
        })
        .map(|a| a.get_id().clone())
        .collect();
    let mut cmd = ids
        .into_iter()
        .fold(cmd, |cmd, id| cmd.mut_arg(id, |a| a.env(None)));
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(name, ignore_empty_env);
    }
    cmd
}

/// Rewrites Go-style `-flag` / `-flag=value` to `--flag` where `flag` is a
/// long flag of this command or a provider's.
fn go_style_flags(cmd: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let mut longs = std::collections::BTreeSet::new();
    let mut collect = |c: &clap::Command| {
        for a in c.get_arguments() {
            if let Some(l) = a.get_long() {
                longs.insert(l.to_owned());
            }
        }
    };
    collect(cmd);
    for sub in cmd.get_subcommands() {
        collect(sub);
    }
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            let Some(s) = arg.to_str() else { return arg };
            if i == 0 || !s.starts_with('-') || s.starts_with("--") || s.len() < 3 {
                return arg;
            }
            let name = s[1..].split('=').next().unwrap_or_default();
            if longs.contains(name) {
                OsString::from(format!("-{s}"))
            } else {
                arg
            }
        })
        .collect()
}

/// Whether clap refused the command line for naming no subcommand (the
/// provider): with flags only, or with nothing at all (then it prints the
/// help).
fn names_no_subcommand(err: &clap::Error) -> bool {
    use clap::error::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

/// clap's error, said in the operator's terms where clap's own would
/// mislead: an unknown provider lists the ones this build has, a global
/// flag after the provider says where it goes, and a bad value from an
/// environment variable names the variable.
fn explain(err: clap::Error, cmd: &clap::Command, args: &[OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let position = subcommand_position(cmd, args);
    match (err.kind(), err.get(ContextKind::InvalidSubcommand)) {
        // A name podvisor does not know, close to a subcommand it has:
        // clap's "a similar subcommand exists" says it best.
        (ErrorKind::InvalidSubcommand, Some(ContextValue::String(name)))
            if position.is_some_and(|i| args[i].to_str() == Some(name.as_str()))
                && (KNOWN_PROVIDERS.iter().any(|(known, _)| known == name)
                    || err.get(ContextKind::SuggestedSubcommand).is_none()) =>
        {
            return unknown_provider(cmd, name, false);
        }
        _ => {}
    }
    if let (ErrorKind::UnknownArgument, Some(ContextValue::String(arg)), Some(position)) =
        (err.kind(), err.get(ContextKind::InvalidArg), position)
        && let Some(e) = global_flag_after_subcommand(cmd, args, position, arg)
    {
        return e;
    }
    name_env(err, cmd, args)
}

/// The index in `args` of the subcommand (the provider): the first
/// argument that is neither a global flag nor a global flag's value.
/// `None` when there is none.
fn subcommand_position(cmd: &clap::Command, args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(arg) = args.get(i) {
        let Some(text) = arg.to_str() else {
            return Some(i);
        };
        if text == "--" {
            return None;
        }
        if let Some(long) = text.strip_prefix("--") {
            if !long.contains('=') && global_flag(cmd, long).is_some_and(takes_value) {
                // Its value, however it looks.
                i += 1;
            }
        } else if !text.starts_with('-') || text == "-" {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The global flag whose long name is `long`.
fn global_flag<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

/// Whether a flag is followed by a value (`--state-dir DIR`), not a switch.
fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// The error for a global flag given after the subcommand at `position`,
/// where clap would only suggest a provider flag of a similar name; `None`
/// if `unknown` (as clap shows it) is not a global flag.
fn global_flag_after_subcommand(
    cmd: &clap::Command,
    args: &[OsString],
    position: usize,
    unknown: &str,
) -> Option<clap::Error> {
    let long = unknown.strip_prefix("--")?;
    let long = long.split_once('=').map_or(long, |(name, _)| name);
    let flag = global_flag(cmd, long)?;
    let subcommand = args.get(position)?.to_string_lossy();
    let is_provider = registry().iter().any(|m| m.name() == subcommand);
    let value = if takes_value(flag) { " …" } else { "" };
    let (what, example) = if is_provider {
        (
            "the provider name",
            format!("podvisor --{long}{value} {subcommand}"),
        )
    } else {
        (
            "the subcommand",
            format!("podvisor --{long}{value} {subcommand} …"),
        )
    };
    Some(
        clap::Error::raw(
            clap::error::ErrorKind::UnknownArgument,
            format!("--{long} is a global flag: global flags go before {what}: {example}\n"),
        )
        .with_cmd(cmd),
    )
}

/// The error for a provider this build does not have (`from_env`: named
/// by [`CLOUD_PROVIDER`]): the ones it has, and the cargo feature that
/// adds a known one (or that podvisor has no such provider yet).
fn unknown_provider(cmd: &clap::Command, name: &str, from_env: bool) -> clap::Error {
    let built: Vec<&str> = registry().iter().map(|m| m.name()).collect();
    let source = if from_env {
        format!(" (from the environment variable {CLOUD_PROVIDER})")
    } else {
        String::new()
    };
    clap::Error::raw(
        clap::error::ErrorKind::InvalidSubcommand,
        format!(
            "unknown provider '{name}'{source}: {}\n",
            missing_provider(name, &built)
        ),
    )
    .with_cmd(cmd)
}

/// What to do about a provider called `name` that is not among `built`:
/// `this build has local, aws; libvirt needs a build with --features
/// libvirt`.
fn missing_provider(name: &str, built: &[&str]) -> String {
    let has = match built {
        [] => "this build has no provider".to_owned(),
        names => format!("this build has {}", names.join(", ")),
    };
    match KNOWN_PROVIDERS.iter().find(|(known, _)| *known == name) {
        Some((_, Some(feature))) => {
            format!("{has}; {name} needs a build with --features {feature}")
        }
        Some((_, None)) => format!("{has}; {name} is not available in podvisor yet"),
        None => format!("{has} (podvisor --help lists them)"),
    }
}

/// Adds the environment variable to clap's error when the bad value came
/// from one, so the operator knows where to look.
fn name_env(err: clap::Error, cmd: &clap::Command, args: &[OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return err;
    }
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let all = std::iter::once(cmd).chain(cmd.get_subcommands());
    for c in all {
        for a in c.get_arguments() {
            let (Some(long), Some(env)) = (a.get_long(), a.get_env()) else {
                continue;
            };
            let flag = format!("--{long}");
            let on_cli = args.iter().any(|x| {
                x.to_str()
                    .is_some_and(|s| s == flag || s.starts_with(&format!("{flag}=")))
            });
            if (shown == &flag || shown.starts_with(&format!("{flag} ")))
                && !on_cli
                && std::env::var_os(env).is_some()
            {
                // `raw` errors get clap's "error: " prefix again when
                // printed: keep it once. The variable goes on the error's
                // own line, before clap's lists and hints.
                let rendered = err.render().to_string();
                let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered);
                let (first, rest) = rendered.split_once('\n').unwrap_or((rendered, ""));
                let message = format!(
                    "{first} (from the environment variable {})\n{rest}",
                    env.to_string_lossy()
                );
                return clap::Error::raw(ErrorKind::ValueValidation, message).with_cmd(cmd);
            }
        }
    }
    err
}

/// `--lease-duration`: a duration of whole seconds, at least 3 s (a
/// Lease keeps seconds, and every daemon of the cluster reads it every
/// third of the duration).
fn parse_lease_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{text} is not a whole number of seconds (a Lease keeps seconds)"
        ));
    }
    if d < Duration::from_secs(3) {
        return Err(format!(
            "{text} is below 3s: every daemon of the cluster would read the Lease more than once a second"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<Invocation, CliError> {
        let mut args = vec!["podvisor"];
        args.extend_from_slice(extra);
        parse(args)
    }

    fn global(extra: &[&str]) -> GlobalArgs {
        match run_args(extra) {
            Ok(Invocation::Run { global, .. }) => *global,
            Ok(Invocation::Version | Invocation::Journal { .. } | Invocation::Client { .. }) => {
                panic!("not a run")
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn err(extra: &[&str]) -> String {
        match run_args(extra) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{extra:?} parsed"),
        }
    }

    #[test]
    fn an_address_with_a_host_name_says_to_use_ip_and_port() {
        for flag in ["--admin-addr", "--grpc-addr"] {
            let e = err(&[flag, "localhost:9797", "local"]);
            assert!(e.contains("use IP:port, for example 127.0.0.1:9797"), "{e}");
            assert!(e.contains(flag), "{e}");
        }
        let g = global(&["--admin-addr", "[::1]:9000", "local"]);
        assert_eq!(g.endpoints.admin_addr, "[::1]:9000".parse().unwrap());
    }

    #[test]
    fn a_lease_duration_is_whole_seconds_and_at_least_three() {
        assert_eq!(
            global(&["local"]).pod_inputs.lease_duration,
            Duration::from_secs(60)
        );
        assert_eq!(
            global(&["--lease-duration", "3s", "local"])
                .pod_inputs
                .lease_duration,
            Duration::from_secs(3)
        );
        let e = err(&["--lease-duration", "0s", "local"]);
        assert!(
            e.contains("below 3s") && e.contains("--lease-duration"),
            "{e}"
        );
        let e = err(&["--lease-duration", "1500ms", "local"]);
        assert!(e.contains("not a whole number of seconds"), "{e}");
    }

    #[test]
    fn a_state_or_pods_dir_that_is_a_file_is_not_a_directory() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        for (flag, env) in [
            ("--state-dir", "PODVISOR_STATE_DIR"),
            ("--pods-dir", "PODS_DIR"),
        ] {
            let e = err(&[flag, path, "local"]);
            assert_eq!(
                e,
                format!("error: {flag} ({env}): {path} is not a directory"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn defaults_match_the_reference() {
        let g = global(&["local"]);
        assert_eq!(g.kata.socket, PathBuf::from("/run/peerpod/hypervisor.sock"));
        assert_eq!(g.kata.pods_dir, PathBuf::from("/run/peerpod/pods"));
        assert_eq!(g.kata.forwarder_port, 15150);
        assert_eq!(g.kata.proxy_timeout, Duration::from_secs(300));
        assert_eq!(g.pod_vms.peerpods_limit_per_node, 10);
        assert_eq!(g.tunnel.vxlan_port, 4789);
        assert_eq!(g.endpoints.admin_addr, "127.0.0.1:9797".parse().unwrap());
        assert_eq!(g.endpoints.grpc_addr, "127.0.0.1:9798".parse().unwrap());
    }

    #[test]
    fn the_connection_cap_defaults_to_512_per_endpoint_and_is_at_least_one() {
        assert_eq!(global(&["local"]).max_connections_per_endpoint, 512);
        let g = global(&["--max-connections-per-endpoint", "64", "local"]);
        assert_eq!(g.max_connections_per_endpoint, 64);
        let e = err(&["--max-connections-per-endpoint", "0", "local"]);
        assert!(e.contains("--max-connections-per-endpoint"), "{e}");
    }

    #[test]
    fn admin_connection_limits_default_to_10s_and_a_minute_and_must_be_above_zero() {
        let g = global(&["local"]);
        let defaults = crate::admin::server::ConnectionTimeouts::default();
        assert_eq!(g.endpoints.admin_header_timeout, defaults.header);
        assert_eq!(g.endpoints.admin_idle_timeout, defaults.idle);
        let g = global(&[
            "--admin-header-timeout",
            "2s",
            "--admin-idle-timeout",
            "5s",
            "local",
        ]);
        assert_eq!(g.endpoints.admin_header_timeout, Duration::from_secs(2));
        assert_eq!(g.endpoints.admin_idle_timeout, Duration::from_secs(5));
        for flag in ["--admin-header-timeout", "--admin-idle-timeout"] {
            let e = err(&[flag, "0s", "local"]);
            assert!(e.contains(flag) && e.contains("above zero"), "{e}");
        }
    }

    #[test]
    fn the_grpc_socket_sits_next_to_the_kata_socket_unless_given() {
        let g = global(&["local"]);
        assert_eq!(
            g.grpc_socket_path(),
            PathBuf::from("/run/peerpod/podvisor-grpc.sock")
        );
        assert_eq!(g.endpoints.grpc_token_file, None);
        let g = global(&["--socket", "/tmp/x/hv.sock", "local"]);
        assert_eq!(
            g.grpc_socket_path(),
            PathBuf::from("/tmp/x/podvisor-grpc.sock")
        );
        let g = global(&["--grpc-socket", "/tmp/y.sock", "local"]);
        assert_eq!(g.grpc_socket_path(), PathBuf::from("/tmp/y.sock"));
    }

    #[test]
    fn go_style_single_dash_flags_are_accepted() {
        let g = global(&[
            "-socket",
            "/tmp/x.sock",
            "-proxy-timeout=30s",
            "local",
            "-create-delay",
            "1s",
        ]);
        assert_eq!(g.kata.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(g.kata.proxy_timeout, Duration::from_secs(30));
        // A negative number is not mistaken for a flag.
        assert_eq!(
            global(&["--peerpods-limit-per-node", "-1", "local"])
                .pod_vms
                .peerpods_limit_per_node,
            -1
        );
    }

    #[test]
    fn bad_values_fail_naming_the_flag() {
        assert!(err(&["--forwarder-port", "0", "local"]).contains("--forwarder-port"));
        assert!(err(&["--forwarder-port", "99999", "local"]).contains("--forwarder-port"));
        assert!(err(&["--proxy-timeout", "5", "local"]).contains("--proxy-timeout"));
        assert!(err(&["--admin-addr", "nowhere", "local"]).contains("--admin-addr"));
        assert!(err(&["--log-format", "xml", "local"]).contains("--log-format"));
        assert!(
            err(&["--tls-min-version", "TLS1.1", "local"])
                .contains("--tls-min-version (TLS_MIN_VERSION)")
        );
        assert!(err(&["--tunnel-type", "geneve", "local"]).contains("--tunnel-type (TUNNEL_TYPE)"));
        assert!(err(&["--vxlan-min-id", "16777216", "local"]).contains("--vxlan-min-id"));
        assert!(err(&["--vxlan-min-id", "0", "local"]).contains("--vxlan-min-id"));
        assert!(err(&["--vxlan-port", "0", "local"]).contains("--vxlan-port (VXLAN_PORT)"));
        assert!(
            err(&["--ext-network-via-podvm", "local"])
                .contains("--ext-network-via-podvm (EXTERNAL_NETWORK_VIA_PODVM)")
        );
        assert!(
            err(&["--pod-subnet-cidrs", "10.0.0.0/8,10.1.2.3/16", "local"])
                .contains("'10.1.2.3/16' has host bits set")
        );
        assert!(
            err(&["--pod-subnet-cidrs", "fd00::/64", "local"])
                .contains("--pod-subnet-cidrs (POD_SUBNET_CIDRS)")
        );
        assert!(err(&["--provider-rate", "0", "local"]).contains("--provider-rate"));
        assert!(err(&["--initdata", "%%%", "local"]).contains("--initdata (INITDATA)"));
        assert!(err(&["--cert-file", "/x", "local"]).contains("go together"));
        assert!(err(&["--node-name", " ", "local"]).contains("--node-name (NODE_NAME)"));
        assert!(
            err(&[
                "--socket",
                "/tmp/a.sock",
                "--grpc-socket",
                "/tmp/a.sock",
                "local"
            ])
            .contains("--grpc-socket (PODVISOR_GRPC_SOCKET)")
        );
        assert!(err(&["nosuchcloud"]).contains("nosuchcloud"));
        assert!(err(&["local", "--create-delay", "x"]).contains("--create-delay"));
    }

    #[test]
    fn call_limits_are_the_providers_unless_a_flag_sets_them() {
        let provider = CallLimits {
            rate: 2.0,
            burst: 20,
            read_rate: 10.0,
            read_burst: 50,
        };
        // Neither flag (nor variable): the provider's default.
        let g = global(&["--provider-max-inflight", "3", "local"]);
        assert_eq!(
            (
                g.provider_calls.provider_rate,
                g.provider_calls.provider_burst
            ),
            (None, None)
        );
        assert_eq!(g.provider_calls.call_limits(provider), provider);
        // Each flag wins on its own; the other value stays the provider's.
        let g = global(&["--provider-rate", "0.5", "local"]);
        assert_eq!(
            g.provider_calls.call_limits(provider),
            CallLimits {
                rate: 0.5,
                ..provider
            }
        );
        let g = global(&["-provider-burst=3", "local"]);
        assert_eq!(
            g.provider_calls.call_limits(provider),
            CallLimits {
                burst: 3,
                ..provider
            }
        );
        let g = global(&["--provider-rate", "7", "--provider-burst", "70", "local"]);
        assert_eq!(
            g.provider_calls.call_limits(provider),
            CallLimits {
                rate: 7.0,
                burst: 70,
                ..provider
            }
        );
        // The read bucket's flags, each on its own.
        let g = global(&["--provider-read-rate", "1.5", "local"]);
        assert_eq!(
            g.provider_calls.call_limits(provider),
            CallLimits {
                read_rate: 1.5,
                ..provider
            }
        );
        let g = global(&["--provider-read-burst", "4", "local"]);
        assert_eq!(
            g.provider_calls.call_limits(provider),
            CallLimits {
                read_burst: 4,
                ..provider
            }
        );
    }

    #[test]
    fn bad_call_limits_fail_naming_the_flag() {
        for bad in ["0", "-1", "NaN", "inf", "fast"] {
            let e = err(&["--provider-rate", bad, "local"]);
            assert!(e.contains("--provider-rate"), "{bad}: {e}");
        }
        assert!(
            err(&["--provider-rate", "0", "local"])
                .contains("--provider-rate (PODVISOR_PROVIDER_RATE)")
        );
        for bad in ["0", "-3", "many"] {
            let e = err(&["--provider-burst", bad, "local"]);
            assert!(e.contains("--provider-burst"), "{bad}: {e}");
            let e = err(&["--provider-read-burst", bad, "local"]);
            assert!(e.contains("--provider-read-burst"), "{bad}: {e}");
        }
        for bad in ["0", "-1", "NaN", "inf", "fast"] {
            let e = err(&["--provider-read-rate", bad, "local"]);
            assert!(e.contains("--provider-read-rate"), "{bad}: {e}");
        }
        assert!(
            err(&["--provider-read-rate", "0", "local"])
                .contains("--provider-read-rate (PODVISOR_PROVIDER_READ_RATE)")
        );
    }

    #[test]
    fn help_lists_every_provider() {
        let help = command().render_help().to_string();
        for m in registry() {
            assert!(help.contains(m.name()), "{help}");
        }
        assert!(help.contains("REMOTE_HYPERVISOR_ENDPOINT"));
    }

    /// A registered provider that declares `.1` as its call limits.
    struct Declares(&'static str, CallLimits);

    impl CloudManager for Declares {
        fn name(&self) -> &'static str {
            self.0
        }

        fn command(&self) -> clap::Command {
            clap::Command::new(self.0)
        }

        fn configure(
            &self,
            _matches: &clap::ArgMatches,
        ) -> Result<Box<dyn ProviderConfig>, ConfigError> {
            Err(ConfigError::flag("none", None, "a test's provider"))
        }

        fn default_call_limits(&self) -> CallLimits {
            self.1
        }
    }

    #[test]
    fn help_gives_each_providers_own_call_limits_then_the_shared_default() {
        let own = CallLimits {
            rate: 2.0,
            burst: 20,
            read_rate: 10.0,
            read_burst: 50,
        };
        let local = Declares("local", CallLimits::DEFAULT);
        let aws = Declares("aws", own);
        let libvirt = Declares("libvirt", CallLimits::DEFAULT);
        let managers: [&dyn CloudManager; 3] = [&local, &aws, &libvirt];
        let rate: fn(CallLimits) -> String = |l| l.rate.to_string();
        let burst: fn(CallLimits) -> String = |l| l.burst.to_string();
        let read_rate: fn(CallLimits) -> String = |l| l.read_rate.to_string();
        let read_burst: fn(CallLimits) -> String = |l| l.read_burst.to_string();
        assert_eq!(
            providers_defaults(&managers, rate),
            "aws 2, local and libvirt 5"
        );
        assert_eq!(
            providers_defaults(&managers, burst),
            "aws 20, local and libvirt 10"
        );
        assert_eq!(providers_defaults(&managers[..1], rate), "local 5");
        // The read defaults: aws shares the read rate with the others.
        assert_eq!(
            providers_defaults(&managers, read_rate),
            "aws 10, local and libvirt 20"
        );
        assert_eq!(
            providers_defaults(&managers, read_burst),
            "aws 50, local and libvirt 100"
        );

        // This build's help names every compiled-in provider.
        let cmd = command();
        for (id, value) in [
            ("provider_rate", rate),
            ("provider_burst", burst),
            ("provider_read_rate", read_rate),
            ("provider_read_burst", read_burst),
        ] {
            let help = cmd
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            let defaults = providers_defaults(&registry(), value);
            assert!(
                help.ends_with(&format!("[default: the provider's; {defaults}]")),
                "{help}"
            );
            for m in registry() {
                assert!(defaults.contains(m.name()), "{id}: {help}");
            }
        }
    }

    #[test]
    fn go_style_rewrite_leaves_values_and_unknown_flags_alone() {
        let cmd = command();
        let out = go_style_flags(
            &cmd,
            ["podvisor", "-socket", "-x", "-5", "--pods-dir", "local"]
                .map(OsString::from)
                .to_vec(),
        );
        assert_eq!(
            out,
            ["podvisor", "--socket", "-x", "-5", "--pods-dir", "local"]
                .map(OsString::from)
                .to_vec()
        );
    }

    #[test]
    fn a_missing_provider_says_which_build_has_it() {
        assert_eq!(
            missing_provider("libvirt", &["local", "aws"]),
            "this build has local, aws; libvirt needs a build with --features libvirt"
        );
        assert_eq!(
            missing_provider("aws", &["local"]),
            "this build has local; aws needs a build with --features aws"
        );
        assert_eq!(
            missing_provider("ibmcloud", &["local"]),
            "this build has local; ibmcloud needs a build with --features ibmcloud"
        );
        assert_eq!(
            missing_provider("azure", &["local"]),
            "this build has local; azure needs a build with --features azure"
        );
        assert_eq!(
            missing_provider("gcp", &["local", "aws"]),
            "this build has local, aws; gcp is not available in podvisor yet"
        );
        assert_eq!(
            missing_provider("vsphere", &["local", "aws"]),
            "this build has local, aws (podvisor --help lists them)"
        );
        assert_eq!(
            missing_provider("vsphere", &[]),
            "this build has no provider (podvisor --help lists them)"
        );
    }

    #[test]
    fn an_unknown_provider_lists_the_ones_this_build_has() {
        let built: Vec<&str> = registry().iter().map(|m| m.name()).collect();
        let e = err(&["--state-dir", "/x", "gcp"]);
        assert_eq!(
            e.trim_end(),
            format!(
                "error: unknown provider 'gcp': this build has {}; gcp is not available in podvisor yet",
                built.join(", ")
            )
        );
        assert_eq!(e.matches("error:").count(), 1, "{e}");
        // A name close to a subcommand keeps clap's suggestion.
        assert!(err(&["loca"]).contains("a similar subcommand exists: 'local'"));
        // A bad journal subcommand is not a provider.
        assert!(!err(&["journal", "statuz"]).contains("provider"));
    }

    #[test]
    fn a_global_flag_after_the_provider_says_where_it_goes() {
        let cases: [(&[&str], &str); 5] = [
            (
                &["local", "--state-dir", "/x"],
                "--state-dir is a global flag: global flags go before the provider name: podvisor --state-dir … local",
            ),
            (
                &["local", "--create-delay", "1s", "--state-dir=/x"],
                "--state-dir is a global flag: global flags go before the provider name: podvisor --state-dir … local",
            ),
            (
                &["--socket", "/s", "local", "-state-dir", "/x"],
                "--state-dir is a global flag: global flags go before the provider name: podvisor --state-dir … local",
            ),
            (
                &["local", "--disable-tls"],
                "--disable-tls is a global flag: global flags go before the provider name: podvisor --disable-tls local",
            ),
            (
                &["journal", "status", "--state-dir", "/x"],
                "--state-dir is a global flag: global flags go before the subcommand: podvisor --state-dir … journal …",
            ),
        ];
        for (args, want) in cases {
            let e = err(args);
            assert_eq!(e.trim_end(), format!("error: {want}"), "{args:?}");
        }
        // A provider flag of a similar name is not mistaken for one.
        assert!(err(&["local", "--stat-dir", "/x"]).contains("--local-dir"));
    }

    #[test]
    fn the_subcommand_is_the_first_word_that_is_no_global_flag_or_value() {
        let cmd = command();
        let at = |args: &[&str]| {
            let args: Vec<OsString> = std::iter::once("podvisor")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect();
            subcommand_position(&cmd, &args)
        };
        assert_eq!(at(&["local"]), Some(1));
        assert_eq!(at(&["--state-dir", "local", "aws"]), Some(3));
        assert_eq!(at(&["--state-dir=/x", "local"]), Some(2));
        assert_eq!(at(&["--disable-tls", "local"]), Some(2));
        assert_eq!(at(&["--peerpods-limit-per-node", "-1", "aws"]), Some(3));
        assert_eq!(at(&["--state-dir", "/x"]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn a_configuration_error_says_error_once() {
        for message in ["--x: bad", "error: --x: bad"] {
            let e = CliError::Config(ConfigError {
                message: message.to_owned(),
            });
            assert_eq!(e.to_string(), "error: --x: bad");
        }
    }
}
