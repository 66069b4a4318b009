//! The virtio-blk disk: boot-time preload, the `disktest=` check hook and the
//! `workload=io` disk workload.
//!
//! Boot-time requests (preload, disktest) wait by polling the used ring, in
//! ring 3, which costs no exit. The io workload keeps one request in flight
//! and is woken by the disk's interrupt.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};

use crate::println;
use crate::virtio::{IdentityHal, Mmio};
use crate::workload::{splitmix64, XorShift64};

/// Largest request the preload issues.
const PRELOAD_CHUNK: usize = 2 << 20;
/// Sectors written/checked by `disktest=`.
const DISKTEST_SECTORS: u64 = 8;
/// Size of one io-workload request.
const IO_BLOCK: usize = 64 << 10;

pub struct Disk {
    blk: VirtIOBlk<IdentityHal, Mmio>,
    pub mmio_base: u64,
    /// Capacity in bytes.
    pub capacity: u64,
}

/// The content of the 512-byte sector `sector` written by `disktest=`
/// (and, with a generation, by the io workload) for a VM with `seed`.
fn fill_pattern(buf: &mut [u8], seed: u64, first_sector: u64, generation: u64) {
    for (s, sector) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
        let base = splitmix64(seed ^ splitmix64((first_sector + s as u64) ^ (generation << 48)));
        for (w, word) in sector.chunks_mut(8).enumerate() {
            word.copy_from_slice(&splitmix64(base.wrapping_add(w as u64)).to_le_bytes());
        }
    }
}

impl Disk {
    pub fn new(transport: Mmio, mmio_base: u64) -> Result<Disk, virtio_drivers::Error> {
        let blk = VirtIOBlk::<IdentityHal, Mmio>::new(transport)?;
        let capacity = blk.capacity() * SECTOR_SIZE as u64;
        Ok(Disk { blk, mmio_base, capacity })
    }

    /// Reads the first `buf.len()` bytes of the disk into `buf`.
    pub fn preload(&mut self, buf: &mut [u8]) -> Result<(), virtio_drivers::Error> {
        let mut sector = 0usize;
        for chunk in buf.chunks_mut(PRELOAD_CHUNK) {
            self.blk.read_blocks(sector, chunk)?;
            sector += chunk.len() / SECTOR_SIZE;
        }
        Ok(())
    }

    /// `disktest=write:<sector>`: 8 sectors of VM-specific data, then a flush.
    pub fn test_write(&mut self, sector: u64, seed: u64) -> Result<(), virtio_drivers::Error> {
        let mut buf = vec![0u8; (DISKTEST_SECTORS as usize) * SECTOR_SIZE];
        fill_pattern(&mut buf, seed, sector, 0);
        self.blk.write_blocks(sector as usize, &buf)?;
        self.blk.flush()
    }

    /// `disktest=check:<sector>`: whether the 8 sectors hold what
    /// `test_write` wrote.
    pub fn test_check(&mut self, sector: u64, seed: u64) -> Result<bool, virtio_drivers::Error> {
        let len = (DISKTEST_SECTORS as usize) * SECTOR_SIZE;
        let mut want = vec![0u8; len];
        fill_pattern(&mut want, seed, sector, 0);
        let mut got = vec![0u8; len];
        self.blk.read_blocks(sector as usize, &mut got)?;
        Ok(got == want)
    }
}

/// The request in flight, boxed so its buffers stay put.
struct Request {
    req: BlkReq,
    resp: BlkResp,
    buf: Vec<u8>,
    token: u16,
    block: usize,
    write: bool,
    generation: u32,
}

/// `workload=io`: reads and writes 64 KiB blocks of the disk area after the
/// preload area at `rate` bytes/s each way, with a per-VM pattern; every
/// block it wrote is checked when read back.
pub struct IoWorkload {
    first_sector: u64,
    blocks: usize,
    rate: u64,
    hz: u64,
    last_tick: u64,
    /// Bytes of requests allowed now.
    credit: u128,
    seed: u64,
    /// Generation last written to each block (0: never written).
    generations: Vec<u32>,
    pick: XorShift64,
    inflight: Option<Box<Request>>,
    spare: Option<Box<Request>>,
    next_is_write: bool,
    pub read: u64,
    pub written: u64,
    pub mismatches: u64,
    pub errors: u64,
}

impl IoWorkload {
    /// The workload over `[area_start, area_start + area_size)` (bytes) of
    /// `disk`. `None` if the area holds no whole block.
    pub fn new(
        disk: &Disk,
        area_start: u64,
        area_size: u64,
        rate: u64,
        seed: u64,
        hz: u64,
        now: u64,
    ) -> Option<IoWorkload> {
        let start = area_start.next_multiple_of(IO_BLOCK as u64);
        let size = area_size.min(disk.capacity.saturating_sub(start));
        let blocks = (size / IO_BLOCK as u64) as usize;
        (blocks > 0).then(|| IoWorkload {
            first_sector: start / SECTOR_SIZE as u64,
            blocks,
            rate,
            hz,
            last_tick: now,
            credit: 0,
            seed,
            generations: vec![0; blocks],
            pick: XorShift64::new(splitmix64(seed ^ 0x494f)),
            inflight: None,
            spare: Some(Box::new(Request {
                req: BlkReq::default(),
                resp: BlkResp::default(),
                buf: vec![0u8; IO_BLOCK],
                token: 0,
                block: 0,
                write: false,
                generation: 0,
            })),
            next_is_write: true,
            read: 0,
            written: 0,
            mismatches: 0,
            errors: 0,
        })
    }

    pub fn area(&self) -> (u64, u64) {
        let start = self.first_sector * SECTOR_SIZE as u64;
        (start, (self.blocks * IO_BLOCK) as u64)
    }

    fn sector_of(&self, block: usize) -> u64 {
        self.first_sector + (block * IO_BLOCK / SECTOR_SIZE) as u64
    }

    /// Completes the request in flight if it is done, then starts the next
    /// one if the rate allows. Returns whether a request is in flight.
    pub fn step(&mut self, disk: &mut Disk, now_tick: u64) -> bool {
        if let Some(mut r) = self.inflight.take() {
            if disk.blk.peek_used() != Some(r.token) {
                self.inflight = Some(r);
                return true;
            }
            let (write, block, generation) = (r.write, r.block, r.generation);
            let Request { req, resp, buf, token, .. } = &mut *r;
            // SAFETY: the same request, buffer and response as submitted.
            let result = unsafe {
                if write {
                    disk.blk.complete_write_blocks(*token, req, buf, resp)
                } else {
                    disk.blk.complete_read_blocks(*token, req, buf, resp)
                }
            };
            let sector = self.sector_of(block);
            match result {
                Ok(()) if r.resp.status() == RespStatus::OK => {
                    if write {
                        self.written += IO_BLOCK as u64;
                        self.generations[block] = generation;
                    } else {
                        self.read += IO_BLOCK as u64;
                        let expected = self.generations[block];
                        if expected != 0 {
                            let mut want = vec![0u8; IO_BLOCK];
                            fill_pattern(&mut want, self.seed, sector, u64::from(expected));
                            if want != r.buf {
                                self.mismatches += 1;
                                if self.mismatches <= 10 {
                                    println!("io: mismatch at sector {sector}");
                                }
                            }
                        }
                    }
                }
                _ => {
                    self.errors += 1;
                    if self.errors <= 10 {
                        println!("io: request failed at sector {sector}");
                    }
                }
            }
            self.spare = Some(r);
        }

        // Pace: `rate` bytes/s each way, i.e. 2 * rate of requests; at most
        // one second of credit (no burst after a pause).
        let ticks = now_tick.saturating_sub(self.last_tick);
        self.last_tick = now_tick;
        let per_second = 2 * u128::from(self.rate);
        self.credit = (self.credit + u128::from(ticks) * per_second / u128::from(self.hz)).min(per_second);
        if self.credit < IO_BLOCK as u128 {
            return false;
        }
        let Some(mut r) = self.spare.take() else { return false };
        self.credit -= IO_BLOCK as u128;
        let block = (self.pick.next() % self.blocks as u64) as usize;
        let sector = self.sector_of(block);
        let write = self.next_is_write;
        self.next_is_write = !write;
        r.block = block;
        r.write = write;
        r.generation = self.generations[block].wrapping_add(1).max(1);
        if write {
            fill_pattern(&mut r.buf, self.seed, sector, u64::from(r.generation));
        }
        let Request { req, resp, buf, .. } = &mut *r;
        // SAFETY: the request lives in a Box that stays in `inflight` (not
        // touched) until the device has used it.
        let submitted = unsafe {
            if write {
                disk.blk.write_blocks_nb(sector as usize, req, buf, resp)
            } else {
                disk.blk.read_blocks_nb(sector as usize, req, buf, resp)
            }
        };
        match submitted {
            Ok(token) => {
                r.token = token;
                self.inflight = Some(r);
                true
            }
            Err(_) => {
                self.errors += 1;
                self.spare = Some(r);
                false
            }
        }
    }
}
