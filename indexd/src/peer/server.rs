//! The peer server: a `mio` event loop on its own thread serving a [`ChunkSource`].

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::wire::{
    decode_request_header, encode_entry, encode_refusal, encode_response_header, PeerError, Refusal, HEADER_LEN,
    MAX_CHUNK, MAX_DIGESTS, MAX_DIGEST_LEN, STATUS_OK,
};
use super::LOG_TARGET;
use crate::tls::Transport;

/// Most connections a server keeps; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Response bytes a connection buffers before waiting for the socket to drain.
const OUT_HIGH_WATER: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// What a server serves: the chunks this VMM holds.
pub trait ChunkSource: Send + Sync + 'static {
    /// The bytes of a chunk with this digest, if this VMM still holds one. Implementations verify
    /// the content still hashes to `digest` before returning it.
    fn chunk(&self, digest: &[u8]) -> Option<Vec<u8>>;
}

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
    /// Listens on `addr` (`"0.0.0.0:0"` allowed) and serves `source` over `transport` (with
    /// TLS, only to clients of the same cluster key).
    pub fn start(addr: &str, source: Arc<dyn ChunkSource>, transport: &Transport) -> Result<PeerServer, PeerError> {
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
            transport: transport.clone(),
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
            tracing::warn!(target: LOG_TARGET, error = %e, "peer server: cannot wake the event loop");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(target: LOG_TARGET, "peer server: event loop thread panicked");
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
    /// The TLS session, unless the transport is plain TCP.
    tls: Option<rustls::ServerConnection>,
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
    transport: Transport,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(target: LOG_TARGET, error = %e, "peer server: poll failed; stopping");
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
                        tracing::warn!(
                            target: LOG_TARGET,
                            %from,
                            "peer server: too many connections; closing a new one"
                        );
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    let token = Token(self.next_token);
                    self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONN);
                    if let Err(e) =
                        self.poll.registry().register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                    {
                        tracing::warn!(target: LOG_TARGET, error = %e, "peer server: cannot register a connection");
                        continue;
                    }
                    let tls = match &self.transport {
                        Transport::Plain => None,
                        Transport::Tls(t) => match t.server_connection() {
                            Ok(c) => Some(c),
                            Err(e) => {
                                tracing::warn!(target: LOG_TARGET, error = %e, "peer server: no TLS session");
                                let _ = self.poll.registry().deregister(&mut sock);
                                continue;
                            }
                        },
                    };
                    let mut c = Conn {
                        sock,
                        tls,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_pos: 0,
                        pending: None,
                        closing: false,
                    };
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
                    tracing::warn!(target: LOG_TARGET, error = %e, "peer server: accept failed");
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
        // What TLS holds for the socket (handshake messages, encrypted responses) goes first.
        let mut progress = match c.flush_tls() {
            Ok(p) => p,
            Err(_) => return Drive::Close,
        };

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
                            target: LOG_TARGET,
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
            match c.write(c.out_pos) {
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
            if c.closing && c.pending.is_none() && !c.tls.as_ref().is_some_and(|t| t.wants_write()) {
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
                        tracing::debug!(
                            target: LOG_TARGET,
                            message = %refusal.message,
                            "peer server: refusing a request"
                        );
                        encode_refusal(&mut c.out, &refusal);
                        c.inbuf = Vec::new();
                        c.closing = true;
                    }
                }
                continue;
            }
            match c.read(scratch) {
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

/// Writes what TLS has for the socket, until it would block; whether anything went.
fn flush(tls: &mut rustls::ServerConnection, sock: &mut TcpStream) -> io::Result<bool> {
    let mut wrote = false;
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => wrote = true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(wrote)
}

impl Conn {
    /// [`flush`], with TLS.
    fn flush_tls(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            Some(tls) => flush(tls, &mut self.sock),
            None => Ok(false),
        }
    }

    /// Writes response bytes from `out[from..]`: to the socket, or into TLS once what it held
    /// went out (`WouldBlock` until then).
    fn write(&mut self, from: usize) -> io::Result<usize> {
        let data = &self.out[from..];
        let Some(tls) = self.tls.as_mut() else { return self.sock.write(data) };
        if tls.is_handshaking() || tls.wants_write() {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = tls.writer().write(data)?;
        flush(tls, &mut self.sock)?;
        Ok(n)
    }

    /// Reads request bytes: from the socket, or decrypted (after the handshake; 0 at the end).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else { return self.sock.read(buf) };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let n = tls.read_tls(&mut self.sock)?;
            if let Err(e) = tls.process_new_packets() {
                // The alert that says why, if the socket takes it.
                let _ = tls.write_tls(&mut self.sock);
                tracing::debug!(target: LOG_TARGET, error = %e, "peer server: TLS refused a connection");
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
            if n == 0 {
                return Ok(0);
            }
            // Handshake replies go at once.
            flush(tls, &mut self.sock)?;
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
