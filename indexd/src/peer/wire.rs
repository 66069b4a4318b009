//! Encoding and decoding of the peer protocol (pure): requests, response headers and entries,
//! refusals. The byte layout is in the [parent module's documentation](super).

use std::io::{self, Read};

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

/// Errors of the peer module: of encoding a request, of a server that cannot start and of a
/// client's fetches.
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
    /// The TLS handshake failed (another cluster key, a peer without TLS).
    #[error("peer {peer}: {source}")]
    Tls {
        /// The peer.
        peer: String,
        /// Why.
        source: crate::tls::TlsError,
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
        let mut x = shrink_testutil::util::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut rnd = move || x.next_u64();
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
