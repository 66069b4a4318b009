//! The event loop: one `mio` poll over the pcap capture fd, the overlay UDP socket, the
//! control socket and the router's timers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{UdpSocket, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::router::{Action, Now, Router, RouterError};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open LAN interface '{iface}' for capture: {err}{hint}")]
    PcapOpen { iface: String, err: pcap::Error, hint: &'static str },
    #[error("pcap setup on '{iface}' failed ({what}): {err}")]
    PcapSetup { iface: String, what: &'static str, err: pcap::Error },
    #[error("capture on '{iface}' failed: {err} (interface removed or down?)")]
    PcapRead { iface: String, err: pcap::Error },
    #[error("cannot write pcap file {path}: {err}")]
    PcapOut { path: PathBuf, err: pcap::Error },
    #[error("cannot bind overlay socket {addr}: {err}{}", if err.kind() == std::io::ErrorKind::AddrInUse {
        " (is another vnetd running?)"
    } else {
        ""
    })]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("cannot create control socket {path}: {err}")]
    Control { path: PathBuf, err: std::io::Error },
    #[error(
        "another vnetd is running: it answers on control socket {path} (stop it first, or give this \
         one another control_socket)"
    )]
    AlreadyRunning { path: PathBuf },
    #[error("state file {path}: {msg}")]
    State { path: PathBuf, msg: String },
    #[error("cannot take SIGTERM/SIGINT/SIGHUP through a signalfd: {0}")]
    Signals(nix::Error),
    #[error(
        "the kernel forwards IPv4 on this gateway ({path} = 1): it would route the same \
         packets as vnetd. Run `sysctl -w net.ipv4.ip_forward=0` (or pass --allow-kernel-forwarding)"
    )]
    KernelForwarding { path: String },
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Router(#[from] RouterError),
}

/// How to run the daemon.
pub struct Options {
    pub config: Config,
    pub pcap_out: Option<PathBuf>,
    pub allow_kernel_forwarding: bool,
}

const CAPTURE: Token = Token(0);
const OVERLAY: Token = Token(1);
const CONTROL: Token = Token(2);
const SIGNALS: Token = Token(3);
const FIRST_CONN: usize = 16;

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    written: usize,
}

#[derive(Default, serde::Serialize)]
struct DaemonCounters {
    inject_errors: u64,
    overlay_send_errors: u64,
    pcap_received: u64,
    pcap_dropped: u64,
    pcap_if_dropped: u64,
    pcap_out_frames: u64,
    /// Frames written to the pcap file with the previous frame's timestamp, because their
    /// own was earlier (a captured frame read after a frame vnetd injected).
    pcap_out_ts_clamped: u64,
    /// Frames longer than the capture's snapshot length (GRO/GSO super-packets): not
    /// forwardable, dropped.
    frames_truncated: u64,
    /// Tunnel datagrams the kernel dropped because the overlay socket was full.
    overlay_rx_dropped: u64,
}

/// Refuse to run when the kernel would forward the packets vnetd routes.
pub fn check_forwarding(iface: &str) -> Result<(), DaemonError> {
    for path in ["/proc/sys/net/ipv4/ip_forward".to_string(), format!("/proc/sys/net/ipv4/conf/{iface}/forwarding")] {
        if let Ok(v) = std::fs::read_to_string(&path) {
            if v.trim() == "1" {
                return Err(DaemonError::KernelForwarding { path });
            }
        }
    }
    Ok(())
}

/// A pcap header timestamp (microsecond precision, see [`open_capture`]) in µs since the
/// epoch; 0 if it is before the epoch.
fn timeval_us(ts: &libc::timeval) -> u64 {
    match (u64::try_from(ts.tv_sec), u64::try_from(ts.tv_usec)) {
        (Ok(s), Ok(us)) => s * 1_000_000 + us,
        _ => 0,
    }
}

/// `hdr` with a timestamp no earlier than `last` (µs, updated); counts a clamp in `clamped`.
fn monotonic(hdr: &pcap::PacketHeader, last: &mut u64, clamped: &mut u64) -> pcap::PacketHeader {
    let mut h = *hdr;
    let us = timeval_us(&hdr.ts);
    if us < *last {
        *clamped += 1;
        h.ts = libc::timeval {
            tv_sec: (*last / 1_000_000) as libc::time_t,
            tv_usec: (*last % 1_000_000) as libc::suseconds_t,
        };
    } else {
        *last = us;
    }
    h
}

fn timeval_now() -> libc::timeval {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t }
}

/// MTU of `iface` (SIOCGIFMTU), if the interface exists.
fn iface_mtu(iface: &str) -> Option<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `fd` is an open socket and `req` a live ifreq with a NUL-terminated name
    // (the name is shorter than IFNAMSIZ and the struct was zeroed).
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFMTU as _, &mut req as *mut libc::ifreq) };
    // SAFETY: `fd` is ours and closed exactly once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).ok().filter(|m| *m > 0)
}

/// Largest frame vnetd captures: the LAN MTU plus an Ethernet header with a VLAN tag.
/// vnetd can only forward packets that fit the LAN MTU; a larger frame (a GRO/GSO
/// super-packet) arrives truncated and is dropped and counted.
fn capture_snaplen(iface: &str) -> u32 {
    match iface_mtu(iface) {
        Some(mtu) => (mtu + 18).clamp(1518, 65535),
        None => 65535,
    }
}

/// Frames the capture ring must hold while vnetd gets no CPU (a loaded gateway): at
/// 1 kHz of traffic, seconds of stall.
const RING_FRAMES: u32 = 4096;
/// Ring buffer bounds (bytes).
const RING_MIN_BYTES: u32 = 8 << 20;
const RING_MAX_BYTES: u32 = 64 << 20;

/// Capture ring size for frames of up to `snaplen` bytes.
///
/// libpcap's Linux capture (TPACKET_V2 in immediate mode) cuts the buffer into fixed
/// slots, one frame each, sized for the snapshot length (plus ~100 bytes of headers).
/// With a snapshot length of 64 KiB an 8 MiB buffer held only 128 frames: a forwarder
/// that lost the CPU for ~130 ms dropped every further packet (`pcap_dropped`). Sizing
/// the buffer in frames of the LAN's MTU keeps thousands of packets queued instead.
fn ring_bytes(snaplen: u32) -> u32 {
    let slot = snaplen + 128;
    slot.saturating_mul(RING_FRAMES).clamp(RING_MIN_BYTES, RING_MAX_BYTES)
}

fn open_capture(cfg: &Config) -> Result<(pcap::Capture<pcap::Active>, u32), DaemonError> {
    let iface = cfg.lan_interface.clone();
    let snaplen = capture_snaplen(&iface);
    let ring = ring_bytes(snaplen);
    // Host timestamps in microseconds: on Linux the kernel's software timestamp of the
    // frame (CLOCK_REALTIME), the clock of `SystemTime::now()`, so the router can time a
    // migration from the capture of its first frame (`Router::handle_captured`).
    let cap = pcap::Capture::from_device(iface.as_str())
        .and_then(|c| {
            c.promisc(true)
                .immediate_mode(true)
                .snaplen(snaplen as i32)
                .buffer_size(ring as i32)
                .tstamp_type(pcap::TimestampType::Host)
                .precision(pcap::Precision::Micro)
                .open()
        })
        .map_err(|err| {
            let s = err.to_string();
            let hint = if s.contains("ermission") || s.contains("not permitted") {
                " (run as root or grant CAP_NET_RAW,CAP_NET_ADMIN)"
            } else if s.contains("No such device") || s.contains("doesn't exist") {
                " (no such interface in this network namespace)"
            } else {
                ""
            };
            DaemonError::PcapOpen { iface: iface.clone(), err, hint }
        })?;
    info!(iface = %iface, snaplen, ring_bytes = ring, ring_frames_approx = ring / (snaplen + 128),
          "capture ring");
    let mut cap = cap.setnonblock().map_err(|err| DaemonError::PcapSetup {
        iface: iface.clone(),
        what: "non-blocking mode",
        err,
    })?;
    // ARP, RARP and every IPv4 frame the LAN delivers to this port: what is sent to the
    // router's MAC is routed, the rest only teaches the HWDT (and reveals moved VMs).
    let filter = "arp or rarp or ip".to_string();
    cap.filter(&filter, true).map_err(|err| DaemonError::PcapSetup {
        iface: iface.clone(),
        what: "BPF filter",
        err,
    })?;
    // Frames we inject (and the kernel's own) are not captured back.
    cap.direction(pcap::Direction::In).map_err(|err| DaemonError::PcapSetup { iface, what: "direction", err })?;
    Ok((cap, snaplen))
}

fn setsockopt_int(sock: &UdpSocket, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> bool {
    // SAFETY: the fd is a valid open socket owned by `sock` for the whole call, and the
    // value points to a live c_int whose size is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

fn getsockopt_int(sock: &UdpSocket, level: libc::c_int, opt: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd; `val`/`len` are live and describe a c_int-sized buffer.
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), level, opt, (&mut val as *mut libc::c_int).cast(), &mut len) };
    (rc == 0).then_some(val)
}

/// Datagrams the kernel dropped on the overlay socket because its receive buffer was
/// full (SO_MEMINFO, SK_MEMINFO_DROPS).
fn socket_drops(sock: &UdpSocket) -> Option<u64> {
    let mut mem = [0u32; 16];
    let mut len = std::mem::size_of_val(&mem) as libc::socklen_t;
    // SAFETY: valid fd; `mem`/`len` describe a live buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MEMINFO, mem.as_mut_ptr().cast(), &mut len)
    };
    let i = libc::SK_MEMINFO_DROPS as usize;
    (rc == 0 && (len as usize) > i * 4).then(|| u64::from(mem[i]))
}

/// Overlay socket buffers: the tunnel must absorb bursts while vnetd is descheduled.
const OVERLAY_BUF: libc::c_int = 8 << 20;

/// No path-MTU discovery (the kernel fragments oversized tunnel datagrams) and large
/// buffers. SO_RCVBUFFORCE/SO_SNDBUFFORCE (vnetd has CAP_NET_ADMIN) are not capped by
/// `net.core.rmem_max`/`wmem_max` (often 208 KiB, a few hundred tunnel datagrams);
/// without the capability the plain options give what the sysctls allow.
fn tune_overlay_socket(sock: &UdpSocket) {
    if !setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT) {
        warn!(error = %std::io::Error::last_os_error(), "IP_MTU_DISCOVER on overlay socket failed");
    }
    for (force, plain, name) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "SO_RCVBUF"), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "SO_SNDBUF")]
    {
        if !setsockopt_int(sock, libc::SOL_SOCKET, force, OVERLAY_BUF)
            && !setsockopt_int(sock, libc::SOL_SOCKET, plain, OVERLAY_BUF)
        {
            warn!(opt = name, error = %std::io::Error::last_os_error(),
                  "setsockopt on overlay socket failed");
        }
    }
    info!(
        rcvbuf = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUF),
        sndbuf = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF),
        "overlay socket buffers"
    );
}

/// Run until a fatal error.
pub fn run(opts: Options) -> Result<(), DaemonError> {
    Daemon::start(opts)?.event_loop()
}

/// Opens the pcap file that logs every captured and injected frame: appends to the file of
/// an earlier run (a restart keeps the history), creates it otherwise.
fn open_savefile(path: &Path) -> Result<pcap::Savefile, DaemonError> {
    let err = |err| DaemonError::PcapOut { path: path.to_path_buf(), err };
    if path.to_str().is_none() {
        return Err(err(pcap::Error::PcapError("the path is not UTF-8".into())));
    }
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(err)?;
    if path.exists() {
        dead.savefile_append(path).map_err(err)
    } else {
        dead.savefile(path).map_err(err)
    }
}

/// This boot's epoch: the time now in µs, or one more than the epoch recorded in
/// `state_file` by the previous boot if the clock is behind it (set back); recorded there
/// before the router sends anything. Peers refuse messages from an epoch older than one
/// they know, so without this a gateway whose clock went back across a restart would be
/// cut off until its clock passed its previous boot's start.
pub fn boot_epoch(state_file: Option<&Path>, now_us: u64) -> Result<u64, DaemonError> {
    let Some(path) = state_file else {
        return Ok(now_us.max(1));
    };
    let err = |msg: String| DaemonError::State { path: path.to_path_buf(), msg };
    let last = match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| err(format!("'{}' is not an epoch (µs); remove the file to start afresh", text.trim())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(err(format!("cannot read it: {e}"))),
    };
    let epoch = now_us.max(last.saturating_add(1)).max(1);
    if epoch != now_us {
        warn!(
            epoch,
            clock_us = now_us,
            previous = last,
            "the clock is behind the previous boot's epoch (set back?): this boot's epoch follows the previous one"
        );
    }
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{epoch}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| err(format!("cannot record this boot's epoch: {e}")))?;
    Ok(epoch)
}

/// The control socket; its file is removed when it is dropped (exit, SIGTERM, a failed start).
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// SIGTERM, SIGINT and SIGHUP, blocked and read from a signalfd in the event loop (vnetd is
/// single-threaded, so blocking them here blocks them for the whole process).
fn signal_fd() -> Result<SignalFd, DaemonError> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block().map_err(DaemonError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(DaemonError::Signals)
}

/// Binds and tunes the overlay (router-to-router) UDP socket.
fn bind_overlay(addr: SocketAddr) -> Result<UdpSocket, DaemonError> {
    let udp = UdpSocket::bind(addr).map_err(|err| DaemonError::Bind { addr, err })?;
    tune_overlay_socket(&udp);
    Ok(udp)
}

/// Binds the control socket. A socket file that a running vnetd answers on is refused (two
/// routers on one gateway would fight over the LAN); one left by a run that was killed is
/// replaced.
fn bind_control(path: &Path) -> Result<ControlSocket, DaemonError> {
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning { path: path.to_path_buf() });
        }
        info!(path = %path.display(), "replacing the stale control socket of an earlier run");
        std::fs::remove_file(path).map_err(|err| DaemonError::Control { path: path.to_path_buf(), err })?;
    }
    let listener = UnixListener::bind(path).map_err(|err| DaemonError::Control { path: path.to_path_buf(), err })?;
    Ok(ControlSocket { listener, path: path.to_path_buf() })
}

/// A poll over the capture, the overlay socket and the control socket (if any).
fn register_sources(
    cap: &pcap::Capture<pcap::Active>,
    udp: &mut UdpSocket,
    control: Option<&mut UnixListener>,
    signals: &SignalFd,
) -> Result<Poll, DaemonError> {
    let poll = Poll::new()?;
    let cap_fd = cap.as_raw_fd();
    poll.registry().register(&mut SourceFd(&cap_fd), CAPTURE, Interest::READABLE)?;
    let sig_fd = signals.as_raw_fd();
    poll.registry().register(&mut SourceFd(&sig_fd), SIGNALS, Interest::READABLE)?;
    poll.registry().register(udp, OVERLAY, Interest::READABLE)?;
    if let Some(l) = control {
        poll.registry().register(l, CONTROL, Interest::READABLE)?;
    }
    Ok(poll)
}

/// Whether a burst of `count` failures of one kind is logged: the first ones, then one in 1000.
fn log_failure(count: u64) -> bool {
    count < 10 || count.is_multiple_of(1000)
}

impl DaemonCounters {
    /// Takes the capture's and the overlay socket's kernel counters (for a status reply).
    fn refresh(&mut self, cap: &mut pcap::Capture<pcap::Active>, udp: &UdpSocket) {
        if let Ok(st) = cap.stats() {
            self.pcap_received = u64::from(st.received);
            self.pcap_dropped = u64::from(st.dropped);
            self.pcap_if_dropped = u64::from(st.if_dropped);
        }
        if let Some(d) = socket_drops(udp) {
            self.overlay_rx_dropped = d;
        }
    }
}

/// How reading a control connection's request stopped.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// Nothing more to read for now.
    WouldBlock,
    /// The client finished sending (or sent more than a request may hold).
    Eof,
    /// The connection failed.
    Failed,
}

/// Largest control request; beyond it the request is taken as complete.
const MAX_CONTROL_REQUEST: usize = 65536;

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn { stream, inbuf: Vec::new(), outbuf: Vec::new(), written: 0 }
    }

    /// Reads what the client sent into `inbuf`, until the socket would block, EOF or an error.
    fn read_request(&mut self) -> ReadEnd {
        let mut tmp = [0u8; 4096];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return ReadEnd::Eof,
                Ok(n) => {
                    self.inbuf.extend_from_slice(&tmp[..n]);
                    if self.inbuf.len() > MAX_CONTROL_REQUEST {
                        return ReadEnd::Eof;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return ReadEnd::WouldBlock,
                Err(_) => return ReadEnd::Failed,
            }
        }
    }

    /// Writes what is left of the response; `true` when the connection is done (all written, or
    /// failed).
    fn write_response(&mut self) -> bool {
        loop {
            match self.stream.write(&self.outbuf[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    if self.written >= self.outbuf.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }
}

/// The running daemon: what the event loop works on.
///
/// The fields drop in the order the former single function's locals did: control connections,
/// the router, the poll, the control socket, the overlay socket, the pcap file, the capture.
struct Daemon {
    /// Overlay datagram receive buffer.
    buf: Vec<u8>,
    conns: HashMap<Token, Conn>,
    next_conn: usize,
    dc: DaemonCounters,
    router: Router,
    poll: Poll,
    signals: SignalFd,
    control: Option<ControlSocket>,
    udp: UdpSocket,
    savefile: Option<pcap::Savefile>,
    cap: pcap::Capture<pcap::Active>,
    snaplen: u32,
    cfg: Config,
    pcap_out: Option<PathBuf>,
    /// Timestamp of the last frame written to the pcap file (µs).
    last_pcap_us: u64,
}

impl Daemon {
    /// Checks the host, opens the capture, the pcap file and the sockets, and creates the router.
    fn start(opts: Options) -> Result<Daemon, DaemonError> {
        let Options { config: cfg, pcap_out, allow_kernel_forwarding } = opts;
        if !allow_kernel_forwarding {
            check_forwarding(&cfg.lan_interface)?;
        }
        // The control socket first: a second vnetd stops here, before it touches the LAN,
        // the pcap file or the overlay port of the running one.
        let mut control = cfg.control_socket.as_deref().map(bind_control).transpose()?;
        let signals = signal_fd()?;
        let (cap, snaplen) = open_capture(&cfg)?;
        let savefile = pcap_out.as_deref().map(open_savefile).transpose()?;
        let mut udp = bind_overlay(cfg.listen)?;
        let poll = register_sources(&cap, &mut udp, control.as_mut().map(|c| &mut c.listener), &signals)?;
        let now = Now::current();
        let epoch = boot_epoch(cfg.state_file.as_deref(), now.wall_us)?;
        let router = Router::with_epoch(cfg.clone(), now, epoch)?;
        info!(
            site = %cfg.site, iface = %cfg.lan_interface, mac = %cfg.router_mac, ip = %cfg.router_ip,
            listen = %cfg.listen, peers = cfg.peers.len(),
            control = ?cfg.control_socket, pcap_out = ?pcap_out,
            "vnetd started"
        );
        Ok(Daemon {
            buf: vec![0u8; 65536],
            conns: HashMap::new(),
            next_conn: FIRST_CONN,
            dc: DaemonCounters::default(),
            router,
            poll,
            signals,
            control,
            udp,
            savefile,
            cap,
            snaplen,
            cfg,
            pcap_out,
            last_pcap_us: 0,
        })
    }

    /// Polls and dispatches until a fatal error or SIGTERM/SIGINT/SIGHUP (then returns Ok;
    /// dropping the daemon removes the control socket file).
    fn event_loop(mut self) -> Result<(), DaemonError> {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .router
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()) + Duration::from_micros(200));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => {
                        if let Ok(Some(info)) = self.signals.read_signal() {
                            let name = Signal::try_from(info.ssi_signo as i32).map(|s| s.as_str()).unwrap_or("?");
                            info!(signal = name, "vnetd stopping");
                            if let Some(sf) = self.savefile.as_mut() {
                                let _ = sf.flush();
                            }
                            return Ok(());
                        }
                    }
                    CAPTURE => self.drain_capture()?,
                    OVERLAY => self.drain_overlay(),
                    CONTROL => self.accept_control(),
                    t => self.serve_control(t),
                }
            }
            self.periodic();
        }
    }

    /// Work after every poll: the router's timers, and a flush of the pcap file.
    fn periodic(&mut self) {
        self.router.handle_timers(&Now::current());
        self.flush_actions();
        // One flush per loop iteration keeps the pcap file current without a write
        // per frame.
        if let Some(sf) = self.savefile.as_mut() {
            let _ = sf.flush();
        }
    }

    /// Executes the router's actions: inject frames (and log them to the pcap file),
    /// send datagrams.
    fn flush_actions(&mut self) {
        for act in self.router.take_actions() {
            match act {
                Action::Inject(frame) => self.inject(&frame),
                Action::Send(to, bytes) => self.send(to, &bytes),
            }
        }
    }

    fn inject(&mut self, frame: &[u8]) {
        if let Err(e) = self.cap.sendpacket(frame) {
            self.dc.inject_errors += 1;
            if log_failure(self.dc.inject_errors) {
                warn!(error = %e, count = self.dc.inject_errors, "frame injection failed");
            }
        }
        let hdr = pcap::PacketHeader { ts: timeval_now(), caplen: frame.len() as u32, len: frame.len() as u32 };
        self.save(&hdr, frame);
    }

    /// Writes a frame to the pcap file, never with a timestamp earlier than the previous
    /// frame's (readers expect capture order to be time order).
    fn save(&mut self, hdr: &pcap::PacketHeader, data: &[u8]) {
        let Some(sf) = self.savefile.as_mut() else {
            return;
        };
        let hdr = monotonic(hdr, &mut self.last_pcap_us, &mut self.dc.pcap_out_ts_clamped);
        sf.write(&pcap::Packet::new(&hdr, data));
        self.dc.pcap_out_frames += 1;
    }

    fn send(&mut self, to: SocketAddr, bytes: &[u8]) {
        if let Err(e) = self.udp.send_to(bytes, to) {
            self.dc.overlay_send_errors += 1;
            if log_failure(self.dc.overlay_send_errors) {
                warn!(%to, error = %e, count = self.dc.overlay_send_errors,
                      "overlay send failed");
            }
        }
    }

    /// Hands every captured frame to the router. Edge-triggered: drains until the capture is
    /// empty. A capture error is fatal.
    fn drain_capture(&mut self) -> Result<(), DaemonError> {
        loop {
            let res = match self.cap.next_packet() {
                Ok(p) => {
                    let now = Now::current();
                    let (hdr, data) = (*p.header, p.data);
                    if let Some(sf) = self.savefile.as_mut() {
                        let h = monotonic(&hdr, &mut self.last_pcap_us, &mut self.dc.pcap_out_ts_clamped);
                        sf.write(&pcap::Packet::new(&h, data));
                        self.dc.pcap_out_frames += 1;
                    }
                    if hdr.caplen < hdr.len {
                        // Cut at the snapshot length: forwarding it would send
                        // a corrupt packet.
                        self.dc.frames_truncated += 1;
                        if log_failure(self.dc.frames_truncated) {
                            warn!(
                                len = p.header.len,
                                snaplen = self.snaplen,
                                count = self.dc.frames_truncated,
                                "frame longer than the LAN MTU dropped (disable GRO/TSO \
                                   on the LAN interface)"
                            );
                        }
                    } else {
                        self.router.handle_captured(&now, timeval_us(&p.header.ts), p.data);
                    }
                    Ok(true)
                }
                Err(pcap::Error::TimeoutExpired) => Ok(false),
                Err(err) => Err(err),
            };
            match res {
                Ok(true) => self.flush_actions(),
                Ok(false) => return Ok(()),
                Err(err) => {
                    error!(error = %err, "capture failed");
                    return Err(DaemonError::PcapRead { iface: self.cfg.lan_interface.clone(), err });
                }
            }
        }
    }

    /// Hands every datagram from the peer routers to the router, until the socket is empty.
    fn drain_overlay(&mut self) {
        loop {
            match self.udp.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    self.router.handle_datagram(&Now::current(), from, &self.buf[..n]);
                    self.flush_actions();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors (peer not listening yet) surface here: not fatal.
                    warn!(error = %e, "overlay receive error");
                    break;
                }
            }
        }
    }

    /// Accepts the waiting control connections.
    fn accept_control(&mut self) {
        let Some(l) = self.control.as_mut().map(|c| &mut c.listener) else {
            return;
        };
        loop {
            match l.accept() {
                Ok((mut stream, _)) => {
                    let t = Token(self.next_conn);
                    self.next_conn += 1;
                    if self.poll.registry().register(&mut stream, t, Interest::READABLE | Interest::WRITABLE).is_ok() {
                        self.conns.insert(t, Conn::new(stream));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    break;
                }
            }
        }
    }

    /// Moves control connection `t` on: reads its request, answers it once complete, writes the
    /// answer and closes the connection once the answer is out (or the connection failed).
    fn serve_control(&mut self, t: Token) {
        let mut close = false;
        if let Some(c) = self.conns.get_mut(&t) {
            if c.outbuf.is_empty() {
                let end = c.read_request();
                close = end == ReadEnd::Failed;
                if !close && (end == ReadEnd::Eof || c.inbuf.contains(&b'\n')) {
                    self.dc.refresh(&mut self.cap, &self.udp);
                    let resp = control_response(&self.router, &self.dc, &self.pcap_out, &c.inbuf);
                    c.outbuf = resp.into_bytes();
                    c.outbuf.push(b'\n');
                }
            }
            if !c.outbuf.is_empty() && c.write_response() {
                close = true;
            }
        }
        if close {
            if let Some(mut c) = self.conns.remove(&t) {
                let _ = self.poll.registry().deregister(&mut c.stream);
            }
        }
    }
}

fn control_response(router: &Router, dc: &DaemonCounters, pcap_out: &Option<PathBuf>, req: &[u8]) -> String {
    let line = String::from_utf8_lossy(req);
    let line = line.lines().next().unwrap_or("").trim();
    let cmd = if line.is_empty() || line == "status" {
        "status".to_string()
    } else {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => v.get("cmd").and_then(|c| c.as_str()).unwrap_or("").to_string(),
            Err(_) => line.to_string(),
        }
    };
    match cmd.as_str() {
        "status" => {
            let mut v = router.status(&Now::current());
            v["daemon"] = serde_json::to_value(dc).unwrap_or_default();
            v["pcap_out"] = serde_json::json!(pcap_out);
            v.to_string()
        }
        other => {
            serde_json::json!({"error": format!("unknown command '{other}' (try {{\"cmd\":\"status\"}})")}).to_string()
        }
    }
}

/// Client side of `vnetd --status SOCKET`: the JSON status of a running vnetd.
pub fn query_status(path: &Path) -> Result<serde_json::Value, std::io::Error> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    serde_json::from_str(out.trim())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capture_ring_holds_thousands_of_lan_frames() {
        // Ethernet LAN: 8 MiB of ~1.6 KiB slots.
        assert_eq!(ring_bytes(1518), RING_MIN_BYTES);
        assert!(ring_bytes(1518) / (1518 + 128) >= RING_FRAMES);
        // Jumbo frames: grown to keep RING_FRAMES slots.
        assert!(ring_bytes(9018) / (9018 + 128) >= RING_FRAMES);
        // Unknown MTU (64 KiB snapshot): capped.
        assert_eq!(ring_bytes(65535), RING_MAX_BYTES);
        // No such interface: the full snapshot length.
        assert_eq!(capture_snaplen("no-such-if0"), 65535);
        assert_eq!(capture_snaplen("lo"), 65535);
    }

    #[test]
    fn a_boot_epoch_follows_the_previous_one_even_if_the_clock_went_back() {
        let dir = shrink_testutil::fs::TempDir::new("vnetd-epoch").unwrap();
        let f = dir.path().join("A.epoch");
        assert_eq!(boot_epoch(None, 5_000).unwrap(), 5_000);
        assert_eq!(boot_epoch(Some(&f), 5_000).unwrap(), 5_000);
        assert_eq!(std::fs::read_to_string(&f).unwrap().trim(), "5000");
        // The clock was set back 2 s: the next boot still orders above.
        assert_eq!(boot_epoch(Some(&f), 3_000).unwrap(), 5_001);
        assert_eq!(boot_epoch(Some(&f), 9_000).unwrap(), 9_000);
        std::fs::write(&f, "garbage").unwrap();
        let e = boot_epoch(Some(&f), 10_000).unwrap_err().to_string();
        assert!(e.contains("A.epoch") && e.contains("not an epoch"), "{e}");
        let e = boot_epoch(Some(&dir.path().join("no/such/dir/A.epoch")), 1).unwrap_err().to_string();
        assert!(e.contains("cannot record"), "{e}");
    }

    #[test]
    fn pcap_timestamps_never_run_backwards() {
        let at = |us: u64| pcap::PacketHeader {
            ts: libc::timeval {
                tv_sec: (us / 1_000_000) as libc::time_t,
                tv_usec: (us % 1_000_000) as libc::suseconds_t,
            },
            caplen: 60,
            len: 60,
        };
        let (mut last, mut clamped) = (0, 0);
        let out: Vec<u64> = [5_000_100, 5_000_300, 5_000_200, 6_000_000, 4_999_999]
            .iter()
            .map(|us| timeval_us(&monotonic(&at(*us), &mut last, &mut clamped).ts))
            .collect();
        assert_eq!(out, [5_000_100, 5_000_300, 5_000_300, 6_000_000, 6_000_000]);
        assert_eq!(clamped, 2);
    }

    #[test]
    fn a_second_vnetd_does_not_take_over_a_running_ones_control_socket() {
        let dir = shrink_testutil::fs::TempDir::new("vnetd-ctl").unwrap();
        let path = dir.path().join("c.sock");
        let first = bind_control(&path).unwrap();
        match bind_control(&path) {
            Err(DaemonError::AlreadyRunning { path: p }) => assert_eq!(p, path),
            other => panic!("second bind: {:?}", other.map(|_| ())),
        }
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "the first one still answers");
        drop(first);
        assert!(!path.exists(), "the socket file goes with its vnetd");
        // A file left by a vnetd that was killed is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let again = bind_control(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(again);
    }

    #[test]
    fn a_control_connection_reads_its_request_then_writes_the_reply() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let mut c = Conn::new(ours);
        assert_eq!(c.read_request(), ReadEnd::WouldBlock);
        client.write_all(b"status\n").unwrap();
        assert_eq!(c.read_request(), ReadEnd::WouldBlock);
        assert_eq!(c.inbuf, b"status\n");
        c.outbuf = b"{}\n".to_vec();
        assert!(c.write_response());
        assert_eq!(c.written, 3);
        let mut reply = [0u8; 3];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"{}\n");
        drop(client);
        assert_eq!(c.read_request(), ReadEnd::Eof);
    }
}
