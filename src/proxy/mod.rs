//! The agent proxy: for each Running sandbox, the ttrpc socket CreateVM
//! returned (`<pods-dir>/<id>/agent.ttrpc`), relayed to the forwarder in the
//! pod VM (`<instance ip>:<forwarder port>`).
//!
//! The relay works at the ttrpc frame level: frames pass through byte for
//! byte in both directions — requests, responses, stream data and
//! cancellations of any method, known to podvisor or not. Each shim
//! connection gets its own connection to the forwarder, dialled when the
//! shim connects (capped exponential backoff, within `--proxy-timeout`), so a
//! forwarder that restarts is simply dialled again by the next connection.
//! When the forwarder's side drops, every call still waiting for its answer
//! gets an `UNAVAILABLE` status naming the pod VM's address, instead of a
//! hang; then the shim's connection is closed.
//!
//! One call is decoded on the way: `CreateContainer`, which gets the
//! annotations the reference's proxy adds ([`hook`]). When a sandbox's
//! socket opens and closes follows its journal record ([`socket`]).

pub mod hook;
pub mod socket;

use crate::connections::Gate;
use protobuf::Message as _;
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use ttrpc::proto::{
    FLAG_REMOTE_CLOSED, MESSAGE_HEADER_LENGTH, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};

/// The largest frame relayed: ttrpc's own limit (4 MiB in ttrpc-rust's
/// `MESSAGE_LENGTH_MAX` and Go's `messageLengthMax`), which neither Kata's
/// shims nor its agent exceed. Larger is a protocol error and ends the
/// connection.
const MAX_FRAME: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;
/// What a frame's buffer starts at: it grows only as the payload arrives, so
/// a peer that announces a large frame and sends nothing costs this much.
const FRAME_BUFFER_START: usize = 64 << 10;
/// The longest pause between two dials.
const DIAL_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// How the proxy talks TLS to one pod VM: the client configuration and the
/// name its certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    /// CA roots and the client certificate.
    pub config: Arc<rustls::ClientConfig>,
    /// The pod VM's certificate name.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({:?})", self.server_name)
    }
}

/// One sandbox's agent socket; closed (and its file removed) on drop.
#[derive(Debug)]
pub struct AgentProxy {
    path: PathBuf,
    accept: JoinHandle<()>,
}

impl AgentProxy {
    /// Binds `path` (replacing a stale socket file) and relays every
    /// connection to `upstream` (over TLS when `tls` is given), dialling for
    /// at most `dial_limit`; at most `max_connections` at once.
    ///
    /// # Errors
    /// The I/O error when a stale file at `path` cannot be removed, or
    /// binding the socket or setting its mode fails.
    pub fn open(
        path: &Path,
        upstream: SocketAddr,
        dial_limit: Duration,
        tls: Option<ClientTls>,
        hook: Arc<hook::Hook>,
        max_connections: u32,
    ) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        {
            // Owner and group, as the Kata socket; its pod directory is
            // owner-only in any case.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        // Each shim connection costs two descriptors (and a pod VM
        // connection): capped like every endpoint, with the same pauses
        // and sparing log when accepts fail.
        let gate = Gate::new(
            crate::connections::AGENT_PROXY,
            path.display().to_string(),
            max_connections,
        );
        let accept = tokio::spawn(async move {
            loop {
                let (shim, _) = gate.admit(&listener).await;
                let (tls, hook) = (tls.clone(), hook.clone());
                tokio::spawn(async move {
                    let (shim, _slot) = shim.into_parts();
                    relay(shim, upstream, dial_limit, tls, hook).await;
                });
            }
        });
        Ok(Self {
            path: path.to_owned(),
            accept,
        })
    }
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Dials the forwarder until it answers or `limit` passes.
async fn dial(upstream: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last =
            match tokio::time::timeout(left.min(DIAL_BACKOFF_CAP), TcpStream::connect(upstream))
                .await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connect timed out".to_owned(),
            };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(format!(
                "The pod VM's agent at {upstream} did not answer within {limit:?} (last: {last})"
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(DIAL_BACKOFF_CAP);
    }
}

/// One frame: its 10-byte header and its payload, as received.
struct Frame {
    bytes: Vec<u8>,
}

impl Frame {
    /// The same frame with another payload.
    fn with_payload(&self, payload: &[u8]) -> Option<Frame> {
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l as usize <= MAX_FRAME)?;
        let mut bytes = Vec::with_capacity(MESSAGE_HEADER_LENGTH + payload.len());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(&self.bytes[4..MESSAGE_HEADER_LENGTH]);
        bytes.extend_from_slice(payload);
        Some(Frame { bytes })
    }

    fn stream_id(&self) -> u32 {
        u32::from_be_bytes([self.bytes[4], self.bytes[5], self.bytes[6], self.bytes[7]])
    }
    fn kind(&self) -> u8 {
        self.bytes[8]
    }
    fn flags(&self) -> u8 {
        self.bytes[9]
    }
}

/// Reads one frame; `None` at a clean end of stream.
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
    let mut header = [0u8; MESSAGE_HEADER_LENGTH];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if length > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a ttrpc frame of {length} bytes is above the relay's limit of {MAX_FRAME}"),
        ));
    }
    // Never allocate what was only announced: read into a buffer that
    // grows with the bytes that actually came.
    let mut bytes = Vec::with_capacity(MESSAGE_HEADER_LENGTH + length.min(FRAME_BUFFER_START));
    bytes.extend_from_slice(&header);
    let read = r.take(length as u64).read_to_end(&mut bytes).await?;
    if read < length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stream ended {read} bytes into a ttrpc frame of {length}"),
        ));
    }
    Ok(Some(Frame { bytes }))
}

/// A response frame carrying `UNAVAILABLE` and `message` for `stream_id`.
fn unavailable(stream_id: u32, message: &str) -> Vec<u8> {
    let mut response = ttrpc::Response::new();
    response.set_status(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, message));
    let payload = response.write_to_bytes().unwrap_or_default();
    let mut frame = Vec::with_capacity(MESSAGE_HEADER_LENGTH + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.push(MESSAGE_TYPE_RESPONSE);
    frame.push(0);
    frame.extend_from_slice(&payload);
    frame
}

/// The two halves of a connection to the forwarder: TCP, or TLS over TCP.
type Upstream = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
);

/// Splits `stream` into boxed halves.
fn halves<S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(stream: S) -> Upstream {
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}

/// Dials the forwarder and, with `tls`, completes the handshake: the pod
/// VM must show a certificate for its name from our CA.
async fn connect(
    upstream: SocketAddr,
    limit: Duration,
    tls: Option<ClientTls>,
) -> Result<Upstream, String> {
    let tcp = dial(upstream, limit).await?;
    match tls {
        // TCP's own halves: no lock between the two directions.
        None => {
            let (r, w) = tcp.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Some(tls) => tokio_rustls::TlsConnector::from(tls.config)
            .connect(tls.server_name.clone(), tcp)
            .await
            .map(halves)
            .map_err(|e| {
                format!(
                    "The TLS handshake with the pod VM's agent at {upstream} ({:?}) failed: {e}",
                    tls.server_name
                )
            }),
    }
}

/// Relays one shim connection.
async fn relay(
    shim: UnixStream,
    upstream: SocketAddr,
    dial_limit: Duration,
    tls: Option<ClientTls>,
    hook: Arc<hook::Hook>,
) {
    let (shim_r, shim_w) = shim.into_split();
    // Buffered both ways: a frame's header and payload usually come in one
    // read, and frames that arrive together leave together (one write, one
    // TLS record) — flushed as soon as nothing more is waiting to be read.
    let mut shim_r = tokio::io::BufReader::with_capacity(64 << 10, shim_r);
    let mut shim_w = tokio::io::BufWriter::with_capacity(64 << 10, shim_w);
    let agent = match connect(upstream, dial_limit, tls).await {
        Ok(agent) => agent,
        Err(why) => {
            tracing::warn!(upstream = %upstream, error = %why, "agent proxy: cannot reach the pod VM");
            // Answer what the shim sent meanwhile, then close.
            answer_pending_until_eof(&mut shim_r, &mut shim_w, &why).await;
            return;
        }
    };
    let (agent_r, agent_w) = agent;
    let mut agent_r = tokio::io::BufReader::with_capacity(64 << 10, agent_r);
    let mut agent_w = tokio::io::BufWriter::with_capacity(64 << 10, agent_w);
    let pending: Arc<Mutex<HashSet<u32>>> = Arc::default();

    let up = {
        let pending = pending.clone();
        async move {
            loop {
                let Ok(Some(mut frame)) = read_frame(&mut shim_r).await else {
                    break;
                };
                if frame.kind() == MESSAGE_TYPE_REQUEST {
                    if let Ok(mut p) = pending.lock() {
                        p.insert(frame.stream_id());
                    }
                    if let Some(rewritten) = hook
                        .rewrite(&frame.bytes[MESSAGE_HEADER_LENGTH..])
                        .and_then(|payload| frame.with_payload(&payload))
                    {
                        frame = rewritten;
                    }
                }
                if agent_w.write_all(&frame.bytes).await.is_err() {
                    break;
                }
                if shim_r.buffer().is_empty() && agent_w.flush().await.is_err() {
                    break;
                }
            }
            let _ = agent_w.shutdown().await;
        }
    };
    let down = {
        let pending = pending.clone();
        async move {
            let why = loop {
                let frame = match read_frame(&mut agent_r).await {
                    Ok(Some(f)) => f,
                    Ok(None) => break "closed the connection".to_owned(),
                    Err(e) => break e.to_string(),
                };
                // A response ends a call; so does the server closing its
                // side of a stream.
                let done = frame.kind() == MESSAGE_TYPE_RESPONSE
                    || ((frame.flags() & FLAG_REMOTE_CLOSED) != 0
                        && frame.kind() != MESSAGE_TYPE_REQUEST);
                if done && let Ok(mut p) = pending.lock() {
                    p.remove(&frame.stream_id());
                }
                if shim_w.write_all(&frame.bytes).await.is_err() {
                    return;
                }
                if agent_r.buffer().is_empty() && shim_w.flush().await.is_err() {
                    return;
                }
            };
            // The pod VM's side is gone: fail what still waits, clearly.
            let waiting: Vec<u32> = pending
                .lock()
                .map(|mut p| p.drain().collect())
                .unwrap_or_default();
            let message =
                format!("The connection to the pod VM's agent at {upstream} dropped: {why}");
            if !waiting.is_empty() {
                tracing::warn!(upstream = %upstream, calls = waiting.len(), error = %why, "agent proxy: failing calls in flight");
            }
            for id in waiting {
                if shim_w.write_all(&unavailable(id, &message)).await.is_err() {
                    break;
                }
            }
            // Flushes, then closes.
            let _ = shim_w.shutdown().await;
        }
    };
    // Either side ending ends the relay; the other half is dropped.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Without a forwarder: answers every request with `UNAVAILABLE` until the
/// shim hangs up.
async fn answer_pending_until_eof(
    shim_r: &mut (impl AsyncRead + Unpin),
    shim_w: &mut (impl tokio::io::AsyncWrite + Unpin),
    why: &str,
) {
    while let Ok(Some(frame)) = read_frame(shim_r).await {
        if frame.kind() == MESSAGE_TYPE_REQUEST
            && (shim_w
                .write_all(&unavailable(frame.stream_id(), why))
                .await
                .is_err()
                || shim_w.flush().await.is_err())
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWrite;

    async fn write_all(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) {
        w.write_all(bytes).await.expect("write");
    }

    #[tokio::test]
    async fn frames_are_read_whole_and_oversized_ones_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut frame = Vec::new();
        frame.extend_from_slice(&3u32.to_be_bytes());
        frame.extend_from_slice(&7u32.to_be_bytes());
        frame.extend_from_slice(&[MESSAGE_TYPE_REQUEST, 0, b'a', b'b', b'c']);
        write_all(&mut a, &frame).await;
        let got = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(got.bytes, frame);
        assert_eq!(got.stream_id(), 7);

        let mut huge = Vec::new();
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        huge.extend_from_slice(&[0; 6]);
        write_all(&mut a, &huge).await;
        let err = read_frame(&mut b).await.err().unwrap();
        assert!(err.to_string().contains("above the relay's limit"), "{err}");

        drop(a);
        assert!(read_frame(&mut b).await.unwrap().is_none(), "clean EOF");
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error_and_the_largest_allowed_one_passes() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let mut frame = Vec::with_capacity(MESSAGE_HEADER_LENGTH + MAX_FRAME);
            frame.extend_from_slice(&(MAX_FRAME as u32).to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0, 1, MESSAGE_TYPE_REQUEST, 0]);
            frame.resize(MESSAGE_HEADER_LENGTH + MAX_FRAME, 0x5a);
            write_all(&mut a, &frame).await;
            // Announced, never sent in full.
            write_all(&mut a, &(MAX_FRAME as u32).to_be_bytes()).await;
            write_all(&mut a, &[0, 0, 0, 3, MESSAGE_TYPE_REQUEST, 0]).await;
            write_all(&mut a, &[1; 100]).await;
        });
        let whole = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(whole.bytes.len(), MESSAGE_HEADER_LENGTH + MAX_FRAME);
        writer.await.unwrap();
        let err = read_frame(&mut b).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("100 bytes into"), "{err}");
    }

    /// Reads `input` as a peer would send it (in pieces of `chunk` bytes)
    /// until the reader stops: the frames read, and how it stopped.
    fn read_all(input: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Option<io::ErrorKind>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(chunk.max(1));
            let owned = input.to_vec();
            let writer = tokio::spawn(async move {
                for piece in owned.chunks(chunk.max(1)) {
                    if a.write_all(piece).await.is_err() {
                        return;
                    }
                }
            });
            let mut frames = Vec::new();
            let end = loop {
                match read_frame(&mut b).await {
                    Ok(Some(f)) => frames.push(f.bytes),
                    Ok(None) => break None,
                    Err(e) => break Some(e.kind()),
                }
            };
            drop(b);
            let _ = writer.await;
            (frames, end)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The relay's frame reader on anything a shim or a pod VM may send:
        /// it never panics, returns the input's own bytes as whole frames
        /// in order, ends cleanly only where no whole header is left, and refuses a
        /// frame above the limit or cut short.
        #[test]
        fn the_frame_reader_takes_any_bytes_apart_exactly(
            frames in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0u32..8, 0u8..4),
                0..6,
            ),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            chunk in 1usize..64,
        ) {
            let mut input = Vec::new();
            for (payload, stream, kind) in &frames {
                input.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                input.extend_from_slice(&stream.to_be_bytes());
                input.extend_from_slice(&[*kind, 0]);
                input.extend_from_slice(payload);
            }
            let valid = input.len();
            input.extend_from_slice(&tail);
            let (read, end) = read_all(&input, chunk);
            let joined: Vec<u8> = read.concat();
            proptest::prop_assert!(input.starts_with(&joined));
            proptest::prop_assert!(read.len() >= frames.len());
            proptest::prop_assert!(joined.len() >= valid);
            match end {
                // A clean end: nothing left but a partial header.
                None => proptest::prop_assert!(input.len() - joined.len() < MESSAGE_HEADER_LENGTH),
                Some(kind) => proptest::prop_assert!(
                    kind == io::ErrorKind::InvalidData || kind == io::ErrorKind::UnexpectedEof,
                    "{kind:?}"
                ),
            }
        }
    }

    #[test]
    fn the_unavailable_answer_is_a_ttrpc_response_with_the_reason() {
        let frame = unavailable(9, "gone");
        assert_eq!(frame[8], MESSAGE_TYPE_RESPONSE);
        assert_eq!(
            u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
            9
        );
        let response = ttrpc::Response::parse_from_bytes(&frame[MESSAGE_HEADER_LENGTH..]).unwrap();
        assert_eq!(response.status().code(), ttrpc::Code::UNAVAILABLE);
        assert_eq!(response.status().message(), "gone");
    }
}
