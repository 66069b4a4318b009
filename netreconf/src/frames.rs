//! Ethernet frames vnetd reads and writes: ARP, RARP (QEMU's announcement) and IPv4.
//!
//! Parsing never panics: every malformed input is an [`FrameError`]. Frames are parsed
//! and built with `etherparse`; RARP (ethertype 0x8035) is not dispatched by
//! `etherparse`, so it is recognised here and its body parsed as an ARP packet.

use std::fmt;
use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, ArpPacketSlice, EtherType, Ethernet2Slice, Ipv4HeaderSlice, PacketBuilder,
};

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// 00:00:00:00:00:00
    pub const ZERO: Mac = Mac([0; 6]);

    /// True for a unicast, non-zero address (what a host may own).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && *self != Mac::ZERO
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = FrameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(FrameError::BadMac(s.to_string()));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() || p.len() > 2 {
                return Err(FrameError::BadMac(s.to_string()));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| FrameError::BadMac(s.to_string()))?;
        }
        Ok(Mac(m))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than an Ethernet header, or than the header it announces.
    #[error("truncated frame ({what}: {len} bytes)")]
    Truncated { what: &'static str, len: usize },
    /// An ARP/RARP body that is not Ethernet/IPv4 or has an opcode that does not fit.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// A textual MAC address that does not parse.
    #[error("bad MAC address '{0}' (expected aa:bb:cc:dd:ee:ff)")]
    BadMac(String),
}

/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of RARP, used by QEMU's self-announcement.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// ARP request.
pub const OP_REQUEST: u16 = 1;
/// ARP reply.
pub const OP_REPLY: u16 = 2;
/// RARP "request reverse", what QEMU sends.
pub const OP_RARP_REQUEST: u16 = 3;
/// Minimum Ethernet frame length without FCS.
pub const MIN_FRAME: usize = 60;

/// An Ethernet/IPv4 ARP or RARP message with its Ethernet addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// A gratuitous ARP: the sender announces its own address (SPA == TPA).
    pub fn is_gratuitous(&self) -> bool {
        self.spa == self.tpa && !self.spa.is_unspecified()
    }
}

/// A parsed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// ARP (0x0806) request or reply.
    Arp(Arp),
    /// RARP (0x8035), opcode 3.
    Rarp(Arp),
    /// An IPv4 packet; `packet` is trimmed to the IP total length (Ethernet padding removed).
    Ipv4 { eth_src: Mac, eth_dst: Mac, src: Ipv4Addr, dst: Ipv4Addr, packet: &'a [u8] },
    /// Any other ethertype.
    Other { ethertype: u16 },
}

fn mac_from(s: &[u8]) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&s[..6]);
    Mac(m)
}

fn ip_from(s: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(s[0], s[1], s[2], s[3])
}

fn parse_arp_body(what: &'static str, eth_src: Mac, eth_dst: Mac, body: &[u8]) -> Result<Arp, FrameError> {
    let a = ArpPacketSlice::from_slice(body).map_err(|_| FrameError::Truncated { what, len: body.len() })?;
    if a.hw_addr_type() != ArpHardwareId::ETHERNET
        || a.proto_addr_type() != EtherType::IPV4
        || a.hw_addr_size() != 6
        || a.proto_addr_size() != 4
    {
        return Err(FrameError::Malformed {
            what,
            reason: format!(
                "not Ethernet/IPv4 (htype {}, ptype {:#06x}, hlen {}, plen {})",
                a.hw_addr_type().0,
                a.proto_addr_type().0,
                a.hw_addr_size(),
                a.proto_addr_size()
            ),
        });
    }
    Ok(Arp {
        eth_src,
        eth_dst,
        op: a.operation().0,
        sha: mac_from(a.sender_hw_addr()),
        spa: ip_from(a.sender_protocol_addr()),
        tha: mac_from(a.target_hw_addr()),
        tpa: ip_from(a.target_protocol_addr()),
    })
}

/// Parse one Ethernet II frame (without FCS).
pub fn parse(data: &[u8]) -> Result<Frame<'_>, FrameError> {
    let eth = Ethernet2Slice::from_slice_without_fcs(data)
        .map_err(|_| FrameError::Truncated { what: "ethernet", len: data.len() })?;
    let eth_src = Mac(eth.source());
    let eth_dst = Mac(eth.destination());
    let body = eth.payload_slice();
    match eth.ether_type().0 {
        ETHERTYPE_ARP => {
            let a = parse_arp_body("arp", eth_src, eth_dst, body)?;
            if a.op != OP_REQUEST && a.op != OP_REPLY {
                return Err(FrameError::Malformed { what: "arp", reason: format!("opcode {}", a.op) });
            }
            Ok(Frame::Arp(a))
        }
        ETHERTYPE_RARP => {
            let a = parse_arp_body("rarp", eth_src, eth_dst, body)?;
            if a.op != OP_RARP_REQUEST {
                return Err(FrameError::Malformed {
                    what: "rarp",
                    reason: format!("opcode {} (only 3, request reverse, is handled)", a.op),
                });
            }
            Ok(Frame::Rarp(a))
        }
        ETHERTYPE_IPV4 => {
            let h = Ipv4HeaderSlice::from_slice(body)
                .map_err(|e| FrameError::Malformed { what: "ipv4", reason: e.to_string() })?;
            let total = usize::from(h.total_len());
            if total < h.slice().len() || total > body.len() {
                return Err(FrameError::Truncated { what: "ipv4", len: body.len() });
            }
            Ok(Frame::Ipv4 {
                eth_src,
                eth_dst,
                src: Ipv4Addr::from(h.source()),
                dst: Ipv4Addr::from(h.destination()),
                packet: &body[..total],
            })
        }
        other => Ok(Frame::Other { ethertype: other }),
    }
}

/// Build an Ethernet/IPv4 ARP (op 1, 2) or RARP (op 3) frame, padded to 60 bytes.
#[allow(clippy::too_many_arguments)]
pub fn build_arp(
    ethertype: u16,
    eth_src: Mac,
    eth_dst: Mac,
    op: u16,
    sha: Mac,
    spa: Ipv4Addr,
    tha: Mac,
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let pkt = match ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation(op),
        &sha.0,
        &spa.octets(),
        &tha.0,
        &tpa.octets(),
    ) {
        Ok(p) => p,
        // Lengths are fixed (6 and 4), so ArpPacket::new cannot fail.
        Err(_) => unreachable!("fixed-size ARP addresses"),
    };
    let mut buf = Vec::with_capacity(MIN_FRAME);
    if ethertype == ETHERTYPE_ARP {
        let b = PacketBuilder::ethernet2(eth_src.0, eth_dst.0).arp(pkt);
        // Writing into a Vec cannot fail.
        let _ = b.write_to_vec(&mut buf);
    } else {
        buf.extend_from_slice(&eth_dst.0);
        buf.extend_from_slice(&eth_src.0);
        buf.extend_from_slice(&ethertype.to_be_bytes());
        buf.extend_from_slice(&pkt.to_bytes());
    }
    if buf.len() < MIN_FRAME {
        buf.resize(MIN_FRAME, 0);
    }
    buf
}

/// Build an ARP frame from an [`Arp`] description.
pub fn build(a: &Arp) -> Vec<u8> {
    let ethertype = if a.op == OP_RARP_REQUEST { ETHERTYPE_RARP } else { ETHERTYPE_ARP };
    build_arp(ethertype, a.eth_src, a.eth_dst, a.op, a.sha, a.spa, a.tha, a.tpa)
}

/// QEMU's self-announcement schedule (net/announce.c's defaults: 5 rounds, the first at once,
/// then 50 ms, growing by 100 ms): the gap before each round, ms. Each round is due a gap after
/// the previous one was sent, so a late round does not shorten the next gap.
pub const QEMU_ANNOUNCE_GAPS_MS: [u64; 5] = [0, 50, 150, 250, 350];

/// The same schedule as times from the first round: 0, 50, 200, 450 and 800 ms.
pub const QEMU_ANNOUNCE_MS: [u64; 5] = {
    let mut at = [0u64; 5];
    let mut i = 1;
    while i < at.len() {
        at[i] = at[i - 1] + QEMU_ANNOUNCE_GAPS_MS[i];
        i += 1;
    }
    at
};

/// QEMU's self-announcement (net/announce.c): a 60-byte broadcast RARP, opcode 3,
/// SHA = THA = the VM MAC, SPA = TPA = 0.0.0.0.
pub fn qemu_rarp(mac: Mac) -> Vec<u8> {
    build_arp(
        ETHERTYPE_RARP,
        mac,
        Mac::BROADCAST,
        OP_RARP_REQUEST,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    )
}

/// Gratuitous ARP request broadcast: "who-has IP tell IP" from `mac`.
pub fn garp_request(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    build_arp(ETHERTYPE_ARP, mac, Mac::BROADCAST, OP_REQUEST, mac, ip, Mac::ZERO, ip)
}

/// Gratuitous ARP reply broadcast: "IP is-at mac", THA = SHA so Linux treats it as GARP.
pub fn garp_reply(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    build_arp(ETHERTYPE_ARP, mac, Mac::BROADCAST, OP_REPLY, mac, ip, mac, ip)
}

/// A directed ARP request that makes `host` (at `host_mac`, `host_ip`) learn
/// `claimed_ip → claimed_mac`: "who-has host_ip tell claimed_ip", unicast to the host,
/// Ethernet source `eth_src` (always the router, so bridges do not relearn ports).
/// Linux (neigh_event_ns) and smoltcp (TPA is its own address) both accept it.
pub fn directed_update(
    eth_src: Mac,
    host_mac: Mac,
    host_ip: Ipv4Addr,
    claimed_ip: Ipv4Addr,
    claimed_mac: Mac,
) -> Vec<u8> {
    build_arp(ETHERTYPE_ARP, eth_src, host_mac, OP_REQUEST, claimed_mac, claimed_ip, Mac::ZERO, host_ip)
}

/// ARP reply `ip is-at mac` to the requester.
pub fn arp_reply(mac: Mac, ip: Ipv4Addr, to_mac: Mac, to_ip: Ipv4Addr) -> Vec<u8> {
    build_arp(ETHERTYPE_ARP, mac, to_mac, OP_REPLY, mac, ip, to_mac, to_ip)
}

/// Broadcast ARP request "who-has target tell ip" from `mac`.
pub fn arp_request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    build_arp(ETHERTYPE_ARP, mac, Mac::BROADCAST, OP_REQUEST, mac, ip, Mac::ZERO, target)
}

/// Wrap an IPv4 packet in an Ethernet II frame.
pub fn ipv4_frame(src: Mac, dst: Mac, packet: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(14 + packet.len().max(46));
    buf.extend_from_slice(&dst.0);
    buf.extend_from_slice(&src.0);
    buf.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    buf.extend_from_slice(packet);
    if buf.len() < MIN_FRAME {
        buf.resize(MIN_FRAME, 0);
    }
    buf
}

/// Parsed view of an IPv4 packet (for packets received from the overlay).
pub fn ipv4_addrs(packet: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr), FrameError> {
    let h = Ipv4HeaderSlice::from_slice(packet)
        .map_err(|e| FrameError::Malformed { what: "ipv4", reason: e.to_string() })?;
    if usize::from(h.total_len()) != packet.len() {
        return Err(FrameError::Malformed {
            what: "ipv4",
            reason: format!("total length {} != packet length {}", h.total_len(), packet.len()),
        });
    }
    Ok((Ipv4Addr::from(h.source()), Ipv4Addr::from(h.destination())))
}

/// Decrement the TTL of an IPv4 packet in place, updating the header checksum
/// incrementally (RFC 1624). Returns false (packet must be dropped) when TTL ≤ 1.
pub fn decrement_ttl(packet: &mut [u8]) -> bool {
    if packet.len() < 20 || packet[8] <= 1 {
        return false;
    }
    packet[8] -= 1;
    // TTL is the high byte of the 16-bit word at offset 8: HC' = ~(~HC + ~m + m').
    let old = u16::from_be_bytes([packet[8] + 1, packet[9]]);
    let new = u16::from_be_bytes([packet[8], packet[9]]);
    let hc = u16::from_be_bytes([packet[10], packet[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    packet[10..12].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn the_announce_schedule_is_qemus() {
        assert_eq!(QEMU_ANNOUNCE_MS, [0, 50, 200, 450, 800]);
    }

    #[test]
    fn qemu_rarp_bytes_match_net_announce_c() {
        let f = qemu_rarp(VM);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &VM.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &VM.0);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &VM.0);
        assert_eq!(&f[38..60], &[0; 22]);
        match parse(&f).unwrap() {
            Frame::Rarp(a) => {
                assert_eq!(a.sha, VM);
                assert_eq!(a.op, 3);
                assert!(a.spa.is_unspecified());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arp_round_trip() {
        let ip = Ipv4Addr::new(10, 1, 0, 10);
        let r = garp_reply(VM, ip);
        let Frame::Arp(a) = parse(&r).unwrap() else { panic!() };
        assert!(a.is_gratuitous());
        assert_eq!(a.op, OP_REPLY);
        assert_eq!(a.tha, VM);
        let d =
            directed_update(Mac([2, 0, 0, 0, 0, 0xfe]), Mac([2, 0, 0, 0, 0, 1]), Ipv4Addr::new(10, 1, 0, 1), ip, VM);
        let Frame::Arp(a) = parse(&d).unwrap() else { panic!() };
        assert_eq!(a.eth_dst, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(a.eth_src, Mac([2, 0, 0, 0, 0, 0xfe]));
        assert_eq!(a.sha, VM);
        assert_eq!(a.spa, ip);
        assert_eq!(a.tpa, Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(build(&a), d);
    }

    #[test]
    fn truncated_and_malformed_frames_are_errors() {
        let f = qemu_rarp(VM);
        for n in 0..42 {
            assert!(parse(&f[..n]).is_err(), "len {n}");
        }
        let mut bad = f.clone();
        bad[21] = 1; // RARP with opcode 1
        assert!(matches!(parse(&bad), Err(FrameError::Malformed { .. })));
        let mut bad = garp_request(VM, Ipv4Addr::new(1, 2, 3, 4));
        bad[18] = 8; // hlen 8
        assert!(parse(&bad).is_err());
        let mut bad = garp_request(VM, Ipv4Addr::new(1, 2, 3, 4));
        bad[21] = 9; // ARP opcode 9
        assert!(parse(&bad).is_err());
        // IPv4 claiming more bytes than present.
        let mut ip = vec![0x45, 0, 0x05, 0xdc, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 1, 0, 2];
        ip.extend_from_slice(&[0; 8]);
        let fr = ipv4_frame(VM, VM, &ip);
        assert!(parse(&fr).is_err());
    }

    #[test]
    fn ipv4_padding_is_trimmed_and_ttl_checksum_stays_valid() {
        let mut ip = vec![0x45, 0, 0, 28, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 1, 1, 1];
        ip.extend_from_slice(&[0; 8]);
        // compute checksum
        let csum = etherparse::Ipv4HeaderSlice::from_slice(&ip).unwrap().to_header().calc_header_checksum();
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        let fr = ipv4_frame(VM, VM, &ip);
        assert_eq!(fr.len(), 60);
        let Frame::Ipv4 { packet, dst, .. } = parse(&fr).unwrap() else { panic!() };
        assert_eq!(packet.len(), 28);
        assert_eq!(dst, Ipv4Addr::new(10, 1, 1, 1));
        let mut p = packet.to_vec();
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 63);
        let h = etherparse::Ipv4HeaderSlice::from_slice(&p).unwrap().to_header();
        assert_eq!(h.calc_header_checksum(), h.header_checksum);
        p[8] = 1;
        assert!(!decrement_ttl(&mut p));
    }

    #[test]
    fn mac_parse() {
        assert_eq!("52:54:00:12:34:56".parse::<Mac>().unwrap(), VM);
        assert!("52:54:00:12:34".parse::<Mac>().is_err());
        assert!("zz:54:00:12:34:56".parse::<Mac>().is_err());
        assert_eq!(VM.to_string(), "52:54:00:12:34:56");
    }
}
