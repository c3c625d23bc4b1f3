//! Serving the admin router over HTTP/1.1, with time limits on every
//! connection and a graceful stop.
//!
//! `axum::serve` keeps a connection for as long as its client likes: one
//! that opens connections and sends nothing, or dribbles a request line a
//! byte at a time, holds a task and a file descriptor each, forever — and,
//! under a connection cap, locks out `/livez` and Prometheus. Here every
//! connection has two limits ([`ConnectionTimeouts`]):
//!
//! - **header**: the client must have sent a request's headers within this
//!   long of opening the connection, or of the first byte of a later request
//!   on it (strictly: the server must have started to answer by then, which
//!   for the admin endpoint's millisecond handlers is the same thing);
//! - **idle**: a kept-alive connection waits this long for its next request,
//!   and a response the client does not read stalls this long, before the
//!   connection is closed.
//!
//! Connections come from any [`axum::serve::Listener`], so a listener that
//! admits them under a cap (`connections::Gated`) plugs in unchanged.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// The default of `--admin-header-timeout`: far above what a client on
/// the node or a scraper needs to send a few hundred bytes of headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of `--admin-idle-timeout`: above the usual scrape and probe
/// intervals (10–30 s), so Prometheus and the kubelet keep their connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// At a stop, how long connections may finish the request they are
/// answering before they are cut: admin answers take milliseconds, and the
/// daemon's shutdown must not wait on a slow client.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Time limits of one admin connection (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// From the connection's opening, or a later request's first byte,
    /// until the server starts to answer.
    pub header: Duration,
    /// How long a kept-alive connection waits for its next request, and a
    /// write waits for a client that does not read.
    pub idle: Duration,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            header: DEFAULT_HEADER_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Serves `router` on the connections `listener` accepts until `shutdown`
/// completes; then stops accepting (the listener is closed), lets open
/// connections finish their request under way for up to [`CLOSE_GRACE`]
/// and cuts the rest.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L::Addr: std::fmt::Debug,
{
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            (io, peer) = listener.accept() => {
                connections.spawn(serve_connection(
                    io,
                    format!("{peer:?}"),
                    router.clone(),
                    timeouts,
                    closing_rx.clone(),
                ));
            }
            // Reaps finished connections, so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            connections = connections.len(),
            "admin connections still open at the stop are cut"
        );
    }
    // Dropping the set aborts what is left.
}

/// Serves one connection until it ends, a limit cuts it, or `closing`
/// turns true (then the request under way is answered and it closes).
async fn serve_connection<I>(
    io: I,
    peer: String,
    router: Router,
    timeouts: ConnectionTimeouts,
    mut closing: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's header timer starts as soon as it waits for a request: on a
    // kept-alive connection that is right after the previous answer, so it
    // is the idle limit; the header limit proper is `TimedIo`'s.
    http.timer(TokioTimer::new())
        .header_read_timeout(timeouts.idle);
    let connection = http.serve_connection(
        TokioIo::new(TimedIo::new(io, timeouts)),
        TowerToHyperService::new(router),
    );
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        // The guard `wait_for` returns is not `Send`: drop it at once.
        () = async { drop(closing.wait_for(|closing| *closing).await) } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    // Per connection, so at debug: a flood of them must not flood the log.
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin connection closed");
    }
}

/// A connection's stream, with the header and stall limits of
/// [`ConnectionTimeouts`]: a read after the header limit ran out, or a
/// write stalled for the idle limit, fails with `TimedOut`, which ends the
/// connection.
struct TimedIo<S> {
    /// The stream.
    io: S,
    /// The limits.
    timeouts: ConnectionTimeouts,
    /// When the answer to the request under way must have started: armed
    /// when the connection opens and at the first byte read after an
    /// answer; disarmed by the next byte written.
    answer_by: Option<Pin<Box<Sleep>>>,
    /// When a write that makes no progress gives up; armed at the first
    /// write that cannot proceed, disarmed by progress.
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl<S> TimedIo<S> {
    fn new(io: S, timeouts: ConnectionTimeouts) -> Self {
        Self {
            io,
            timeouts,
            answer_by: Some(Box::pin(tokio::time::sleep(timeouts.header))),
            write_stall: None,
        }
    }

    fn header_timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete request within {:?} (--admin-header-timeout)",
                self.timeouts.header
            ),
        )
    }

    /// After a write of `result`: progress disarms both limits; no progress
    /// arms the stall limit, and fails once it ran out.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                self.write_stall = None;
                if n > 0 {
                    self.answer_by = None;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let idle = self.timeouts.idle;
                let stall = self
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if stall.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client read nothing of the answer for {idle:?} (--admin-idle-timeout)"
                        ),
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Checked before reading too: a client that dribbles a byte now
        // and then would otherwise always find something to read.
        if this.answer_by.as_ref().is_some_and(|d| d.is_elapsed()) {
            return Poll::Ready(Err(this.header_timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.answer_by.is_none() {
                    let header = this.timeouts.header;
                    this.answer_by = Some(Box::pin(tokio::time::sleep(header)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let ran_out = this
                    .answer_by
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if ran_out {
                    Poll::Ready(Err(this.header_timed_out()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    const LIMITS: ConnectionTimeouts = ConnectionTimeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    /// One connection to a router with `/small` and a 4 MiB `/big`, served
    /// under [`LIMITS`]: the client's end, and the connection's task.
    fn connection() -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let router = Router::new()
            .route("/small", get(|| async { "ok\n" }))
            .route("/big", get(|| async { "x".repeat(4 << 20) }));
        let (client, server) = tokio::io::duplex(16 * 1024);
        let (closing_tx, closing) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Held, so that the connection is never told to close.
            let _closing_tx = closing_tx;
            serve_connection(server, "test".into(), router, LIMITS, closing).await;
        });
        (client, task)
    }

    /// Reads one `/small` answer (headers and its 3-byte body) off `client`.
    async fn read_small_answer(client: &mut DuplexStream) -> String {
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\nok\n") {
            let n = client.read(&mut byte).await.expect("the answer arrives");
            assert_eq!(
                n,
                1,
                "closed mid-answer: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.push(byte[0]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Waits for the connection's task to end; fails, instead of hanging,
    /// when no limit ends it.
    async fn ended(task: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(LIMITS.idle * 5, task)
            .await
            .expect("a limit ends the connection")
            .expect("the connection's task does not panic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
        let (mut client, task) = connection();
        let opened = Instant::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        ended(task).await;
        let after = opened.elapsed();
        assert!(after >= LIMITS.header, "{after:?}");
        assert!(after < LIMITS.header + Duration::from_secs(1), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dribbled_a_byte_a_second_is_cut_at_the_header_timeout() {
        let (mut client, task) = connection();
        let opened = Instant::now();
        let _dribbler = tokio::spawn(async move {
            for byte in b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n" {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        ended(task).await;
        let after = opened.elapsed();
        assert!(after >= LIMITS.header, "{after:?}");
        assert!(after < LIMITS.header + Duration::from_secs(2), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_outlives_the_header_timeout_until_the_idle_timeout() {
        let (mut client, task) = connection();
        let request = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(request).await.unwrap();
        assert!(
            read_small_answer(&mut client)
                .await
                .starts_with("HTTP/1.1 200")
        );
        // Quiet for longer than the header limit, less than the idle one:
        // the next request is still answered.
        tokio::time::sleep(LIMITS.header * 3).await;
        client.write_all(request).await.unwrap();
        assert!(
            read_small_answer(&mut client)
                .await
                .starts_with("HTTP/1.1 200")
        );
        let answered = Instant::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        ended(task).await;
        let idle = answered.elapsed();
        assert!(idle >= LIMITS.idle, "{idle:?}");
        assert!(idle < LIMITS.idle + Duration::from_secs(1), "{idle:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_does_not_read_is_cut_at_the_idle_timeout() {
        let (mut client, task) = connection();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let asked = Instant::now();
        // The client never reads: 4 MiB cannot fit the 16 KiB pipe.
        ended(task).await;
        let after = asked.elapsed();
        assert!(after >= LIMITS.idle, "{after:?}");
        assert!(after < LIMITS.idle + Duration::from_secs(1), "{after:?}");
        drop(client);
    }
}
