//! Guest networking: a virtio-net driver (asynchronous transmit and receive
//! on `VirtIONetRaw`, with our own buffer pools) under smoltcp, a static IPv4
//! address, ARP and ICMP echo (smoltcp), a UDP echo service on port 7 and the
//! optional UDP probe client (`probe.rs`).
//!
//! Frames wake the guest at once: the NIC's GSI is routed through the IOAPIC
//! to a device vector (see `interrupts.rs`), and the main loop polls the
//! stack whenever the idle wait returns.
//!
//! Neighbour learning. smoltcp fills its ARP cache only from ARP packets whose
//! target is its own address, and its entries expire after 60 s whatever the
//! traffic. So the driver helps it (as Linux would, from gratuitous ARP and
//! from traffic): before an IPv4 frame addressed to us from a neighbour on the
//! subnet whose MAC is new (or not refreshed for 20 s), it hands smoltcp a
//! synthetic ARP reply "neighbour is at <source MAC>"; and ARP packets aimed
//! at someone else (gratuitous ARP, or a known neighbour's ARP) are rewritten
//! into replies aimed at us, so a moved or re-announced neighbour is learnt
//! without waiting for a cache expiry and a 1 s ARP retry.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU32;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;

use crate::config::Config;
use crate::probe::Probe;
use crate::virtio::{DeferredNotify, IdentityHal, Mmio};

/// Queue size (the device's maximum) and receive buffers posted.
const QS: usize = 256;
/// Size of every receive and transmit buffer: header + 1514-byte frame fits.
const BUF: usize = 2048;
/// `virtio_net_hdr_v1` (with `num_buffers`).
const HDR: usize = 12;
/// Transmit buffers.
const TX_BUFS: usize = 128;
/// Ethernet frame size for a 1500-byte MTU.
const MAX_FRAME: usize = 1514;
/// UDP echo port.
pub const ECHO_PORT: u16 = 7;
/// How long a learnt neighbour MAC counts as fresh.
const NEIGHBOUR_REFRESH_MS: u64 = 20_000;

/// Queues of the NIC with buffers the device has not been told about yet
/// (see [`DeferredNotify`]); flushed at the end of every poll.
static NOTIFY_PENDING: AtomicU32 = AtomicU32::new(0);

/// Packet counters.
#[derive(Default, Clone, Copy, Debug)]
pub struct Stats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub tx_full: u64,
    pub echoed: u64,
}

/// The virtio side: rings and buffer pools.
struct Core {
    raw: VirtIONetRaw<IdentityHal, DeferredNotify, QS>,
    rx_pool: Vec<u8>,
    /// Receive buffer index of each in-flight token (descriptor head).
    rx_of_token: [u16; QS],
    tx_pool: Vec<u8>,
    tx_free: Vec<u16>,
    /// (buffer index, length) of each in-flight transmit token.
    tx_of_token: [(u16, u16); QS],
    stats: Stats,
}

impl Core {
    fn rx_buf(&mut self, i: u16) -> &'static mut [u8] {
        let off = usize::from(i) * BUF;
        assert!(off + BUF <= self.rx_pool.len());
        // SAFETY: in bounds of the pool, which is never reallocated or freed
        // (the NIC lives for the kernel's lifetime); buffer `i` is used by one
        // request (or by this function's caller) at a time.
        unsafe { core::slice::from_raw_parts_mut(self.rx_pool.as_mut_ptr().add(off), BUF) }
    }

    fn tx_buf(&mut self, i: u16) -> &'static mut [u8] {
        let off = usize::from(i) * BUF;
        assert!(off + BUF <= self.tx_pool.len());
        // SAFETY: as in `rx_buf`, for the transmit pool.
        unsafe { core::slice::from_raw_parts_mut(self.tx_pool.as_mut_ptr().add(off), BUF) }
    }

    /// Posts receive buffer `i`.
    fn post_rx(&mut self, i: u16) {
        let buf = self.rx_buf(i);
        // SAFETY: the buffer is not touched again until the device returns
        // it (`recv_into` completes it first).
        let token = unsafe { self.raw.receive_begin(buf) }.expect("virtio-net: cannot post a receive buffer");
        self.rx_of_token[usize::from(token)] = i;
    }

    /// Copies the next received frame (without the virtio header) into `out`
    /// and gives its buffer back to the device. `Some(0)` for a frame that
    /// was dropped (malformed), `None` when there is none.
    fn recv_into(&mut self, out: &mut [u8]) -> Option<usize> {
        let token = self.raw.poll_receive()?;
        let i = self.rx_of_token[usize::from(token)];
        let buf = self.rx_buf(i);
        // SAFETY: `buf` is the buffer posted with this token.
        let n = match unsafe { self.raw.receive_complete(token, buf) } {
            Ok((hdr, len)) if len <= out.len() && hdr + len <= BUF => {
                out[..len].copy_from_slice(&buf[hdr..hdr + len]);
                len
            }
            _ => 0,
        };
        self.post_rx(i);
        self.stats.rx_frames += 1;
        Some(n)
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let (i, len) = self.tx_of_token[usize::from(token)];
            let buf = self.tx_buf(i);
            // SAFETY: the same buffer (and length) as given to transmit_begin.
            let _ = unsafe { self.raw.transmit_complete(token, &buf[..usize::from(len)]) };
            self.tx_free.push(i);
        }
    }

    /// Sends a frame of `len` bytes built by `f`.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if self.tx_free.is_empty() {
            self.reclaim();
        }
        let len = len.min(BUF - HDR);
        let Some(i) = self.tx_free.pop() else {
            // No room: build the frame and drop it (smoltcp asked through
            // `receive` without checking; this is rare).
            self.stats.tx_full += 1;
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        };
        let buf = self.tx_buf(i);
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..HDR + len]);
        let total = HDR + len;
        // SAFETY: the buffer is not touched until `reclaim` sees its token.
        match unsafe { self.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                self.tx_of_token[usize::from(token)] = (i, total as u16);
                self.stats.tx_frames += 1;
            }
            Err(_) => {
                self.tx_free.push(i);
                self.stats.tx_full += 1;
            }
        }
        r
    }
}

/// Keeps smoltcp's neighbour cache in step with the wire (see the module
/// documentation).
struct Learner {
    ip: [u8; 4],
    mac: [u8; 6],
    mask: u32,
    /// Neighbours seen: IP, MAC, when last handed to smoltcp.
    known: Vec<([u8; 4], [u8; 6], u64)>,
}

impl Learner {
    const CAPACITY: usize = 32;

    fn same_subnet(&self, ip: [u8; 4]) -> bool {
        u32::from_be_bytes(ip) & self.mask == u32::from_be_bytes(self.ip) & self.mask
    }

    fn lookup(&self, ip: [u8; 4]) -> Option<usize> {
        self.known.iter().position(|k| k.0 == ip)
    }

    fn remember(&mut self, ip: [u8; 4], mac: [u8; 6], now: u64) {
        match self.lookup(ip) {
            Some(i) => self.known[i] = (ip, mac, now),
            None => {
                if self.known.len() >= Self::CAPACITY {
                    let oldest = (0..self.known.len()).min_by_key(|&i| self.known[i].2).unwrap_or(0);
                    self.known.swap_remove(oldest);
                }
                self.known.push((ip, mac, now));
            }
        }
    }

    /// Looks at a received frame: may rewrite it (ARP) or return a synthetic
    /// ARP reply to deliver before it.
    fn inspect(&mut self, frame: &mut [u8], now: u64) -> Option<[u8; 60]> {
        if frame.len() < 34 {
            return None;
        }
        let src_mac: [u8; 6] = frame[6..12].try_into().ok()?;
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0806 if frame.len() >= 42 => {
                let arp = &mut frame[14..42];
                if arp[0..6] != [0, 1, 8, 0, 6, 4] {
                    return None;
                }
                let sha: [u8; 6] = arp[8..14].try_into().ok()?;
                let spa: [u8; 4] = arp[14..18].try_into().ok()?;
                let tpa: [u8; 4] = arp[24..28].try_into().ok()?;
                if tpa == self.ip || spa == self.ip || spa == [0; 4] || sha[0] & 1 != 0 || !self.same_subnet(spa) {
                    return None;
                }
                if spa == tpa || self.lookup(spa).is_some() {
                    // Gratuitous ARP or a neighbour we talk to: make it a
                    // reply aimed at us, which smoltcp learns from.
                    arp[6..8].copy_from_slice(&2u16.to_be_bytes());
                    arp[18..24].copy_from_slice(&self.mac);
                    arp[24..28].copy_from_slice(&self.ip);
                    self.remember(spa, sha, now);
                }
                None
            }
            0x0800 => {
                let src: [u8; 4] = frame[26..30].try_into().ok()?;
                let dst: [u8; 4] = frame[30..34].try_into().ok()?;
                if dst != self.ip || src == self.ip || src_mac[0] & 1 != 0 || !self.same_subnet(src) {
                    return None;
                }
                if let Some(i) = self.lookup(src) {
                    let (_, mac, at) = self.known[i];
                    if mac == src_mac && now.saturating_sub(at) < NEIGHBOUR_REFRESH_MS {
                        return None;
                    }
                }
                self.remember(src, src_mac, now);
                let mut f = [0u8; 60];
                f[0..6].copy_from_slice(&self.mac);
                f[6..12].copy_from_slice(&src_mac);
                f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
                f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
                f[22..28].copy_from_slice(&src_mac);
                f[28..32].copy_from_slice(&src);
                f[32..38].copy_from_slice(&self.mac);
                f[38..42].copy_from_slice(&self.ip);
                Some(f)
            }
            _ => None,
        }
    }
}

/// The smoltcp device: the virtio core plus a receive scratch buffer and the
/// frames queued behind a synthetic one.
pub struct Nic {
    core: Core,
    scratch: Vec<u8>,
    stash: VecDeque<Vec<u8>>,
    learner: Option<Learner>,
    now_ms: u64,
}

pub struct NicRx<'a>(&'a [u8]);
pub struct NicTx<'a>(&'a mut Core);

impl phy::RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.send(len, f)
    }
}

impl Device for Nic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        let len = if let Some(frame) = self.stash.pop_front() {
            self.scratch[..frame.len()].copy_from_slice(&frame);
            frame.len()
        } else {
            let n = loop {
                match self.core.recv_into(&mut self.scratch)? {
                    0 => continue,
                    n => break n,
                }
            };
            let synthetic = match self.learner.as_mut() {
                Some(l) => l.inspect(&mut self.scratch[..n], self.now_ms),
                None => None,
            };
            match synthetic {
                Some(arp) => {
                    self.stash.push_back(self.scratch[..n].to_vec());
                    self.scratch[..arp.len()].copy_from_slice(&arp);
                    arp.len()
                }
                None => n,
            }
        };
        Some((NicRx(&self.scratch[..len]), NicTx(&mut self.core)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NicTx<'_>> {
        if self.core.tx_free.is_empty() {
            self.core.reclaim();
        }
        if self.core.tx_free.is_empty() {
            None
        } else {
            Some(NicTx(&mut self.core))
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// The network stack of one NIC.
pub struct Net {
    pub mac: [u8; 6],
    pub ip: Option<([u8; 4], u8)>,
    pub mmio_base: u64,
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: Option<SocketHandle>,
    pub probe: Option<Probe>,
    pub sender: Option<Sender>,
    buf: Vec<u8>,
}

/// `udpsend=`: sends datagrams of `size` bytes at `rate` bytes/s (0: as
/// fast as the transmit ring drains; transmit completions wake the guest).
pub struct Sender {
    handle: SocketHandle,
    peer: IpEndpoint,
    size: usize,
    rate: u64,
    credit: u64,
    last_ms: u64,
    pub datagrams: u64,
    pub bytes: u64,
}

/// Local UDP port of the sender.
const SENDER_PORT: u16 = 40009;

impl Sender {
    fn fill(&mut self, sock: &mut udp::Socket<'static>, now_ms: u64, buf: &mut [u8]) {
        if self.rate > 0 {
            let ms = now_ms.saturating_sub(self.last_ms);
            self.credit = (self.credit + ms * self.rate / 1000).min(self.rate);
        }
        self.last_ms = now_ms;
        while sock.can_send() && (self.rate == 0 || self.credit >= self.size as u64) {
            buf[..8].copy_from_slice(&self.datagrams.to_le_bytes());
            if sock.send_slice(&buf[..self.size], self.peer).is_err() {
                break;
            }
            self.datagrams += 1;
            self.bytes += self.size as u64;
            if self.rate > 0 {
                self.credit -= self.size as u64;
            }
        }
    }

    pub fn report(&self) {
        crate::println!("udpsend: sent={} bytes={}", self.datagrams, self.bytes);
    }
}

fn udp_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
    )
}

impl Net {
    /// Initialises the NIC behind `transport` and the stack on it.
    pub fn new(transport: Mmio, mmio_base: u64, config: &Config, now_ms: u64) -> Result<Net, virtio_drivers::Error> {
        let transport = DeferredNotify::new(transport, &NOTIFY_PENDING);
        let raw = VirtIONetRaw::<IdentityHal, DeferredNotify, QS>::new(transport)?;
        let mac = raw.mac_address();
        let mut core = Core {
            raw,
            rx_pool: vec![0u8; QS * BUF],
            rx_of_token: [u16::MAX; QS],
            tx_pool: vec![0u8; TX_BUFS * BUF],
            tx_free: (0..TX_BUFS as u16).rev().collect(),
            tx_of_token: [(u16::MAX, 0); QS],
            stats: Stats::default(),
        };
        for i in 0..QS as u16 {
            core.post_rx(i);
        }
        DeferredNotify::flush(mmio_base, &NOTIFY_PENDING);
        let learner = config.ip.map(|(ip, len)| Learner {
            ip,
            mac,
            mask: if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) },
            known: Vec::new(),
        });
        let mut nic = Nic { core, scratch: vec![0u8; BUF], stash: VecDeque::new(), learner, now_ms };

        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        cfg.random_seed =
            crate::workload::splitmix64(u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]));
        let now = Instant::from_millis(now_ms as i64);
        let mut iface = Interface::new(cfg, &mut nic, now);
        let mut sockets = SocketSet::new(Vec::new());
        let mut echo = None;
        let mut probe = None;
        let mut sender = None;
        if let Some((ip, len)) = config.ip {
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), len));
            });
            if let Some(gw) = config.gw {
                let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(gw[0], gw[1], gw[2], gw[3]));
            }
            let mut s = udp_socket(256, 256 * 1024);
            s.bind(ECHO_PORT).expect("bind the echo port");
            echo = Some(sockets.add(s));
            if let Some(p) = config.probe {
                let mut s = udp_socket(64, 64 * 1024);
                s.bind(crate::probe::LOCAL_PORT).expect("bind the probe port");
                let handle = sockets.add(s);
                probe = Some(Probe::new(p, handle, now_ms));
            }
            if let Some(u) = config.udpsend {
                let mut s = udp_socket(256, 512 * 1024);
                s.bind(SENDER_PORT).expect("bind the sender port");
                let [a, b, c, d] = u.ip;
                sender = Some(Sender {
                    handle: sockets.add(s),
                    peer: IpEndpoint::new(IpAddress::v4(a, b, c, d), u.port),
                    size: u.size,
                    rate: u.rate,
                    credit: 0,
                    last_ms: now_ms,
                    datagrams: 0,
                    bytes: 0,
                });
            }
        }
        Ok(Net { mac, ip: config.ip, mmio_base, nic, iface, sockets, echo, probe, sender, buf: vec![0u8; 65536] })
    }

    /// Processes everything that arrived and everything due at `now_ms`.
    pub fn poll(&mut self, now_ms: u64) {
        let ts = Instant::from_millis(now_ms as i64);
        self.nic.now_ms = now_ms;
        for _ in 0..64 {
            if let Some(u) = self.sender.as_mut() {
                u.fill(self.sockets.get_mut::<udp::Socket>(u.handle), now_ms, &mut self.buf);
            }
            self.iface.poll(ts, &mut self.nic, &mut self.sockets);
            let mut again = false;
            if let Some(h) = self.echo {
                let sock = self.sockets.get_mut::<udp::Socket>(h);
                while sock.can_send() {
                    let Ok((n, meta)) = sock.recv_slice(&mut self.buf) else { break };
                    if sock.send_slice(&self.buf[..n], meta.endpoint).is_ok() {
                        self.nic.core.stats.echoed += 1;
                    }
                    again = true;
                }
            }
            if let Some(p) = self.probe.as_mut() {
                let sock = self.sockets.get_mut::<udp::Socket>(p.handle);
                again |= p.step(sock, now_ms, &mut self.buf);
            }
            if !again {
                break;
            }
        }
        self.nic.core.reclaim();
        DeferredNotify::flush(self.mmio_base, &NOTIFY_PENDING);
    }

    /// When the stack next needs a poll (milliseconds), if ever.
    pub fn next_deadline(&mut self, now_ms: u64) -> Option<u64> {
        let ts = Instant::from_millis(now_ms as i64);
        let stack = self.iface.poll_at(ts, &self.sockets).map(|t| t.total_millis().max(0) as u64);
        let mut probe = self.probe.as_ref().map(|p| p.next_deadline());
        if self.sender.is_some() {
            // Paced sending: every tick (completions wake the unpaced one).
            probe = Some(probe.unwrap_or(u64::MAX).min(now_ms + 1));
        }
        match (stack, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Packet counters.
    #[allow(dead_code)]
    pub fn stats(&self) -> Stats {
        self.nic.core.stats
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub struct MacFmt(pub [u8; 6]);

impl core::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}
