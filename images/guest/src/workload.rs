//! Guest workloads selected on the command line.
//!
//! * `workload=idle` (default): nothing besides the heartbeat.
//! * `workload=mem mem=<size> rate=<size> [memtrace=1]`: rewrite whole 4 KiB
//!   pages of a working set with pseudo-random data, at pseudo-random pages,
//!   paced by the timer so the average dirty rate is `rate` bytes/s.

use crate::bootparams::{align_up, BootParams};
use crate::println;

const PAGE_SIZE: u64 = 4096;
const DEFAULT_MEM: u64 = 64 << 20;
const DEFAULT_RATE: u64 = 20 << 20;
/// Only the low 4 GiB are identity-mapped by the VMM's page tables.
const MAPPED_LIMIT: u64 = 1 << 32;

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Mem,
}

/// Workload settings parsed from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub kind: Kind,
    /// Working-set size in bytes.
    pub mem: u64,
    /// Dirty rate in bytes per second.
    pub rate: u64,
    /// Print `wrote 0x<addr>` after every page write.
    pub memtrace: bool,
}

impl Config {
    /// Parses space-separated `key=value` words; unknown keys are ignored,
    /// malformed values keep the default (with a warning).
    pub fn from_cmdline(cmdline: &str) -> Config {
        let mut config = Config { kind: Kind::Idle, mem: DEFAULT_MEM, rate: DEFAULT_RATE, memtrace: false };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            match key {
                "workload" => match value {
                    "idle" => config.kind = Kind::Idle,
                    "mem" => config.kind = Kind::Mem,
                    other => println!("warning: unknown workload '{other}', using idle"),
                },
                "mem" => match parse_size(value) {
                    Some(v) => config.mem = v,
                    None => println!("warning: bad mem= value '{value}'"),
                },
                "rate" => match parse_size(value) {
                    Some(v) => config.rate = v,
                    None => println!("warning: bad rate= value '{value}'"),
                },
                "memtrace" => config.memtrace = matches!(value, "1" | "on" | "yes" | "true"),
                _ => {}
            }
        }
        config
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

/// xorshift64 pseudo-random generator.
#[derive(Clone, Copy, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub const fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// State of the memory-dirtying workload.
pub struct MemWorkload {
    base: u64,
    pages: u64,
    rate: u64,
    memtrace: bool,
    hz: u64,
    start_tick: u64,
    /// Pages owed so far that have been written or deliberately skipped.
    accounted: u64,
    /// Pages actually written.
    dirtied: u64,
    pick: XorShift64,
    data: XorShift64,
}

impl MemWorkload {
    /// Chooses the working set: the largest usable RAM range at or above
    /// `floor` (the end of the kernel's heap) within the mapped 4 GiB,
    /// clamped to `config.mem`. Returns `None` if there is no room at all.
    pub fn new(config: &Config, boot: &BootParams, floor: u64, hz: u64, now: u64) -> Option<MemWorkload> {
        let floor = align_up(floor, 2 << 20);
        let (start, end) = boot.usable_ram(floor, MAPPED_LIMIT).max_by_key(|&(s, e)| e - s)?;
        let size = config.mem.min(end - start) & !(PAGE_SIZE - 1);
        if size == 0 {
            return None;
        }
        Some(MemWorkload {
            base: start,
            pages: size / PAGE_SIZE,
            rate: config.rate,
            memtrace: config.memtrace,
            hz,
            start_tick: now,
            accounted: 0,
            dirtied: 0,
            pick: XorShift64::new(0x2545_f491_4f6c_dd1d),
            data: XorShift64::new(0x9e37_79b9_7f4a_7c15),
        })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Total pages written so far.
    pub fn dirtied(&self) -> u64 {
        self.dirtied
    }

    /// Writes the pages owed at tick `now`: `rate` bytes per second since the
    /// start, as whole pages. A backlog of more than one second (e.g. after
    /// the VM was paused) is dropped rather than written in a burst.
    pub fn step(&mut self, now: u64) {
        let elapsed = now.wrapping_sub(self.start_tick);
        let due = (u128::from(elapsed) * u128::from(self.rate) / (u128::from(self.hz) * u128::from(PAGE_SIZE))) as u64;
        let mut owed = due.saturating_sub(self.accounted);
        let max_burst = (self.rate / PAGE_SIZE).max(1);
        if owed > max_burst {
            self.accounted += owed - max_burst;
            owed = max_burst;
        }
        for _ in 0..owed {
            let page = self.pick.next() % self.pages;
            let addr = self.base + page * PAGE_SIZE;
            self.write_page(addr);
            self.accounted += 1;
            self.dirtied += 1;
            if self.memtrace {
                println!("wrote 0x{addr:x}");
            }
        }
    }

    /// Overwrites the whole page at `addr` with pseudo-random data.
    fn write_page(&mut self, addr: u64) {
        let words = addr as *mut u64;
        for i in 0..(PAGE_SIZE / 8) as usize {
            // SAFETY: `addr` is a page inside the working set, which is usable
            // RAM (e820) above the kernel image and heap, identity-mapped, and
            // owned by this workload alone. Volatile so the stores really
            // happen (nobody in the guest reads them).
            unsafe { words.add(i).write_volatile(self.data.next()) };
        }
    }
}
