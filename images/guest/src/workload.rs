//! Guest workloads selected on the command line.
//!
//! * `workload=idle` (default): nothing besides the heartbeat.
//! * `workload=mem mem=<size> rate=<size> [memtrace=1]`: write the whole
//!   working set once at boot, then rewrite whole 4 KiB pages of it with
//!   pseudo-random data (per VM), at pseudo-random pages, paced by the timer
//!   so the average dirty rate is `rate` bytes/s.
//! * `private=<size>`: per-VM pseudo-random memory, written once at boot
//!   ([`fill_private`]).
//! * `workload=io` lives in `disk.rs`.

use crate::println;

const PAGE_SIZE: u64 = 4096;

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
    /// The workload over the working set `[base, base + size)` (usable RAM,
    /// page-aligned, owned by the workload alone), at `rate` bytes/s;
    /// `memtrace` prints every page written.
    pub fn new(base: u64, size: u64, rate: u64, memtrace: bool, hz: u64, now: u64) -> MemWorkload {
        MemWorkload {
            base,
            pages: (size / PAGE_SIZE).max(1),
            rate,
            memtrace,
            hz,
            start_tick: now,
            accounted: 0,
            dirtied: 0,
            pick: XorShift64::new(0x2545_f491_4f6c_dd1d),
            data: XorShift64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// Gives the workload this VM's own data (from the MAC or `seed=`) and writes every page
    /// of the working set once, as a program initialising its arrays would: the working set
    /// is resident, with content of this VM's own, from the start. Then `rate` applies.
    pub fn start(&mut self, seed: u64, now: u64) {
        self.data = XorShift64::new(splitmix64(seed ^ 0x4d45_4d57_4f52_4b21));
        for p in 0..self.pages {
            self.write_page(self.base + p * PAGE_SIZE);
        }
        self.start_tick = now;
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

/// splitmix64: a good 64-bit mix, used to derive per-VM data from a seed.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `[base, base + size)` with pseudo-random data derived from `seed`
/// (the MAC, or `seed=`), so that VMs booted from one image hold different
/// private pages.
pub fn fill_private(base: u64, size: u64, seed: u64) {
    let mut rng = XorShift64::new(splitmix64(seed ^ 0x5052_4956_4154_4521));
    let words = base as *mut u64;
    for i in 0..(size / 8) as usize {
        // SAFETY: the caller hands over a region of usable RAM (e820) owned
        // by the private data alone, identity-mapped.
        unsafe { words.add(i).write_volatile(rng.next()) };
    }
}
