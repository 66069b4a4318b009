//! Mutually authenticated TLS 1.3 (rustls, with ring) on every connection between hosts: the
//! migration stream with the pulls that travel on it, and peer chunk fetches.
//!
//! # Trust: a cluster key
//!
//! The hosts of a cluster share one secret, the cluster key: 32 random bytes in a file only its
//! owner may read (`shrink-migrate --new-cluster-key FILE` writes one). From it every endpoint
//! derives the same certificate authority, an Ed25519 key pair (HKDF-SHA256 of the key) with a
//! fixed self-signed certificate, and at start makes itself a fresh leaf key and certificate
//! signed by that authority. Both ends of a connection present their leaf and accept only a
//! peer whose leaf chains to the authority: a peer is trusted if and only if it holds the
//! cluster key. Nothing but the authority's public key is derivable from what crosses the wire,
//! so the key itself never leaves the hosts. The fingerprint ([`Tls::fingerprint`]) names a
//! cluster key in status output and errors without revealing it.
//!
//! # Streams
//!
//! [`SecureStream`] is a blocking TLS stream with `try_clone`, like `TcpStream`: one handle
//! reads while another writes (the migration's sender and its answer reader). Socket reads and
//! writes happen outside the lock on the TLS state, so a write blocked on a full link never
//! holds up the reader. Timeouts, `shutdown` and socket errors (`TimedOut` from
//! `TCP_USER_TIMEOUT` among them) come from the TCP socket unchanged. The end of the TCP stream
//! reads as end of stream, with or without TLS `close_notify`: every protocol carried here ends
//! with an explicit message of its own, so a truncated stream is still detected.
//!
//! [`Transport`] is what a VMM was configured with: TLS on a cluster key, or plain TCP, which
//! only an explicit flag selects.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};

/// The name every endpoint's certificate carries and every client asks for: trust comes from
/// the cluster's authority, not from host names.
pub const SERVER_NAME: &str = "shrink-cluster";

/// How long a TLS handshake may take at most (each read and write of it).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const KEY_LEN: usize = 32;
/// What the authority's Ed25519 seed is derived for.
const AUTHORITY_SEED: &[u8] = b"authority ed25519 seed";
const READ_BUF: usize = 64 * 1024;
/// TLS output a connection buffers before its writer must wait for the socket.
const SEND_BUFFER: usize = 256 * 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The key file cannot be read or written.
    #[error("cluster key {path}: {source}")]
    KeyIo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file may be read by others.
    #[error("cluster key {path}: readable by group or others (mode {mode:03o}); `chmod 600` it")]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("cluster key {path}: {why}")]
    KeyFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The certificates could not be made.
    #[error("cluster certificates: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A handshake failed.
    #[error("TLS handshake with {peer} failed: {source}{hint}")]
    Handshake {
        /// The other end.
        peer: String,
        /// What happened.
        #[source]
        source: io::Error,
        /// What it probably means.
        hint: &'static str,
    },
}

/// The cluster's shared secret.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A new random key.
    pub fn generate() -> Result<ClusterKey, TlsError> {
        use ring::rand::SecureRandom;
        let mut k = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| TlsError::Certificate("the system's random generator failed".into()))?;
        Ok(ClusterKey(k))
    }

    /// Writes the key to a new file `path` (mode 0600); an existing file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), TlsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| TlsError::KeyIo { path: path.to_owned(), source };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{hex}\n").as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }

    /// Reads a key file: 64 hexadecimal digits, readable by its owner only.
    pub fn load(path: &Path) -> Result<ClusterKey, TlsError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |source| TlsError::KeyIo { path: path.to_owned(), source };
        let mode = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyMode { path: path.to_owned(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(err)?;
        ClusterKey::parse(text.trim()).map_err(|why| TlsError::KeyFormat { path: path.to_owned(), why })
    }

    fn parse(hex: &str) -> Result<ClusterKey, String> {
        if hex.len() != 2 * KEY_LEN {
            return Err(format!("expected {} hexadecimal digits, found {} characters", 2 * KEY_LEN, hex.len()));
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("x"), 16)
                .map_err(|_| "not hexadecimal digits".to_string())?;
        }
        Ok(ClusterKey(k))
    }

    /// A short public name of the key: the first 8 bytes, in hex, of the SHA-256 of its
    /// authority's public key (what [`Tls::fingerprint`] shows), without making certificates.
    pub fn fingerprint(&self) -> String {
        use ring::signature::KeyPair as _;
        let seed = self.derive(AUTHORITY_SEED);
        let ca = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an Ed25519 seed");
        ring::digest::digest(&ring::digest::SHA256, ca.public_key().as_ref()).as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// 32 bytes derived from the key for `purpose` (HKDF-SHA256).
    fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"shrink cluster key v1").extract(&self.0);
        let mut out = [0u8; 32];
        prk.expand(&[purpose], Len).and_then(|okm| okm.fill(&mut out)).expect("32 bytes is a valid HKDF-SHA256 length");
        out
    }
}

/// TLS configuration of one endpoint: the cluster's authority and this endpoint's certificate.
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    fingerprint: String,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("fingerprint", &self.fingerprint).finish()
    }
}

/// The PKCS#8 (v1) encoding of an Ed25519 private key from its 32-byte seed (RFC 8410).
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(seed);
    der
}

fn cert_err(e: rcgen::Error) -> TlsError {
    TlsError::Certificate(e.to_string())
}

impl Tls {
    /// The configuration for a host of the cluster whose key is `key`.
    pub fn new(key: &ClusterKey) -> Result<Tls, TlsError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose, PKCS_ED25519,
        };
        let ca_pkcs8 = ed25519_pkcs8(&key.derive(AUTHORITY_SEED));
        let ca_key = KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(ca_pkcs8), &PKCS_ED25519)
            .map_err(cert_err)?;
        // Every field fixed: every host derives the same authority.
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name.push(DnType::CommonName, "shrink cluster authority");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
        ca.not_after = rcgen::date_time_ymd(2124, 1, 1);
        ca.serial_number = Some(rcgen::SerialNumber::from_slice(&[1]));
        let ca_cert = ca.self_signed(&ca_key).map_err(cert_err)?;
        let fingerprint = key.fingerprint();

        let leaf_key = KeyPair::generate_for(&PKCS_ED25519).map_err(cert_err)?;
        let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(cert_err)?;
        leaf.distinguished_name.push(DnType::CommonName, SERVER_NAME);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = std::time::SystemTime::now();
        leaf.not_before = (now - Duration::from_secs(86_400)).into();
        leaf.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
        let leaf_cert = leaf.signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key)).map_err(cert_err)?;

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
        let private = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = &[&rustls::version::TLS13];

        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), private())?;
        client.resumption = rustls::client::Resumption::disabled();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, private())?;
        server.send_tls13_tickets = 0;
        Ok(Tls { client: Arc::new(client), server: Arc::new(server), fingerprint })
    }

    /// A short public name of the cluster key (from its authority's public key).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The client end of a handshake on `tcp`, blocking (at most [`HANDSHAKE_TIMEOUT`] per read
    /// or write).
    pub fn connect(&self, tcp: TcpStream) -> Result<SecureStream, TlsError> {
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let conn = ClientConnection::new(self.client.clone(), name)?;
        SecureStream::handshake(Connection::Client(conn), tcp)
    }

    /// The server end of a handshake on `tcp`, blocking as [`Tls::connect`].
    pub fn accept(&self, tcp: TcpStream) -> Result<SecureStream, TlsError> {
        let conn = self.server_connection()?;
        SecureStream::handshake(Connection::Server(conn), tcp)
    }

    /// A server connection to drive on a non-blocking socket (the peer server's event loop).
    pub fn server_connection(&self) -> Result<ServerConnection, TlsError> {
        let mut conn = ServerConnection::new(self.server.clone())?;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Ok(conn)
    }
}

/// What a handshake error probably means, for the operator.
fn hint(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    match e.get_ref().and_then(|i| i.downcast_ref::<R>()) {
        Some(R::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            " (the peer's certificate is not of this cluster: it has another cluster key)"
        }
        Some(R::AlertReceived(A::UnknownCA | A::BadCertificate | A::DecryptError | A::CertificateUnknown)) => {
            " (the peer refused this host's certificate: it has another cluster key)"
        }
        Some(R::InvalidMessage(_) | R::InappropriateHandshakeMessage { .. } | R::InappropriateMessage { .. }) => {
            " (the peer does not speak TLS: plain TCP, or not a shrink endpoint)"
        }
        _ if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => " (no answer in time)",
        _ if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
            " (the peer closed the connection: plain TCP, another cluster key, or not a shrink endpoint)"
        }
        _ => "",
    }
}

/// The read side's buffer: ciphertext read from the socket that TLS has not taken yet.
struct ReadBuf {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

struct Shared {
    conn: Mutex<Connection>,
    /// Held by the one reader at a time: socket reads and what they bring stay in order.
    reading: Mutex<ReadBuf>,
    /// Held by the one writer at a time, with the ciphertext it is writing.
    writing: Mutex<Vec<u8>>,
    /// An earlier write stopped part-way: the TLS stream is cut.
    broken: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves nothing inconsistent that matters: the stream
    // is then useless anyway, and its next error says so.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

/// A blocking TLS stream over TCP whose handles (from [`SecureStream::try_clone`]) share one
/// TLS session: one may read while another writes.
pub struct SecureStream {
    shared: Arc<Shared>,
    sock: TcpStream,
}

impl fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureStream").field("peer", &self.sock.peer_addr().ok()).finish()
    }
}

impl SecureStream {
    fn handshake(mut conn: Connection, mut tcp: TcpStream) -> Result<SecureStream, TlsError> {
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let fail = |source: io::Error| TlsError::Handshake { peer: peer.clone(), hint: hint(&source), source };
        let (rt, wt) = (tcp.read_timeout().map_err(fail)?, tcp.write_timeout().map_err(fail)?);
        let bound = |t: Option<Duration>| Some(t.map_or(HANDSHAKE_TIMEOUT, |t| t.min(HANDSHAKE_TIMEOUT)));
        tcp.set_read_timeout(bound(rt)).and_then(|_| tcp.set_write_timeout(bound(wt))).map_err(fail)?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok((0, 0)) if conn.is_handshaking() => {
                    return Err(fail(io::Error::new(ErrorKind::UnexpectedEof, "the peer closed the connection")))
                }
                Ok(_) => {}
                Err(e) => {
                    // Tell the peer why, when rustls has an alert for it.
                    let _ = conn.write_tls(&mut tcp);
                    return Err(fail(e));
                }
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut tcp).map_err(fail)?;
        }
        tcp.set_read_timeout(rt).and_then(|_| tcp.set_write_timeout(wt)).map_err(fail)?;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Ok(SecureStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                reading: Mutex::new(ReadBuf { buf: vec![0; READ_BUF], pos: 0, len: 0 }),
                writing: Mutex::new(Vec::new()),
                broken: AtomicBool::new(false),
            }),
            sock: tcp,
        })
    }

    /// Another handle on the same stream.
    pub fn try_clone(&self) -> io::Result<SecureStream> {
        Ok(SecureStream { shared: self.shared.clone(), sock: self.sock.try_clone()? })
    }

    /// Shuts the TCP connection down (as `TcpStream::shutdown`): a blocked read or write on
    /// any handle returns.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

impl Read for SecureStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rb = lock(&self.shared.reading);
        loop {
            {
                let mut conn = lock(&self.shared.conn);
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    // The TCP stream ended without close_notify: the end of the stream all the
                    // same (see the module's documentation).
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if rb.pos < rb.len {
                    let ReadBuf { buf, pos, len } = &mut *rb;
                    let took = conn.read_tls(&mut &buf[*pos..*len])?;
                    if took == 0 {
                        return Err(io::Error::new(ErrorKind::InvalidData, "TLS takes no more input"));
                    }
                    *pos += took;
                    conn.process_new_packets().map_err(tls_err)?;
                    continue;
                }
            }
            // Wait for the socket without holding the TLS state: the writer goes on meanwhile.
            let n = {
                let ReadBuf { buf, .. } = &mut *rb;
                (&self.sock).read(buf)?
            };
            rb.pos = 0;
            rb.len = n;
            if n == 0 {
                let mut conn = lock(&self.shared.conn);
                conn.read_tls(&mut io::empty())?;
                conn.process_new_packets().map_err(tls_err)?;
                return Ok(0);
            }
        }
    }
}

impl SecureStream {
    /// Encrypts `data` (none: only what TLS has pending) and writes it to the socket; returns
    /// how much of `data` was taken.
    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.shared.broken.load(Ordering::SeqCst) {
            return Err(io::Error::new(ErrorKind::BrokenPipe, "the TLS stream was cut by an earlier failed write"));
        }
        let mut out = lock(&self.shared.writing);
        let n = {
            let mut conn = lock(&self.shared.conn);
            let n = if data.is_empty() { 0 } else { conn.writer().write(data)? };
            while conn.wants_write() {
                conn.write_tls(&mut *out)?;
            }
            n
        };
        let r = (&self.sock).write_all(&out);
        out.clear();
        if let Err(e) = r {
            // Part of a record may have gone: nothing written after it could be decrypted.
            self.shared.broken.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(n)
    }
}

impl Write for SecureStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.send(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send(&[]).map(|_| ())
    }
}

/// A connection between hosts: TLS, or plain TCP where configured so.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP (`--plain-tcp`).
    Plain(TcpStream),
    /// TLS on a cluster key.
    Tls(SecureStream),
}

impl Stream {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(s) => Stream::Plain(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }

    /// `TcpStream::shutdown` of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp().shutdown(how)
    }

    /// `TcpStream::set_read_timeout` of the connection (all its handles).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }

    /// `TcpStream::set_write_timeout` of the connection (all its handles).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(t)
    }

    /// The other end's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How an endpoint talks to other hosts.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain TCP: only where explicitly asked for.
    Plain,
    /// Mutually authenticated TLS on the cluster key.
    Tls(Arc<Tls>),
}

impl Transport {
    /// The transport that a key file, or the explicit plain-TCP flag, selects; `None` when
    /// neither is given.
    pub fn configured(key: Option<&Path>, plain: bool) -> Result<Option<Transport>, TlsError> {
        match (key, plain) {
            (Some(k), _) => Ok(Some(Transport::Tls(Arc::new(Tls::new(&ClusterKey::load(k)?)?)))),
            (None, true) => Ok(Some(Transport::Plain)),
            (None, false) => Ok(None),
        }
    }

    /// The client end of a connection on `tcp`.
    pub fn connect(&self, tcp: TcpStream) -> Result<Stream, TlsError> {
        match self {
            Transport::Plain => Ok(Stream::Plain(tcp)),
            Transport::Tls(t) => t.connect(tcp).map(Stream::Tls),
        }
    }

    /// The server end of a connection on `tcp`.
    pub fn accept(&self, tcp: TcpStream) -> Result<Stream, TlsError> {
        match self {
            Transport::Plain => Ok(Stream::Plain(tcp)),
            Transport::Tls(t) => t.accept(tcp).map(Stream::Tls),
        }
    }

    /// The cluster key's fingerprint, with TLS.
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Transport::Plain => None,
            Transport::Tls(t) => Some(t.fingerprint()),
        }
    }

    /// `"tls"` or `"plain"`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls(_) => "tls",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Plain => f.write_str("plain TCP"),
            Transport::Tls(t) => write!(f, "TLS 1.3, cluster key {}", t.fingerprint()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn key(b: u8) -> ClusterKey {
        ClusterKey([b; KEY_LEN])
    }

    /// A connected pair: (client, server) handshakes on loopback.
    fn pair(client: &Tls, server: &Tls) -> (Result<SecureStream, TlsError>, Result<SecureStream, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::scope(|s| {
            let srv = s.spawn(|| server.accept(l.accept().unwrap().0));
            let c = client.connect(TcpStream::connect(addr).unwrap());
            (c, srv.join().unwrap())
        })
    }

    #[test]
    fn the_same_key_gives_the_same_authority_and_another_key_another() {
        let (a, b, c) = (Tls::new(&key(1)).unwrap(), Tls::new(&key(1)).unwrap(), Tls::new(&key(2)).unwrap());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        assert_eq!(key(1).fingerprint(), a.fingerprint(), "the key's own fingerprint is its authority's");
    }

    #[test]
    fn hosts_with_the_same_key_talk_both_ways_on_cloned_handles() {
        let (a, b) = (Tls::new(&key(7)).unwrap(), Tls::new(&key(7)).unwrap());
        let (c, s) = pair(&a, &b);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut back = c.try_clone().unwrap();
        let expect = data.clone();
        std::thread::scope(|sc| {
            // The client writes a lot while its clone reads the server's answers: neither
            // blocks the other.
            let w = sc.spawn(move || {
                c.write_all(&data).unwrap();
                c.flush().unwrap();
                c
            });
            let mut got = vec![0u8; expect.len()];
            let mut s2 = s.try_clone().unwrap();
            let srv = sc.spawn(move || {
                s2.read_exact(&mut got).unwrap();
                s2.write_all(b"done").unwrap();
                got
            });
            let mut four = [0u8; 4];
            back.read_exact(&mut four).unwrap();
            assert_eq!(&four, b"done");
            assert!(srv.join().unwrap() == expect);
            let c = w.join().unwrap();
            c.shutdown(Shutdown::Both).unwrap();
        });
        // The end of the TCP stream reads as the end of the stream.
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_host_with_another_key_is_refused_both_ways_and_told_why() {
        let (a, b) = (Tls::new(&key(1)).unwrap(), Tls::new(&key(2)).unwrap());
        let (c, s) = pair(&a, &b);
        let c = c.unwrap_err().to_string();
        assert!(c.contains("another cluster key"), "{c}");
        assert!(s.is_err());
    }

    #[test]
    fn a_plain_tcp_peer_is_not_taken_for_a_tls_one() {
        let tls = Tls::new(&key(3)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(b"SHKA this is not TLS at all, and it goes on for a while.......\n");
        });
        let e = tls.connect(TcpStream::connect(addr).unwrap()).unwrap_err().to_string();
        t.join().unwrap();
        assert!(e.contains("TLS handshake with 127.0.0.1"), "{e}");
        assert!(e.contains("does not speak TLS") || e.contains("closed the connection"), "{e}");
    }

    #[test]
    fn a_silent_peer_ends_the_handshake_after_the_timeout() {
        let tls = Tls::new(&key(4)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let e = tls.connect(tcp).unwrap_err();
        assert!(
            matches!(&e, TlsError::Handshake { source, .. }
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "{e}"
        );
        drop(l);
    }

    #[test]
    fn key_files_are_written_private_never_overwritten_and_checked_on_load() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shrink-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cluster.key");
        let _ = std::fs::remove_file(&p);
        let k = ClusterKey::generate().unwrap();
        k.write_new(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(ClusterKey::load(&p).unwrap().0, k.0);
        assert!(matches!(k.write_new(&p), Err(TlsError::KeyIo { .. })), "an existing key is kept");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("readable by group or others (mode 644)"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "abc\n").unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("expected 64 hexadecimal digits"), "{e}");
        assert!(format!("{k:?}") == "ClusterKey(..)", "the key never shows in a debug print");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
