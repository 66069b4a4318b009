//! virtio-net backed by a tap: queue 0 receives (tap → guest), queue 1 transmits.
//! Frames carry the 12-byte `virtio_net_hdr_v1`, which the tap reads and writes as is.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN};
use super::worker::{Handler, Worker};
use super::{ActivateContext, ActivateError, Interrupt, SharedQueues, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame we move: a 1500-byte MTU Ethernet frame plus header, with room to spare.
const MAX_FRAME: usize = 65562;

/// Errors in network device configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// The MAC address does not parse.
    #[error("malformed MAC '{0}': expected six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    /// A unicast MAC is required.
    #[error("MAC {0} is a multicast address; a NIC needs a unicast MAC")]
    MulticastMac(String),
    /// A `--net` option is missing a key or has an unknown one.
    #[error("--net {spec}: {why} (expected tap=NAME,mac=MAC[,bridge=BR])")]
    BadSpec {
        /// The option value.
        spec: String,
        /// What is wrong.
        why: String,
    },
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err(NetConfigError::BadMac(s.to_owned()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| NetConfigError::BadMac(s.to_owned()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(NetConfigError::MulticastMac(s.to_owned()));
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// One `--net` option.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Tap interface name.
    pub tap: String,
    /// Guest MAC.
    pub mac: [u8; 6],
    /// Bridge to attach the tap to.
    pub bridge: Option<String>,
}

impl NetConfig {
    /// Parses `tap=NAME,mac=MAC[,bridge=BR]`.
    pub fn parse(spec: &str) -> Result<NetConfig, NetConfigError> {
        let bad = |why: &str| NetConfigError::BadSpec { spec: spec.to_owned(), why: why.to_owned() };
        let (mut tap, mut mac, mut bridge) = (None, None, None);
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(&format!("'{kv}' is not key=value")))?;
            match k {
                "tap" => tap = Some(v.to_owned()),
                "mac" => mac = Some(parse_mac(v)?),
                "bridge" => bridge = Some(v.to_owned()),
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or_else(|| bad("missing tap=NAME"))?,
            mac: mac.ok_or_else(|| bad("missing mac=MAC"))?,
            bridge,
        })
    }
}

/// Packet counters of a NIC.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped because they did not fit the guest's buffer.
    pub rx_dropped: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Frames the tap refused.
    pub tx_dropped: AtomicU64,
}

/// A virtio-net device.
pub struct Net {
    name: String,
    mac: [u8; 6],
    tap: Tap,
    worker: Option<Worker>,
    stats: Arc<NetStats>,
}

impl Net {
    /// A NIC on `tap` with `mac`.
    pub fn new(name: String, tap: Tap, mac: [u8; 6]) -> Net {
        Net { name, mac, tap, worker: None, stats: Arc::new(NetStats::default()) }
    }

    /// Counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [rx_evt, tx_evt]: [EventFd; 2] = ctx.queue_evts.try_into().map_err(|_| ActivateError::BadQueue(0))?;
        let handler = NetHandler {
            mem: ctx.mem,
            queues: ctx.queues,
            rx_evt,
            tx_evt,
            tap: self.tap.try_clone().map_err(ActivateError::Worker)?,
            interrupt: ctx.interrupt,
            pending: None,
            buf: vec![0u8; MAX_FRAME],
            stats: self.stats.clone(),
        };
        self.worker = Some(Worker::spawn(&self.name, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn worker(&mut self) -> &mut Option<Worker> {
        &mut self.worker
    }
    fn name(&self) -> &str {
        &self.name
    }
}

struct NetHandler {
    mem: GuestMemoryMmap,
    queues: SharedQueues,
    rx_evt: EventFd,
    tx_evt: EventFd,
    tap: Tap,
    interrupt: Arc<Interrupt>,
    /// A frame read from the tap that found no guest buffer yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    stats: Arc<NetStats>,
}

impl NetHandler {
    /// Moves frames from the tap into the guest's receive buffers, until either runs out.
    fn process_rx(&mut self) {
        let mut used = false;
        while !self.interrupt.failed() {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read(&mut self.buf) {
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("{}: tap read: {e}", self.tap.name());
                        break;
                    }
                },
            };
            let mut qs = self.queues.lock().expect("queues poisoned");
            let q = &mut qs[RX];
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.interrupt.fail(format!("rx ring: {e:?}"));
                    return;
                }
            };
            let Some(chain) = chain else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&self.mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => match w.write_all(&frame) {
                    Ok(()) => frame.len() as u32,
                    Err(e) => {
                        self.interrupt.fail(format!("rx buffer: {e}"));
                        return;
                    }
                },
                Ok(_) => {
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
                Err(e) => {
                    self.interrupt.fail(format!("rx descriptor chain: {e:?}"));
                    return;
                }
            };
            if let Err(e) = q.add_used(&self.mem, head, written) {
                self.interrupt.fail(format!("rx used ring: {e:?}"));
                return;
            }
            if written > 0 {
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            }
            used = true;
        }
        if used {
            super::notify_used(&self.queues, RX, &self.mem, &self.interrupt);
        }
    }

    /// Sends every frame the guest queued for transmission.
    fn process_tx(&mut self) {
        let mut used = false;
        while !self.interrupt.failed() {
            let mut qs = self.queues.lock().expect("queues poisoned");
            let q = &mut qs[TX];
            let chain = match q.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.interrupt.fail(format!("tx ring: {e:?}"));
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut frame = Vec::with_capacity(1600);
            match chain.reader(&self.mem) {
                Ok(mut r) if r.available_bytes() <= MAX_FRAME => {
                    if let Err(e) = r.read_to_end(&mut frame) {
                        self.interrupt.fail(format!("tx buffer: {e}"));
                        return;
                    }
                }
                Ok(_) => {
                    self.interrupt.fail("tx frame larger than 64 KiB");
                    return;
                }
                Err(e) => {
                    self.interrupt.fail(format!("tx descriptor chain: {e:?}"));
                    return;
                }
            }
            if frame.len() < VNET_HDR_LEN {
                self.interrupt.fail(format!("tx frame of {} bytes has no virtio-net header", frame.len()));
                return;
            }
            // A tap takes a frame whole or not at all; anything short of the whole is a drop.
            match self.tap.write(&frame) {
                Ok(n) if n == frame.len() => self.stats.tx_frames.fetch_add(1, Ordering::Relaxed),
                _ => self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed),
            };
            if let Err(e) = q.add_used(&self.mem, head, 0) {
                self.interrupt.fail(format!("tx used ring: {e:?}"));
                return;
            }
            used = true;
        }
        if used {
            super::notify_used(&self.queues, TX, &self.mem, &self.interrupt);
        }
    }
}

impl Handler for NetHandler {
    fn sources(&self) -> Vec<(RawFd, bool)> {
        vec![(self.rx_evt.as_raw_fd(), false), (self.tx_evt.as_raw_fd(), false), (self.tap.as_raw_fd(), true)]
    }
    fn handle(&mut self, index: usize) {
        match index {
            0 => {
                let _ = self.rx_evt.read();
                self.process_rx();
            }
            1 => {
                let _ = self.tx_evt.read();
                self.process_tx();
            }
            _ => self.process_rx(),
        }
    }
    fn process_all(&mut self) {
        let _ = self.tx_evt.read();
        let _ = self.rx_evt.read();
        self.process_tx();
        self.process_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_specs() {
        assert_eq!(parse_mac("52:54:00:12:34:5f"), Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f]));
        for bad in
            ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "zz:54:00:12:34:56", "5254.0012.3456", "52:54:0:12:34:56"]
        {
            assert_eq!(parse_mac(bad), Err(NetConfigError::BadMac(bad.into())), "{bad}");
        }
        assert!(matches!(parse_mac("01:00:5e:00:00:01"), Err(NetConfigError::MulticastMac(_))));
        let c = NetConfig::parse("tap=tap0,mac=52:54:00:00:00:01,bridge=br0").unwrap();
        assert_eq!((c.tap.as_str(), c.bridge.as_deref()), ("tap0", Some("br0")));
        assert!(NetConfig::parse("mac=52:54:00:00:00:01").unwrap_err().to_string().contains("missing tap"));
        assert!(NetConfig::parse("tap=t,mac=52:54:00:00:00:01,colour=red")
            .unwrap_err()
            .to_string()
            .contains("unknown key 'colour'"));
        assert!(matches!(NetConfig::parse("tap=t,mac=nope"), Err(NetConfigError::BadMac(_))));
        assert_eq!(format_mac(&c.mac), "52:54:00:00:00:01");
    }
}
