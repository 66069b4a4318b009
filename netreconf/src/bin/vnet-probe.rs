//! `vnet-probe`: traffic helpers for the vnetd tests and benchmark (run inside network
//! namespaces with `ip netns exec`): QEMU's RARP announcement, raw frames, UDP streams
//! with gap measurement, UDP round-trip times and TCP throughput. Results are JSON on
//! stdout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// Send QEMU's RARP self-announcement for MAC on IFACE at the given offsets (ms).
    Rarp {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        mac: Mac,
        #[arg(long, value_delimiter = ',', default_value = "0,50,200,450,800")]
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
    },
    /// Send a numbered UDP stream until STOP exists.
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
    /// Receive a numbered UDP stream until STOP exists; report gaps.
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
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
    if s.len() & 1 == 1 {
        return Err(format!("odd-length hex '{s}'"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex: {e}")))
        .collect()
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

fn run(cmd: Cmd) -> Result<serde_json::Value, String> {
    match cmd {
        Cmd::Rarp {
            iface,
            mac,
            schedule_ms,
            wait_file,
        } => {
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
            let t0 = Instant::now();
            let mut sent = Vec::new();
            for ms in schedule_ms {
                let at = t0 + Duration::from_millis(ms);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                send(&mut cap, &f)?;
                sent.push(netreconf::router::wall_us());
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
        Cmd::UdpHex { to, hex } => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            for h in &hex {
                s.send_to(&unhex(h)?, to).map_err(|e| e.to_string())?;
            }
            Ok(serde_json::json!({"sent": hex.len()}))
        }
        Cmd::UdpSend {
            to,
            interval_us,
            stop_file,
            max_seconds,
        } => {
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
            Ok(serde_json::json!({"sent": seq, "send_errors": errors, "interval_us": interval_us}))
        }
        Cmd::UdpRecv {
            bind,
            stop_file,
            max_seconds,
        } => {
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .map_err(|e| e.to_string())?;
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
            loop {
                if !draining
                    && (stop(&stop_file) || t0.elapsed() >= Duration::from_secs(max_seconds))
                {
                    // Count what already arrived but was not read yet, then stop.
                    draining = true;
                    s.set_nonblocking(true).map_err(|e| e.to_string())?;
                }
                match s.recv_from(&mut buf) {
                    Err(_) if draining => break, // WouldBlock: nothing left
                    Ok((n, _)) if n >= 16 => {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
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
            }))
        }
        Cmd::UdpEcho { bind, stop_file } => {
            let s = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| e.to_string())?;
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
        Cmd::UdpRtt {
            to,
            count,
            interval_us,
        } => {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
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
            let avg = if rtts.is_empty() {
                None
            } else {
                Some(rtts.iter().sum::<f64>() / rtts.len() as f64)
            };
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
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connect {to}: {e}"))?;
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
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vnet-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
