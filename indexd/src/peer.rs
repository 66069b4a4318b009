//! Serve and fetch chunks by digest between the hypervisors of one site.
//!
//! A destination VMM that needs content another VMM of its site already holds asks that VMM's
//! [`PeerServer`] for it with a [`PeerClient`], a whole batch of digests per request. The server
//! answers from its [`ChunkSource`] (which re-checks that the chunk still hashes to the digest);
//! the requester verifies what it receives, since the peer may have been overwritten, be broken,
//! or lie.
//!
//! # Wire protocol (version 1)
//!
//! TCP, little-endian integers, one request then its response, in turn, on a connection that
//! stays open for further requests.
//!
//! Request (client → server):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SHKQ"` |
//! | 4 | 1 | version: 1 |
//! | 5 | 1 | operation: 1 = FETCH |
//! | 6 | 1 | digest length `L`, 1..=64 (20 for SHA-1, 32 for SHA-256) |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | `N`, number of digests, 1..=[`MAX_DIGESTS`] (4096) |
//! | 12 | `N`×`L` | the digests |
//!
//! Response (server → client):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SHKA"` |
//! | 4 | 1 | version: 1 |
//! | 5 | 1 | status: 0 = OK, 1 = bad request, 2 = unsupported version |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 4 | OK: `N` (the request's); error: length `M` of a message, ≤ 1024 |
//! | 12 | … | OK: `N` entries in request order; error: `M` bytes of UTF-8 message, then the server closes the connection |
//!
//! Entry:
//!
//! | size | field |
//! |---|---|
//! | 4 | chunk length `C` ≤ [`MAX_CHUNK`] (65536), or `0xFFFF_FFFF` = not held |
//! | `C` | the chunk's bytes (absent when not held) |
//!
//! # Bounds
//!
//! The server reads at most one request ahead (12 + 4096 × 64 bytes = 256 KiB), refuses any
//! header outside the limits above with an error response, produces a response while the socket
//! drains (at most about 1 MiB buffered per connection, whatever the batch), and serves at most
//! [`MAX_CONNECTIONS`] connections. The client refuses responses whose magic, version, count or
//! lengths are out of bounds. A client batch larger than 4096 digests goes as consecutive
//! requests on the same connection.

use std::collections::HashMap;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use thiserror::Error;

/// Request magic.
pub const REQUEST_MAGIC: [u8; 4] = *b"SHKQ";
/// Response magic.
pub const RESPONSE_MAGIC: [u8; 4] = *b"SHKA";
/// Protocol version.
pub const VERSION: u8 = 1;
/// The FETCH operation.
pub const OP_FETCH: u8 = 1;
/// Header size of requests and responses.
pub const HEADER_LEN: usize = 12;
/// Most digests in one request.
pub const MAX_DIGESTS: usize = 4096;
/// Longest digest.
pub const MAX_DIGEST_LEN: usize = 64;
/// Longest chunk.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Longest error message.
pub const MAX_MESSAGE: usize = 1024;
/// Entry length meaning "not held".
pub const NOT_HELD: u32 = u32::MAX;
/// Response status: OK.
pub const STATUS_OK: u8 = 0;
/// Response status: bad request.
pub const STATUS_BAD_REQUEST: u8 = 1;
/// Response status: unsupported version.
pub const STATUS_BAD_VERSION: u8 = 2;
/// Most connections a server keeps; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Response bytes a connection buffers before waiting for the socket to drain.
const OUT_HIGH_WATER: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum PeerError {
    /// The server cannot listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The peer cannot be reached.
    #[error("cannot connect to peer {peer}: {source}")]
    Connect {
        /// The peer.
        peer: String,
        /// Why.
        source: io::Error,
    },
    /// The exchange failed (connection lost, timeout).
    #[error("peer {peer}: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// Why.
        source: io::Error,
    },
    /// The peer sent something that is not a valid response.
    #[error("peer {peer} sent a bad response: {reason}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What is wrong.
        reason: String,
    },
    /// The peer refused the request.
    #[error("peer {peer} refused the request: {message}")]
    Refused {
        /// The peer.
        peer: String,
        /// The peer's message.
        message: String,
    },
    /// The caller's request cannot be encoded (digest lengths).
    #[error("bad fetch request: {0}")]
    BadRequest(String),
}

/// What a server serves: the chunks this VMM holds.
pub trait ChunkSource: Send + Sync + 'static {
    /// The bytes of a chunk with this digest, if this VMM still holds one. Implementations verify
    /// the content still hashes to `digest` before returning it.
    fn chunk(&self, digest: &[u8]) -> Option<Vec<u8>>;
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding (pure).

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Digest length.
    pub digest_len: usize,
    /// Number of digests.
    pub count: usize,
}

impl RequestHeader {
    /// Size of the whole request, header included.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.digest_len * self.count
    }
}

/// Why a request header is refused, with the status to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Response status.
    pub status: u8,
    /// Message for the client.
    pub message: String,
}

/// Encodes a FETCH request for `digests` (all of one length, 1..=4096 of them).
pub fn encode_request(digests: &[Vec<u8>]) -> Result<Vec<u8>, PeerError> {
    let bad = |m: String| Err(PeerError::BadRequest(m));
    if digests.is_empty() || digests.len() > MAX_DIGESTS {
        return bad(format!("{} digests in one request (1..={MAX_DIGESTS})", digests.len()));
    }
    let l = digests[0].len();
    if l == 0 || l > MAX_DIGEST_LEN {
        return bad(format!("digest of {l} bytes (1..={MAX_DIGEST_LEN})"));
    }
    if let Some(d) = digests.iter().find(|d| d.len() != l) {
        return bad(format!("digests of different lengths ({l} and {}) in one batch", d.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + l * digests.len());
    out.extend_from_slice(&REQUEST_MAGIC);
    out.extend_from_slice(&[VERSION, OP_FETCH, l as u8, 0]);
    out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
    for d in digests {
        out.extend_from_slice(d);
    }
    Ok(out)
}

/// Decodes and bounds-checks a request header (`buf` holds at least [`HEADER_LEN`] bytes).
pub fn decode_request_header(buf: &[u8]) -> Result<RequestHeader, Refusal> {
    let refuse = |status, message: String| Err(Refusal { status, message });
    if buf.len() < HEADER_LEN {
        return refuse(STATUS_BAD_REQUEST, format!("short header ({} bytes)", buf.len()));
    }
    if buf[0..4] != REQUEST_MAGIC {
        return refuse(STATUS_BAD_REQUEST, "bad magic (not a shrink peer request)".into());
    }
    if buf[4] != VERSION {
        return refuse(STATUS_BAD_VERSION, format!("unsupported version {} (this server speaks {VERSION})", buf[4]));
    }
    if buf[5] != OP_FETCH {
        return refuse(STATUS_BAD_REQUEST, format!("unknown operation {}", buf[5]));
    }
    let digest_len = buf[6] as usize;
    if digest_len == 0 || digest_len > MAX_DIGEST_LEN {
        return refuse(STATUS_BAD_REQUEST, format!("digest length {digest_len} (1..={MAX_DIGEST_LEN})"));
    }
    if buf[7] != 0 {
        return refuse(STATUS_BAD_REQUEST, "reserved byte not zero".into());
    }
    let count = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if count == 0 || count > MAX_DIGESTS {
        return refuse(STATUS_BAD_REQUEST, format!("{count} digests (1..={MAX_DIGESTS})"));
    }
    Ok(RequestHeader { digest_len, count })
}

/// Appends a response header.
pub fn encode_response_header(out: &mut Vec<u8>, status: u8, count_or_len: u32) {
    out.extend_from_slice(&RESPONSE_MAGIC);
    out.extend_from_slice(&[VERSION, status, 0, 0]);
    out.extend_from_slice(&count_or_len.to_le_bytes());
}

/// Appends one response entry (`None` = not held).
pub fn encode_entry(out: &mut Vec<u8>, chunk: Option<&[u8]>) {
    match chunk {
        Some(c) => {
            debug_assert!(c.len() <= MAX_CHUNK);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(c);
        }
        None => out.extend_from_slice(&NOT_HELD.to_le_bytes()),
    }
}

/// Appends a whole error response.
pub fn encode_refusal(out: &mut Vec<u8>, r: &Refusal) {
    let mut m = r.message.as_bytes();
    if m.len() > MAX_MESSAGE {
        m = &m[..MAX_MESSAGE];
    }
    encode_response_header(out, r.status, m.len() as u32);
    out.extend_from_slice(m);
}

/// What went wrong reading a response.
#[derive(Debug)]
pub enum ResponseError {
    /// The stream failed or ended.
    Io(io::Error),
    /// The bytes are not a valid response.
    Protocol(String),
    /// The server refused the request.
    Refused(String),
}

impl From<io::Error> for ResponseError {
    fn from(e: io::Error) -> Self {
        ResponseError::Io(e)
    }
}

/// Reads the response to a request of `expected` digests.
pub fn read_response<R: Read>(r: &mut R, expected: usize) -> Result<Vec<Option<Vec<u8>>>, ResponseError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    if h[0..4] != RESPONSE_MAGIC {
        return Err(ResponseError::Protocol("bad magic".into()));
    }
    if h[4] != VERSION {
        return Err(ResponseError::Protocol(format!("version {} (expected {VERSION})", h[4])));
    }
    let n = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if h[5] != STATUS_OK {
        if n > MAX_MESSAGE {
            return Err(ResponseError::Protocol(format!("status {} with a message of {n} bytes", h[5])));
        }
        let mut m = vec![0u8; n];
        r.read_exact(&mut m)?;
        return Err(ResponseError::Refused(format!("status {}: {}", h[5], String::from_utf8_lossy(&m))));
    }
    if n != expected {
        return Err(ResponseError::Protocol(format!("{n} entries for {expected} digests")));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut l = [0u8; 4];
        r.read_exact(&mut l)?;
        let l = u32::from_le_bytes(l);
        if l == NOT_HELD {
            out.push(None);
            continue;
        }
        let l = l as usize;
        if l > MAX_CHUNK {
            return Err(ResponseError::Protocol(format!("chunk of {l} bytes (at most {MAX_CHUNK})")));
        }
        let mut c = vec![0u8; l];
        r.read_exact(&mut c)?;
        out.push(Some(c));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Server.

struct Shared {
    served: AtomicU64,
    not_found: AtomicU64,
    corrupt: AtomicBool,
    stop: AtomicBool,
}

/// Serves a [`ChunkSource`] to the site's peers from a `mio` event-loop thread; stops (and
/// joins the thread) on drop.
pub struct PeerServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer").field("addr", &self.addr).finish()
    }
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

impl PeerServer {
    /// Listens on `addr` (`"0.0.0.0:0"` allowed) and serves `source`.
    pub fn start(addr: &str, source: Arc<dyn ChunkSource>) -> Result<PeerServer, PeerError> {
        let bind_err = |source| PeerError::Bind { addr: addr.to_string(), source };
        let sa = addr
            .to_socket_addrs()
            .map_err(bind_err)?
            .next()
            .ok_or_else(|| bind_err(io::Error::new(ErrorKind::InvalidInput, "no address")))?;
        let mut listener = TcpListener::bind(sa).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let poll = Poll::new().map_err(bind_err)?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE).map_err(bind_err)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(bind_err)?);
        let shared = Arc::new(Shared {
            served: AtomicU64::new(0),
            not_found: AtomicU64::new(0),
            corrupt: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut ev = EventLoop {
            poll,
            listener,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            source,
            shared: shared.clone(),
            scratch: vec![0; READ_CHUNK],
        };
        let thread = std::thread::Builder::new()
            .name(format!("peer-server-{}", local.port()))
            .spawn(move || ev.run())
            .map_err(bind_err)?;
        Ok(PeerServer { addr: local, shared, waker, thread: Some(thread) })
    }

    /// The address the server listens on (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Chunks served.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Digests asked for that were not held.
    pub fn not_found(&self) -> u64 {
        self.shared.not_found.load(Ordering::Relaxed)
    }

    /// Test hook: when set, the server corrupts every chunk it serves (flips a byte).
    pub fn set_corrupt(&self, on: bool) {
        self.shared.corrupt.store(on, Ordering::Relaxed);
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "peer server: cannot wake the event loop");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("peer server: event loop thread panicked");
            }
        }
    }
}

/// A request read in full whose response is being produced.
struct Pending {
    digests: Vec<u8>,
    digest_len: usize,
    next: usize,
}

struct Conn {
    sock: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    pending: Option<Pending>,
    /// Stop reading; close once the output is flushed (after a refusal, or EOF).
    closing: bool,
}

enum Drive {
    Keep,
    Close,
}

struct EventLoop {
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    source: Arc<dyn ChunkSource>,
    shared: Arc<Shared>,
    scratch: Vec<u8>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "peer server: poll failed; stopping");
                return;
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => {
                        let close = match self.conns.get_mut(&token) {
                            Some(c) => {
                                matches!(drive(c, &*self.source, &self.shared, &mut self.scratch), Drive::Close)
                            }
                            None => false,
                        };
                        if close {
                            if let Some(mut c) = self.conns.remove(&token) {
                                let _ = self.poll.registry().deregister(&mut c.sock);
                            }
                        }
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, from)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%from, "peer server: too many connections; closing a new one");
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    let token = Token(self.next_token);
                    self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONN);
                    if let Err(e) =
                        self.poll.registry().register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        tracing::warn!(error = %e, "peer server: cannot register a connection");
                        continue;
                    }
                    let mut c =
                        Conn { sock, inbuf: Vec::new(), out: Vec::new(), out_pos: 0, pending: None, closing: false };
                    // Data may already be there (edge-triggered).
                    if let Drive::Close = drive(&mut c, &*self.source, &self.shared, &mut self.scratch) {
                        let _ = self.poll.registry().deregister(&mut c.sock);
                    } else {
                        self.conns.insert(token, c);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "peer server: accept failed");
                    return;
                }
            }
        }
    }
}

/// Makes every possible step on a connection: produce response entries, write, read and parse
/// the next request; returns when nothing moves without the socket becoming ready again.
fn drive(c: &mut Conn, source: &dyn ChunkSource, shared: &Shared, scratch: &mut [u8]) -> Drive {
    loop {
        let mut progress = false;

        // Produce response entries while the buffer has room.
        if let Some(p) = c.pending.as_mut() {
            let count = p.digests.len() / p.digest_len;
            while c.out.len() - c.out_pos < OUT_HIGH_WATER && p.next < count {
                let d = &p.digests[p.next * p.digest_len..(p.next + 1) * p.digest_len];
                match source.chunk(d) {
                    Some(mut bytes) if bytes.len() <= MAX_CHUNK => {
                        if shared.corrupt.load(Ordering::Relaxed) {
                            match bytes.first_mut() {
                                Some(b) => *b ^= 0xff,
                                None => bytes.push(0xff),
                            }
                        }
                        shared.served.fetch_add(1, Ordering::Relaxed);
                        encode_entry(&mut c.out, Some(&bytes));
                    }
                    Some(bytes) => {
                        tracing::warn!(
                            len = bytes.len(),
                            "peer server: chunk larger than the protocol allows; not served"
                        );
                        shared.not_found.fetch_add(1, Ordering::Relaxed);
                        encode_entry(&mut c.out, None);
                    }
                    None => {
                        shared.not_found.fetch_add(1, Ordering::Relaxed);
                        encode_entry(&mut c.out, None);
                    }
                }
                p.next += 1;
                progress = true;
            }
            if p.next == count {
                c.pending = None;
            }
        }

        // Write.
        while c.out_pos < c.out.len() {
            match c.sock.write(&c.out[c.out_pos..]) {
                Ok(0) => return Drive::Close,
                Ok(n) => {
                    c.out_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Drive::Close,
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
            if c.closing && c.pending.is_none() {
                return Drive::Close;
            }
        } else if c.out_pos > OUT_HIGH_WATER {
            c.out.drain(..c.out_pos);
            c.out_pos = 0;
        }

        // Parse the next request from what was read; read more only when idle.
        if c.pending.is_none() && !c.closing {
            if let Some(r) = parse(c) {
                match r {
                    Ok(p) => c.pending = Some(p),
                    Err(refusal) => {
                        tracing::debug!(message = %refusal.message, "peer server: refusing a request");
                        encode_refusal(&mut c.out, &refusal);
                        c.inbuf = Vec::new();
                        c.closing = true;
                    }
                }
                continue;
            }
            match c.sock.read(scratch) {
                Ok(0) => {
                    // EOF: finish what is being written, then close.
                    c.closing = true;
                    progress = true;
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&scratch[..n]);
                    progress = true;
                }
                Err(e) => match e.kind() {
                    ErrorKind::WouldBlock => {}
                    ErrorKind::Interrupted => progress = true,
                    _ => return Drive::Close,
                },
            }
        }

        if !progress {
            return Drive::Keep;
        }
    }
}

/// A complete request from the input buffer, a refusal, or `None` when more bytes are needed.
fn parse(c: &mut Conn) -> Option<Result<Pending, Refusal>> {
    if c.inbuf.len() < HEADER_LEN {
        return None;
    }
    let h = match decode_request_header(&c.inbuf[..HEADER_LEN]) {
        Ok(h) => h,
        Err(r) => return Some(Err(r)),
    };
    let total = h.total_len();
    if c.inbuf.len() < total {
        return None;
    }
    let digests = c.inbuf[HEADER_LEN..total].to_vec();
    c.inbuf.drain(..total);
    if c.inbuf.capacity() > 2 * (HEADER_LEN + MAX_DIGESTS * MAX_DIGEST_LEN) {
        c.inbuf.shrink_to_fit();
    }
    let mut out_header = Vec::with_capacity(HEADER_LEN);
    encode_response_header(&mut out_header, STATUS_OK, h.count as u32);
    c.out.extend_from_slice(&out_header);
    Some(Ok(Pending { digests, digest_len: h.digest_len, next: 0 }))
}

// ---------------------------------------------------------------------------------------------
// Client.

struct PeerConn {
    writer: StdTcpStream,
    reader: BufReader<StdTcpStream>,
}

/// Fetches chunks from the site's peers; keeps one connection per peer address and reconnects
/// after a failure.
pub struct PeerClient {
    timeout: Duration,
    conns: HashMap<String, PeerConn>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").field("timeout", &self.timeout).field("peers", &self.conns.len()).finish()
    }
}

impl PeerClient {
    /// A client whose connects, reads and writes each give up after `timeout`.
    pub fn new(timeout: Duration) -> PeerClient {
        let timeout = if timeout.is_zero() { Duration::from_millis(1) } else { timeout };
        PeerClient { timeout, conns: HashMap::new() }
    }

    /// Fetches many chunks from one peer in one request/response exchange (one per 4096
    /// digests). `Ok(v)`: `v[i]` is `Some(bytes)` when the peer had `digests[i]`, `None`
    /// otherwise. Does NOT verify the bytes.
    pub fn fetch(&mut self, peer: &str, digests: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(MAX_DIGESTS) {
            let req = encode_request(batch)?;
            out.extend(self.exchange(peer, &req, batch.len())?);
        }
        Ok(out)
    }

    /// Drops the connection to `peer`, if any.
    pub fn disconnect(&mut self, peer: &str) {
        self.conns.remove(peer);
    }

    fn connect(&self, peer: &str) -> Result<PeerConn, PeerError> {
        let err = |source| PeerError::Connect { peer: peer.to_string(), source };
        let mut last = io::Error::new(ErrorKind::InvalidInput, "address resolves to nothing");
        for sa in peer.to_socket_addrs().map_err(err)? {
            match StdTcpStream::connect_timeout(&sa, self.timeout) {
                Ok(s) => {
                    s.set_nodelay(true).map_err(err)?;
                    s.set_read_timeout(Some(self.timeout)).map_err(err)?;
                    s.set_write_timeout(Some(self.timeout)).map_err(err)?;
                    let r = s.try_clone().map_err(err)?;
                    return Ok(PeerConn { writer: s, reader: BufReader::with_capacity(256 * 1024, r) });
                }
                Err(e) => last = e,
            }
        }
        Err(err(last))
    }

    fn exchange(&mut self, peer: &str, req: &[u8], n: usize) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        for attempt in 0..2 {
            let reused = self.conns.contains_key(peer);
            if !reused {
                let c = self.connect(peer)?;
                self.conns.insert(peer.to_string(), c);
            }
            let Some(c) = self.conns.get_mut(peer) else { unreachable!("inserted above") };
            let result =
                c.writer.write_all(req).map_err(ResponseError::Io).and_then(|()| read_response(&mut c.reader, n));
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.conns.remove(peer);
                    let e = match e {
                        ResponseError::Io(source) => {
                            let timeout = matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                            // A kept connection the peer closed since (restart): once more, afresh.
                            if attempt == 0 && reused && !timeout {
                                tracing::debug!(peer, error = %source, "peer connection lost; retrying on a new one");
                                continue;
                            }
                            PeerError::Io { peer: peer.to_string(), source }
                        }
                        ResponseError::Protocol(reason) => PeerError::Protocol { peer: peer.to_string(), reason },
                        ResponseError::Refused(message) => PeerError::Refused { peer: peer.to_string(), message },
                    };
                    return Err(e);
                }
            }
        }
        unreachable!("the second attempt returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn digests(n: usize, l: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| (0..l).map(|j| (i * 7 + j) as u8).collect()).collect()
    }

    #[test]
    fn request_round_trip() {
        let ds = digests(3, 32);
        let req = encode_request(&ds).unwrap();
        assert_eq!(req.len(), HEADER_LEN + 3 * 32);
        assert_eq!(&req[..4], b"SHKQ");
        let h = decode_request_header(&req).unwrap();
        assert_eq!(h, RequestHeader { digest_len: 32, count: 3 });
        assert_eq!(h.total_len(), req.len());
        assert_eq!(&req[HEADER_LEN + 32..HEADER_LEN + 64], &ds[1][..]);
    }

    #[test]
    fn request_encode_refuses_bad_batches() {
        assert!(encode_request(&[]).is_err());
        assert!(encode_request(&digests(MAX_DIGESTS + 1, 20)).is_err());
        assert!(encode_request(&digests(MAX_DIGESTS, 20)).is_ok());
        assert!(encode_request(&[vec![]]).is_err());
        assert!(encode_request(&[vec![0; 65]]).is_err());
        assert!(encode_request(&[vec![0; 20], vec![0; 32]]).is_err());
    }

    #[test]
    fn request_header_bounds() {
        let good = encode_request(&digests(2, 20)).unwrap();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            decode_request_header(&b)
        };
        assert_eq!(with(0, b'X').unwrap_err().status, STATUS_BAD_REQUEST);
        assert_eq!(with(4, 2).unwrap_err().status, STATUS_BAD_VERSION);
        assert_eq!(with(5, 9).unwrap_err().status, STATUS_BAD_REQUEST);
        assert!(with(6, 0).is_err());
        assert!(with(6, 65).is_err());
        assert!(with(6, 64).is_ok());
        assert!(with(7, 1).is_err());
        let mut b = good.clone();
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_request_header(&b).is_err());
        b[8..12].copy_from_slice(&(MAX_DIGESTS as u32 + 1).to_le_bytes());
        assert!(decode_request_header(&b).is_err());
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_request_header(&b).is_err());
        assert!(decode_request_header(&good[..11]).is_err());
    }

    #[test]
    fn response_round_trip() {
        let mut b = Vec::new();
        encode_response_header(&mut b, STATUS_OK, 3);
        encode_entry(&mut b, Some(b"abc"));
        encode_entry(&mut b, None);
        encode_entry(&mut b, Some(&[7u8; MAX_CHUNK]));
        let v = read_response(&mut Cursor::new(&b), 3).unwrap();
        assert_eq!(v[0].as_deref(), Some(&b"abc"[..]));
        assert_eq!(v[1], None);
        assert_eq!(v[2].as_ref().map(Vec::len), Some(MAX_CHUNK));
        // Wrong count for the request.
        assert!(matches!(read_response(&mut Cursor::new(&b), 2), Err(ResponseError::Protocol(_))));
        // Truncated.
        assert!(matches!(read_response(&mut Cursor::new(&b[..b.len() - 1]), 3), Err(ResponseError::Io(_))));
    }

    /// Arbitrary bytes never panic the decoders, and never make them allocate past the bounds.
    #[test]
    fn random_bytes_decode_safely() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let len = (rnd() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // Half the time, a valid magic and version so the decoders go further.
            if i % 2 == 0 && b.len() >= 6 {
                b[..4].copy_from_slice(if i % 4 == 0 { &REQUEST_MAGIC } else { &RESPONSE_MAGIC });
                b[4] = VERSION;
                b[5] = (rnd() % 3) as u8;
            }
            if let Ok(h) = decode_request_header(&b) {
                assert!(h.total_len() <= HEADER_LEN + MAX_DIGESTS * MAX_DIGEST_LEN);
            }
            let _ = read_response(&mut Cursor::new(&b), (rnd() % 8) as usize);
        }
    }

    #[test]
    fn response_bounds() {
        let mut b = Vec::new();
        encode_response_header(&mut b, STATUS_OK, 1);
        b.extend_from_slice(&(MAX_CHUNK as u32 + 1).to_le_bytes());
        assert!(matches!(read_response(&mut Cursor::new(&b), 1), Err(ResponseError::Protocol(_))));
        let mut b = Vec::new();
        encode_response_header(&mut b, STATUS_OK, 1);
        b[0] = b'Z';
        assert!(matches!(read_response(&mut Cursor::new(&b), 1), Err(ResponseError::Protocol(_))));
        let mut b = Vec::new();
        encode_response_header(&mut b, STATUS_BAD_REQUEST, 5000);
        assert!(matches!(read_response(&mut Cursor::new(&b), 1), Err(ResponseError::Protocol(_))));
        let mut b = Vec::new();
        encode_refusal(&mut b, &Refusal { status: STATUS_BAD_REQUEST, message: "x".repeat(5000) });
        assert_eq!(b.len(), HEADER_LEN + MAX_MESSAGE);
        match read_response(&mut Cursor::new(&b), 1) {
            Err(ResponseError::Refused(m)) => assert!(m.starts_with("status 1: xxx")),
            other => panic!("{other:?}"),
        }
    }
}
