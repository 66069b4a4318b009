//! UDP probe client (`probe=<ip>:<port>,<interval_ms>`): sends numbered
//! datagrams to a peer's echo service and counts the echoes.
//!
//! * Until the peer first answers, a "hello" datagram goes out every 100 ms
//!   and nothing is counted (so a peer that boots later, or ARP resolution,
//!   is not counted as loss); `probe started: ...` is printed once it answers.
//! * Then one numbered probe every `interval_ms` (timer-paced: with intervals
//!   shorter than the 10 ms tick, the probes due are sent together).
//! * A probe is lost when no echo came back within 1 s; a late echo is
//!   ignored. `maxgap_ms` is the longest time between two consecutive echoes.
//! * `probe: sent=<S> received=<R> lost=<L> maxgap_ms=<G>` once per second
//!   (cumulative); probes still within their 1 s are in neither R nor L.

use alloc::collections::VecDeque;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpEndpoint};

use crate::config;
use crate::println;

/// Local UDP port of the probe client.
pub const LOCAL_PORT: u16 = 40007;
const MAGIC_PROBE: &[u8; 8] = b"SHRKPROB";
const MAGIC_HELLO: &[u8; 8] = b"SHRKHELO";
const HELLO_INTERVAL_MS: u64 = 100;
const TIMEOUT_MS: u64 = 1000;
/// Datagram: magic, sequence number, send time (µs), padding to 64 bytes.
const LEN: usize = 64;

pub struct Probe {
    pub handle: SocketHandle,
    peer: IpEndpoint,
    interval_ms: u64,
    started: bool,
    boot_ms: u64,
    next_send_ms: u64,
    next_seq: u64,
    /// Probes sent in the last second: (sequence, send time, answered).
    window: VecDeque<(u64, u64, bool)>,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    last_echo_ms: Option<u64>,
    pub maxgap_ms: u64,
}

impl Probe {
    pub fn new(cfg: config::Probe, handle: SocketHandle, now_ms: u64) -> Probe {
        let [a, b, c, d] = cfg.ip;
        Probe {
            handle,
            peer: IpEndpoint::new(IpAddress::v4(a, b, c, d), cfg.port),
            interval_ms: cfg.interval_ms,
            started: false,
            boot_ms: now_ms,
            next_send_ms: now_ms,
            next_seq: 1,
            window: VecDeque::new(),
            sent: 0,
            received: 0,
            lost: 0,
            last_echo_ms: None,
            maxgap_ms: 0,
        }
    }

    /// When the next probe (or hello) is due.
    pub fn next_deadline(&self) -> u64 {
        let expiry = self.window.front().map_or(u64::MAX, |&(_, t, _)| t + TIMEOUT_MS + 1);
        self.next_send_ms.min(expiry)
    }

    fn datagram(magic: &[u8; 8], seq: u64, now_us: u64) -> [u8; LEN] {
        let mut d = [0u8; LEN];
        d[..8].copy_from_slice(magic);
        d[8..16].copy_from_slice(&seq.to_le_bytes());
        d[16..24].copy_from_slice(&now_us.to_le_bytes());
        d
    }

    /// Handles echoes, expiries and sends what is due. Returns whether it did
    /// anything (the caller then polls the stack again).
    pub fn step(&mut self, sock: &mut udp::Socket<'static>, now_ms: u64, buf: &mut [u8]) -> bool {
        let mut did = false;
        while let Ok((n, meta)) = sock.recv_slice(buf) {
            did = true;
            if meta.endpoint != self.peer || n < 16 {
                continue;
            }
            let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
            if &buf[..8] == MAGIC_HELLO && !self.started {
                self.started = true;
                self.next_send_ms = now_ms;
                println!(
                    "probe started: {}:{} answered after {} ms, interval {} ms",
                    self.peer.addr,
                    self.peer.port,
                    now_ms - self.boot_ms,
                    self.interval_ms
                );
            } else if &buf[..8] == MAGIC_PROBE {
                if let Some(entry) = self.window.iter_mut().find(|e| e.0 == seq) {
                    if !entry.2 && now_ms <= entry.1 + TIMEOUT_MS {
                        entry.2 = true;
                        self.received += 1;
                        if let Some(last) = self.last_echo_ms {
                            self.maxgap_ms = self.maxgap_ms.max(now_ms - last);
                        }
                        self.last_echo_ms = Some(now_ms);
                    }
                }
            }
        }
        // Expire probes older than the timeout.
        while let Some(&(_, t, answered)) = self.window.front() {
            if now_ms <= t + TIMEOUT_MS {
                break;
            }
            if !answered {
                self.lost += 1;
            }
            self.window.pop_front();
        }
        // Send what is due; after a long stall (VM paused) do not burst.
        if now_ms >= self.next_send_ms {
            let now_us = crate::clock::now_us();
            if !self.started {
                let _ = sock.send_slice(&Self::datagram(MAGIC_HELLO, 0, now_us), self.peer);
                self.next_send_ms = now_ms + HELLO_INTERVAL_MS;
                return true;
            }
            if now_ms - self.next_send_ms > 100 {
                self.next_send_ms = now_ms;
            }
            while now_ms >= self.next_send_ms {
                let seq = self.next_seq;
                if sock.send_slice(&Self::datagram(MAGIC_PROBE, seq, now_us), self.peer).is_err() {
                    break;
                }
                self.next_seq += 1;
                self.sent += 1;
                self.window.push_back((seq, now_ms, false));
                self.next_send_ms += self.interval_ms;
                did = true;
            }
        }
        did
    }

    /// The once-per-second line.
    pub fn report(&self) {
        println!(
            "probe: sent={} received={} lost={} maxgap_ms={}",
            self.sent, self.received, self.lost, self.maxgap_ms
        );
    }
}
