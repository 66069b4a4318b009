//! Router-to-router protocol (UDP), authenticated with HMAC-SHA256.
//!
//! ```text
//! off  len  field
//! 0    4    magic "VNE2"
//! 4    1    type (1 data, 2 who-has, 3 i-have, 4 host-route, 5 host-route-ack,
//!           6 hello, 7 route-sync, 8 sync-ack)
//! 5    1    sender name length n (1..=32)
//! 6    n    sender name (UTF-8)
//! 6+n  8    sender's epoch (its boot time in µs: every boot orders above the earlier ones)
//! 14+n 8    receiver's epoch as the sender knows it (0: not known yet)
//! 22+n 8    sequence number (per sender and epoch, strictly increasing)
//! 30+n 8    timestamp, µs since the Unix epoch
//! 38+n 2    body length m
//! 40+n m    body
//! ..   32   HMAC-SHA256(key, all preceding bytes)
//! ```
//! The two epochs bind every message to one boot of each end: a receiver accepts a
//! message other than `hello` only if it names the receiver's current epoch and comes
//! from the sender's current epoch, so nothing recorded before either end restarted is
//! accepted after it (see [`crate::router`]).
//! Every field is big-endian. Bodies:
//! - data: an IPv4 packet;
//! - who-has: query id (4), MAC (6);
//! - i-have: query id (4), MAC (6), IPv4 (4);
//! - host-route: IPv4 (4), route sequence (8), MAC (6), owner length (1), owner;
//! - host-route-ack: IPv4 (4), route sequence (8), flags (1; bit 0 = "I served this IP
//!   before", bit 1 = "late": the host list of a hand-over made just after a restart),
//!   host count (2), hosts (4 each);
//! - hello: flags (1; bit 0 = "adopted": the sender has adopted the epoch it names;
//!   bit 1 = "ask": answer with a hello);
//! - route-sync: batch id (4), entry count (2), entries: IPv4 (4), route sequence (8),
//!   MAC (6), owner length (1), owner;
//! - sync-ack: batch id (4).

use std::net::Ipv4Addr;

use openssl::sha::Sha256;

use crate::frames::Mac;

/// Magic bytes at the start of every message.
pub const MAGIC: &[u8; 4] = b"VNE2";
/// Length of the HMAC trailer.
pub const MAC_LEN: usize = 32;
/// Longest router name.
pub const MAX_NAME: usize = 32;
/// Most hosts carried in one acknowledgement.
pub const MAX_HOSTS: usize = 1024;
/// Largest route-sync body: keeps each datagram under a 1500-byte MTU.
pub const MAX_SYNC_BODY: usize = 1200;
/// Fixed header bytes besides the sender's name.
const HEADER: usize = 4 + 1 + 1 + 8 + 8 + 8 + 8 + 2;

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message too short ({0} bytes)")]
    TooShort(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("authentication failed (HMAC mismatch)")]
    BadHmac,
    #[error("unknown message type {0}")]
    BadType(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("crypto error: {0}")]
    Crypto(String),
    #[error("message too large ({0} bytes body)")]
    TooLarge(usize),
}

/// Message bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// A tunnelled IPv4 packet.
    Data(&'a [u8]),
    /// "Which IP does this MAC use?" (a RARP was seen).
    WhoHas { query: u32, mac: Mac },
    /// Answer from a HWDT.
    IHave { query: u32, mac: Mac, ip: Ipv4Addr },
    /// GNDT /32 update: `ip` is now served by `owner`.
    HostRoute { ip: Ipv4Addr, seq: u64, mac: Mac, owner: String },
    /// Acknowledgement of a host route; the previous owner lists its LAN hosts.
    /// `late`: not an answer to a host route, but the host list of a former owner that
    /// handed the IP over while it had just restarted and did not know its LAN's hosts yet.
    HostRouteAck { ip: Ipv4Addr, seq: u64, was_owner: bool, late: bool, hosts: Vec<Ipv4Addr> },
    /// "This is my epoch" (and, in the header, "yours is…"). `adopted`: the sender has
    /// adopted the epoch it names (its session with the receiver is open); a hello without
    /// it answers a hello that did not name the receiver's current epoch. `ask`: the
    /// sender has no sign yet that the receiver adopted its epoch; answer with a hello.
    Hello { adopted: bool, ask: bool },
    /// Part of the sender's /32 table, sent when a session opens.
    RouteSync { batch: u32, routes: Vec<SyncRoute> },
    /// Receipt of a route-sync batch.
    SyncAck { batch: u32 },
}

/// One /32 of a route sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRoute {
    pub ip: Ipv4Addr,
    pub seq: u64,
    /// The host's MAC where the sender knows it (all zero otherwise).
    pub mac: Mac,
    pub owner: String,
}

impl SyncRoute {
    /// Bytes this entry takes in a route-sync body.
    pub fn encoded_len(&self) -> usize {
        4 + 8 + 6 + 1 + self.owner.len()
    }
}

impl Body<'_> {
    fn type_id(&self) -> u8 {
        match self {
            Body::Data(_) => 1,
            Body::WhoHas { .. } => 2,
            Body::IHave { .. } => 3,
            Body::HostRoute { .. } => 4,
            Body::HostRouteAck { .. } => 5,
            Body::Hello { .. } => 6,
            Body::RouteSync { .. } => 7,
            Body::SyncAck { .. } => 8,
        }
    }

    /// Short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Data(_) => "data",
            Body::WhoHas { .. } => "who-has",
            Body::IHave { .. } => "i-have",
            Body::HostRoute { .. } => "host-route",
            Body::HostRouteAck { .. } => "host-route-ack",
            Body::Hello { .. } => "hello",
            Body::RouteSync { .. } => "route-sync",
            Body::SyncAck { .. } => "sync-ack",
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub sender: String,
    /// The sender's epoch.
    pub epoch: u64,
    /// The receiver's epoch as the sender knows it (0: unknown).
    pub peer_epoch: u64,
    pub seq: u64,
    pub timestamp_us: u64,
    pub body: Body<'a>,
}

/// The shared key, with the HMAC-SHA256 inner and outer states precomputed so each
/// message costs two SHA-256 finalisations (RFC 2104 through openssl's SHA-256).
pub struct Auth {
    inner: Sha256,
    outer: Sha256,
}

impl Auth {
    /// Create from the shared key bytes.
    pub fn new(key: &[u8]) -> Result<Auth, ProtoError> {
        if key.is_empty() {
            return Err(ProtoError::Crypto("empty key".into()));
        }
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&openssl::sha::sha256(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut inner = Sha256::new();
        let mut outer = Sha256::new();
        inner.update(&k.map(|b| b ^ 0x36));
        outer.update(&k.map(|b| b ^ 0x5c));
        Ok(Auth { inner, outer })
    }

    fn hmac(&self, data: &[u8]) -> Result<[u8; 32], ProtoError> {
        let mut i = self.inner.clone();
        i.update(data);
        let ih = i.finish();
        let mut o = self.outer.clone();
        o.update(&ih);
        Ok(o.finish())
    }
}

/// Append the HMAC to already-encoded message bytes (used by the fuzz targets to
/// reach the router logic behind authentication).
pub fn seal(auth: &Auth, signed: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let mut out = signed.to_vec();
    out.extend_from_slice(&auth.hmac(signed)?);
    Ok(out)
}

/// Encode and sign a message.
pub fn encode(auth: &Auth, msg: &Message<'_>) -> Result<Vec<u8>, ProtoError> {
    let name = msg.sender.as_bytes();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ProtoError::Malformed("sender name length"));
    }
    let mut body = Vec::new();
    match &msg.body {
        Body::Data(p) => body.extend_from_slice(p),
        Body::WhoHas { query, mac } => {
            body.extend_from_slice(&query.to_be_bytes());
            body.extend_from_slice(&mac.0);
        }
        Body::IHave { query, mac, ip } => {
            body.extend_from_slice(&query.to_be_bytes());
            body.extend_from_slice(&mac.0);
            body.extend_from_slice(&ip.octets());
        }
        Body::HostRoute { ip, seq, mac, owner } => {
            if owner.is_empty() || owner.len() > MAX_NAME {
                return Err(ProtoError::Malformed("owner name length"));
            }
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&seq.to_be_bytes());
            body.extend_from_slice(&mac.0);
            body.push(owner.len() as u8);
            body.extend_from_slice(owner.as_bytes());
        }
        Body::HostRouteAck { ip, seq, was_owner, late, hosts } => {
            if hosts.len() > MAX_HOSTS {
                return Err(ProtoError::TooLarge(hosts.len() * 4));
            }
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&seq.to_be_bytes());
            body.push(u8::from(*was_owner) | u8::from(*late) << 1);
            body.extend_from_slice(&(hosts.len() as u16).to_be_bytes());
            for h in hosts {
                body.extend_from_slice(&h.octets());
            }
        }
        Body::Hello { adopted, ask } => body.push(u8::from(*adopted) | u8::from(*ask) << 1),
        Body::RouteSync { batch, routes } => {
            body.extend_from_slice(&batch.to_be_bytes());
            body.extend_from_slice(&(routes.len() as u16).to_be_bytes());
            for r in routes {
                if r.owner.is_empty() || r.owner.len() > MAX_NAME {
                    return Err(ProtoError::Malformed("owner name length"));
                }
                body.extend_from_slice(&r.ip.octets());
                body.extend_from_slice(&r.seq.to_be_bytes());
                body.extend_from_slice(&r.mac.0);
                body.push(r.owner.len() as u8);
                body.extend_from_slice(r.owner.as_bytes());
            }
            if body.len() > MAX_SYNC_BODY {
                return Err(ProtoError::TooLarge(body.len()));
            }
        }
        Body::SyncAck { batch } => body.extend_from_slice(&batch.to_be_bytes()),
    }
    if body.len() > usize::from(u16::MAX) {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER + name.len() + body.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(msg.body.type_id());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&msg.epoch.to_be_bytes());
    out.extend_from_slice(&msg.peer_epoch.to_be_bytes());
    out.extend_from_slice(&msg.seq.to_be_bytes());
    out.extend_from_slice(&msg.timestamp_us.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    let tag = auth.hmac(&out)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() - self.pos < n {
            return Err(ProtoError::Malformed(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        let s = self.take(8, what)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Ok(u64::from_be_bytes(b))
    }
    fn mac(&mut self, what: &'static str) -> Result<Mac, ProtoError> {
        let s = self.take(6, what)?;
        let mut b = [0u8; 6];
        b.copy_from_slice(s);
        Ok(Mac(b))
    }
    fn ip(&mut self, what: &'static str) -> Result<Ipv4Addr, ProtoError> {
        let s = self.take(4, what)?;
        Ok(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
    }
    fn name(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let n = usize::from(self.u8(what)?);
        if n == 0 || n > MAX_NAME {
            return Err(ProtoError::Malformed(what));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError::Malformed(what))
    }
    fn done(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtoError::Malformed(what))
        }
    }
}

/// Verify the HMAC, then decode. Never panics on any input.
pub fn decode<'a>(auth: &Auth, buf: &'a [u8]) -> Result<Message<'a>, ProtoError> {
    if buf.len() < HEADER + 1 + MAC_LEN {
        return Err(ProtoError::TooShort(buf.len()));
    }
    if &buf[..4] != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let (signed, tag) = buf.split_at(buf.len() - MAC_LEN);
    let expect = auth.hmac(signed)?;
    if !openssl::memcmp::eq(&expect, tag) {
        return Err(ProtoError::BadHmac);
    }
    decode_unauthenticated(signed)
}

/// Decode the signed part (without the HMAC trailer). Exposed for fuzzing.
pub fn decode_unauthenticated(signed: &[u8]) -> Result<Message<'_>, ProtoError> {
    let mut r = Reader { buf: signed, pos: 0 };
    if r.take(4, "magic")? != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let ty = r.u8("type")?;
    let sender = r.name("sender")?;
    let epoch = r.u64("epoch")?;
    let peer_epoch = r.u64("peer epoch")?;
    let seq = r.u64("seq")?;
    let timestamp_us = r.u64("timestamp")?;
    let blen = usize::from(r.u16("body length")?);
    let body_bytes = r.take(blen, "body")?;
    r.done("trailing bytes")?;
    let mut b = Reader { buf: body_bytes, pos: 0 };
    let body = match ty {
        1 => {
            if body_bytes.is_empty() {
                return Err(ProtoError::Malformed("empty data"));
            }
            Body::Data(body_bytes)
        }
        2 => {
            let query = b.u32("query")?;
            let mac = b.mac("mac")?;
            b.done("who-has length")?;
            Body::WhoHas { query, mac }
        }
        3 => {
            let query = b.u32("query")?;
            let mac = b.mac("mac")?;
            let ip = b.ip("ip")?;
            b.done("i-have length")?;
            Body::IHave { query, mac, ip }
        }
        4 => {
            let ip = b.ip("ip")?;
            let seq = b.u64("route seq")?;
            let mac = b.mac("mac")?;
            let owner = b.name("owner")?;
            b.done("host-route length")?;
            Body::HostRoute { ip, seq, mac, owner }
        }
        5 => {
            let ip = b.ip("ip")?;
            let seq = b.u64("route seq")?;
            let flags = b.u8("flags")?;
            let n = usize::from(b.u16("host count")?);
            if n > MAX_HOSTS {
                return Err(ProtoError::Malformed("host count"));
            }
            let mut hosts = Vec::with_capacity(n);
            for _ in 0..n {
                hosts.push(b.ip("host")?);
            }
            b.done("ack length")?;
            Body::HostRouteAck { ip, seq, was_owner: flags & 1 == 1, late: flags & 2 == 2, hosts }
        }
        6 => {
            let flags = b.u8("hello flags")?;
            b.done("hello length")?;
            Body::Hello { adopted: flags & 1 == 1, ask: flags & 2 == 2 }
        }
        7 => {
            let batch = b.u32("batch")?;
            let n = usize::from(b.u16("route count")?);
            // Each entry takes at least 20 bytes: a count the body cannot hold is malformed.
            if n * 20 > body_bytes.len() {
                return Err(ProtoError::Malformed("route count"));
            }
            let mut routes = Vec::with_capacity(n);
            for _ in 0..n {
                let ip = b.ip("ip")?;
                let seq = b.u64("route seq")?;
                let mac = b.mac("mac")?;
                let owner = b.name("owner")?;
                routes.push(SyncRoute { ip, seq, mac, owner });
            }
            b.done("route-sync length")?;
            Body::RouteSync { batch, routes }
        }
        8 => {
            let batch = b.u32("batch")?;
            b.done("sync-ack length")?;
            Body::SyncAck { batch }
        }
        t => return Err(ProtoError::BadType(t)),
    };
    Ok(Message { sender, epoch, peer_epoch, seq, timestamp_us, body })
}

/// Sliding anti-replay window (as IPsec's): accepts each sequence number once, and
/// sequence numbers up to `WINDOW - 1` behind the highest seen (UDP may reorder).
#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    top: u64,
    bits: [u64; 4],
    any: bool,
}

/// Width of the window.
pub const WINDOW: u64 = 256;

impl ReplayWindow {
    fn bit(&self, off: u64) -> bool {
        self.bits[(off / 64) as usize] >> (off % 64) & 1 == 1
    }
    fn set(&mut self, off: u64) {
        self.bits[(off / 64) as usize] |= 1 << (off % 64);
    }

    /// Returns true (and records it) if `seq` was never seen and is not too old.
    pub fn accept(&mut self, seq: u64) -> bool {
        if !self.any {
            self.any = true;
            self.top = seq;
            self.bits = [0; 4];
            self.set(0);
            return true;
        }
        if seq > self.top {
            let shift = seq - self.top;
            if shift >= WINDOW {
                self.bits = [0; 4];
            } else {
                // Shift the bitmap left by `shift` bits (bit i = top - i).
                let mut nb = [0u64; 4];
                for off in 0..(WINDOW - shift) {
                    if self.bit(off) {
                        let n = off + shift;
                        nb[(n / 64) as usize] |= 1 << (n % 64);
                    }
                }
                self.bits = nb;
            }
            self.top = seq;
            self.set(0);
            true
        } else {
            let off = self.top - seq;
            if off >= WINDOW || self.bit(off) {
                false
            } else {
                self.set(off);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(b"correct horse battery staple").unwrap()
    }

    fn all_bodies() -> Vec<Body<'static>> {
        vec![
            Body::Data(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 1, 0, 1, 10, 1, 1, 1]),
            Body::WhoHas { query: 7, mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]) },
            Body::IHave { query: 7, mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]), ip: Ipv4Addr::new(10, 1, 0, 10) },
            Body::HostRoute {
                ip: Ipv4Addr::new(10, 1, 0, 10),
                seq: 3,
                mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                owner: "siteB".into(),
            },
            Body::HostRouteAck {
                ip: Ipv4Addr::new(10, 1, 0, 10),
                seq: 3,
                was_owner: true,
                late: true,
                hosts: vec![Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2)],
            },
            Body::Hello { adopted: true, ask: false },
            Body::Hello { adopted: false, ask: true },
            Body::RouteSync {
                batch: 9,
                routes: vec![
                    SyncRoute {
                        ip: Ipv4Addr::new(10, 1, 0, 10),
                        seq: 1_700_000_000_000_001,
                        mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                        owner: "siteB".into(),
                    },
                    SyncRoute { ip: Ipv4Addr::new(10, 1, 0, 11), seq: 4, mac: Mac([0; 6]), owner: "A".into() },
                ],
            },
            Body::RouteSync { batch: 10, routes: Vec::new() },
            Body::SyncAck { batch: 9 },
        ]
    }

    #[test]
    fn round_trip_every_type() {
        let a = auth();
        for (i, body) in all_bodies().into_iter().enumerate() {
            let m = Message {
                sender: "siteA".into(),
                epoch: 1_700_000_000_000_000,
                peer_epoch: 1_600_000_000_000_000 + i as u64,
                seq: 1000 + i as u64,
                timestamp_us: 1_700_000_000_000_000,
                body,
            };
            let bytes = encode(&a, &m).unwrap();
            assert_eq!(decode(&a, &bytes).unwrap(), m);
        }
    }

    #[test]
    fn tampering_and_wrong_key_are_rejected() {
        let a = auth();
        let m = Message {
            sender: "siteA".into(),
            epoch: 3,
            peer_epoch: 4,
            seq: 1,
            timestamp_us: 5,
            body: all_bodies().remove(3),
        };
        let bytes = encode(&a, &m).unwrap();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(decode(&a, &t).is_err(), "flip at {i}");
        }
        let other = Auth::new(b"wrong key").unwrap();
        assert_eq!(decode(&other, &bytes), Err(ProtoError::BadHmac));
        for n in 0..bytes.len() {
            assert!(decode(&a, &bytes[..n]).is_err());
        }
    }

    #[test]
    fn a_route_sync_too_large_for_a_datagram_is_refused() {
        let a = auth();
        let route = SyncRoute { ip: Ipv4Addr::new(10, 1, 0, 1), seq: 1, mac: Mac([2; 6]), owner: "B".into() };
        let n = MAX_SYNC_BODY / route.encoded_len() + 1;
        let m = Message {
            sender: "A".into(),
            epoch: 1,
            peer_epoch: 2,
            seq: 3,
            timestamp_us: 4,
            body: Body::RouteSync { batch: 1, routes: vec![route; n] },
        };
        assert!(matches!(encode(&a, &m), Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn unauthenticated_decoder_survives_garbage() {
        let mut rnd = shrink_testutil::util::XorShift::new(12345);
        for len in 0..200usize {
            let mut buf = rnd.bytes(len);
            if len >= 4 {
                buf[..4].copy_from_slice(MAGIC);
            }
            let _ = decode_unauthenticated(&buf);
        }
    }

    #[test]
    fn hmac_matches_openssl_hmac() {
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::sign::Signer;
        for key in [&b"k"[..], &[7u8; 64][..], &[9u8; 100][..], b"correct horse battery staple"] {
            let a = Auth::new(key).unwrap();
            let pk = PKey::hmac(key).unwrap();
            let mut s = Signer::new(MessageDigest::sha256(), &pk).unwrap();
            s.update(b"hello vnetd").unwrap();
            assert_eq!(a.hmac(b"hello vnetd").unwrap().to_vec(), s.sign_to_vec().unwrap());
        }
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(100));
        assert!(!w.accept(100));
        assert!(w.accept(102));
        assert!(w.accept(101));
        assert!(!w.accept(101));
        assert!(w.accept(90));
        assert!(!w.accept(90));
        assert!(w.accept(400));
        assert!(!w.accept(102)); // fell out of the window
        assert!(w.accept(399));
        assert!(w.accept(400 - 255));
        assert!(!w.accept(400 - 256));
        assert!(w.accept(1000));
        assert!(!w.accept(400));
    }
}
