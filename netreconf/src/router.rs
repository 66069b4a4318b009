//! The ViNe router logic, free of I/O: frames and datagrams in, [`Action`]s out.
//!
//! The event loop ([`crate::daemon`]) feeds captured frames, overlay datagrams and timer
//! expiries; everything the router decides to do comes back as frames to inject on the
//! LAN or datagrams to send to a peer. This keeps the whole migration protocol testable
//! in memory (see the tests at the bottom, which wire two routers together).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::frames::{self, Arp, Frame, Mac, OP_REQUEST};
use crate::proto::{self, Auth, Body, Message, ProtoError, ReplayWindow, SyncRoute};
use crate::tables::{Gndt, HostUpdate, Hwdt, Lndt};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("bad shared key: {0}")]
    Key(#[from] ProtoError),
}

/// A point in time, monotonic and wall-clock (µs since the epoch, CLOCK_REALTIME: the
/// clock of libpcap's capture timestamps, see [`Router::handle_captured`]).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub wall_us: u64,
}

impl Now {
    /// The current time.
    pub fn current() -> Now {
        Now { mono: Instant::now(), wall_us: wall_us() }
    }

    /// `self` advanced by `d` (for tests and scheduling).
    pub fn after(&self, d: Duration) -> Now {
        Now { mono: self.mono + d, wall_us: self.wall_us + d.as_micros() as u64 }
    }
}

/// Microseconds since the Unix epoch.
pub fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What the router wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Inject this frame on the LAN.
    Inject(Vec<u8>),
    /// Send this datagram to a peer router.
    Send(SocketAddr, Vec<u8>),
}

/// Counters shown by the status dump.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    pub frames_captured: u64,
    pub frames_malformed: u64,
    pub frames_ignored: u64,
    pub arp_seen: u64,
    pub rarp_seen: u64,
    pub arp_replies_sent: u64,
    pub proxy_arp_replies: u64,
    pub lndt_denied: u64,
    pub no_route: u64,
    pub ttl_expired: u64,
    pub tunnelled_out: u64,
    pub tunnelled_in: u64,
    pub delivered_local: u64,
    pub hairpinned: u64,
    pub forwarded_onward: u64,
    pub loop_dropped: u64,
    pub arp_resolutions: u64,
    pub arp_unresolved_dropped: u64,
    pub arp_queue_dropped: u64,
    pub detections_rate_limited: u64,
    pub detections_duplicate: u64,
    pub detections_already_local: u64,
    pub rarp_unknown_mac: u64,
    pub migrations_detected: u64,
    pub migrations_completed: u64,
    pub migrations_lost: u64,
    pub route_updates_installed: u64,
    pub route_updates_duplicate: u64,
    pub route_updates_stale: u64,
    pub route_updates_rejected: u64,
    pub route_unacked_peers: u64,
    pub announcements_sent: u64,
    pub overlay_rx: u64,
    pub overlay_tx: u64,
    pub overlay_auth_failed: u64,
    pub overlay_malformed: u64,
    pub overlay_replayed: u64,
    pub overlay_stale: u64,
    pub overlay_unknown_peer: u64,
    pub overlay_unsolicited: u64,
    /// Sent before a peer's current boot (its epoch is older than the one we know).
    pub overlay_old_epoch: u64,
    /// Not bound to our current boot (names another epoch of ours), or a new boot of the
    /// peer speaking before its hello.
    pub overlay_wrong_epoch: u64,
    /// Not sent: the peer's epoch is not known yet (no session).
    pub overlay_held: u64,
    pub hellos_sent: u64,
    /// Hellos from a new epoch of a peer that did not name ours (a new boot that does not
    /// know us yet, or a recording from before we restarted): answered, nothing opened.
    pub hellos_unbound: u64,
    pub sessions_opened: u64,
    pub peer_restarts: u64,
    pub sync_batches_sent: u64,
    pub sync_batches_retransmitted: u64,
    pub routes_synced: u64,
    pub probes_sent: u64,
    pub probe_sweeps: u64,
    /// Local hosts learned from IPv4 frames (not ARP).
    pub hwdt_learned_from_ip: u64,
    /// Moves detected from a frame of the VM itself (its ARP or IPv4), not RARP/GARP.
    pub detections_from_traffic: u64,
    /// Frames of a host captured before its /32 moved to another router (read late).
    pub detections_stale_frame: u64,
    /// ARP/IPv4 from another site's address whose MAC the HWDT knows for another address
    /// too (a proxy-ARP device, not a moved VM): not taken as a move.
    pub detections_refused_shared_mac: u64,
    /// Host lists of a VM's former site received after the move's acknowledgement (the
    /// former owner had just restarted).
    pub late_host_reports: u64,
    /// Log lines not written (rate limit); the counters above still count every event.
    pub log_lines_suppressed: u64,
    pub hwdt_expired: u64,
}

/// One migration as seen by this router.
///
/// Every `*_us` field is a wall-clock timestamp in µs since the Unix epoch, all on the same
/// clock (CLOCK_REALTIME): the kernel's capture timestamp of a frame (the pcap packet
/// header's `ts`, a host/software timestamp) and vnetd's own `SystemTime::now()`.
/// Differences between them are durations on one clock, so `resolved_us - detected_us`
/// includes the time the first detection frame waited in the capture path.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationRecord {
    /// "destination" (the VM arrived here) or "source" (it left).
    pub role: &'static str,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub seq: u64,
    /// Destination: the router that served the IP before. Source: the new owner.
    pub other_router: String,
    /// "rarp", "garp", "arp" or "traffic" (destination: what revealed the VM; "arp" and
    /// "traffic" are its own ARP or IPv4 frames), "host-route" or "sync" (source: a peer's
    /// host route, or its route sync after a restart).
    pub trigger: &'static str,
    /// Destination: the capture timestamp of the first detection frame of the move (the
    /// RARP or gratuitous ARP that started it), from its pcap header. Source: when the
    /// host route was received.
    pub detected_us: u64,
    /// Destination: when vnetd read that frame from the capture (`detection_read_us -
    /// detected_us` is the time it waited in the kernel and libpcap's ring).
    pub detection_read_us: Option<u64>,
    /// IP of the MAC known (destination), µs.
    pub resolved_us: Option<u64>,
    /// Every peer acknowledged the /32 (destination), µs.
    pub all_acked_us: Option<u64>,
    /// First LAN announcement injected, µs.
    pub first_announce_us: Option<u64>,
    /// Peers that acknowledged.
    pub acked_by: Vec<String>,
    /// LAN hosts the source router reported (destination) or announced (source).
    pub hosts: Vec<Ipv4Addr>,
}

#[derive(Debug)]
struct PeerState {
    name: String,
    addr: SocketAddr,
    /// Anti-replay window of the peer's current epoch.
    replay: ReplayWindow,
    last_rx: Option<Instant>,
    /// The peer's current epoch (0: no session yet).
    epoch: u64,
    /// The peer has shown it knows our current epoch.
    knows_us: bool,
    /// Route-sync batches sent in this session and not acknowledged: id → (routes, tries).
    sync_pending: BTreeMap<u32, (Vec<SyncRoute>, u32)>,
    /// Last hello sent in answer to a message bound to another epoch.
    last_prompt: Option<Instant>,
    /// Sequence number of the last message sent to this peer (each peer has a window).
    tx_seq: u64,
}

#[derive(Debug)]
struct Query {
    id: u32,
    trigger: &'static str,
    /// When the detection frame was captured / read by vnetd (see [`MigrationRecord`]).
    seen: Seen,
}

/// When a detection frame was captured (its pcap timestamp) and read by vnetd, µs.
#[derive(Debug, Clone, Copy)]
struct Seen {
    captured_us: u64,
    read_us: u64,
}

#[derive(Debug)]
struct Migration {
    mac: Mac,
    seq: u64,
    unacked: BTreeSet<String>,
    attempts: u32,
    record: usize, // index into history (by id)
}

#[derive(Debug)]
struct Pending {
    queue: VecDeque<Vec<u8>>,
    tries: u32,
}

#[derive(Debug, Clone)]
enum Timer {
    Inject(Vec<u8>),
    QueryTimeout(Mac, u32),
    Retransmit(Ipv4Addr, u64),
    ArpRetry(Ipv4Addr),
    Housekeeping,
    /// Hello to every peer that does not know our epoch yet.
    Hello,
    /// Route-sync batch not acknowledged: (peer, peer epoch, batch).
    SyncRetransmit(usize, u64, u32),
    /// Next probe frames.
    Probe,
    /// Decide on the addresses a MAC claimed by ordinary traffic.
    ClaimCheck(Mac),
    /// Report the hosts of hand-overs made while the HWDT was cold.
    LateReports,
}

/// After the sweep at start, how long answers may still come in before late host lists go out.
const LATE_REPORT_DELAY: Duration = Duration::from_millis(300);

/// How long the addresses a MAC claims by ordinary ARP/IPv4 frames are collected before
/// the claim is taken as a move: a proxy-ARP device answering the sweep at start (1000
/// addresses/s) claims many within it, a moved VM one.
const CLAIM_SETTLE: Duration = Duration::from_millis(200);
/// Most MACs with a claim being collected.
const MAX_CLAIMS: usize = 1024;

/// Addresses of other sites a MAC was seen using on this LAN (ARP or IPv4 frames).
#[derive(Debug)]
struct Claim {
    ips: BTreeSet<Ipv4Addr>,
    seen: Seen,
    trigger: &'static str,
}

/// Hello period while a peer does not know our epoch.
const HELLO_INTERVAL: Duration = Duration::from_millis(500);
/// Route-sync retransmission period, and tries.
const SYNC_RETRANSMIT: Duration = Duration::from_millis(300);
const SYNC_TRIES: u32 = 20;
/// Hellos prompted by messages bound to another epoch, at most one per this per peer.
const PROMPT_INTERVAL: Duration = Duration::from_millis(100);
/// Probe timer granularity.
const PROBE_TICK: Duration = Duration::from_millis(10);

/// At most `LOG_LINES` log lines per `LOG_WINDOW` for events an unauthenticated sender can
/// cause at will (overlay datagrams that are dropped); the counters count every one.
const LOG_LINES: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct LogLimiter {
    /// What the lines are about (in the summary line).
    what: &'static str,
    window: Instant,
    lines: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// Whether to write one more line now; reports what the last window suppressed.
    fn allow(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window) >= LOG_WINDOW {
            self.flush();
            self.window = now;
            self.lines = 0;
        }
        if self.lines < LOG_LINES {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    fn flush(&mut self) {
        if self.suppressed > 0 {
            warn!(
                suppressed = self.suppressed,
                window_s = LOG_WINDOW.as_secs(),
                about = self.what,
                "log lines suppressed by the rate limit (the status counters count every event)"
            );
            self.suppressed = 0;
        }
    }
}

/// Active probing: the addresses still to ask, and at which pace.
#[derive(Debug, Default)]
struct ProbeState {
    queue: VecDeque<Ipv4Addr>,
    rate_per_s: u32,
    startup: bool,
    /// When the current sweep started.
    started: Option<Instant>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most outstanding who-has queries.
const MAX_QUERIES: usize = 256;
/// Most destinations waiting for ARP resolution.
const MAX_PENDING_ARP: usize = 256;
/// Migration records kept for the status dump.
const HISTORY: usize = 64;

/// The router.
pub struct Router {
    cfg: Config,
    auth: Auth,
    /// HardWare Description Table.
    pub hwdt: Hwdt,
    /// Local Network Description Table.
    pub lndt: Lndt,
    /// Global Network Description Table.
    pub gndt: Gndt,
    /// Counters.
    pub counters: Counters,
    peers: Vec<PeerState>,
    next_query: u32,
    queries: HashMap<Mac, Query>,
    migrations: BTreeMap<Ipv4Addr, Migration>,
    /// Remote hosts this router told a migrated VM about (VM IP → hosts).
    announced_to: HashMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
    /// Hand-overs this router did as the source: IP → (seq, hosts), to re-ack.
    handovers: HashMap<Ipv4Addr, (u64, Vec<Ipv4Addr>)>,
    pending_arp: HashMap<Ipv4Addr, Pending>,
    timers: BTreeMap<(Instant, u64), Timer>,
    timer_id: u64,
    bucket: Bucket,
    history: VecDeque<(usize, MigrationRecord)>,
    history_id: usize,
    actions: Vec<Action>,
    started: Instant,
    /// This boot's epoch (µs since the Unix epoch at start; above every earlier boot's).
    epoch: u64,
    next_batch: u32,
    /// MACs of /32 hosts (for route syncs).
    route_macs: HashMap<Ipv4Addr, Mac>,
    /// When a /32 was handed to another router (wall µs): frames of the host captured
    /// before are not a move back.
    moved_away_us: HashMap<Ipv4Addr, u64>,
    probe: ProbeState,
    /// Lines about dropped overlay datagrams.
    log: LogLimiter,
    /// Lines about LAN frames of unknown MACs (RARPs nobody can name).
    lan_log: LogLimiter,
    claims: HashMap<Mac, Claim>,
    /// Hand-overs made while the HWDT was cold (at start): (IP, seq, new owner).
    late_reports: Vec<(Ipv4Addr, u64, String)>,
}

impl Router {
    /// Build a router from its configuration; its epoch is the time now.
    pub fn new(cfg: Config, now: Now) -> Result<Router, RouterError> {
        Router::with_epoch(cfg, now, now.wall_us)
    }

    /// Build a router whose boot has `epoch` (above every earlier boot's: see
    /// [`crate::config::Config::state_file`]).
    pub fn with_epoch(cfg: Config, now: Now, epoch: u64) -> Result<Router, RouterError> {
        let auth = Auth::new(&cfg.key)?;
        let mut gndt = Gndt::default();
        for (p, r) in &cfg.gndt {
            gndt.insert(*p, r, 0);
        }
        let lndt = Lndt::new(&cfg.lndt);
        let peers = cfg
            .peers
            .iter()
            .map(|p| PeerState {
                name: p.name.clone(),
                addr: p.address,
                replay: ReplayWindow::default(),
                last_rx: None,
                epoch: 0,
                knows_us: false,
                sync_pending: BTreeMap::new(),
                last_prompt: None,
                tx_seq: 0,
            })
            .collect();
        let bucket = Bucket {
            tokens: f64::from(cfg.timers.rarp_burst),
            last: now.mono,
            rate: f64::from(cfg.timers.rarp_rate_per_s),
            burst: f64::from(cfg.timers.rarp_burst),
        };
        let mut r = Router {
            auth,
            hwdt: Hwdt::default(),
            lndt,
            gndt,
            counters: Counters::default(),
            peers,
            next_query: 1,
            queries: HashMap::new(),
            migrations: BTreeMap::new(),
            announced_to: HashMap::new(),
            handovers: HashMap::new(),
            pending_arp: HashMap::new(),
            timers: BTreeMap::new(),
            timer_id: 0,
            bucket,
            history: VecDeque::new(),
            history_id: 0,
            actions: Vec::new(),
            started: now.mono,
            epoch: epoch.max(1),
            next_batch: 1,
            route_macs: HashMap::new(),
            moved_away_us: HashMap::new(),
            probe: ProbeState::default(),
            log: LogLimiter { what: "dropped overlay datagrams", window: now.mono, lines: 0, suppressed: 0 },
            lan_log: LogLimiter { what: "unknown MACs on the LAN", window: now.mono, lines: 0, suppressed: 0 },
            claims: HashMap::new(),
            late_reports: Vec::new(),
            cfg,
        };
        r.schedule(now.mono + Duration::from_secs(30), Timer::Housekeeping);
        r.schedule(now.mono, Timer::Hello);
        if r.cfg.probe.enabled {
            r.fill_probe_queue(true);
            r.schedule(now.mono, Timer::Probe);
        }
        Ok(r)
    }

    /// This boot's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Take the actions decided so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// When `handle_timers` must next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(t, _)| *t)
    }

    fn schedule(&mut self, at: Instant, t: Timer) {
        self.timer_id += 1;
        self.timers.insert((at, self.timer_id), t);
    }

    fn me(&self) -> &str {
        &self.cfg.site
    }

    fn mac(&self) -> Mac {
        self.cfg.router_mac
    }

    /// Router serving `ip`, if any.
    fn route_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.gndt.lookup(ip).map(|r| r.router.as_str())
    }

    fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.route_of(ip) == Some(self.me())
    }

    fn inject(&mut self, frame: Vec<u8>) {
        self.actions.push(Action::Inject(frame));
    }

    /// Inject now and `announce_count - 1` more times, spaced by `announce_interval`.
    fn announce(&mut self, now: &Now, frame: Vec<u8>) {
        let n = self.cfg.timers.announce_count;
        let iv = self.cfg.timers.announce_interval;
        for k in 1..n {
            self.schedule(now.mono + iv * k, Timer::Inject(frame.clone()));
        }
        self.counters.announcements_sent += 1;
        self.inject(frame);
    }

    fn record(&mut self, rec: MigrationRecord) -> usize {
        self.history_id += 1;
        self.history.push_back((self.history_id, rec));
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.history_id
    }

    fn record_mut(&mut self, id: usize) -> Option<&mut MigrationRecord> {
        self.history.iter_mut().find(|(i, _)| *i == id).map(|(_, r)| r)
    }

    /// Send `body` to `peer` in the current session. Nothing but a hello goes to a peer
    /// whose epoch we do not know: it could not accept it (the hello timer, the
    /// retransmissions and the route sync at session start make up for it).
    fn send(&mut self, now: &Now, peer: usize, body: Body<'_>) {
        let peer_epoch = self.peers[peer].epoch;
        if peer_epoch == 0 && !matches!(body, Body::Hello { .. }) {
            self.counters.overlay_held += 1;
            return;
        }
        self.send_naming(now, peer, peer_epoch, body);
    }

    /// Send `body` to `peer`, naming `peer_epoch` as its epoch.
    fn send_naming(&mut self, now: &Now, peer: usize, peer_epoch: u64, body: Body<'_>) {
        self.peers[peer].tx_seq += 1;
        let msg = Message {
            sender: self.cfg.site.clone(),
            epoch: self.epoch,
            peer_epoch,
            seq: self.peers[peer].tx_seq,
            timestamp_us: now.wall_us,
            body,
        };
        match proto::encode(&self.auth, &msg) {
            Ok(bytes) => {
                self.counters.overlay_tx += 1;
                self.actions.push(Action::Send(self.peers[peer].addr, bytes));
            }
            Err(e) => warn!(error = %e, kind = msg.body.kind(), "cannot encode message"),
        }
    }

    fn peer_index(&self, name: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.name == name)
    }

    /// Local hosts known in the HWDT (LNDT members served by this router), except `but`.
    fn local_hosts(&self, but: Ipv4Addr) -> Vec<(Ipv4Addr, Mac)> {
        self.hwdt
            .iter()
            .filter(|(ip, _)| {
                **ip != but && **ip != self.cfg.router_ip && self.lndt.contains(**ip) && self.is_local(**ip)
            })
            .map(|(ip, e)| (*ip, e.mac))
            .collect()
    }

    // ------------------------------------------------------------ LAN side

    /// A frame captured on the LAN, timed by when vnetd reads it (`now`).
    pub fn handle_frame(&mut self, now: &Now, data: &[u8]) {
        self.handle_captured(now, now.wall_us, data);
    }

    /// A frame captured on the LAN at `captured_us` (its pcap header timestamp, µs since
    /// the epoch on CLOCK_REALTIME, the clock of [`Now::wall_us`]) and read by vnetd at
    /// `now`. A migration it reveals is timed from `captured_us`, so the time the frame
    /// waited in the capture path counts in the detection time. A timestamp that is
    /// missing (0) or later than `now` (the wall clock was stepped back) is replaced by
    /// `now`, which keeps a record's timestamps ordered.
    pub fn handle_captured(&mut self, now: &Now, captured_us: u64, data: &[u8]) {
        let captured_us = if captured_us == 0 || captured_us > now.wall_us { now.wall_us } else { captured_us };
        let seen = Seen { captured_us, read_us: now.wall_us };
        self.counters.frames_captured += 1;
        match frames::parse(data) {
            Err(e) => {
                self.counters.frames_malformed += 1;
                debug!(error = %e, len = data.len(), "malformed frame dropped");
            }
            Ok(Frame::Arp(a)) => self.on_arp(now, seen, a),
            Ok(Frame::Rarp(a)) => self.on_rarp(now, seen, a),
            Ok(Frame::Ipv4 { eth_src, eth_dst, src, dst, packet }) => {
                if eth_src == self.mac() {
                    self.counters.frames_ignored += 1;
                    return;
                }
                self.observe_ipv4_sender(now, seen, src, eth_src);
                if eth_dst != self.mac() {
                    self.counters.frames_ignored += 1;
                    return;
                }
                let packet = packet.to_vec();
                self.on_ipv4(now, src, dst, packet);
            }
            Ok(Frame::Other { .. }) => self.counters.frames_ignored += 1,
        }
    }

    fn on_arp(&mut self, now: &Now, seen: Seen, a: Arp) {
        self.counters.arp_seen += 1;
        if a.eth_src == self.mac() || a.sha == self.mac() {
            self.counters.frames_ignored += 1;
            return;
        }
        if !a.sha.is_unicast() {
            self.counters.frames_malformed += 1;
            return;
        }
        if !a.spa.is_unspecified() && a.spa != self.cfg.router_ip && !a.spa.is_broadcast() {
            if self.hwdt.learn(a.spa, a.sha, now.mono) {
                debug!(ip = %a.spa, mac = %a.sha, "HWDT learned");
            }
            self.flush_pending(a.spa, a.sha);
        }
        if !a.spa.is_unspecified() && !self.is_local(a.spa) && self.route_of(a.spa).is_some() {
            // A host on this LAN using an address another site serves: it migrated here
            // (its gratuitous ARP, or any ARP of it, such as its answer to a probe).
            if a.is_gratuitous() {
                self.detect(now, seen, a.sha, Some(a.spa), "garp");
                return;
            }
            self.claim(now, seen, a.sha, a.spa, "arp");
        }
        if a.op != OP_REQUEST || a.is_gratuitous() || a.spa.is_unspecified() {
            return;
        }
        if a.tpa == self.cfg.router_ip {
            self.counters.arp_replies_sent += 1;
            let f = frames::arp_reply(self.mac(), a.tpa, a.sha, a.spa);
            self.inject(f);
            return;
        }
        match self.route_of(a.tpa) {
            Some(r) if r != self.me() => {
                if self.lndt.contains(a.spa) {
                    self.counters.proxy_arp_replies += 1;
                    let f = frames::arp_reply(self.mac(), a.tpa, a.sha, a.spa);
                    self.inject(f);
                } else {
                    self.counters.lndt_denied += 1;
                }
            }
            _ => {}
        }
    }

    fn on_rarp(&mut self, now: &Now, seen: Seen, a: Arp) {
        self.counters.rarp_seen += 1;
        if !a.sha.is_unicast() || a.sha == self.mac() {
            self.counters.frames_malformed += 1;
            return;
        }
        self.detect(now, seen, a.sha, None, "rarp");
    }

    /// An IPv4 frame from `src` at `mac` was captured on the LAN: a local host is learned
    /// (no ARP of it needs to reach the gateway), a host using another site's address has
    /// migrated here.
    fn observe_ipv4_sender(&mut self, now: &Now, seen: Seen, src: Ipv4Addr, mac: Mac) {
        if !mac.is_unicast()
            || src.is_unspecified()
            || src.is_broadcast()
            || src.is_multicast()
            || src == self.cfg.router_ip
        {
            return;
        }
        if self.is_local(src) {
            if self.lndt.contains(src) && self.hwdt.learn(src, mac, now.mono) {
                self.counters.hwdt_learned_from_ip += 1;
                debug!(ip = %src, %mac, "HWDT learned from an IPv4 frame");
            }
        } else if self.route_of(src).is_some() {
            self.claim(now, seen, mac, src, "traffic");
        }
    }

    /// `mac` used `ip`, an address another site serves, in an ordinary ARP or IPv4 frame:
    /// a VM that moved here, or a device that answers for several addresses (proxy ARP).
    /// The addresses the MAC uses are collected for [`CLAIM_SETTLE`]; a MAC with exactly
    /// one, and known for no other in the HWDT, is taken as a moved VM.
    fn claim(&mut self, now: &Now, seen: Seen, mac: Mac, ip: Ipv4Addr, trigger: &'static str) {
        if self.is_local(ip) {
            self.counters.detections_already_local += 1;
            return;
        }
        if let Some(c) = self.claims.get_mut(&mac) {
            c.ips.insert(ip);
            return;
        }
        if self.mac_claims_another_ip(mac, ip) {
            self.counters.detections_refused_shared_mac += 1;
            return;
        }
        if self.claims.len() >= MAX_CLAIMS {
            self.counters.detections_rate_limited += 1;
            return;
        }
        self.claims.insert(mac, Claim { ips: BTreeSet::from([ip]), seen, trigger });
        self.schedule(now.mono + CLAIM_SETTLE, Timer::ClaimCheck(mac));
    }

    fn claim_check(&mut self, now: &Now, mac: Mac) {
        let Some(c) = self.claims.remove(&mac) else {
            return;
        };
        let ip = *c.ips.iter().next().expect("a claim has an address");
        if c.ips.len() == 1 && !self.mac_claims_another_ip(mac, ip) {
            self.counters.detections_from_traffic += 1;
            self.detect(now, c.seen, mac, Some(ip), c.trigger);
        } else {
            self.counters.detections_refused_shared_mac += c.ips.len() as u64;
            if self.log_lan(now) {
                warn!(%mac, addresses = c.ips.len(), "a MAC uses several addresses of other sites (proxy ARP?): not a moved VM");
            }
        }
    }

    /// Does the HWDT know `mac` for an address other than `ip`? Then the frame of `mac` with
    /// `ip` comes from a device that answers for several addresses (proxy ARP, a router),
    /// not from a moved VM, and only a RARP or a gratuitous ARP makes it a move.
    fn mac_claims_another_ip(&self, mac: Mac, ip: Ipv4Addr) -> bool {
        self.hwdt.iter().any(|(i, e)| e.mac == mac && *i != ip)
    }

    /// A frame (captured and read at `seen`) revealed that `mac` (maybe with `ip`) is on
    /// this LAN.
    fn detect(&mut self, now: &Now, seen: Seen, mac: Mac, ip: Option<Ipv4Addr>, trigger: &'static str) {
        // Frames of hosts already served here (the common case for traffic) cost no token.
        if let Some(ip) = ip {
            if self.is_local(ip) {
                self.counters.detections_already_local += 1;
                return;
            }
            // Captured before its /32 went to another router (read late): not a move back.
            if self.moved_away_us.get(&ip).is_some_and(|t| seen.captured_us <= *t) {
                self.counters.detections_stale_frame += 1;
                return;
            }
        }
        if !self.bucket.take(now.mono) {
            self.counters.detections_rate_limited += 1;
            return;
        }
        let ip = ip.or_else(|| self.hwdt.ip_of(mac));
        match ip {
            Some(ip) => {
                if self.is_local(ip) {
                    self.counters.detections_already_local += 1;
                    return;
                }
                if self.route_of(ip).is_none() {
                    self.counters.no_route += 1;
                    return;
                }
                self.start_migration(now, ip, mac, trigger, seen);
            }
            None => {
                if self.queries.contains_key(&mac) {
                    self.counters.detections_duplicate += 1;
                    return;
                }
                if self.queries.len() >= MAX_QUERIES {
                    self.counters.detections_rate_limited += 1;
                    return;
                }
                let id = self.next_query;
                self.next_query = self.next_query.wrapping_add(1);
                self.queries.insert(mac, Query { id, trigger, seen });
                if self.log_lan(now) {
                    info!(%mac, trigger, "migration suspected: asking peers which IP this MAC uses");
                }
                for i in 0..self.peers.len() {
                    self.send(now, i, Body::WhoHas { query: id, mac });
                }
                let t = now.mono + self.cfg.timers.query_timeout;
                self.schedule(t, Timer::QueryTimeout(mac, id));
            }
        }
    }

    fn start_migration(&mut self, now: &Now, ip: Ipv4Addr, mac: Mac, trigger: &'static str, seen: Seen) {
        let previous = self.route_of(ip).unwrap_or("?").to_string();
        // Above every sequence number this router knows, and above those of every earlier
        // move it may have forgotten (a restart): a µs timestamp.
        let seq = self.gndt.host_seq(ip).saturating_add(1).max(now.wall_us);
        let me = self.cfg.site.clone();
        self.gndt.offer_host(ip, &me, seq);
        self.route_macs.insert(ip, mac);
        self.moved_away_us.remove(&ip);
        self.lndt.add(ip);
        self.hwdt.learn(ip, mac, now.mono);
        self.handovers.remove(&ip);
        self.counters.migrations_detected += 1;
        info!(
            %ip, %mac, seq, from = %previous, trigger,
            detect_to_resolve_ms = ms(now.wall_us, seen.captured_us),
            capture_to_read_ms = ms(seen.read_us, seen.captured_us),
            "migration detected: installed /32 and propagating to every router"
        );
        let rec = self.record(MigrationRecord {
            role: "destination",
            ip,
            mac: Some(mac),
            seq,
            other_router: previous,
            trigger,
            detected_us: seen.captured_us,
            detection_read_us: Some(seen.read_us),
            resolved_us: Some(now.wall_us),
            all_acked_us: None,
            first_announce_us: None,
            acked_by: Vec::new(),
            hosts: Vec::new(),
        });
        let empty = self.propagate(now, ip, seq, mac, rec);
        // Routing optimisation (§5.5.4): the VM and the hosts of its new LAN talk directly.
        let locals = self.local_hosts(ip);
        let own = self.mac();
        for (h, hmac) in &locals {
            let to_vm = frames::directed_update(own, mac, ip, *h, *hmac);
            self.announce(now, to_vm);
            let to_host = frames::directed_update(own, *hmac, *h, ip, mac);
            self.announce(now, to_host);
        }
        if !locals.is_empty() {
            if let Some(r) = self.record_mut(rec) {
                r.first_announce_us = Some(now.wall_us);
            }
        }
        if empty {
            self.complete(now, ip);
        }
    }

    /// Send `ip`'s /32 (ours, `seq`) to every peer, retransmitted until each acknowledges.
    /// Returns true if there is no peer.
    fn propagate(&mut self, now: &Now, ip: Ipv4Addr, seq: u64, mac: Mac, rec: usize) -> bool {
        let me = self.cfg.site.clone();
        let unacked: BTreeSet<String> = self.peers.iter().map(|p| p.name.clone()).collect();
        for i in 0..self.peers.len() {
            self.send(now, i, Body::HostRoute { ip, seq, mac, owner: me.clone() });
        }
        self.schedule(now.mono + self.cfg.timers.retransmit, Timer::Retransmit(ip, seq));
        let empty = unacked.is_empty();
        self.migrations.insert(ip, Migration { mac, seq, unacked, attempts: 0, record: rec });
        empty
    }

    fn complete(&mut self, now: &Now, ip: Ipv4Addr) {
        if let Some(m) = self.migrations.remove(&ip) {
            self.counters.migrations_completed += 1;
            let rec = m.record;
            if let Some(r) = self.record_mut(rec) {
                r.all_acked_us = Some(now.wall_us);
                let (d, res) = (r.detected_us, r.resolved_us.unwrap_or(r.detected_us));
                info!(
                    %ip, seq = m.seq,
                    detect_to_resolved_ms = ms(res, d),
                    detect_to_all_routers_ms = ms(now.wall_us, d),
                    "reconfigured: every router holds the /32"
                );
            }
        }
    }

    fn on_ipv4(&mut self, now: &Now, src: Ipv4Addr, dst: Ipv4Addr, packet: Vec<u8>) {
        if dst == self.cfg.router_ip {
            self.counters.frames_ignored += 1;
            return;
        }
        if !self.lndt.contains(src) {
            self.counters.lndt_denied += 1;
            return;
        }
        match self.route_of(dst).map(|s| s.to_string()) {
            None => self.counters.no_route += 1,
            Some(r) if r == self.cfg.site => {
                self.counters.hairpinned += 1;
                self.deliver_local(now, dst, packet);
            }
            Some(r) => self.tunnel(now, &r, packet, false),
        }
    }

    fn tunnel(&mut self, now: &Now, router: &str, mut packet: Vec<u8>, onward: bool) {
        let Some(i) = self.peer_index(router) else {
            self.counters.no_route += 1;
            return;
        };
        if !frames::decrement_ttl(&mut packet) {
            self.counters.ttl_expired += 1;
            return;
        }
        if onward {
            self.counters.forwarded_onward += 1;
        } else {
            self.counters.tunnelled_out += 1;
        }
        self.send(now, i, Body::Data(&packet));
    }

    fn deliver_local(&mut self, now: &Now, dst: Ipv4Addr, packet: Vec<u8>) {
        if let Some(mac) = self.hwdt.mac_of(dst) {
            self.counters.delivered_local += 1;
            let f = frames::ipv4_frame(self.mac(), mac, &packet);
            self.inject(f);
            return;
        }
        let qlen = self.cfg.timers.arp_queue_len;
        if let Some(p) = self.pending_arp.get_mut(&dst) {
            if p.queue.len() >= qlen {
                self.counters.arp_queue_dropped += 1;
            } else {
                p.queue.push_back(packet);
            }
            return;
        }
        if self.pending_arp.len() >= MAX_PENDING_ARP || qlen == 0 {
            self.counters.arp_queue_dropped += 1;
            return;
        }
        let mut queue = VecDeque::new();
        queue.push_back(packet);
        self.pending_arp.insert(dst, Pending { queue, tries: 1 });
        self.counters.arp_resolutions += 1;
        let f = frames::arp_request(self.mac(), self.cfg.router_ip, dst);
        self.inject(f);
        self.schedule(now.mono + Duration::from_millis(500), Timer::ArpRetry(dst));
    }

    fn flush_pending(&mut self, ip: Ipv4Addr, mac: Mac) {
        if let Some(p) = self.pending_arp.remove(&ip) {
            for pkt in p.queue {
                self.counters.delivered_local += 1;
                let f = frames::ipv4_frame(self.mac(), mac, &pkt);
                self.inject(f);
            }
        }
    }

    // ------------------------------------------------------------ overlay side

    /// Whether to log one more dropped overlay datagram (rate-limited: a stranger can
    /// send them at line rate).
    fn log_drop(&mut self, now: &Now) -> bool {
        let ok = self.log.allow(now.mono);
        self.counters.log_lines_suppressed += u64::from(!ok);
        ok
    }

    /// Whether to log one more line about an unknown MAC on the LAN (rate-limited: any LAN
    /// host can send RARPs for made-up MACs).
    fn log_lan(&mut self, now: &Now) -> bool {
        let ok = self.lan_log.allow(now.mono);
        self.counters.log_lines_suppressed += u64::from(!ok);
        ok
    }

    /// Whether a hello prompted by peer `pi`'s message may go now (at most one every
    /// [`PROMPT_INTERVAL`] per peer: recordings can be replayed at line rate).
    fn may_prompt(&mut self, now: &Now, pi: usize) -> bool {
        let p = &mut self.peers[pi];
        if p.last_prompt.is_some_and(|t| now.mono.saturating_duration_since(t) < PROMPT_INTERVAL) {
            return false;
        }
        p.last_prompt = Some(now.mono);
        true
    }

    /// A datagram received on the overlay socket.
    ///
    /// Authenticated (HMAC), from a configured peer, timestamped within the allowed clock
    /// skew, then bound to both ends' boots: a message whose sender epoch is older than
    /// the one we know was sent before the peer restarted; one with a newer epoch is a
    /// new boot of the peer, and only its hello is taken (it opens a new session with a
    /// fresh anti-replay window); every other message must name our current epoch, so
    /// nothing recorded before we restarted is taken after. Within a session, the
    /// anti-replay window takes each sequence number once.
    pub fn handle_datagram(&mut self, now: &Now, from: SocketAddr, data: &[u8]) {
        self.counters.overlay_rx += 1;
        let msg = match proto::decode(&self.auth, data) {
            Ok(m) => m,
            Err(ProtoError::BadHmac) => {
                self.counters.overlay_auth_failed += 1;
                if self.log_drop(now) {
                    warn!(%from, "overlay message with a bad HMAC dropped");
                }
                return;
            }
            Err(e) => {
                self.counters.overlay_malformed += 1;
                if self.log_drop(now) {
                    warn!(%from, error = %e, "malformed overlay message dropped");
                }
                return;
            }
        };
        let Some(pi) = self.peer_index(&msg.sender) else {
            self.counters.overlay_unknown_peer += 1;
            if self.log_drop(now) {
                warn!(%from, sender = %msg.sender, "message from an unknown router dropped");
            }
            return;
        };
        let skew = self.cfg.timers.max_clock_skew.as_micros() as u64;
        if msg.timestamp_us.abs_diff(now.wall_us) > skew {
            self.counters.overlay_stale += 1;
            if self.log_drop(now) {
                warn!(%from, sender = %msg.sender, age_ms = ms(now.wall_us, msg.timestamp_us),
                      "stale overlay message dropped");
            }
            return;
        }
        let (is_hello, adopted, ask) = match msg.body {
            Body::Hello { adopted, ask } => (true, adopted, ask),
            _ => (false, false, false),
        };
        let known = self.peers[pi].epoch;
        if msg.epoch < known {
            self.counters.overlay_old_epoch += 1;
            if self.log_drop(now) {
                warn!(%from, sender = %msg.sender, epoch = msg.epoch, current = known, kind = msg.body.kind(),
                      "overlay message from before the peer's restart dropped");
            }
            return;
        }
        if !is_hello && (msg.epoch > known || msg.peer_epoch != self.epoch) {
            self.counters.overlay_wrong_epoch += 1;
            if self.log_drop(now) {
                warn!(%from, sender = %msg.sender, epoch = msg.epoch, our_epoch = self.epoch,
                      named_epoch = msg.peer_epoch, kind = msg.body.kind(),
                      "overlay message not bound to the current sessions dropped");
            }
            self.prompt_hello(now, pi);
            return;
        }
        if is_hello && msg.epoch > known && msg.peer_epoch != self.epoch {
            // A new boot of the peer that does not know ours yet, or a hello recorded
            // before we restarted: open nothing, answer with our epoch. The peer adopts it
            // from the answer and says hello again, naming it; that hello opens the session.
            self.counters.hellos_unbound += 1;
            if !self.may_prompt(now, pi) {
                return;
            }
            self.counters.hellos_sent += 1;
            self.send_naming(now, pi, msg.epoch, Body::Hello { adopted: false, ask: true });
            return;
        }
        let new_session = msg.epoch > known;
        if new_session {
            let p = &mut self.peers[pi];
            p.epoch = msg.epoch;
            p.replay = ReplayWindow::default();
            p.knows_us = false;
            p.sync_pending.clear();
            self.counters.sessions_opened += 1;
            if known != 0 {
                self.counters.peer_restarts += 1;
            }
            info!(peer = %msg.sender, epoch = msg.epoch, restarted = known != 0, "session with peer opened");
        }
        if !self.peers[pi].replay.accept(msg.seq) {
            self.counters.overlay_replayed += 1;
            if self.log_drop(now) {
                warn!(%from, sender = %msg.sender, seq = msg.seq, "replayed overlay message dropped");
            }
            return;
        }
        self.peers[pi].last_rx = Some(now.mono);
        if msg.peer_epoch == self.epoch && (adopted || !is_hello) && !self.peers[pi].knows_us {
            // The peer has adopted our epoch: what it dropped before now gets through.
            self.peers[pi].knows_us = true;
            if !new_session {
                self.resend_session_state(now, pi);
            }
        }
        if new_session || is_hello && (ask || msg.peer_epoch != self.epoch) {
            // Tell the peer we adopted its epoch (and which is ours), before anything else
            // of the session, which it could not take otherwise; ask for an answer until
            // it shows it adopted ours.
            let ask = !self.peers[pi].knows_us;
            self.counters.hellos_sent += 1;
            self.send(now, pi, Body::Hello { adopted: true, ask });
        }
        if new_session {
            self.session_opened(now, pi);
        }
        let sender = msg.sender.clone();
        match msg.body {
            Body::Data(p) => self.on_tunnelled(now, &sender, p.to_vec()),
            Body::WhoHas { query, mac } => {
                if let Some(ip) = self.hwdt.ip_of(mac) {
                    debug!(%mac, %ip, to = %sender, "answering who-has from HWDT");
                    self.send(now, pi, Body::IHave { query, mac, ip });
                }
            }
            Body::IHave { query, mac, ip } => match self.queries.get(&mac) {
                Some(q) if q.id == query => {
                    let q = self.queries.remove(&mac).expect("present");
                    if self.is_local(ip) {
                        self.counters.detections_already_local += 1;
                    } else if self.route_of(ip).is_none() {
                        self.counters.no_route += 1;
                    } else {
                        info!(%mac, %ip, from = %sender, "peer HWDT resolved the MAC");
                        self.start_migration(now, ip, mac, q.trigger, q.seen);
                    }
                }
                _ => self.counters.overlay_unsolicited += 1,
            },
            Body::HostRoute { ip, seq, mac, owner } => self.on_host_route(now, pi, ip, seq, mac, owner),
            Body::HostRouteAck { ip, seq, was_owner, late, hosts } => {
                self.on_ack(now, &sender, ip, seq, was_owner, late, hosts)
            }
            Body::Hello { .. } => {}
            Body::RouteSync { batch, routes } => {
                for r in routes {
                    self.on_synced_route(now, pi, r);
                }
                self.send(now, pi, Body::SyncAck { batch });
            }
            Body::SyncAck { batch } => {
                if self.peers[pi].sync_pending.remove(&batch).is_none() {
                    self.counters.overlay_unsolicited += 1;
                }
            }
        }
    }

    /// A message bound to another epoch came from peer `pi`: it may not know we restarted
    /// (or we missed its hello). Say hello, at most every [`PROMPT_INTERVAL`].
    fn prompt_hello(&mut self, now: &Now, pi: usize) {
        if !self.may_prompt(now, pi) {
            return;
        }
        let adopted = self.peers[pi].epoch != 0;
        self.counters.hellos_sent += 1;
        self.send(now, pi, Body::Hello { adopted, ask: true });
    }

    /// Peer `pi` has just adopted our epoch: resend the session's unacknowledged route-sync
    /// batches and host routes now (it dropped them while it did not know our epoch).
    fn resend_session_state(&mut self, now: &Now, pi: usize) {
        let batches: Vec<(u32, Vec<SyncRoute>)> =
            self.peers[pi].sync_pending.iter().map(|(id, (r, _))| (*id, r.clone())).collect();
        for (batch, routes) in batches {
            self.counters.sync_batches_retransmitted += 1;
            self.send(now, pi, Body::RouteSync { batch, routes });
        }
        self.resend_unacked_host_routes(now, pi);
    }

    /// The host routes of our moves that peer `pi` has not acknowledged, again.
    fn resend_unacked_host_routes(&mut self, now: &Now, pi: usize) {
        let name = self.peers[pi].name.clone();
        let me = self.cfg.site.clone();
        let inflight: Vec<(Ipv4Addr, u64, Mac)> = self
            .migrations
            .iter()
            .filter(|(_, m)| m.unacked.contains(&name))
            .map(|(ip, m)| (*ip, m.seq, m.mac))
            .collect();
        for (ip, seq, mac) in inflight {
            self.send(now, pi, Body::HostRoute { ip, seq, mac, owner: me.clone() });
        }
    }

    /// A new session with peer `pi` (first contact, or the peer restarted): send it every
    /// /32 we hold, and the host routes of our moves it has not acknowledged.
    fn session_opened(&mut self, now: &Now, pi: usize) {
        let routes: Vec<SyncRoute> = self
            .gndt
            .routes()
            .filter(|r| r.prefix.len == 32)
            .map(|r| {
                let ip = r.prefix.addr;
                let mac = self.route_macs.get(&ip).copied().or_else(|| self.hwdt.mac_of(ip)).unwrap_or(Mac([0; 6]));
                SyncRoute { ip, seq: r.seq, mac, owner: r.router.clone() }
            })
            .collect();
        let mut batch: Vec<SyncRoute> = Vec::new();
        let mut size = 6;
        let mut batches = Vec::new();
        for r in routes {
            if size + r.encoded_len() > proto::MAX_SYNC_BODY {
                batches.push(std::mem::take(&mut batch));
                size = 6;
            }
            size += r.encoded_len();
            batch.push(r);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        let epoch = self.peers[pi].epoch;
        for routes in batches {
            let id = self.next_batch;
            self.next_batch = self.next_batch.wrapping_add(1);
            info!(peer = %self.peers[pi].name, batch = id, routes = routes.len(), "sending route sync");
            self.counters.sync_batches_sent += 1;
            self.send(now, pi, Body::RouteSync { batch: id, routes: routes.clone() });
            self.peers[pi].sync_pending.insert(id, (routes, 0));
            self.schedule(now.mono + SYNC_RETRANSMIT, Timer::SyncRetransmit(pi, epoch, id));
        }
        self.resend_unacked_host_routes(now, pi);
    }

    /// One /32 of a peer's route sync.
    fn on_synced_route(&mut self, now: &Now, pi: usize, r: SyncRoute) {
        let SyncRoute { ip, seq, mac, owner } = r;
        if self.absurd_seq(now, seq) {
            self.counters.route_updates_rejected += 1;
            warn!(%ip, seq, from = %self.peers[pi].name, "synced host route with a sequence number from the future rejected");
            return;
        }
        if owner != self.cfg.site && self.peer_index(&owner).is_none() {
            self.counters.route_updates_rejected += 1;
            warn!(%ip, %owner, from = %self.peers[pi].name, "synced host route for an unknown router rejected");
            return;
        }
        let was_owner = self.is_local(ip);
        match self.gndt.offer_host(ip, &owner, seq) {
            HostUpdate::Installed { previous } => {
                self.counters.routes_synced += 1;
                if mac.is_unicast() {
                    self.route_macs.insert(ip, mac);
                }
                if owner == self.cfg.site {
                    // We served it before we restarted: serve it again.
                    self.lndt.add(ip);
                    self.moved_away_us.remove(&ip);
                    if mac.is_unicast() {
                        self.hwdt.learn(ip, mac, now.mono);
                    }
                    info!(%ip, seq, from = %self.peers[pi].name, "recovered from a peer: this site serves the host");
                    // Every other router must hold it too (one may have missed our host
                    // route before we restarted), and the former owner's answer carries
                    // its LAN's hosts for the VM.
                    let rec = self.record(MigrationRecord {
                        role: "destination",
                        ip,
                        mac: mac.is_unicast().then_some(mac),
                        seq,
                        other_router: self.peers[pi].name.clone(),
                        trigger: "sync",
                        detected_us: now.wall_us,
                        detection_read_us: None,
                        resolved_us: Some(now.wall_us),
                        all_acked_us: None,
                        first_announce_us: None,
                        acked_by: Vec::new(),
                        hosts: Vec::new(),
                    });
                    if self.propagate(now, ip, seq, mac, rec) {
                        self.complete(now, ip);
                    }
                } else {
                    if let Some(m) = self.migrations.remove(&ip) {
                        self.counters.migrations_lost += 1;
                        warn!(%ip, our_seq = m.seq, their_seq = seq, winner = %owner,
                              "our in-flight host route was superseded");
                    }
                    self.moved_away_us.insert(ip, now.wall_us);
                    if was_owner {
                        self.hand_over(now, ip, seq, &owner, "sync");
                        // The peer's word is older than what this LAN may show now (the VM
                        // may have come back here while we were down): ask. An answer is a
                        // move here, with a newer sequence number.
                        let f = frames::arp_request(self.mac(), self.cfg.router_ip, ip);
                        self.inject(f);
                    } else {
                        self.announced_to.remove(&ip);
                        self.hwdt.remove(ip);
                    }
                    info!(%ip, seq, %owner, previous = ?previous, "recovered from a peer: GNDT /32");
                }
            }
            HostUpdate::Duplicate | HostUpdate::Stale { .. } => {}
        }
    }

    fn on_tunnelled(&mut self, now: &Now, sender: &str, packet: Vec<u8>) {
        let dst = match frames::ipv4_addrs(&packet) {
            Ok((_, d)) => d,
            Err(_) => {
                self.counters.overlay_malformed += 1;
                return;
            }
        };
        self.counters.tunnelled_in += 1;
        match self.route_of(dst).map(|s| s.to_string()) {
            None => self.counters.no_route += 1,
            Some(r) if r == self.cfg.site => self.deliver_local(now, dst, packet),
            Some(r) if r == sender => self.counters.loop_dropped += 1,
            Some(r) => self.tunnel(now, &r, packet, true),
        }
    }

    /// A sequence number no router can have made yet: a move's is at most its detection
    /// time in µs (or one more than the previous move's), and clocks agree within the skew.
    fn absurd_seq(&self, now: &Now, seq: u64) -> bool {
        seq > now.wall_us.saturating_add(self.cfg.timers.max_clock_skew.as_micros() as u64)
    }

    fn on_host_route(&mut self, now: &Now, pi: usize, ip: Ipv4Addr, seq: u64, mac: Mac, owner: String) {
        let sender = self.peers[pi].name.clone();
        if self.absurd_seq(now, seq) {
            self.counters.route_updates_rejected += 1;
            warn!(%ip, seq, %sender, "host route with a sequence number from the future rejected");
            return;
        }
        if owner != sender {
            self.counters.route_updates_rejected += 1;
            warn!(%ip, %owner, %sender, "host route for another router rejected");
            return;
        }
        let was_owner = self.is_local(ip);
        match self.gndt.offer_host(ip, &owner, seq) {
            HostUpdate::Installed { previous } => {
                self.counters.route_updates_installed += 1;
                if let Some(m) = self.migrations.remove(&ip) {
                    self.counters.migrations_lost += 1;
                    warn!(%ip, our_seq = m.seq, their_seq = seq, winner = %owner,
                          "our in-flight host route was superseded");
                }
                let mut hosts = Vec::new();
                self.route_macs.insert(ip, mac);
                self.moved_away_us.insert(ip, now.wall_us);
                if was_owner {
                    hosts = self.hand_over(now, ip, seq, &owner, "host-route");
                } else {
                    info!(%ip, seq, owner = %owner, previous = ?previous, "GNDT /32 updated");
                    self.announced_to.remove(&ip);
                    self.hwdt.remove(ip);
                }
                self.send(now, pi, Body::HostRouteAck { ip, seq, was_owner, late: false, hosts });
            }
            HostUpdate::Duplicate => {
                self.counters.route_updates_duplicate += 1;
                let (was, hosts) = match self.handovers.get(&ip) {
                    Some((s, h)) if *s == seq => (true, h.clone()),
                    _ => (false, Vec::new()),
                };
                self.send(now, pi, Body::HostRouteAck { ip, seq, was_owner: was, late: false, hosts });
            }
            HostUpdate::Stale { installed_seq } => {
                self.counters.route_updates_stale += 1;
                warn!(%ip, seq, installed_seq, from = %sender, %mac, "stale host route ignored");
            }
        }
    }

    /// The VM at `ip` left our LAN: claim its IP on the LAN and report our hosts.
    fn hand_over(&mut self, now: &Now, ip: Ipv4Addr, seq: u64, owner: &str, trigger: &'static str) -> Vec<Ipv4Addr> {
        self.lndt.remove(ip);
        self.hwdt.remove(ip);
        self.pending_arp.remove(&ip);
        let locals = self.local_hosts(ip);
        let own = self.mac();
        // Gratuitous ARP request and reply: "ip is-at <router MAC>" (Linux always applies
        // a GARP to an existing entry), repeated past the 1 s locktime.
        self.announce(now, frames::garp_request(own, ip));
        self.announce(now, frames::garp_reply(own, ip));
        // Directed requests to every known host (the form smoltcp accepts too).
        for (h, hmac) in &locals {
            self.announce(now, frames::directed_update(own, *hmac, *h, ip, own));
        }
        let mut hosts: BTreeSet<Ipv4Addr> = locals.iter().map(|(h, _)| *h).collect();
        if let Some(prev) = self.announced_to.remove(&ip) {
            hosts.extend(prev);
        }
        hosts.remove(&ip);
        let hosts: Vec<Ipv4Addr> = hosts.into_iter().take(proto::MAX_HOSTS).collect();
        self.handovers.insert(ip, (seq, hosts.clone()));
        if self.probe.startup && !self.probe.queue.is_empty() {
            // Our HWDT is still being filled (we just started): report the hosts once the
            // sweep at start is done.
            self.late_reports.push((ip, seq, owner.to_string()));
        }
        info!(%ip, seq, new_owner = %owner, hosts = hosts.len(),
              "VM left this site: LNDT updated, gratuitous ARP and proxy ARP for its IP");
        self.record(MigrationRecord {
            role: "source",
            ip,
            mac: None,
            seq,
            other_router: owner.to_string(),
            trigger,
            detected_us: now.wall_us,
            detection_read_us: None,
            resolved_us: None,
            all_acked_us: None,
            first_announce_us: Some(now.wall_us),
            acked_by: Vec::new(),
            hosts: hosts.clone(),
        });
        hosts
    }

    /// Tell the VM at `ip` (`vm_mac`) that each remote host of `hosts` is behind this router.
    fn announce_remote_hosts(&mut self, now: &Now, ip: Ipv4Addr, vm_mac: Mac, hosts: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        let own = self.mac();
        let mut announced = Vec::new();
        if !vm_mac.is_unicast() {
            return announced;
        }
        for h in hosts {
            if *h == ip || self.is_local(*h) || *h == self.cfg.router_ip {
                continue;
            }
            // "h is-at <our MAC>", aimed at the VM's own IP so any stack accepts it.
            let f = frames::directed_update(own, vm_mac, ip, *h, own);
            self.announce(now, f);
            announced.push(*h);
        }
        self.announced_to.entry(ip).or_default().extend(announced.iter().copied());
        announced
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ack(
        &mut self,
        now: &Now,
        sender: &str,
        ip: Ipv4Addr,
        seq: u64,
        was_owner: bool,
        late: bool,
        hosts: Vec<Ipv4Addr>,
    ) {
        let in_flight = self.migrations.get(&ip).is_some_and(|m| m.seq == seq && m.unacked.contains(sender));
        if late {
            // A former owner that restarted reports its LAN's hosts late (once it knows
            // them, see `report_late_handovers`): announce them to the VM we serve.
            let ours = self.gndt.host_route(ip).is_some_and(|r| r.seq == seq && r.router == self.cfg.site);
            if was_owner && ours && !hosts.is_empty() {
                self.counters.late_host_reports += 1;
                let mac = self.hwdt.mac_of(ip).or_else(|| self.route_macs.get(&ip).copied()).unwrap_or(Mac([0; 6]));
                let n = self.announce_remote_hosts(now, ip, mac, &hosts).len();
                info!(%ip, seq, from = %sender, hosts = hosts.len(), announced = n,
                      "late host list from the VM's former site: announced to the VM");
            } else {
                self.counters.overlay_unsolicited += 1;
            }
            return;
        }
        if !in_flight {
            self.counters.overlay_unsolicited += 1;
            return;
        }
        let m = self.migrations.get_mut(&ip).expect("in flight");
        m.unacked.remove(sender);
        let (vm_mac, rec) = (m.mac, m.record);
        let done = m.unacked.is_empty();
        let announced = if was_owner { self.announce_remote_hosts(now, ip, vm_mac, &hosts) } else { Vec::new() };
        let first = !announced.is_empty();
        if let Some(r) = self.record_mut(rec) {
            r.acked_by.push(sender.to_string());
            if was_owner {
                r.hosts = hosts.clone();
            }
            if first && r.first_announce_us.is_none() {
                r.first_announce_us = Some(now.wall_us);
            }
        }
        debug!(%ip, seq, from = %sender, was_owner, hosts = hosts.len(), "host route acknowledged");
        if done {
            self.complete(now, ip);
        }
    }

    // ------------------------------------------------------------ timers

    /// Run every timer due at `now`.
    pub fn handle_timers(&mut self, now: &Now) {
        while let Some((&key, _)) = self.timers.iter().next() {
            if key.0 > now.mono {
                break;
            }
            let t = self.timers.remove(&key).expect("present");
            match t {
                Timer::Inject(f) => self.inject(f),
                Timer::QueryTimeout(mac, id) => {
                    if self.queries.get(&mac).map(|q| q.id) == Some(id) {
                        self.queries.remove(&mac);
                        self.counters.rarp_unknown_mac += 1;
                        if self.log_lan(now) {
                            info!(%mac, "no router knows this MAC: nothing changed");
                        }
                    }
                }
                Timer::Retransmit(ip, seq) => self.retransmit(now, ip, seq),
                Timer::ArpRetry(ip) => {
                    let give_up = match self.pending_arp.get_mut(&ip) {
                        None => continue,
                        Some(p) if p.tries >= 3 => true,
                        Some(p) => {
                            p.tries += 1;
                            false
                        }
                    };
                    if give_up {
                        if let Some(p) = self.pending_arp.remove(&ip) {
                            self.counters.arp_unresolved_dropped += p.queue.len() as u64;
                        }
                    } else {
                        let f = frames::arp_request(self.mac(), self.cfg.router_ip, ip);
                        self.inject(f);
                        self.schedule(now.mono + Duration::from_millis(500), Timer::ArpRetry(ip));
                    }
                }
                Timer::Housekeeping => {
                    let n = self.hwdt.expire(now.mono, self.cfg.timers.hwdt_max_age);
                    self.counters.hwdt_expired += n as u64;
                    for l in [&mut self.log, &mut self.lan_log] {
                        if now.mono.saturating_duration_since(l.window) >= LOG_WINDOW {
                            l.flush();
                        }
                    }
                    self.schedule(now.mono + Duration::from_secs(30), Timer::Housekeeping);
                }
                Timer::Hello => {
                    for i in 0..self.peers.len() {
                        if !self.peers[i].knows_us {
                            let adopted = self.peers[i].epoch != 0;
                            self.counters.hellos_sent += 1;
                            self.send(now, i, Body::Hello { adopted, ask: true });
                        }
                    }
                    self.schedule(now.mono + HELLO_INTERVAL, Timer::Hello);
                }
                Timer::SyncRetransmit(pi, epoch, id) => {
                    if self.peers[pi].epoch != epoch {
                        continue;
                    }
                    let Some((routes, tries)) = self.peers[pi].sync_pending.get_mut(&id) else {
                        continue;
                    };
                    *tries += 1;
                    if *tries > SYNC_TRIES {
                        warn!(peer = %self.peers[pi].name, batch = id, "route sync never acknowledged");
                        self.peers[pi].sync_pending.remove(&id);
                        continue;
                    }
                    let routes = routes.clone();
                    self.counters.sync_batches_retransmitted += 1;
                    self.send(now, pi, Body::RouteSync { batch: id, routes });
                    self.schedule(now.mono + SYNC_RETRANSMIT, Timer::SyncRetransmit(pi, epoch, id));
                }
                Timer::Probe => self.probe_tick(now),
                Timer::ClaimCheck(mac) => self.claim_check(now, mac),
                Timer::LateReports => self.report_late_handovers(now),
            }
        }
    }

    /// The hand-overs made while the HWDT was cold: send each new owner our LAN's hosts now
    /// (as the acknowledgement of its host route would have), so it can tell the VM they
    /// are behind it.
    fn report_late_handovers(&mut self, now: &Now) {
        for (ip, seq, owner) in std::mem::take(&mut self.late_reports) {
            if self.gndt.host_route(ip).is_none_or(|r| r.seq != seq || r.router != owner) {
                continue;
            }
            let Some(pi) = self.peer_index(&owner) else { continue };
            let mut hosts: BTreeSet<Ipv4Addr> = self.local_hosts(ip).into_iter().map(|(h, _)| h).collect();
            hosts.remove(&ip);
            let hosts: Vec<Ipv4Addr> = hosts.into_iter().take(proto::MAX_HOSTS).collect();
            if hosts.is_empty() {
                continue;
            }
            self.handovers.insert(ip, (seq, hosts.clone()));
            info!(%ip, seq, %owner, hosts = hosts.len(), "sending the host list of a hand-over made at start");
            self.send(now, pi, Body::HostRouteAck { ip, seq, was_owner: true, late: true, hosts });
        }
    }

    /// Addresses of a sweep: every host address of the LNDT's prefixes and its single
    /// hosts; at start, first the other routers' prefixes (a VM that moved here while every
    /// router lost its state answers from this LAN with another site's address: finding it
    /// is what repairs the network), then this site's.
    fn fill_probe_queue(&mut self, startup: bool) {
        let mut seen = std::collections::HashSet::new();
        let mut queue = VecDeque::new();
        let mut add = |queue: &mut VecDeque<Ipv4Addr>, ips: &mut dyn Iterator<Item = Ipv4Addr>| {
            for ip in ips {
                if ip != self.cfg.router_ip && seen.insert(ip) {
                    queue.push_back(ip);
                }
            }
        };
        let probed = |p: &&crate::tables::Prefix| p.size() <= u64::from(crate::config::MAX_PROBED_PREFIX);
        if startup && self.cfg.probe.remote_at_start {
            for (p, r) in self.cfg.gndt.iter().filter(|(p, _)| probed(&p)) {
                if *r != self.cfg.site {
                    add(&mut queue, &mut p.hosts());
                }
            }
        }
        for p in self.lndt.prefixes().iter().filter(probed) {
            add(&mut queue, &mut p.hosts());
        }
        add(&mut queue, &mut self.lndt.hosts());
        self.probe.queue = queue;
        self.probe.startup = startup;
        self.probe.rate_per_s = if startup { self.cfg.probe.startup_rate_per_s } else { self.cfg.probe.rate_per_s };
    }

    /// Send the probe frames due now (paced at the sweep's rate); at the end of a sweep,
    /// schedule the next one.
    fn probe_tick(&mut self, now: &Now) {
        if self.probe.queue.is_empty() {
            self.fill_probe_queue(false);
        }
        if self.probe.started.is_none() {
            self.probe.started = Some(now.mono);
        }
        let rate = f64::from(self.probe.rate_per_s.max(1));
        let tick = PROBE_TICK.max(Duration::from_secs_f64(1.0 / rate));
        let n = (rate * tick.as_secs_f64()).round().max(1.0) as usize;
        for _ in 0..n {
            let Some(ip) = self.probe.queue.pop_front() else { break };
            self.counters.probes_sent += 1;
            let f = frames::arp_request(self.mac(), self.cfg.router_ip, ip);
            self.inject(f);
        }
        if self.probe.queue.is_empty() {
            self.counters.probe_sweeps += 1;
            debug!(startup = self.probe.startup, "probe sweep done");
            if self.probe.startup && !self.late_reports.is_empty() {
                self.schedule(now.mono + LATE_REPORT_DELAY, Timer::LateReports);
            }
            // Sweeps start `interval` apart (at once if a sweep took longer); the one at
            // start does not count, so the first periodic sweep starts `interval` after it.
            let started = if self.probe.startup { now.mono } else { self.probe.started.unwrap_or(now.mono) };
            self.probe.started = None;
            self.schedule((started + self.cfg.probe.interval).max(now.mono), Timer::Probe);
        } else {
            self.schedule(now.mono + tick, Timer::Probe);
        }
    }

    fn retransmit(&mut self, now: &Now, ip: Ipv4Addr, seq: u64) {
        let max = self.cfg.timers.retransmit_count;
        let Some(m) = self.migrations.get_mut(&ip) else {
            return;
        };
        if m.seq != seq {
            return;
        }
        if m.attempts >= max {
            let missing: Vec<String> = m.unacked.iter().cloned().collect();
            warn!(%ip, seq, ?missing, "peers never acknowledged the host route");
            self.counters.route_unacked_peers += missing.len() as u64;
            self.migrations.remove(&ip);
            return;
        }
        m.attempts += 1;
        let delay = self.cfg.timers.retransmit * (1u32 << m.attempts.min(10));
        let (mac, names): (Mac, Vec<String>) = (m.mac, m.unacked.iter().cloned().collect());
        let me = self.cfg.site.clone();
        for n in names {
            if let Some(i) = self.peer_index(&n) {
                self.send(now, i, Body::HostRoute { ip, seq, mac, owner: me.clone() });
            }
        }
        self.schedule(now.mono + delay, Timer::Retransmit(ip, seq));
    }

    // ------------------------------------------------------------ status

    /// The status dump: tables, counters, migrations.
    pub fn status(&self, now: &Now) -> serde_json::Value {
        let hwdt: Vec<_> = self
            .hwdt
            .iter()
            .map(|(ip, e)| {
                serde_json::json!({
                    "ip": ip, "mac": e.mac,
                    "age_ms": now.mono.saturating_duration_since(e.last_seen).as_millis() as u64,
                    "local": self.lndt.contains(*ip) && self.is_local(*ip),
                })
            })
            .collect();
        let gndt: Vec<_> = self.gndt.routes().collect();
        let peers: Vec<_> = self
            .peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "address": p.addr.to_string(),
                    "last_rx_ms_ago": p.last_rx.map(|t| now.mono.saturating_duration_since(t).as_millis() as u64),
                    "epoch": p.epoch, "knows_our_epoch": p.knows_us,
                    "sync_unacked": p.sync_pending.len(),
                })
            })
            .collect();
        let migrations: Vec<_> = self.history.iter().map(|(_, r)| r).collect();
        serde_json::json!({
            "site": self.cfg.site,
            "router_mac": self.cfg.router_mac,
            "router_ip": self.cfg.router_ip,
            "lan_interface": self.cfg.lan_interface,
            "uptime_ms": now.mono.saturating_duration_since(self.started).as_millis() as u64,
            "epoch": self.epoch,
            "probe": {
                "enabled": self.cfg.probe.enabled,
                "queued": self.probe.queue.len(),
                "rate_per_s": self.probe.rate_per_s,
                "startup_sweep": self.probe.startup && !self.probe.queue.is_empty(),
            },
            "hwdt": hwdt,
            "lndt": self.lndt.view(),
            "gndt": gndt,
            "peers": peers,
            "pending_queries": self.queries.len(),
            "migrations_in_flight": self.migrations.len(),
            "migrations": migrations,
            "counters": self.counters,
        })
    }
}

fn ms(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const VM_MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const A1_MAC: Mac = Mac([2, 0, 0x0a, 1, 0, 1]);
    const B1_MAC: Mac = Mac([2, 0, 0x0a, 1, 1, 1]);
    const RA: Mac = Mac([2, 0, 0x0a, 1, 0, 0xfe]);
    const RB: Mac = Mac([2, 0, 0x0a, 1, 1, 0xfe]);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const NO_PROBE: &str = "\n[probe]\nenabled = false\n";

    fn config(site: char, extra: &str) -> Config {
        let text = match site {
            'A' => include_str!("../examples/site-a.toml"),
            _ => include_str!("../examples/site-b.toml"),
        };
        Config::parse(&format!("{text}{extra}"), Path::new("x")).unwrap()
    }

    /// Two routers (without probing) that have opened their sessions.
    fn routers(now: Now) -> (Router, Router) {
        let (mut a, mut b) =
            (Router::new(config('A', NO_PROBE), now).unwrap(), Router::new(config('B', NO_PROBE), now).unwrap());
        a.handle_timers(&now);
        b.handle_timers(&now);
        pump(&now, &mut a, &mut b);
        assert!(a.peers[0].knows_us && b.peers[0].knows_us, "sessions open");
        (a, b)
    }

    /// [`routers`], A having seen the VM's ARP.
    fn routers_knowing_the_vm(now: Now) -> (Router, Router) {
        let (mut a, mut b) = routers(now);
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        pump(&now, &mut a, &mut b);
        (a, b)
    }

    /// A message from `from` to `to` in their current sessions.
    fn msg(from: &Router, to: &Router, seq: u64, now: &Now, body: Body<'static>) -> Message<'static> {
        Message {
            sender: from.cfg.site.clone(),
            epoch: from.epoch,
            peer_epoch: to.epoch,
            seq,
            timestamp_us: now.wall_us,
            body,
        }
    }

    /// Deliver overlay datagrams between the two routers until quiet; return LAN frames
    /// injected by each.
    fn pump(now: &Now, a: &mut Router, b: &mut Router) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        let addr_a = a.cfg.listen;
        let addr_b = b.cfg.listen;
        for _ in 0..20 {
            let mut moved = false;
            for act in a.take_actions() {
                match act {
                    Action::Inject(f) => fa.push(f),
                    Action::Send(to, d) => {
                        assert_eq!(to, addr_b);
                        b.handle_datagram(now, addr_a, &d);
                        moved = true;
                    }
                }
            }
            for act in b.take_actions() {
                match act {
                    Action::Inject(f) => fb.push(f),
                    Action::Send(to, d) => {
                        assert_eq!(to, addr_a);
                        a.handle_datagram(now, addr_b, &d);
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
        (fa, fb)
    }

    fn arps(frames: &[Vec<u8>]) -> Vec<Arp> {
        frames
            .iter()
            .filter_map(|f| match frames::parse(f) {
                Ok(Frame::Arp(a)) => Some(a),
                _ => None,
            })
            .collect()
    }

    fn learn(r: &mut Router, now: &Now, mac: Mac, addr: &str, target: &str) {
        let f = frames::arp_request(mac, ip(addr), ip(target));
        r.handle_frame(now, &f);
    }

    #[test]
    fn proxy_arp_for_remote_site_and_own_address() {
        let now = Now::current();
        let (mut a, _) = routers(now);
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.1.1");
        let mut b = routers(now).1;
        b.peers[0].epoch = a.epoch;
        let out = arps(&pump(&now, &mut a, &mut b).0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].op, 2);
        assert_eq!(out[0].sha, RA);
        assert_eq!(out[0].spa, ip("10.1.1.1"));
        assert_eq!(out[0].eth_dst, A1_MAC);
        // Local target: no answer.
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.10");
        assert!(a.take_actions().is_empty());
        // Own address.
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.254");
        assert_eq!(a.take_actions().len(), 1);
        // Sender outside the LNDT.
        learn(&mut a, &now, A1_MAC, "10.1.7.1", "10.1.1.1");
        assert!(a.take_actions().is_empty());
        assert_eq!(a.counters.lndt_denied, 1);
    }

    #[test]
    fn migration_a_to_b_and_back() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let vm = ip("10.1.0.10");
        // Before: A sees the VM and A1, B sees B1.
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.10");
        learn(&mut b, &now, B1_MAC, "10.1.1.1", "10.1.0.10");
        pump(&now, &mut a, &mut b);

        // The VM resumes at B: QEMU's RARP.
        let t1 = now.after(Duration::from_millis(10));
        b.handle_frame(&t1, &frames::qemu_rarp(VM_MAC));
        let (fa, fb) = pump(&t1, &mut a, &mut b);
        let seq1 = b.gndt.host_seq(vm);
        assert!(seq1 >= t1.wall_us, "a move's sequence number is at least its time in µs");
        for r in [&a, &b] {
            let route = r.gndt.host_route(vm).expect("/32 installed");
            assert_eq!((route.router.as_str(), route.seq), ("B", seq1));
        }
        assert!(!a.lndt.contains(vm));
        assert!(b.lndt.contains(vm));
        assert_eq!(b.counters.migrations_completed, 1);
        // A: gratuitous request + reply for the VM's IP with A's MAC, and a directed
        // update to A1.
        let la = arps(&fa);
        assert!(la.iter().any(|x| x.is_gratuitous() && x.spa == vm && x.sha == RA && x.op == 1));
        assert!(la.iter().any(|x| x.is_gratuitous() && x.spa == vm && x.sha == RA && x.op == 2));
        assert!(la.iter().any(|x| x.eth_dst == A1_MAC && x.spa == vm && x.sha == RA && x.tpa == ip("10.1.0.1")));
        // B: tells the VM that A1 is at B's MAC (aimed at the VM's own IP), and
        // optimises B1 <-> VM to direct layer 2 in both directions.
        let lb = arps(&fb);
        assert!(lb.iter().any(|x| x.eth_dst == VM_MAC && x.tpa == vm && x.spa == ip("10.1.0.1") && x.sha == RB));
        assert!(lb.iter().any(|x| x.eth_dst == VM_MAC && x.spa == ip("10.1.1.1") && x.sha == B1_MAC));
        assert!(lb.iter().any(|x| x.eth_dst == B1_MAC && x.spa == vm && x.sha == VM_MAC));
        // Repeats are scheduled past the locktime.
        let t2 = t1.after(Duration::from_millis(1200));
        a.handle_timers(&t2);
        assert!(!a.take_actions().is_empty());

        // Proxy ARP at A for the VM; at B for A1 (asked by the VM).
        learn(&mut a, &t2, A1_MAC, "10.1.0.1", "10.1.0.10");
        let r = arps(&pump(&t2, &mut a, &mut b).0);
        assert!(r.iter().any(|x| x.op == 2 && x.spa == vm && x.sha == RA));
        learn(&mut b, &t2, VM_MAC, "10.1.0.10", "10.1.0.1");
        let r = arps(&pump(&t2, &mut a, &mut b).1);
        assert!(r.iter().any(|x| x.op == 2 && x.spa == ip("10.1.0.1") && x.sha == RB));

        // Further RARP rounds change nothing.
        b.handle_frame(&t2, &frames::qemu_rarp(VM_MAC));
        pump(&t2, &mut a, &mut b);
        assert_eq!(b.gndt.host_seq(vm), seq1);
        assert!(b.counters.detections_already_local >= 1);

        // Move back to A.
        let t3 = t2.after(Duration::from_secs(5));
        a.handle_frame(&t3, &frames::qemu_rarp(VM_MAC));
        let (fa, fb) = pump(&t3, &mut a, &mut b);
        let seq2 = a.gndt.host_seq(vm);
        assert!(seq2 > seq1);
        for r in [&a, &b] {
            let route = r.gndt.host_route(vm).unwrap();
            assert_eq!((route.router.as_str(), route.seq), ("A", seq2));
        }
        assert!(a.lndt.contains(vm) && !b.lndt.contains(vm));
        let la = arps(&fa);
        // A1 and the VM are told to talk directly again.
        assert!(la.iter().any(|x| x.eth_dst == A1_MAC && x.spa == vm && x.sha == VM_MAC));
        assert!(la.iter().any(|x| x.eth_dst == VM_MAC && x.spa == ip("10.1.0.1") && x.sha == A1_MAC));
        // The VM learns that B1 is now behind A.
        assert!(la.iter().any(|x| x.eth_dst == VM_MAC && x.spa == ip("10.1.1.1") && x.sha == RA));
        // B claims the VM's IP on LAN B.
        let lb = arps(&fb);
        assert!(lb.iter().any(|x| x.is_gratuitous() && x.spa == vm && x.sha == RB));
        assert!(lb.iter().any(|x| x.eth_dst == B1_MAC && x.spa == vm && x.sha == RB));
    }

    #[test]
    fn data_path_tunnels_and_delivers() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        learn(&mut b, &now, B1_MAC, "10.1.1.1", "10.1.1.254");
        b.take_actions();
        let mut pkt = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 1, 1, 1];
        pkt.extend_from_slice(&[0; 8]);
        let f = frames::ipv4_frame(A1_MAC, RA, &pkt);
        a.handle_frame(&now, &f);
        let (_, fb) = pump(&now, &mut a, &mut b);
        assert_eq!(a.counters.tunnelled_out, 1);
        assert_eq!(fb.len(), 1);
        match frames::parse(&fb[0]).unwrap() {
            Frame::Ipv4 { eth_src, eth_dst, packet, .. } => {
                assert_eq!((eth_src, eth_dst), (RB, B1_MAC));
                assert_eq!(packet[8], 63);
            }
            other => panic!("{other:?}"),
        }
        // Unknown destination: B ARPs and queues, then delivers on the reply.
        let mut pkt2 = pkt.clone();
        pkt2[19] = 2;
        a.handle_frame(&now, &frames::ipv4_frame(A1_MAC, RA, &pkt2));
        let (_, fb) = pump(&now, &mut a, &mut b);
        let q = arps(&fb);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].tpa, ip("10.1.1.2"));
        let reply = frames::arp_reply(Mac([2, 0, 0, 0, 0, 9]), ip("10.1.1.2"), RB, ip("10.1.1.254"));
        b.handle_frame(&now, &reply);
        let out = b.take_actions();
        assert_eq!(out.len(), 1);
        // Not from the LNDT: dropped.
        let mut pkt3 = pkt.clone();
        pkt3[12] = 99;
        a.handle_frame(&now, &frames::ipv4_frame(A1_MAC, RA, &pkt3));
        assert!(a.take_actions().is_empty());
        assert_eq!(a.counters.lndt_denied, 1);
    }

    #[test]
    fn unknown_mac_flood_replay_and_forgery_change_nothing() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let before = format!("{:?}", b.gndt);
        for i in 0..500u32 {
            let m = Mac([2, 0x99, 0, (i >> 8) as u8, i as u8, 1]);
            b.handle_frame(&now, &frames::qemu_rarp(m));
        }
        pump(&now, &mut a, &mut b);
        b.handle_timers(&now.after(Duration::from_secs(2)));
        assert_eq!(format!("{:?}", b.gndt), before);
        assert_eq!(b.counters.rarp_unknown_mac, 40);
        assert_eq!(b.counters.detections_rate_limited, 460);
        // Forged (bad key) and replayed messages.
        let evil = Auth::new(b"not the shared key at all").unwrap();
        let forged = proto::encode(
            &evil,
            &msg(
                &a,
                &b,
                u64::MAX / 2,
                &now,
                Body::HostRoute { ip: ip("10.1.1.1"), seq: 99, mac: VM_MAC, owner: "A".into() },
            ),
        )
        .unwrap();
        b.handle_datagram(&now, a.cfg.listen, &forged);
        assert_eq!(b.counters.overlay_auth_failed, 1);
        let good =
            proto::encode(&a.auth, &msg(&a, &b, a.peers[0].tx_seq + 100, &now, Body::WhoHas { query: 1, mac: VM_MAC }))
                .unwrap();
        b.handle_datagram(&now, a.cfg.listen, &good);
        b.handle_datagram(&now, a.cfg.listen, &good);
        assert_eq!(b.counters.overlay_replayed, 1);
        let old = proto::encode(
            &a.auth,
            &Message {
                timestamp_us: now.wall_us - 3_600_000_000,
                ..msg(&a, &b, a.peers[0].tx_seq + 200, &now, Body::WhoHas { query: 1, mac: VM_MAC })
            },
        )
        .unwrap();
        b.handle_datagram(&now, a.cfg.listen, &old);
        assert_eq!(b.counters.overlay_stale, 1);
        // A host route claimed by someone else than its sender.
        let hijack = proto::encode(
            &a.auth,
            &msg(
                &a,
                &b,
                a.peers[0].tx_seq + 300,
                &now,
                Body::HostRoute { ip: ip("10.1.1.1"), seq: 5, mac: VM_MAC, owner: "B".into() },
            ),
        )
        .unwrap();
        b.handle_datagram(&now, a.cfg.listen, &hijack);
        assert_eq!(b.counters.route_updates_rejected, 1);
        assert_eq!(format!("{:?}", b.gndt), before);
    }

    #[test]
    fn a_move_is_timed_from_the_capture_of_its_first_frame() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        a.take_actions();
        // B reads the RARP 3 ms after the kernel captured it; A answers B's who-has later.
        let read = now.after(Duration::from_millis(10));
        b.handle_captured(&read, read.wall_us - 3000, &frames::qemu_rarp(VM_MAC));
        let answered = read.after(Duration::from_millis(1));
        pump(&answered, &mut a, &mut b);
        let st = b.status(&answered);
        let r = &st["migrations"][0];
        assert_eq!(r["detected_us"], read.wall_us - 3000, "{r}");
        assert_eq!(r["detection_read_us"], read.wall_us, "{r}");
        assert_eq!(r["resolved_us"], answered.wall_us, "{r}");
        assert_eq!(r["all_acked_us"], answered.wall_us, "{r}");
        // A capture timestamp later than the read (the wall clock was stepped back) or
        // missing is replaced by the read time.
        let t = answered.after(Duration::from_secs(1));
        let other = Mac([2, 0, 0, 0, 0, 0x11]);
        b.handle_captured(&t, t.wall_us + 5_000_000, &frames::garp_request(other, ip("10.1.0.11")));
        let t2 = t.after(Duration::from_secs(1));
        b.handle_captured(&t2, 0, &frames::garp_request(Mac([2, 0, 0, 0, 0, 0x12]), ip("10.1.0.12")));
        let st = b.status(&t2);
        let recs = st["migrations"].as_array().unwrap();
        assert_eq!(recs[1]["detected_us"], t.wall_us, "{st}");
        assert_eq!(recs[2]["detected_us"], t2.wall_us, "{st}");
    }

    #[test]
    fn gratuitous_arp_for_a_remote_ip_is_a_migration() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let f = frames::garp_request(VM_MAC, ip("10.1.0.10"));
        b.handle_frame(&now, &f);
        pump(&now, &mut a, &mut b);
        assert_eq!(a.gndt.host_route(ip("10.1.0.10")).unwrap().router, "B");
        assert_eq!(b.counters.migrations_completed, 1);
    }

    #[test]
    fn lost_ack_is_retransmitted_and_host_list_resent() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.10");
        a.take_actions();
        b.handle_frame(&now, &frames::qemu_rarp(VM_MAC));
        // who-has -> A
        for act in b.take_actions() {
            if let Action::Send(_, d) = act {
                a.handle_datagram(&now, b.cfg.listen, &d);
            }
        }
        // i-have -> B
        for act in a.take_actions() {
            if let Action::Send(_, d) = act {
                b.handle_datagram(&now, a.cfg.listen, &d);
            }
        }
        // host-route -> A; drop A's ack.
        for act in b.take_actions() {
            if let Action::Send(_, d) = act {
                a.handle_datagram(&now, b.cfg.listen, &d);
            }
        }
        a.take_actions();
        assert_eq!(b.counters.migrations_completed, 0);
        let later = now.after(Duration::from_millis(250));
        b.handle_timers(&later);
        let (_, fb) = pump(&later, &mut a, &mut b);
        assert_eq!(b.counters.migrations_completed, 1);
        assert_eq!(a.counters.route_updates_duplicate, 1);
        assert!(arps(&fb).iter().any(|x| x.eth_dst == VM_MAC && x.spa == ip("10.1.0.1")));
    }
    /// An IPv4/UDP packet (20-byte header, 8 bytes of UDP, no payload).
    fn udp_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0; 8]);
        p
    }

    /// Every datagram `r` wants sent, without delivering them.
    fn sent(r: &mut Router) -> Vec<Vec<u8>> {
        r.take_actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(_, d) => Some(d),
                Action::Inject(_) => None,
            })
            .collect()
    }

    /// A router restarted at `now`: a fresh process with the same configuration.
    fn restart(r: &Router, now: Now) -> Router {
        let mut n = Router::new(r.cfg.clone(), now).unwrap();
        n.handle_timers(&now);
        n
    }

    /// Move the VM from A to B (RARP at B); returns the route's sequence number.
    fn move_to_b(now: &Now, a: &mut Router, b: &mut Router) -> u64 {
        b.handle_frame(now, &frames::qemu_rarp(VM_MAC));
        pump(now, a, b);
        let r = b.gndt.host_route(ip("10.1.0.10")).expect("moved").clone();
        assert_eq!(r.router, "B");
        assert_eq!(a.gndt.host_route(ip("10.1.0.10")).map(|r| r.seq), Some(r.seq));
        r.seq
    }

    #[test]
    fn a_restart_of_either_router_is_repaired_from_its_peer_and_sequence_numbers_stay_monotonic() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.10");
        pump(&now, &mut a, &mut b);
        let t1 = now.after(Duration::from_millis(10));
        let seq1 = move_to_b(&t1, &mut a, &mut b);

        // A restarts: it only has its /24s, and thinks the VM is on its LAN.
        let t2 = t1.after(Duration::from_secs(3));
        let mut a2 = restart(&a, t2);
        assert!(a2.epoch > a.epoch);
        assert!(a2.is_local(vm));
        let (fa, _) = pump(&t2, &mut a2, &mut b);
        assert_eq!(b.counters.peer_restarts, 1);
        let route = a2.gndt.host_route(vm).expect("A recovered the /32 from B");
        assert_eq!((route.router.as_str(), route.seq), ("B", seq1));
        assert!(!a2.lndt.contains(vm), "A no longer serves the VM");
        assert_eq!(a2.counters.routes_synced, 1);
        // A claims the VM's IP on LAN A again (gratuitous ARP with A's MAC).
        assert!(arps(&fa).iter().any(|x| x.is_gratuitous() && x.spa == vm && x.sha == RA));
        // Tunnelled traffic A1 -> VM flows again: A sends it to B.
        let pkt = udp_packet([10, 1, 0, 1], [10, 1, 0, 10]);
        a2.handle_frame(&t2, &frames::ipv4_frame(A1_MAC, RA, &pkt));
        let (_, fb) = pump(&t2, &mut a2, &mut b);
        assert_eq!(a2.counters.tunnelled_out, 1);
        assert_eq!(fb.len(), 1, "B delivered the packet to the VM");

        // B restarts: it forgot it serves the VM.
        let t3 = t2.after(Duration::from_secs(3));
        let mut b2 = restart(&b, t3);
        assert!(!b2.lndt.contains(vm));
        pump(&t3, &mut a2, &mut b2);
        let route = b2.gndt.host_route(vm).expect("B recovered the /32 from A");
        assert_eq!((route.router.as_str(), route.seq), ("B", seq1));
        assert!(b2.lndt.contains(vm), "B serves the VM again");
        assert_eq!(b2.hwdt.mac_of(vm), Some(VM_MAC), "B knows the VM's MAC from the sync");
        a2.handle_frame(&t3, &frames::ipv4_frame(A1_MAC, RA, &pkt));
        let (_, fb) = pump(&t3, &mut a2, &mut b2);
        assert_eq!(fb.len(), 1, "the restarted B delivers to the VM");
        assert_eq!(b2.counters.loop_dropped, 0);

        // The move home beats the route from before both restarts.
        let t4 = t3.after(Duration::from_secs(1));
        a2.handle_frame(&t4, &frames::qemu_rarp(VM_MAC));
        pump(&t4, &mut a2, &mut b2);
        let seq2 = a2.gndt.host_seq(vm);
        assert!(seq2 > seq1);
        assert_eq!(b2.gndt.host_route(vm).map(|r| (r.router.clone(), r.seq)), Some(("A".into(), seq2)));
        assert!(a2.lndt.contains(vm) && !b2.lndt.contains(vm));
        assert_eq!(b2.counters.route_updates_stale, 0);
    }

    #[test]
    fn nothing_sent_before_a_restart_is_accepted_after_it() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers_knowing_the_vm(now);
        // Record what B sends during the move: its who-has, then its host route.
        let t1 = now.after(Duration::from_millis(10));
        b.handle_frame(&t1, &frames::qemu_rarp(VM_MAC));
        let mut recorded = Vec::new();
        for _ in 0..5 {
            let d = sent(&mut b);
            recorded.extend(d.iter().cloned());
            for x in d {
                a.handle_datagram(&t1, b.cfg.listen, &x);
            }
            for x in sent(&mut a) {
                b.handle_datagram(&t1, a.cfg.listen, &x);
            }
        }
        assert!(recorded.len() >= 2);
        // A restarts 2 s later; the recording is replayed to it after the new session.
        let t2 = t1.after(Duration::from_secs(2));
        let mut a2 = restart(&a, t2);
        pump(&t2, &mut a2, &mut b);
        let before = a2.gndt.clone();
        let counters = a2.counters.clone();
        for d in &recorded {
            a2.handle_datagram(&t2, b.cfg.listen, d);
        }
        assert_eq!(a2.counters.overlay_wrong_epoch, counters.overlay_wrong_epoch + recorded.len() as u64);
        assert_eq!(a2.counters.route_updates_installed, counters.route_updates_installed);
        assert_eq!(format!("{:?}", a2.gndt), format!("{before:?}"));
        // B restarts; what the old B sent is older than the epoch A now knows.
        let t3 = t2.after(Duration::from_secs(2));
        let mut b2 = restart(&b, t3);
        pump(&t3, &mut a2, &mut b2);
        let old_epoch = a2.counters.overlay_old_epoch;
        for d in &recorded {
            a2.handle_datagram(&t3, b.cfg.listen, d);
        }
        assert_eq!(a2.counters.overlay_old_epoch, old_epoch + recorded.len() as u64);
        // Within the clock skew, the old scheme would have taken the host route.
        assert!(t3.wall_us - t1.wall_us < a2.cfg.timers.max_clock_skew.as_micros() as u64);
        assert_eq!(a2.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        // The current sessions still work.
        a2.handle_frame(&t3, &frames::qemu_rarp(VM_MAC));
        pump(&t3, &mut a2, &mut b2);
        assert_eq!(b2.gndt.host_route(vm).map(|r| r.router.as_str()), Some("A"));
    }

    #[test]
    fn a_hello_replayed_from_an_earlier_boot_opens_nothing() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let t1 = now.after(Duration::from_secs(1));
        // A hello of A's first boot, recorded, and A restarted.
        let old_hello =
            proto::encode(&a.auth, &msg(&a, &b, 999, &t1, Body::Hello { adopted: true, ask: true })).unwrap();
        let mut a2 = restart(&a, t1);
        pump(&t1, &mut a2, &mut b);
        let restarts = b.counters.peer_restarts;
        b.handle_datagram(&t1, a.cfg.listen, &old_hello);
        assert_eq!(b.counters.overlay_old_epoch, 1);
        assert_eq!(b.counters.peer_restarts, restarts);
        assert_eq!(b.peers[0].epoch, a2.epoch);
        let _ = &mut a;
    }

    #[test]
    fn hellos_stop_once_the_peer_has_answered() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        // As if the hello that showed A that B adopted its epoch had been lost.
        a.peers[0].knows_us = false;
        let sent_before = a.counters.hellos_sent + b.counters.hellos_sent;
        let mut t = now;
        for _ in 0..20 {
            t = t.after(Duration::from_millis(500));
            a.handle_timers(&t);
            b.handle_timers(&t);
            pump(&t, &mut a, &mut b);
        }
        assert!(a.peers[0].knows_us);
        assert_eq!(a.counters.hellos_sent + b.counters.hellos_sent, sent_before + 2, "one ask, one answer");
    }

    #[test]
    fn a_hello_recorded_before_the_receiver_restarted_opens_nothing() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let t1 = now.after(Duration::from_secs(1));
        let recorded =
            proto::encode(&a.auth, &msg(&a, &b, 999, &t1, Body::Hello { adopted: true, ask: true })).unwrap();
        // B restarts; the recording comes first.
        let t2 = t1.after(Duration::from_secs(2));
        let mut b2 = Router::new(b.cfg.clone(), t2).unwrap();
        b2.handle_datagram(&t2, a.cfg.listen, &recorded);
        assert_eq!((b2.counters.hellos_unbound, b2.counters.sessions_opened), (1, 0));
        assert_eq!(b2.peers[0].epoch, 0, "no epoch adopted from it");
        // B's answer names A's epoch without adopting it; A's hello that names B's new epoch
        // opens the session.
        b2.handle_timers(&t2);
        pump(&t2, &mut a, &mut b2);
        assert!(a.peers[0].knows_us && b2.peers[0].knows_us);
        assert_eq!(b2.peers[0].epoch, a.epoch);
        let _ = &mut b;
    }

    #[test]
    fn a_vm_that_never_talked_across_sites_is_found_by_probing_and_detected_after_its_move() {
        let now = Now::current();
        let mut a = Router::new(config('A', ""), now).unwrap();
        let mut b = Router::new(config('B', NO_PROBE), now).unwrap();
        // The sweep at start: paced at 1000 frames/s, LAN A's /24 and site B's /24.
        let mut probed = Vec::new();
        let mut t = now;
        for _ in 0..200 {
            a.handle_timers(&t);
            b.handle_timers(&t);
            let (fa, _) = pump(&t, &mut a, &mut b);
            probed.extend(arps(&fa).into_iter().filter(|x| x.op == OP_REQUEST && x.sha == RA));
            t = t.after(Duration::from_millis(10));
        }
        let targets: BTreeSet<Ipv4Addr> = probed.iter().map(|x| x.tpa).collect();
        // 253 of LAN A (not the router's own address) and 254 of site B.
        assert_eq!(probed.len(), 253 + 254, "one request per address, once");
        assert_eq!(targets.len(), 253 + 254);
        assert!(targets.contains(&ip("10.1.0.10")) && targets.contains(&ip("10.1.1.1")));
        assert!(!targets.contains(&ip("10.1.0.254")) && !targets.contains(&ip("10.1.0.0")));
        // The peers' prefixes first: that is where a VM that moved here would answer.
        assert!(probed[..254].iter().all(|x| x.tpa.octets()[2] == 1), "site B's /24 first");
        assert_eq!(a.counters.probe_sweeps, 1);
        // The VM answers (unicast to the router).
        a.handle_frame(&t, &frames::arp_reply(VM_MAC, ip("10.1.0.10"), RA, ip("10.1.0.254")));
        assert_eq!(a.hwdt.mac_of(ip("10.1.0.10")), Some(VM_MAC));
        // Periodic sweeps cover only LAN A, at 20 frames/s: 253 frames a minute.
        let mut t2 = t.after(Duration::from_secs(60));
        let mut periodic = 0;
        for _ in 0..(14 * 20) {
            a.handle_timers(&t2);
            periodic += arps(&pump(&t2, &mut a, &mut b).0).iter().filter(|x| x.op == OP_REQUEST).count();
            t2 = t2.after(Duration::from_millis(50));
        }
        assert_eq!(periodic, 253);
        assert_eq!(a.counters.probe_sweeps, 2);
        // The VM moves to B; B's who-has is answered from A's HWDT.
        move_to_b(&t2, &mut a, &mut b);
        assert_eq!(b.counters.rarp_unknown_mac, 0);
    }

    #[test]
    fn periodic_sweeps_start_one_interval_apart() {
        let now = Now::current();
        let mut a = Router::new(config('A', ""), now).unwrap();
        let mut sends = Vec::new();
        for i in 0..(200 * 20) {
            let t = now.after(Duration::from_millis(50 * i));
            a.handle_timers(&t);
            let n = a.take_actions().iter().filter(|x| matches!(x, Action::Inject(_))).count();
            sends.extend(std::iter::repeat_n(i * 50, n));
        }
        // Sweep starts: the first frame after a pause of more than a second.
        let starts: Vec<u64> = sends.windows(2).filter(|w| w[1] - w[0] > 1000).map(|w| w[1]).collect();
        assert!(starts.len() >= 3, "{starts:?}");
        for w in starts.windows(2) {
            assert_eq!(w[1] - w[0], 60_000, "sweeps start 60 s apart: {starts:?}");
        }
        // 507 frames at start, then 253 per sweep.
        let after_first = sends.iter().filter(|t| **t >= starts[0] && **t < starts[1]).count();
        assert_eq!(after_first, 253);
        assert_eq!(sends.iter().filter(|t| **t < starts[0]).count(), 507);
    }

    #[test]
    fn local_hosts_are_learned_from_ipv4_and_a_moved_vm_from_its_own_traffic() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        // A1 -> VM unicast (flooded to the gateway's port): A learns the VM from it.
        let pkt = udp_packet([10, 1, 0, 10], [10, 1, 0, 1]);
        a.handle_frame(&now, &frames::ipv4_frame(VM_MAC, A1_MAC, &pkt));
        assert_eq!(a.hwdt.mac_of(vm), Some(VM_MAC));
        assert_eq!(a.counters.hwdt_learned_from_ip, 1);
        assert!(a.take_actions().is_empty(), "nothing forwarded");
        // The VM appears at B without a RARP and sends to B1: B sees it and repairs.
        let t1 = now.after(Duration::from_millis(5));
        let to_b1 = udp_packet([10, 1, 0, 10], [10, 1, 1, 1]);
        b.handle_frame(&t1, &frames::ipv4_frame(VM_MAC, B1_MAC, &to_b1));
        pump(&t1, &mut a, &mut b);
        assert!(a.gndt.host_route(vm).is_none(), "a claim settles before it is a move");
        let t1 = t1.after(CLAIM_SETTLE);
        b.handle_timers(&t1);
        pump(&t1, &mut a, &mut b);
        assert_eq!(a.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        assert_eq!(b.status(&t1)["migrations"][0]["trigger"], "traffic");
        // More frames of the VM at B cost nothing.
        b.handle_frame(&t1, &frames::ipv4_frame(VM_MAC, B1_MAC, &to_b1));
        assert_eq!(b.counters.migrations_detected, 1);
        // A frame of the VM captured at A before the hand-over, read after it: not a move back.
        a.handle_captured(
            &t1.after(Duration::from_millis(50)),
            t1.wall_us - 1000,
            &frames::ipv4_frame(VM_MAC, A1_MAC, &pkt),
        );
        a.handle_timers(&t1.after(Duration::from_millis(50) + CLAIM_SETTLE));
        assert_eq!(a.counters.detections_stale_frame, 1);
        assert_eq!(a.counters.migrations_detected, 0);
    }

    #[test]
    fn a_proxy_arp_device_answering_for_the_other_site_is_not_a_moved_vm() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let proxy = Mac([2, 0, 0, 0, 0, 0x77]);
        // Right after B's start (empty HWDT), a device of LAN B answers B's sweep for every
        // address of site A, one per millisecond.
        let mut t = now;
        for h in 1..20u8 {
            b.handle_frame(&t, &frames::arp_reply(proxy, Ipv4Addr::new(10, 1, 0, h), RB, ip("10.1.1.254")));
            t = t.after(Duration::from_millis(1));
        }
        let t = t.after(CLAIM_SETTLE);
        b.handle_timers(&t);
        pump(&t, &mut a, &mut b);
        assert_eq!(b.counters.migrations_detected, 0);
        assert_eq!(b.counters.detections_refused_shared_mac, 19);
        assert!(a.gndt.routes().all(|r| r.prefix.len < 32));
        // Known for an address of its own LAN, it is refused at once.
        learn(&mut b, &t, proxy, "10.1.1.200", "10.1.1.1");
        b.handle_frame(&t, &frames::arp_reply(proxy, ip("10.1.0.99"), RB, ip("10.1.1.254")));
        assert_eq!(b.counters.detections_refused_shared_mac, 20);
    }

    #[test]
    fn after_both_routers_restart_a_moved_vm_is_found_on_its_new_lan() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let mut a = Router::new(config('A', ""), now).unwrap();
        let mut b = Router::new(config('B', ""), now).unwrap();
        a.handle_timers(&now);
        b.handle_timers(&now);
        pump(&now, &mut a, &mut b);
        // B's sweep at start asks LAN B for site A's addresses too; the VM answers.
        b.handle_frame(&now, &frames::arp_reply(VM_MAC, vm, RB, ip("10.1.1.254")));
        let t = now.after(CLAIM_SETTLE);
        b.handle_timers(&t);
        a.handle_timers(&t);
        pump(&t, &mut a, &mut b);
        assert_eq!(a.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        assert!(!a.lndt.contains(vm) && b.lndt.contains(vm));
        assert_eq!(b.status(&now)["migrations"][0]["trigger"], "arp");
    }

    #[test]
    fn dropped_overlay_datagrams_are_counted_but_logged_at_a_bounded_rate() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let evil = Auth::new(b"not the shared key at all").unwrap();
        let forged = proto::encode(&evil, &msg(&a, &b, 5, &now, Body::Hello { adopted: true, ask: true })).unwrap();
        for i in 0..10_000u64 {
            b.handle_datagram(&now.after(Duration::from_micros(i)), a.cfg.listen, &forged);
        }
        assert_eq!(b.counters.overlay_auth_failed, 10_000);
        assert_eq!(b.counters.log_lines_suppressed, 10_000 - u64::from(LOG_LINES));
        // A new window logs again.
        b.handle_datagram(&now.after(LOG_WINDOW), a.cfg.listen, &forged);
        assert_eq!(b.counters.log_lines_suppressed, 10_000 - u64::from(LOG_LINES));
        let _ = &mut a;
    }
    /// Config of router `name` ("A", "B" or "C", sites 10.1.0/24, 10.1.1/24, 10.1.2/24) in a
    /// three-router mesh.
    fn mesh_config(name: &str, extra: &str) -> Config {
        let all = [("A", 0u8), ("B", 1), ("C", 2)];
        let i = all.iter().position(|(n, _)| *n == name).unwrap() as u8;
        let mut t = format!(
            "site = \"{name}\"\nlan_interface = \"lan0\"\nrouter_mac = \"02:00:0a:01:0{i}:fe\"\n\
             router_ip = \"10.1.{i}.254\"\nlisten = \"192.168.100.{}:7800\"\n\
             key = \"shrink-demo-key-change-me-0123456789\"\nlndt = [\"10.1.{i}.0/24\"]\n",
            i + 1
        );
        for (n, j) in all {
            if n != name {
                t += &format!("[[peers]]\nname = \"{n}\"\naddress = \"192.168.100.{}:7800\"\n", j + 1);
            }
        }
        for (n, j) in all {
            t += &format!("[[gndt]]\nnetwork = \"10.1.{j}.0/24\"\nrouter = \"{n}\"\n");
        }
        Config::parse(&format!("{t}{extra}"), Path::new("mesh")).unwrap()
    }

    /// Deliver datagrams among `rs` until quiet, dropping those `drop(from, to)` says are
    /// lost; returns each router's injected frames.
    fn pump_mesh(now: &Now, rs: &mut [&mut Router], drop: &dyn Fn(&str, &str) -> bool) -> Vec<Vec<Vec<u8>>> {
        let mut frames_out = vec![Vec::new(); rs.len()];
        for _ in 0..30 {
            let mut moved = false;
            for i in 0..rs.len() {
                let from = rs[i].cfg.listen;
                let from_name = rs[i].cfg.site.clone();
                for act in rs[i].take_actions() {
                    match act {
                        Action::Inject(f) => frames_out[i].push(f),
                        Action::Send(to, d) => {
                            if let Some(j) = rs.iter().position(|r| r.cfg.listen == to) {
                                if !drop(&from_name, &rs[j].cfg.site.clone()) {
                                    rs[j].handle_datagram(now, from, &d);
                                    moved = true;
                                }
                            }
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
        frames_out
    }

    #[test]
    fn with_three_routers_a_restarted_destination_repairs_a_peer_that_missed_its_host_route() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let [mut a, mut b, mut c] = ["A", "B", "C"].map(|n| Router::new(mesh_config(n, NO_PROBE), now).unwrap());
        for r in [&mut a, &mut b, &mut c] {
            r.handle_timers(&now);
        }
        pump_mesh(&now, &mut [&mut a, &mut b, &mut c], &|_, _| false);
        learn(&mut a, &now, VM_MAC, "10.1.0.10", "10.1.0.1");
        // The VM moves to B; B's messages to A are lost; B dies before retransmitting.
        let t1 = now.after(Duration::from_millis(10));
        b.handle_frame(&t1, &frames::garp_request(VM_MAC, vm));
        pump_mesh(&t1, &mut [&mut a, &mut b, &mut c], &|f, t| f == "B" && t == "A");
        assert_eq!(c.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        assert!(a.gndt.host_route(vm).is_none() && a.lndt.contains(vm));
        // B restarts; its sync from A has nothing, C's tells it it serves the VM.
        let t2 = t1.after(Duration::from_secs(2));
        let mut b2 = restart(&b, t2);
        pump_mesh(&t2, &mut [&mut a, &mut b2, &mut c], &|_, _| false);
        assert!(b2.lndt.contains(vm));
        let seq = b2.gndt.host_seq(vm);
        for r in [&a, &c] {
            assert_eq!(
                r.gndt.host_route(vm).map(|r| (r.router.clone(), r.seq)),
                Some(("B".into(), seq)),
                "{}",
                r.cfg.site
            );
        }
        assert!(!a.lndt.contains(vm), "A handed the VM over");
    }

    #[test]
    fn a_vm_that_came_home_while_its_gateway_was_down_is_claimed_back() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers_knowing_the_vm(now);
        let t1 = now.after(Duration::from_millis(10));
        let seq1 = move_to_b(&t1, &mut a, &mut b);
        // Back to A: A's host route to B is lost, and A is killed.
        let t2 = t1.after(Duration::from_secs(1));
        a.handle_frame(&t2, &frames::qemu_rarp(VM_MAC));
        let _ = sent(&mut a);
        assert_eq!(b.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        // A restarts; B's sync says the VM is at B (the older move); A asks its LAN.
        let t3 = t2.after(Duration::from_secs(1));
        let mut a2 = restart(&a, t3);
        let (fa, _) = pump(&t3, &mut a2, &mut b);
        let asked = arps(&fa).iter().any(|x| x.op == OP_REQUEST && x.tpa == vm && x.sha == RA);
        assert!(asked, "A asked its LAN for the IP it handed over on the peer's word");
        // The VM answers from LAN A.
        let t4 = t3.after(Duration::from_millis(1));
        a2.handle_frame(&t4, &frames::arp_reply(VM_MAC, vm, RA, ip("10.1.0.254")));
        let t5 = t4.after(CLAIM_SETTLE);
        a2.handle_timers(&t5);
        pump(&t5, &mut a2, &mut b);
        let route = b.gndt.host_route(vm).unwrap();
        assert_eq!(route.router, "A");
        assert!(route.seq > seq1);
        assert!(a2.lndt.contains(vm) && !b.lndt.contains(vm));
    }

    #[test]
    fn a_former_owner_that_restarted_sends_its_lan_hosts_after_its_sweep() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        learn(&mut a, &now, A1_MAC, "10.1.0.1", "10.1.0.10");
        pump(&now, &mut a, &mut b);
        // A is down; the VM appears at B (its gratuitous ARP); the host route to A is lost.
        let t1 = now.after(Duration::from_millis(10));
        b.handle_frame(&t1, &frames::garp_request(VM_MAC, vm));
        let _ = sent(&mut b);
        // A restarts with probing; it hands the VM over before it knows A1 again.
        let t2 = t1.after(Duration::from_secs(1));
        let mut a2 = Router::new(config('A', ""), t2).unwrap();
        a2.handle_timers(&t2);
        pump(&t2, &mut a2, &mut b);
        assert_eq!(a2.gndt.host_route(vm).map(|r| r.router.as_str()), Some("B"));
        // A1 answers A's sweep; once the sweep is done, A sends B its hosts and B tells the
        // VM that A1 is behind B.
        a2.handle_frame(&t2, &frames::arp_reply(A1_MAC, ip("10.1.0.1"), RA, ip("10.1.0.254")));
        let mut to_vm = Vec::new();
        let mut t = t2;
        for _ in 0..150 {
            t = t.after(Duration::from_millis(10));
            a2.handle_timers(&t);
            b.handle_timers(&t);
            let (_, fb) = pump(&t, &mut a2, &mut b);
            to_vm.extend(
                arps(&fb).into_iter().filter(|x| x.eth_dst == VM_MAC && x.spa == ip("10.1.0.1") && x.sha == RB),
            );
        }
        assert_eq!(b.counters.late_host_reports, 1, "{:?}", b.counters);
        assert!(!to_vm.is_empty(), "B told the VM that A1 is at B's MAC");
    }

    #[test]
    fn sequence_numbers_from_the_future_are_refused() {
        let vm = ip("10.1.0.10");
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        let far = proto::encode(
            &b.auth,
            &msg(&b, &a, 1_000, &now, Body::HostRoute { ip: vm, seq: u64::MAX, mac: VM_MAC, owner: "B".into() }),
        )
        .unwrap();
        a.handle_datagram(&now, b.cfg.listen, &far);
        assert_eq!(a.counters.route_updates_rejected, 1);
        assert!(a.gndt.host_route(vm).is_none());
        let sync = proto::encode(
            &b.auth,
            &msg(
                &b,
                &a,
                1_001,
                &now,
                Body::RouteSync {
                    batch: 1,
                    routes: vec![SyncRoute { ip: vm, seq: u64::MAX, mac: VM_MAC, owner: "B".into() }],
                },
            ),
        )
        .unwrap();
        a.handle_datagram(&now, b.cfg.listen, &sync);
        assert_eq!(a.counters.route_updates_rejected, 2);
        // A move here still works (no overflow).
        a.handle_frame(&now, &frames::qemu_rarp(VM_MAC));
        let _ = &mut b;
    }

    #[test]
    fn a_boot_whose_clock_went_back_is_heard_when_its_epoch_follows_the_last_one() {
        let now = Now::current();
        let (mut a, mut b) = routers(now);
        // A restarts with its clock 5 s behind: an epoch below the one B knows is refused…
        let back = Now { mono: now.mono + Duration::from_secs(1), wall_us: now.wall_us - 5_000_000 };
        let mut behind = Router::new(a.cfg.clone(), back).unwrap();
        behind.handle_timers(&back);
        pump(&back, &mut behind, &mut b);
        assert!(b.counters.overlay_old_epoch > 0);
        assert!(!behind.peers[0].knows_us);
        // …one that follows the last (vnetd's state file) opens the session.
        let mut a2 = Router::with_epoch(a.cfg.clone(), back, a.epoch + 1).unwrap();
        a2.handle_timers(&back);
        pump(&back, &mut a2, &mut b);
        assert!(a2.peers[0].knows_us && b.peers[0].epoch == a.epoch + 1);
        let _ = &mut a;
    }
}
