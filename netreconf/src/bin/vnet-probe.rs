//! `vnet-probe`: traffic helpers for the vnetd tests and benchmark (run inside network
//! namespaces with `ip netns exec`): QEMU's RARP announcement, raw frames, UDP streams
//! with gap measurement, UDP round-trip times, TCP throughput, and a multi-target UDP
//! echo prober that counts the probes each VM loses while it migrates. Results are JSON
//! on stdout (or, for `probe --out`, in a file).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use netreconf::frames::{self, Mac};

#[derive(Parser)]
#[command(name = "vnet-probe", about = "traffic helpers for vnetd tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send QEMU's RARP self-announcement for MAC on IFACE in rounds at the given offsets
    /// (ms). As QEMU's announce timer (net/announce.c: 50 ms, then 100 ms longer each round),
    /// each round is armed when the previous one has been sent, so consecutive rounds are
    /// at least the difference of their offsets apart even when one is late.
    Rarp {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        mac: Mac,
        #[arg(long, value_delimiter = ',', default_values_t = frames::QEMU_ANNOUNCE_MS)]
        schedule_ms: Vec<u64>,
        /// Open the interface first, then wait until this file exists before the first
        /// round (so the announcement follows the "resume" without process start-up).
        #[arg(long)]
        wait_file: Option<PathBuf>,
    },
    /// Send raw Ethernet frames given in hex, each `repeat` times.
    Frames {
        #[arg(long)]
        iface: String,
        #[arg(long = "hex", required = true)]
        hex: Vec<String>,
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Send `count` RARPs from distinct made-up MACs as fast as possible.
    RarpFlood {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        count: u32,
    },
    /// Send one UDP datagram (hex payload) to ADDR.
    UdpHex {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long = "hex", required = true)]
        hex: Vec<String>,
        /// Send each datagram this many times (a flood).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Send a numbered UDP stream until STOP exists, then an end-of-stream marker (three
    /// copies) that tells `udp-recv` the stream is over.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// Receive a numbered UDP stream until its end-of-stream marker arrives or STOP exists;
    /// report gaps.
    UdpRecv {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// Echo UDP datagrams back until STOP exists.
    UdpEcho {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
    },
    /// Measure UDP round-trip times to a `udp-echo`.
    UdpRtt {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 500)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        interval_us: u64,
    },
    /// Accept TCP connections and discard what they send, until STOP exists.
    TcpSink {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
    },
    /// Send as much as possible over TCP for SECONDS and report the throughput.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Probe UDP echo services every INTERVAL_MS until STOP exists; report per-target
    /// loss, gaps and RTTs (loss counted from each target's first answered probe).
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// A UDP echo service to probe, as NAME=IP:PORT (repeatable).
    #[arg(long = "target", required = true)]
    targets: Vec<Target>,
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Stop sending once this file exists (SIGTERM/SIGINT do the same).
    #[arg(long)]
    stop_file: PathBuf,
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
    /// Write the JSON report here (atomically: temp file + rename) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
}

#[derive(Clone, Debug)]
struct Target {
    name: String,
    addr: SocketAddr,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = s.split_once('=').ok_or_else(|| format!("target '{s}' is not NAME=IP:PORT"))?;
        if name.is_empty() {
            return Err(format!("target '{s}' has an empty name"));
        }
        let addr = addr.parse().map_err(|e| format!("target '{s}': bad IP:PORT '{addr}': {e}"))?;
        Ok(Target { name: name.to_string(), addr })
    }
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
    if s.len() & 1 == 1 {
        return Err(format!("odd-length hex '{s}'"));
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex: {e}"))).collect()
}

fn open(iface: &str) -> Result<pcap::Capture<pcap::Active>, String> {
    pcap::Capture::from_device(iface)
        .and_then(|c| c.immediate_mode(true).snaplen(64).open())
        .map_err(|e| format!("cannot open {iface}: {e}"))
}

fn send(cap: &mut pcap::Capture<pcap::Active>, f: &[u8]) -> Result<(), String> {
    cap.sendpacket(f).map_err(|e| format!("send failed: {e}"))
}

fn stop(p: &Path) -> bool {
    p.exists()
}

/// Sequence number of `udp-send`'s end-of-stream marker; its next 8 bytes hold the number
/// of datagrams sent. Sent on the same socket after the last datagram, it arrives after
/// every datagram of the stream that arrives at all.
const END_OF_STREAM: u64 = u64::MAX;

/// Ask for an 8 MiB receive buffer (SO_RCVBUFFORCE as root, else up to `rmem_max`).
fn big_rcvbuf(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: valid fd owned by `s`; `v` is a live c_int whose size is passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Set by SIGTERM/SIGINT while `probe` runs: stop sending, drain, report.
static STOP_SIGNAL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNAL.store(true, Ordering::SeqCst);
}

fn catch_stop_signals() {
    let h = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, h);
        }
    }
}

const PROBE_MAGIC: &[u8; 4] = b"SHPR";
const PROBE_LEN: usize = 32;
/// Replies to probes sent within this long before sending stopped make up the tail.
const TAIL_NS: u64 = 2_000_000_000;
/// How long to keep receiving after sending stopped.
const DRAIN: Duration = Duration::from_secs(1);

fn probe_payload(idx: u16, seq: u64, send_ns: u64) -> [u8; PROBE_LEN] {
    let mut p = [0u8; PROBE_LEN];
    p[..4].copy_from_slice(PROBE_MAGIC);
    p[4..6].copy_from_slice(&idx.to_le_bytes());
    // p[6..8] reserved (zero)
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    p[16..24].copy_from_slice(&send_ns.to_le_bytes());
    p
}

/// (target index, sequence, send ns) of a well-formed probe reply.
fn parse_reply(b: &[u8]) -> Option<(usize, usize, u64)> {
    if b.len() < 24 || &b[..4] != PROBE_MAGIC {
        return None;
    }
    let idx = u16::from_le_bytes(b[4..6].try_into().ok()?) as usize;
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let send_ns = u64::from_le_bytes(b[16..24].try_into().ok()?);
    Some((idx, usize::try_from(seq).ok()?, send_ns))
}

/// Per-target record: one (send ns since start, RTT ns if answered) per probe, by sequence.
struct Track {
    probes: Vec<(u64, Option<u64>)>,
    send_errors: u64,
}

fn target_report(t: &Target, tr: &Track, start_unix_ns: u64, stop_ns: u64) -> serde_json::Value {
    let warmup = tr.probes.iter().position(|p| p.1.is_some()).unwrap_or(tr.probes.len());
    let counted = &tr.probes[warmup..];
    let received = counted.iter().filter(|p| p.1.is_some()).count();
    let (mut max_gap_ns, mut max_gap_start, mut over_100) = (0u64, None, 0u64);
    let mut note_gap = |from: u64, to: u64| {
        let g = to - from;
        if g > 100_000_000 {
            over_100 += 1;
        }
        if g > max_gap_ns {
            max_gap_ns = g;
            max_gap_start = Some(from);
        }
    };
    let mut last_answered: Option<u64> = None;
    for &(sent, rtt) in counted {
        if rtt.is_some() {
            if let Some(l) = last_answered {
                note_gap(l, sent);
            }
            last_answered = Some(sent);
        }
    }
    if let (Some(l), Some(&(last_sent, None))) = (last_answered, counted.last()) {
        note_gap(l, last_sent);
    }
    let mut rtts: Vec<u64> = counted.iter().filter_map(|p| p.1).collect();
    rtts.sort_unstable();
    let pct_us = |q: f64| -> u64 {
        if rtts.is_empty() {
            0
        } else {
            rtts[((rtts.len() - 1) as f64 * q).round() as usize] / 1000
        }
    };
    let tail_from = stop_ns.saturating_sub(TAIL_NS);
    let tail: Vec<_> = counted.iter().filter(|p| p.0 >= tail_from).collect();
    serde_json::json!({
        "name": t.name,
        "addr": t.addr.to_string(),
        "warmup": warmup,
        "sent": counted.len(),
        "received": received,
        "lost": counted.len() - received,
        "max_gap_ms": max_gap_ns as f64 / 1e6,
        "max_gap_start_unix_ms": max_gap_start.map_or(0, |s| (start_unix_ns + s) / 1_000_000),
        "gaps_over_100ms": over_100,
        "rtt_p50_us": pct_us(0.5),
        "rtt_p99_us": pct_us(0.99),
        "rtt_max_us": rtts.last().map_or(0, |r| r / 1000),
        "tail_sent": tail.len(),
        "tail_received": tail.iter().filter(|p| p.1.is_some()).count(),
        "answered": warmup < tr.probes.len(),
        "send_errors": tr.send_errors,
    })
}

/// Write `text` to `path` via a temp file in the same directory and a rename.
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let fname = path.file_name().ok_or_else(|| format!("--out {} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp{}", fname.to_string_lossy(), std::process::id()));
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("write {}: {e}", path.display()));
    }
    Ok(())
}

/// `probe`: returns the report, or `Null` once it is written to `--out`.
fn probe(a: ProbeArgs) -> Result<serde_json::Value, String> {
    if a.targets.len() > usize::from(u16::MAX) + 1 {
        return Err(format!("too many targets ({})", a.targets.len()));
    }
    let s = UdpSocket::bind(a.bind).map_err(|e| format!("bind {}: {e}", a.bind))?;
    big_rcvbuf(&s);
    catch_stop_signals();
    let iv = Duration::from_millis(a.interval_ms.max(1));
    let max = Duration::from_secs(a.max_seconds);
    let mut tracks: Vec<Track> =
        a.targets.iter().map(|_| Track { probes: Vec::with_capacity(1024), send_errors: 0 }).collect();
    let mut buf = [0u8; 2048];
    let t0 = Instant::now();
    let start_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let ns = |t: Instant| t.duration_since(t0).as_nanos() as u64;
    // Receive replies until `until`, recording RTTs of first answers to our probes.
    let mut receive_until = |tracks: &mut [Track], until: Instant| loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if s.set_read_timeout(Some(until - now)).is_err() {
            break;
        }
        let Ok((n, _)) = s.recv_from(&mut buf) else {
            continue; // timeout, EINTR or a reported ICMP error: re-check the deadline
        };
        let at = ns(Instant::now());
        if let Some((idx, seq, send_ns)) = parse_reply(&buf[..n]) {
            if let Some(p) = tracks.get_mut(idx).and_then(|t| t.probes.get_mut(seq)) {
                if p.0 == send_ns && p.1.is_none() {
                    p.1 = Some(at.saturating_sub(send_ns));
                }
            }
        }
    };
    eprintln!("probe: {} targets every {} ms", a.targets.len(), iv.as_millis());
    let mut tick: u32 = 0;
    let mut ticks_skipped: u64 = 0;
    let stop_at = loop {
        let now = Instant::now();
        if STOP_SIGNAL.load(Ordering::SeqCst) || stop(&a.stop_file) || now - t0 >= max {
            break now;
        }
        for (i, (t, tr)) in a.targets.iter().zip(tracks.iter_mut()).enumerate() {
            let send_ns = ns(Instant::now());
            let p = probe_payload(i as u16, tr.probes.len() as u64, send_ns);
            if s.send_to(&p, t.addr).is_err() {
                tr.send_errors += 1;
            }
            tr.probes.push((send_ns, None));
        }
        // Absolute schedule; if we fell behind by whole intervals, skip those ticks
        // rather than sending a burst.
        let behind = (Instant::now() - t0).as_nanos() / iv.as_nanos();
        let next = (u128::from(tick) + 1).max(behind);
        ticks_skipped += (next - u128::from(tick) - 1) as u64;
        tick = u32::try_from(next).map_err(|_| "probe ran too long".to_string())?;
        receive_until(&mut tracks, t0 + iv * tick);
    };
    receive_until(&mut tracks, stop_at + DRAIN);
    let stop_ns = ns(stop_at);
    let report = serde_json::json!({
        "interval_ms": iv.as_millis() as u64,
        "started_unix_ms": start_unix_ns / 1_000_000,
        "duration_ms": stop_ns / 1_000_000,
        "ticks_skipped": ticks_skipped,
        "targets": a.targets.iter().zip(&tracks)
            .map(|(t, tr)| target_report(t, tr, start_unix_ns, stop_ns))
            .collect::<Vec<_>>(),
    });
    match a.out {
        Some(out) => {
            write_atomically(&out, &format!("{report}\n"))?;
            Ok(serde_json::Value::Null)
        }
        None => Ok(report),
    }
}

fn run(cmd: Cmd) -> Result<serde_json::Value, String> {
    match cmd {
        Cmd::Probe(a) => probe(a),
        Cmd::Rarp { iface, mac, schedule_ms, wait_file } => {
            let mut cap = open(&iface)?;
            let f = frames::qemu_rarp(mac);
            if let Some(w) = wait_file {
                let t = Instant::now();
                while !w.exists() {
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(format!("{} never appeared", w.display()));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            if schedule_ms.windows(2).any(|w| w[1] < w[0]) {
                return Err(format!("--schedule-ms {schedule_ms:?} is not in increasing order"));
            }
            let mut sent = Vec::new();
            let mut prev: Option<(Instant, u64)> = None;
            for ms in schedule_ms {
                if let Some((fired, prev_ms)) = prev {
                    let at = fired + Duration::from_millis(ms - prev_ms);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                }
                send(&mut cap, &f)?;
                sent.push(netreconf::router::wall_us());
                prev = Some((Instant::now(), ms));
            }
            Ok(serde_json::json!({"sent_us": sent}))
        }
        Cmd::Frames { iface, hex, repeat } => {
            let mut cap = open(&iface)?;
            let frames: Vec<Vec<u8>> = hex.iter().map(|h| unhex(h)).collect::<Result<_, _>>()?;
            let mut n = 0;
            for _ in 0..repeat {
                for f in &frames {
                    send(&mut cap, f)?;
                    n += 1;
                }
            }
            Ok(serde_json::json!({"sent": n}))
        }
        Cmd::RarpFlood { iface, count } => {
            let mut cap = open(&iface)?;
            for i in 0..count {
                let m = Mac([0x02, 0xf1, 0x00, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
                send(&mut cap, &frames::qemu_rarp(m))?;
            }
            Ok(serde_json::json!({"sent": count}))
        }
        Cmd::UdpHex { to, hex, repeat } => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            let payloads = hex.iter().map(|h| unhex(h)).collect::<Result<Vec<_>, _>>()?;
            let mut sent = 0u64;
            for _ in 0..repeat {
                for p in &payloads {
                    s.send_to(p, to).map_err(|e| e.to_string())?;
                    sent += 1;
                }
            }
            Ok(serde_json::json!({"sent": sent}))
        }
        Cmd::UdpSend { to, interval_us, stop_file, max_seconds } => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            let iv = Duration::from_micros(interval_us.max(1));
            let mut seq: u64 = 0;
            let mut errors = 0u64;
            while !stop(&stop_file) && t0.elapsed() < Duration::from_secs(max_seconds) {
                let mut p = [0u8; 64];
                p[..8].copy_from_slice(&seq.to_be_bytes());
                p[8..16].copy_from_slice(&netreconf::router::wall_us().to_be_bytes());
                if s.send_to(&p, to).is_err() {
                    errors += 1;
                }
                seq += 1;
                let next = t0 + iv * seq as u32;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            let mut end = [0u8; 64];
            end[..8].copy_from_slice(&END_OF_STREAM.to_be_bytes());
            end[8..16].copy_from_slice(&seq.to_be_bytes());
            for _ in 0..3 {
                if s.send_to(&end, to).is_err() {
                    errors += 1;
                }
            }
            Ok(serde_json::json!({"sent": seq, "send_errors": errors, "interval_us": interval_us}))
        }
        Cmd::UdpRecv { bind, stop_file, max_seconds } => {
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(20))).map_err(|e| e.to_string())?;
            // The receiver measures the network, not its own scheduling: a roomy buffer
            // keeps what arrives while it waits for the CPU.
            big_rcvbuf(&s);
            let t0 = Instant::now();
            let mut buf = [0u8; 2048];
            let (mut received, mut dup) = (0u64, 0u64);
            let mut last: Option<(u64, u64)> = None; // (seq, arrival wall µs)
            let (mut max_gap_us, mut gap_end_us, mut gap_seqs) = (0u64, 0u64, 0u64);
            let mut first_seq = None;
            let mut max_seq = 0u64;
            let mut draining = false;
            let mut end_of_stream: Option<u64> = None;
            loop {
                if !draining && (stop(&stop_file) || t0.elapsed() >= Duration::from_secs(max_seconds)) {
                    // Count what already arrived but was not read yet, then stop.
                    draining = true;
                    s.set_nonblocking(true).map_err(|e| e.to_string())?;
                }
                match s.recv_from(&mut buf) {
                    Err(_) if draining => break, // WouldBlock: nothing left
                    Ok((n, _)) if n >= 16 => {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                        if seq == END_OF_STREAM {
                            // Everything the sender sent before it has arrived or is lost.
                            end_of_stream = Some(u64::from_be_bytes(buf[8..16].try_into().unwrap_or([0; 8])));
                            if !draining {
                                draining = true;
                                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                            }
                            continue;
                        }
                        let now = netreconf::router::wall_us();
                        received += 1;
                        first_seq.get_or_insert(seq);
                        if let Some((ls, lt)) = last {
                            if seq <= ls {
                                dup += 1;
                                continue;
                            }
                            if now - lt > max_gap_us {
                                max_gap_us = now - lt;
                                gap_end_us = now;
                                gap_seqs = seq - ls - 1;
                            }
                        }
                        max_seq = max_seq.max(seq);
                        last = Some((seq, now));
                    }
                    _ => {}
                }
            }
            let expected = first_seq.map(|f| max_seq - f + 1).unwrap_or(0);
            Ok(serde_json::json!({
                "received": received, "duplicates_or_reordered": dup,
                "first_seq": first_seq, "last_seq": last.map(|l| l.0),
                "lost": expected.saturating_sub(received - dup),
                "max_gap_ms": max_gap_us as f64 / 1000.0,
                "max_gap_end_us": gap_end_us,
                "max_gap_missing_datagrams": gap_seqs,
                "end_of_stream": end_of_stream.is_some(),
                "sender_sent": end_of_stream,
            }))
        }
        Cmd::UdpEcho { bind, stop_file } => {
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2048];
            let mut n_echo = 0u64;
            while !stop(&stop_file) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                    n_echo += 1;
                }
            }
            Ok(serde_json::json!({"echoed": n_echo}))
        }
        Cmd::UdpRtt { to, count, interval_us } => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
            let mut rtts = Vec::new();
            let mut buf = [0u8; 64];
            for i in 0..count {
                let p = (u64::from(i)).to_be_bytes();
                let t = Instant::now();
                s.send_to(&p, to).map_err(|e| e.to_string())?;
                loop {
                    match s.recv_from(&mut buf) {
                        Ok((8, _)) if buf[..8] == p => {
                            rtts.push(t.elapsed().as_secs_f64() * 1e6);
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_micros(interval_us));
            }
            rtts.sort_by(|a, b| a.total_cmp(b));
            let pct = |q: f64| -> Option<f64> {
                if rtts.is_empty() {
                    None
                } else {
                    Some(rtts[((rtts.len() - 1) as f64 * q).round() as usize])
                }
            };
            let avg = if rtts.is_empty() { None } else { Some(rtts.iter().sum::<f64>() / rtts.len() as f64) };
            Ok(serde_json::json!({
                "sent": count, "received": rtts.len(),
                "avg_us": avg, "min_us": pct(0.0), "p50_us": pct(0.5), "p99_us": pct(0.99),
            }))
        }
        Cmd::TcpSink { bind, stop_file } => {
            let l = TcpListener::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut total = 0u64;
            while !stop(&stop_file) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n) = c.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            Ok(serde_json::json!({"received_bytes": total}))
        }
        Cmd::TcpSend { to, seconds } => {
            let mut c =
                TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("connect {to}: {e}"))?;
            let buf = vec![0x5au8; 1 << 16];
            let t0 = Instant::now();
            let mut total = 0u64;
            while t0.elapsed().as_secs_f64() < seconds {
                match c.write(&buf) {
                    Ok(n) => total += n as u64,
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
            let el = t0.elapsed().as_secs_f64();
            Ok(serde_json::json!({
                "bytes": total, "seconds": el, "mbit_s": total as f64 * 8.0 / el / 1e6,
            }))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(v) => {
            if !v.is_null() {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vnet-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
