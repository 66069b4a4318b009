//! Command-line options (space-separated `key=value` words; unknown keys are
//! ignored, malformed values keep the default with a warning).

use alloc::vec::Vec;

use crate::println;

const DEFAULT_MEM: u64 = 64 << 20;
const DEFAULT_RATE: u64 = 20 << 20;
const DEFAULT_IORATE: u64 = 4 << 20;
const DEFAULT_IOAREA: u64 = 16 << 20;

/// A virtio-mmio device announced as `virtio_mmio.device=<size>@<base>:<gsi>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// `probe=<ip>:<port>,<interval_ms>`.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub ip: [u8; 4],
    pub port: u16,
    pub interval_ms: u64,
}

/// `udpsend=<ip>:<port>[,<size>[,<rate>]]`: a UDP traffic source.
#[derive(Clone, Copy, Debug)]
pub struct UdpSend {
    pub ip: [u8; 4],
    pub port: u16,
    /// Payload bytes per datagram.
    pub size: usize,
    /// Payload bytes per second; 0: as fast as the NIC takes them.
    pub rate: u64,
}

/// `disktest=write:<sector>` / `disktest=check:<sector>`.
#[derive(Clone, Copy, Debug)]
pub enum DiskTest {
    Write(u64),
    Check(u64),
}

/// Everything the command line can ask for.
#[derive(Clone, Debug)]
pub struct Config {
    /// `workload=mem` (or `mem,io`): the memory-dirtying workload.
    pub mem_workload: bool,
    /// `workload=io` (or `mem,io`): the disk workload.
    pub io_workload: bool,
    /// Working-set size of the mem workload, in bytes.
    pub mem: u64,
    /// Dirty rate of the mem workload, bytes per second.
    pub rate: u64,
    /// Print `wrote 0x<addr>` after every page write.
    pub memtrace: bool,
    /// Disk workload rate: bytes per second read and as many written.
    pub iorate: u64,
    /// Size of the disk area the io workload uses (after the preload area).
    pub ioarea: u64,
    /// Static IPv4 address and prefix length of the first NIC.
    pub ip: Option<([u8; 4], u8)>,
    /// Default gateway.
    pub gw: Option<[u8; 4]>,
    pub probe: Option<Probe>,
    pub udpsend: Option<UdpSend>,
    /// Bytes of the disk to read into memory at boot.
    pub preload: u64,
    /// Bytes of per-VM pseudo-random memory.
    pub private: u64,
    /// Seed of the per-VM data when there is no NIC (else the MAC is used).
    pub seed: u64,
    pub disktests: Vec<DiskTest>,
    /// virtio-mmio devices, in command-line order.
    pub devices: Vec<MmioDevice>,
}

impl Config {
    pub fn from_cmdline(cmdline: &str) -> Config {
        let mut c = Config {
            mem_workload: false,
            io_workload: false,
            mem: DEFAULT_MEM,
            rate: DEFAULT_RATE,
            memtrace: false,
            iorate: DEFAULT_IORATE,
            ioarea: DEFAULT_IOAREA,
            ip: None,
            gw: None,
            probe: None,
            udpsend: None,
            preload: 0,
            private: 0,
            seed: 0,
            disktests: Vec::new(),
            devices: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            let size = |what: &mut u64| match parse_size(value) {
                Some(v) => *what = v,
                None => println!("warning: bad {key}= value '{value}'"),
            };
            match key {
                "workload" => {
                    c.mem_workload = false;
                    c.io_workload = false;
                    for w in value.split(',') {
                        match w {
                            "idle" => {}
                            "mem" => c.mem_workload = true,
                            "io" => c.io_workload = true,
                            other => println!("warning: unknown workload '{other}', ignored"),
                        }
                    }
                }
                "mem" => size(&mut c.mem),
                "rate" => size(&mut c.rate),
                "iorate" => size(&mut c.iorate),
                "ioarea" => size(&mut c.ioarea),
                "preload" => size(&mut c.preload),
                "private" => size(&mut c.private),
                "memtrace" => c.memtrace = matches!(value, "1" | "on" | "yes" | "true"),
                "seed" => match parse_u64(value) {
                    Some(v) => c.seed = v,
                    None => println!("warning: bad seed= value '{value}'"),
                },
                "ip" => match parse_cidr(value) {
                    Some(v) => c.ip = Some(v),
                    None => println!("warning: bad ip= value '{value}' (expected a.b.c.d/len)"),
                },
                "gw" => match parse_ipv4(value) {
                    Some(v) => c.gw = Some(v),
                    None => println!("warning: bad gw= value '{value}'"),
                },
                "probe" => match parse_probe(value) {
                    Some(v) => c.probe = Some(v),
                    None => println!("warning: bad probe= value '{value}' (expected ip:port,interval_ms)"),
                },
                "udpsend" => match parse_udpsend(value) {
                    Some(v) => c.udpsend = Some(v),
                    None => println!("warning: bad udpsend= value '{value}' (expected ip:port[,size[,rate]])"),
                },
                "disktest" => match parse_disktest(value) {
                    Some(v) => c.disktests.push(v),
                    None => println!("warning: bad disktest= value '{value}' (expected write:N or check:N)"),
                },
                "virtio_mmio.device" => match parse_mmio_device(value) {
                    Some(v) => c.devices.push(v),
                    None => println!("warning: bad virtio_mmio.device= value '{value}'"),
                },
                _ => {}
            }
        }
        c
    }
}

/// Parses `<digits>[K|M|G][B]` (binary multiples, case-insensitive).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.strip_suffix(['B', 'b']).unwrap_or(s);
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// Decimal, or hexadecimal with `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "24"));
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((parse_ipv4(ip)?, len))
}

fn parse_probe(s: &str) -> Option<Probe> {
    let (addr, interval) = s.split_once(',').unwrap_or((s, "100"));
    let (ip, port) = addr.split_once(':')?;
    let interval_ms: u64 = interval.parse().ok()?;
    (interval_ms > 0).then_some(Probe { ip: parse_ipv4(ip)?, port: port.parse().ok()?, interval_ms })
}

fn parse_udpsend(s: &str) -> Option<UdpSend> {
    let mut parts = s.split(',');
    let (ip, port) = parts.next()?.split_once(':')?;
    let size = parts.next().map_or(Some(1472), parse_size)? as usize;
    let rate = parts.next().map_or(Some(0), parse_size)?;
    (1..=1472).contains(&size).then_some(UdpSend { ip: parse_ipv4(ip)?, port: port.parse().ok()?, size, rate })
}

fn parse_disktest(s: &str) -> Option<DiskTest> {
    let (op, sector) = s.split_once(':')?;
    let sector = parse_u64(sector)?;
    match op {
        "write" => Some(DiskTest::Write(sector)),
        "check" => Some(DiskTest::Check(sector)),
        _ => None,
    }
}

/// `<size>@<base>:<irq>[:<id>]`, as Linux's virtio_mmio module takes it.
fn parse_mmio_device(s: &str) -> Option<MmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_u64(parts.next()?)?;
    let gsi = parse_u64(parts.next()?)? as u32;
    Some(MmioDevice { base, size: parse_size(size)?, gsi })
}
