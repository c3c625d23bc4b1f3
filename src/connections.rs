//! Who gets a connection, on every endpoint: the open-file limit, a cap on
//! concurrent connections per endpoint, and an accept loop that never spins.
//!
//! Every endpoint (the Kata socket, both gRPC endpoints, the admin HTTP
//! endpoint and each agent socket) accepts through a [`Gate`]. Left to
//! themselves, the libraries behind them handle a failed `accept` badly:
//! ttrpc's server and tonic retry at once, so a process out of file
//! descriptors (`EMFILE`) with a connection waiting spins a core and, for
//! ttrpc, writes an error line per retry. A gate instead
//!
//! - admits at most `--max-connections-per-endpoint` connections at once and
//!   closes any beyond that as soon as it is accepted, so no endpoint — least
//!   of all the loopback ones any local user can reach — can use up the
//!   daemon's file descriptors and starve the others;
//! - pauses after a failed accept, doubling up to [`ACCEPT_PAUSE_CAP`], and
//!   logs such failures and refusals at most once per [`LOG_WINDOW`] per
//!   endpoint, with the number held back.
//!
//! [`raise_nofile_limit`] lifts the soft `RLIMIT_NOFILE` (1024 under
//! systemd) to the hard limit at start-up, so the caps, not the soft limit,
//! are what bound connections.

use crate::metrics;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;

/// The default of `--max-connections-per-endpoint`. A node's Kata shims
/// hold a handful of connections per sandbox to each endpoint, and
/// monitoring a few more, so this is far above what a busy node uses; and
/// four daemon-wide endpoints at this cap (2,048 descriptors) stay far below
/// the raised open-file limit (systemd's hard limit is 524,288), leaving
/// the rest for the journal, the cloud provider and the agent sockets' pod
/// VM connections.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;

/// Descriptors the daemon needs besides its endpoints' connections (the
/// journal, the provider's HTTP connections, the agent proxies' upstream
/// connections): the open-file limit should leave at least this much above
/// the daemon-wide endpoints' caps.
const RESERVED_FILES: u64 = 1024;

/// The endpoints whose cap counts against the daemon-wide budget (the agent
/// sockets come and go with sandboxes): the Kata socket, the gRPC socket,
/// the gRPC TCP address and the admin endpoint — plus the probe port when
/// `--probe-port` opens one.
const DAEMON_WIDE_ENDPOINTS: u64 = 4;

/// The first pause after a failed accept.
pub const ACCEPT_PAUSE_START: Duration = Duration::from_millis(10);
/// The longest pause between two failed accepts: short enough that an
/// endpoint answers within a second of descriptors coming free, long
/// enough that an endpoint out of them costs nothing.
pub const ACCEPT_PAUSE_CAP: Duration = Duration::from_secs(1);
/// At most one accept-error line, and one refusal line, per endpoint per
/// this long.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Endpoint label of the Kata ttrpc socket (`--socket`).
pub const TTRPC: &str = "ttrpc";
/// Endpoint label of gRPC over TCP (`--grpc-addr`).
pub const GRPC_TCP: &str = "grpc_tcp";
/// Endpoint label of the gRPC unix socket (`--grpc-socket`).
pub const GRPC_UNIX: &str = "grpc_unix";
/// Endpoint label of the admin HTTP endpoint (`--admin-addr`).
pub const ADMIN: &str = "admin";
/// Endpoint label of the startup probe's port (`--probe-port`).
pub const PROBE: &str = "probe";
/// Endpoint label of the agent sockets (`<pods-dir>/<id>/agent.ttrpc`),
/// each with its own cap; one label for all, as metrics carry no
/// per-sandbox labels.
pub const AGENT_PROXY: &str = "agent_proxy";

/// The soft open-file limit to set, given the current `soft` and `hard`
/// ones: the hard limit, if that is higher.
pub fn nofile_target(soft: u64, hard: u64) -> Option<u64> {
    (hard > soft).then_some(hard)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both values;
/// warns, without stopping start-up, when it cannot, or when the limit
/// leaves too little room for `max_connections` on each endpoint (the
/// daemon-wide four, and the probe port when `probe_port`). Returns the
/// soft limit in force afterwards, if it could be read.
pub fn raise_nofile_limit(max_connections: u32, probe_port: bool) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE); keeping it");
            return None;
        }
    };
    let now = match nofile_target(soft, hard) {
        None => {
            tracing::info!(
                soft,
                hard,
                "open-file limit (RLIMIT_NOFILE) already at its hard limit"
            );
            soft
        }
        Some(target) => match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => {
                tracing::info!(
                    before = soft,
                    after = target,
                    hard,
                    "raised the soft open-file limit (RLIMIT_NOFILE) to the hard limit"
                );
                target
            }
            Err(e) => {
                tracing::warn!(
                    soft,
                    hard,
                    error = %e,
                    "cannot raise the soft open-file limit (RLIMIT_NOFILE) to the hard limit; keeping it"
                );
                soft
            }
        },
    };
    let endpoints = DAEMON_WIDE_ENDPOINTS + u64::from(probe_port);
    let wanted = endpoints * u64::from(max_connections) + RESERVED_FILES;
    if now < wanted {
        tracing::warn!(
            limit = now,
            wanted,
            max_connections_per_endpoint = max_connections,
            "the open-file limit is below what the connection caps need ({endpoints} endpoints × --max-connections-per-endpoint + {RESERVED_FILES}): a flood of connections can still use up file descriptors; raise the hard limit (systemd LimitNOFILE=) or lower --max-connections-per-endpoint (PODVISOR_MAX_CONNECTIONS)"
        );
    }
    Some(now)
}

/// The pause after `failures` failed accepts in a row (1-based):
/// [`ACCEPT_PAUSE_START`] doubling up to [`ACCEPT_PAUSE_CAP`].
pub fn accept_pause(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    ACCEPT_PAUSE_START
        .saturating_mul(1u32 << exp)
        .min(ACCEPT_PAUSE_CAP)
}

/// Lets one log line through per window and counts the ones held back, so
/// that an error repeated thousands of times a second costs one line.
#[derive(Debug)]
pub struct Throttle {
    /// Least time between two lines.
    window: Duration,
    /// When the last line was let through.
    last: Option<Instant>,
    /// Lines held back since then.
    held_back: u64,
}

impl Throttle {
    /// One line per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: None,
            held_back: 0,
        }
    }

    /// Whether a line may be written at `now`: `Some(n)`, with `n` the
    /// lines held back since the last one, or `None` (and counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.window => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// [`Throttle::allow`] on a throttle shared between tasks, now.
fn allow_now(throttle: &Mutex<Throttle>) -> Option<u64> {
    throttle
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow(Instant::now())
}

/// A listener a [`Gate`] accepts from.
pub trait Accept: Send + Sync + 'static {
    /// An accepted connection.
    type Io: Send + 'static;
    /// The peer's address.
    type Addr: Send + 'static;
    /// Accepts one connection (cancel-safe, as Tokio's listeners are).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(
        &self,
    ) -> impl Future<Output = io::Result<(UnixStream, tokio::net::unix::SocketAddr)>> + Send {
        UnixListener::accept(self)
    }
}

/// True for an accept error that concerns one connection only (its peer
/// gave up while it waited): the next accept may succeed at once, so there
/// is nothing to wait for.
fn concerns_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// One endpoint's admission: its cap, its metrics and its throttled log.
#[derive(Debug)]
pub struct Gate {
    /// The endpoint label of the metrics and log lines.
    endpoint: &'static str,
    /// Where it listens (an address or a socket path), for the log.
    place: String,
    /// The cap.
    max: usize,
    /// One permit per connection that may be open.
    slots: Arc<Semaphore>,
    /// Accept failures' log lines.
    error_log: Mutex<Throttle>,
    /// Refusals' log lines.
    refusal_log: Mutex<Throttle>,
}

impl Gate {
    /// The gate of `endpoint` (one of the labels above) listening at
    /// `place`, admitting at most `max` connections at once (at least 1).
    pub fn new(endpoint: &'static str, place: impl Into<String>, max: u32) -> Arc<Self> {
        let max = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        // Zero series from the start, so a dashboard shows the endpoint
        // before anything goes wrong on it.
        metrics::counter!(metrics::CONNECTIONS_REFUSED, "endpoint" => endpoint).increment(0);
        metrics::counter!(metrics::CONNECTION_ACCEPT_ERRORS, "endpoint" => endpoint).increment(0);
        metrics::gauge!(metrics::CONNECTIONS_OPEN, "endpoint" => endpoint).increment(0.0);
        Arc::new(Self {
            endpoint,
            place: place.into(),
            max,
            slots: Arc::new(Semaphore::new(max)),
            error_log: Mutex::new(Throttle::new(LOG_WINDOW)),
            refusal_log: Mutex::new(Throttle::new(LOG_WINDOW)),
        })
    }

    /// Waits for the next connection this endpoint admits. A connection
    /// beyond the cap is closed at once and counted; after a failed accept
    /// (`EMFILE`, `ENFILE`, `ENOBUFS`, …) it pauses, longer after each
    /// failure in a row. Cancel-safe: a connection is never held across an
    /// await.
    pub async fn admit<L: Accept>(&self, listener: &L) -> (Admitted<L::Io>, L::Addr) {
        let mut failures = 0u32;
        loop {
            match listener.accept().await {
                Ok((io, addr)) => {
                    failures = 0;
                    match self.slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let open = metrics::gauge!(metrics::CONNECTIONS_OPEN, "endpoint" => self.endpoint);
                            open.increment(1.0);
                            return (
                                Admitted {
                                    io,
                                    slot: Slot {
                                        _permit: permit,
                                        open,
                                    },
                                },
                                addr,
                            );
                        }
                        Err(_) => {
                            drop(io);
                            self.refused();
                        }
                    }
                }
                Err(e) if concerns_one_connection(&e) => {}
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = accept_pause(failures);
                    self.failed(&e, pause);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    fn refused(&self) {
        metrics::counter!(metrics::CONNECTIONS_REFUSED, "endpoint" => self.endpoint).increment(1);
        let allowed = allow_now(&self.refusal_log);
        if let Some(held_back) = allowed {
            tracing::warn!(
                endpoint = self.endpoint,
                at = %self.place,
                max_connections = self.max,
                refused_before_unlogged = held_back,
                "connection closed at once: the endpoint already has its most connections (--max-connections-per-endpoint); logged at most every {}s",
                LOG_WINDOW.as_secs()
            );
        }
    }

    fn failed(&self, e: &io::Error, pause: Duration) {
        metrics::counter!(metrics::CONNECTION_ACCEPT_ERRORS, "endpoint" => self.endpoint)
            .increment(1);
        let allowed = allow_now(&self.error_log);
        if let Some(held_back) = allowed {
            tracing::warn!(
                endpoint = self.endpoint,
                at = %self.place,
                error = %e,
                errors_before_unlogged = held_back,
                pause_ms = pause.as_millis() as u64,
                "cannot accept a connection; trying again after a pause (logged at most every {}s)",
                LOG_WINDOW.as_secs()
            );
        }
    }
}

/// A connection's place under its endpoint's cap: given back, and the
/// open-connections gauge lowered, when it is dropped.
#[derive(Debug)]
pub struct Slot {
    /// Held for as long as the connection is open.
    _permit: OwnedSemaphorePermit,
    /// `podvisor_connections_open` of the endpoint.
    open: ::metrics::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// An admitted connection: the stream, holding its [`Slot`] until dropped.
#[derive(Debug)]
pub struct Admitted<S> {
    /// The connection.
    io: S,
    /// Its place under the cap.
    slot: Slot,
}

impl<S> Admitted<S> {
    /// The stream and its slot, for code that needs the stream itself
    /// (keep the slot for as long as the stream is open).
    pub fn into_parts(self) -> (S, Slot) {
        (self.io, self.slot)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The next admission under way.
type Admission<L> =
    Pin<Box<dyn Future<Output = (Admitted<<L as Accept>::Io>, <L as Accept>::Addr)> + Send>>;

/// A listener behind its endpoint's [`Gate`]: a [`Stream`] of admitted
/// connections (for tonic's `serve_with_incoming` and ttrpc's
/// `Listener::new`) that never yields an error — the gate handles them —
/// and, over TCP, an [`axum::serve::Listener`]. Dropping it closes the
/// listener.
pub struct Gated<L: Accept> {
    /// The endpoint's gate.
    gate: Arc<Gate>,
    /// The listener, shared with the admission under way.
    listener: Arc<L>,
    /// The admission under way, kept across polls of the stream.
    next: Option<Admission<L>>,
}

impl<L: Accept> std::fmt::Debug for Gated<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gated")
            .field("gate", &self.gate)
            .field("admitting", &self.next.is_some())
            .finish_non_exhaustive()
    }
}

impl<L: Accept> Gated<L> {
    /// `listener` behind `gate`.
    pub fn new(gate: Arc<Gate>, listener: L) -> Self {
        Self {
            gate,
            listener: Arc::new(listener),
            next: None,
        }
    }
}

impl<L: Accept> Stream for Gated<L> {
    type Item = io::Result<Admitted<L::Io>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let next = this.next.get_or_insert_with(|| {
            let gate = this.gate.clone();
            let listener = this.listener.clone();
            Box::pin(async move { gate.admit(&*listener).await })
        });
        match next.as_mut().poll(cx) {
            Poll::Ready((io, _)) => {
                this.next = None;
                Poll::Ready(Some(Ok(io)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl axum::serve::Listener for Gated<TcpListener> {
    type Io = Admitted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.gate.admit(&*self.listener).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_soft_limit_is_raised_only_when_the_hard_limit_is_higher() {
        assert_eq!(nofile_target(1024, 524_288), Some(524_288));
        assert_eq!(nofile_target(4096, 4096), None);
        assert_eq!(nofile_target(8192, 4096), None);
    }

    #[test]
    fn accept_pauses_double_from_10_ms_up_to_a_second() {
        assert_eq!(accept_pause(1), Duration::from_millis(10));
        assert_eq!(accept_pause(2), Duration::from_millis(20));
        assert_eq!(accept_pause(7), Duration::from_millis(640));
        assert_eq!(accept_pause(8), ACCEPT_PAUSE_CAP);
        assert_eq!(accept_pause(u32::MAX), ACCEPT_PAUSE_CAP);
    }

    #[test]
    fn a_throttled_log_lets_one_line_through_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut log = Throttle::new(Duration::from_secs(10));
        assert_eq!(log.allow(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(log.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.allow(t0 + Duration::from_millis(9_999)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(10)), Some(1001));
        assert_eq!(log.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(30)), Some(1));
    }

    /// A listener out of file descriptors: every accept fails with EMFILE.
    #[derive(Default)]
    struct OutOfFiles {
        accepts: AtomicU32,
    }

    impl Accept for OutOfFiles {
        type Io = tokio::io::DuplexStream;
        type Addr = ();
        fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, ())>> + Send {
            self.accepts.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err(io::Error::from_raw_os_error(
                nix::errno::Errno::EMFILE as i32,
            )))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_out_of_file_descriptors_backs_off_instead_of_spinning() {
        let gate = Gate::new(TTRPC, "test", 8);
        let listener = OutOfFiles::default();
        let waited = tokio::time::timeout(Duration::from_secs(60), gate.admit(&listener)).await;
        assert!(waited.is_err(), "nothing can be admitted");
        // 10 ms doubling to 1 s: 8 tries in the first 1.3 s, then one a
        // second — where a spinning loop makes millions.
        let accepts = listener.accepts.load(Ordering::SeqCst);
        assert!((55..=70).contains(&accepts), "{accepts} accepts in 60 s");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once_until_a_slot_frees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gated.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let gate = Gate::new(AGENT_PROXY, path.display().to_string(), 2);

        let _a = UnixStream::connect(&path).await.unwrap();
        let _b = UnixStream::connect(&path).await.unwrap();
        let first = gate.admit(&listener).await.0;
        let _second = gate.admit(&listener).await.0;

        // A third, while two are open: accepted and closed, never admitted.
        let mut third = UnixStream::connect(&path).await.unwrap();
        let admitted =
            tokio::time::timeout(Duration::from_millis(300), gate.admit(&listener)).await;
        assert!(admitted.is_err(), "a third connection was admitted");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte))
            .await
            .expect("the refused connection is closed at once");
        assert_eq!(read.unwrap(), 0, "end of stream");

        // One closes: the next connection gets its slot.
        drop(first);
        let _fourth = UnixStream::connect(&path).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), gate.admit(&listener))
            .await
            .expect("a freed slot admits the next connection");
    }
}
