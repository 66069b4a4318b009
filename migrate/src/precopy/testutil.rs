//! Fakes shared by the engine's tests: a guest ([`FakeVm`], a [`Source`]), a destination
//! ([`FakeDest`], a [`Sink`]), byte pipes between their threads, and [`run_full`], which runs
//! a whole migration from one to the other.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    receive_with, Dedup, EndpointError, MigrationError, MigrationInfo, NoDedup, Params, ReceiveOptions, ReceiveStats,
    Sender, Sink, Source, PAGE_SIZE,
};
use crate::protocol::{Hello, Region};

/// A fake guest: memory in a Vec, writes simulated between passes.
pub(super) struct FakeVm {
    pub(super) mem: Vec<u8>,
    dirty: Vec<u64>,
    pub(super) logging: bool,
    pub(super) paused: bool,
    pub(super) resumed: u32,
    /// Pages the "guest" dirties at each dirty-log fetch while running.
    pub(super) churn: Vec<usize>,
    pub(super) throttle: u8,
    pub(super) max_throttle: u8,
}

impl FakeVm {
    pub(super) fn new(pages: usize) -> FakeVm {
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        for p in 0..pages / 2 {
            mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill((p % 251) as u8 + 1);
            mem[p * PAGE_SIZE + 7] = p as u8; // not uniform
        }
        FakeVm {
            mem,
            dirty: vec![0; pages.div_ceil(64)],
            logging: false,
            paused: false,
            resumed: 0,
            churn: vec![],
            throttle: 0,
            max_throttle: 0,
        }
    }
    fn write(&mut self, page: usize, byte: u8) {
        self.mem[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(byte);
        self.mem[page * PAGE_SIZE] ^= 0x55;
        if self.logging {
            self.dirty[page / 64] |= 1 << (page % 64);
        }
    }
}

impl Source for FakeVm {
    fn regions(&self) -> Vec<Region> {
        vec![Region { gpa: 0, len: self.mem.len() as u64 }]
    }
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
        buf.copy_from_slice(&self.mem[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<(), EndpointError> {
        self.logging = true;
        Ok(())
    }
    fn stop_dirty_log(&mut self) -> Result<(), EndpointError> {
        self.logging = false;
        Ok(())
    }
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError> {
        if !self.paused {
            let churn = self.churn.clone();
            for p in churn {
                self.write(p, 0xee);
            }
        }
        let n = self.dirty.len();
        Ok(vec![std::mem::replace(&mut self.dirty, vec![0; n])])
    }
    fn pause(&mut self) -> Result<(), EndpointError> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), EndpointError> {
        self.paused = false;
        self.resumed += 1;
        Ok(())
    }
    fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError> {
        Ok(b"state".to_vec())
    }
    fn set_throttle(&mut self, p: u8) {
        self.throttle = p;
        self.max_throttle = self.max_throttle.max(p);
    }
    fn name(&self) -> String {
        "fake".into()
    }
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
        Ok(toy_digest(&self.mem))
    }
}

/// Not cryptographic; enough to compare two byte strings in tests.
pub(super) fn toy_digest(b: &[u8]) -> [u8; 32] {
    let mut d = [0u8; 32];
    for (i, chunk) in b.chunks(32).enumerate() {
        for (j, x) in chunk.iter().enumerate() {
            d[j] = d[j].wrapping_mul(31).wrapping_add(*x ^ i as u8);
        }
    }
    d
}

/// A fake guest with one disk: `top` is the guest-visible disk, whose blocks `own` the overlay
/// holds (the rest equals `base`); `churn` blocks are written at each dirty-log fetch.
pub(super) struct DiskVm {
    pub(super) vm: FakeVm,
    pub(super) top: Vec<u8>,
    pub(super) own: Vec<bool>,
    pub(super) base: Option<[u8; 32]>,
    pub(super) churn: Vec<usize>,
    dirty: Vec<u64>,
    /// What the first pass was asked for (held flags).
    pub(super) held: Vec<bool>,
}

impl DiskVm {
    pub(super) fn new(vm: FakeVm, base: &[u8], own: &[(usize, u8)]) -> DiskVm {
        let mut top = base.to_vec();
        let mut owned = vec![false; base.len() / PAGE_SIZE];
        for &(b, byte) in own {
            top[b * PAGE_SIZE..(b + 1) * PAGE_SIZE].fill(byte);
            owned[b] = true;
        }
        let n = owned.len();
        DiskVm { vm, top, own: owned, base: Some([5; 32]), churn: vec![], dirty: vec![0; n.div_ceil(64)], held: vec![] }
    }
}

impl Source for DiskVm {
    fn regions(&self) -> Vec<Region> {
        let mut r = self.vm.regions();
        r.push(Region { gpa: crate::protocol::disk_addr(0, 0), len: self.top.len() as u64 });
        r
    }
    fn disks(&mut self) -> Result<Vec<crate::protocol::DiskInfo>, EndpointError> {
        Ok(vec![crate::protocol::DiskInfo { size: self.top.len() as u64, base: self.base, repository_content: false }])
    }
    fn first_pass(&mut self, regions: &[Region], held: &[bool]) -> Result<Vec<Vec<u64>>, EndpointError> {
        self.held = held.to_vec();
        let mut maps = vec![super::layout::full_bitmap(regions[0].len)];
        let mut disk = vec![0u64; self.own.len().div_ceil(64)];
        for (b, &o) in self.own.iter().enumerate() {
            if o || !held[0] {
                disk[b / 64] |= 1 << (b % 64);
            }
        }
        maps.push(disk);
        Ok(maps)
    }
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError> {
        match crate::protocol::disk_of(gpa) {
            Some((_, off)) => {
                buf.copy_from_slice(&self.top[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            None => self.vm.read_chunk(gpa, buf),
        }
    }
    fn start_dirty_log(&mut self) -> Result<(), EndpointError> {
        self.vm.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), EndpointError> {
        self.vm.stop_dirty_log()
    }
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError> {
        if !self.vm.paused {
            for b in self.churn.clone() {
                self.top[b * PAGE_SIZE..(b + 1) * PAGE_SIZE].fill(0xd0 + b as u8);
                self.dirty[b / 64] |= 1 << (b % 64);
            }
        }
        let mut maps = self.vm.dirty_log()?;
        let n = self.dirty.len();
        maps.push(std::mem::replace(&mut self.dirty, vec![0; n]));
        Ok(maps)
    }
    fn pause(&mut self) -> Result<(), EndpointError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), EndpointError> {
        self.vm.resume()
    }
    fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError> {
        self.vm.vm_state()
    }
    fn set_throttle(&mut self, p: u8) {
        self.vm.set_throttle(p)
    }
    fn name(&self) -> String {
        self.vm.name()
    }
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
        self.vm.memory_digest()
    }
}

#[derive(Default)]
pub(super) struct FakeDest {
    /// The destination's copy of the base image (`None`: it holds none).
    pub(super) base: Option<Vec<u8>>,
    /// The disk as written here.
    pub(super) disk: Vec<u8>,
    pub(super) mem: Vec<u8>,
    pub(super) state: Vec<u8>,
    pub(super) started: bool,
    /// Simulates a page that arrived wrong.
    pub(super) corrupt: bool,
    /// Resolve digest-only chunks from this VM's own memory (else they must be pulled).
    pub(super) resolvable: bool,
    pub(super) index: HashMap<Vec<u8>, u64>,
}

impl Sink for FakeDest {
    fn prepare(&mut self, _: &Hello, regions: &[Region]) -> Result<(), EndpointError> {
        self.mem = vec![0; regions[0].len as usize];
        Ok(())
    }
    fn disks(&mut self, disks: &[crate::protocol::DiskInfo]) -> Result<(Vec<bool>, String), EndpointError> {
        let held = self.base.is_some();
        self.disk = self.base.clone().unwrap_or_else(|| vec![0; disks[0].size as usize]);
        Ok((vec![held], if held { String::new() } else { "no base here".into() }))
    }
    fn write_chunk(&mut self, gpa: u64, data: &[u8]) -> Result<(), EndpointError> {
        if let Some((_, off)) = crate::protocol::disk_of(gpa) {
            self.disk[off as usize..off as usize + data.len()].copy_from_slice(data);
            return Ok(());
        }
        self.mem[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn on_write(&mut self, gpa: u64, data: Option<&[u8]>) {
        if let Some(d) = data {
            self.index.insert(indexd::hash::digest(indexd::hash::Algo::Sha256, d), gpa);
        }
    }
    fn resolve(&mut self, batch: &mut Vec<(u64, Vec<u8>)>) -> Result<(), EndpointError> {
        if !self.resolvable {
            return Ok(());
        }
        batch.retain(|(gpa, d)| {
            let Some(&src) = self.index.get(d) else { return true };
            let chunk = self.mem[src as usize..src as usize + PAGE_SIZE].to_vec();
            if indexd::hash::digest(indexd::hash::Algo::Sha256, &chunk) != *d {
                return true;
            }
            self.mem[*gpa as usize..*gpa as usize + PAGE_SIZE].copy_from_slice(&chunk);
            false
        });
        Ok(())
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), EndpointError> {
        self.state = state.to_vec();
        Ok(())
    }
    fn start(&mut self) -> Result<(), EndpointError> {
        self.started = true;
        Ok(())
    }
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError> {
        if self.corrupt {
            self.mem[4096 * 3 + 9] ^= 1;
        }
        Ok(toy_digest(&self.mem))
    }
}

/// A byte pipe between threads.
pub(super) struct Pipe(pub(super) mpsc::Sender<Vec<u8>>);
impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.send(b.to_vec()).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
pub(super) struct PipeIn(pub(super) mpsc::Receiver<Vec<u8>>, pub(super) Vec<u8>, pub(super) usize);
impl Read for PipeIn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.2 >= self.1.len() {
            match self.0.recv() {
                Ok(v) => {
                    self.1 = v;
                    self.2 = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.1.len() - self.2);
        buf[..n].copy_from_slice(&self.1[self.2..self.2 + n]);
        self.2 += n;
        Ok(n)
    }
}

pub(super) fn run(
    vm: &mut FakeVm,
    params: Params,
) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>) {
    run_to(vm, params, FakeDest::default())
}

pub(super) fn run_to(
    vm: &mut FakeVm,
    params: Params,
    dest: FakeDest,
) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>) {
    let (src, dest, _) = run_full(vm, params, dest, NoDedup);
    (src, dest)
}

pub(super) fn run_full<S: Source, D: Dedup>(
    vm: &mut S,
    params: Params,
    dest: FakeDest,
    dedup: D,
) -> (Result<MigrationInfo, MigrationError>, Result<FakeDest, MigrationError>, ReceiveStats) {
    let (tx, rx) = mpsc::channel();
    let (btx, brx) = mpsc::channel();
    let dest = std::thread::spawn(move || {
        let mut d = dest;
        let opts = ReceiveOptions { wait: Duration::from_millis(100), ..ReceiveOptions::default() };
        match receive_with(&mut d, PipeIn(rx, vec![], 0), Pipe(btx), opts) {
            Ok(s) => (Ok(d), s),
            Err(e) => (Err(e), ReceiveStats::default()),
        }
    });
    let info = Arc::new(Mutex::new(MigrationInfo::default()));
    let r =
        Sender::new(vm, dedup, Pipe(tx), PipeIn(brx, vec![], 0), params, info, Arc::new(AtomicBool::new(false))).run();
    let (d, s) = dest.join().unwrap();
    (r, d, s)
}

/// In-memory coordination: the first chunk with a digest goes in full, the others as digests.
pub(super) struct SetDedup(pub(super) std::collections::HashSet<Vec<u8>>);
impl Dedup for SetDedup {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        Ok(chunks
            .iter()
            .map(|(_, c)| {
                let d = indexd::hash::digest(indexd::hash::Algo::Sha256, c);
                if self.0.insert(d.clone()) {
                    None
                } else {
                    Some(d)
                }
            })
            .collect())
    }
}

pub(super) fn duplicated_vm() -> FakeVm {
    let mut vm = FakeVm::new(512);
    // 256 pages of data, but only 16 distinct contents.
    for p in 0..256 {
        let fill = (p % 16) as u8 + 1;
        vm.mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(fill);
        vm.mem[p * PAGE_SIZE + 1] = 0x77;
    }
    vm
}

/// Copies what passes through into a shared buffer.
pub(super) struct Tee(pub(super) Pipe, pub(super) Arc<Mutex<Vec<u8>>>);
impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1.lock().unwrap().extend_from_slice(b);
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
