//! The three traits through which the engine meets the world: the source VMM ([`Source`]),
//! the destination VMM ([`Sink`]) and the deduplication service ([`Dedup`]). Nothing in the
//! engine knows about KVM.

use super::EndpointError;
use crate::protocol::{DiskInfo, Hello, Region};

/// What the engine needs from the source VMM.
///
/// Guest memory is only ever copied out, a chunk at a time ([`Source::read_chunk`]): the guest
/// and other threads may write it at any moment, so no reference into it is ever held. The
/// engine classifies, hashes and sends a chunk from that one copy, so the digest it registers
/// is always the digest of the bytes it sent.
pub trait Source {
    /// Guest memory regions, in order, then one region per disk (at
    /// [`crate::protocol::disk_addr`]`(i, 0)`, the disk's size long).
    fn regions(&self) -> Vec<Region>;
    /// The VM's disks, in the order of their regions (none by default).
    fn disks(&mut self) -> Result<Vec<DiskInfo>, EndpointError> {
        Ok(Vec::new())
    }
    /// The pages of the first pass, one bitmap per region: all of memory, and of disk `i` the
    /// blocks of its own top layer when `held[i]` (the destination's disk starts as this disk's
    /// base layer), every block otherwise. The default sends everything.
    fn first_pass(&mut self, regions: &[Region], held: &[bool]) -> Result<Vec<Vec<u64>>, EndpointError> {
        let _ = held;
        Ok(regions.iter().map(|r| super::layout::full_bitmap(r.len)).collect())
    }
    /// Copies the guest's `buf.len()` bytes at `gpa` (inside one region) into `buf`. While the
    /// guest runs the copy may be torn; the dirty log then has the page, and it is sent again.
    fn read_chunk(&self, gpa: u64, buf: &mut [u8]) -> Result<(), EndpointError>;
    /// Starts dirty logging.
    fn start_dirty_log(&mut self) -> Result<(), EndpointError>;
    /// Stops dirty logging.
    fn stop_dirty_log(&mut self) -> Result<(), EndpointError>;
    /// Pages (and disk blocks) written since the last call, one bitmap per region (bit per
    /// 4 KiB page).
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, EndpointError>;
    /// Pauses the guest (vCPUs and devices).
    fn pause(&mut self) -> Result<(), EndpointError>;
    /// Resumes the guest.
    fn resume(&mut self) -> Result<(), EndpointError>;
    /// vCPU, VM and device state of the paused guest.
    fn vm_state(&mut self) -> Result<Vec<u8>, EndpointError>;
    /// Sets the vCPU throttle (percent of time kept off the CPU).
    fn set_throttle(&mut self, percent: u8);
    /// VM name.
    fn name(&self) -> String;
    /// SHA-256 of all guest memory in address order (the guest is paused).
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError>;
}

/// How non-uniform chunks travel: in full, or as a digest the destination resolves.
pub trait Dedup {
    /// For each chunk of `chunks` (address, bytes), `Some(digest)` to send only the digest,
    /// `None` to send it in full.
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError>;
    /// The destination's answer to the source's disks: whether its site's repository holds the
    /// base image of the first disk, so that content equal to the base image's may travel as a
    /// digest from the first copy on. Called once, before the first pass.
    fn repository(&mut self, _held: bool) {}
}

impl<D: Dedup + ?Sized> Dedup for Box<D> {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        (**self).decide(chunks)
    }
    fn repository(&mut self, held: bool) {
        (**self).repository(held)
    }
}

/// Plain pre-copy: everything in full.
pub struct NoDedup;

impl Dedup for NoDedup {
    fn decide(&mut self, chunks: &[(u64, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, EndpointError> {
        Ok(vec![None; chunks.len()])
    }
}

/// What the engine needs from the destination VMM.
pub trait Sink {
    /// Creates guest memory for the memory regions of `regions` (from `Hello` and
    /// `MemoryLayout`; disk regions follow them). It must be zero-filled: zero chunks are written
    /// to memory only over chunks written before.
    fn prepare(&mut self, hello: &Hello, regions: &[Region]) -> Result<(), EndpointError>;
    /// The source's disks (after [`Sink::prepare`]): create where each one's blocks go, and say
    /// per disk whether it starts as the source's base layer (the same base image here, or
    /// neither has one), with the reason for each that does not. Every disk chunk is then
    /// written (zero ones too: under them lies the base image). The default takes no disks.
    fn disks(&mut self, disks: &[DiskInfo]) -> Result<(Vec<bool>, String), EndpointError> {
        if disks.is_empty() {
            return Ok((Vec::new(), String::new()));
        }
        Err(EndpointError::failed("disks", "this destination takes no disks"))
    }
    /// Writes `data` to guest memory at `gpa` (inside one region). The guest does not run yet,
    /// but other threads (a peer server) may read the memory meanwhile.
    fn write_chunk(&mut self, gpa: u64, data: &[u8]) -> Result<(), EndpointError>;
    /// Fills `len` bytes of guest memory at `gpa` with `byte`.
    fn fill_chunk(&mut self, gpa: u64, byte: u8, len: usize) -> Result<(), EndpointError> {
        self.write_chunk(gpa, &vec![byte; len])
    }
    /// A chunk was installed at `gpa`: `Some(bytes)` for content that arrived in full (or was
    /// pulled), `None` for a uniform chunk. (Content indexes keep track here.)
    fn on_write(&mut self, _gpa: u64, _data: Option<&[u8]>) {}
    /// Content `data` whose digest `digest` (of the stream's algorithm) was just checked was
    /// installed at `gpa`: as [`Sink::on_write`], without hashing it again.
    fn on_write_verified(&mut self, gpa: u64, data: &[u8], _digest: &[u8]) {
        self.on_write(gpa, Some(data));
    }
    /// Digest-only chunks `(address, digest)`: install those whose content can be found (this
    /// VM's memory, peers) and remove them from `batch`; the rest wait. The default finds none.
    fn resolve(&mut self, _batch: &mut Vec<(u64, Vec<u8>)>) -> Result<(), EndpointError> {
        Ok(())
    }
    /// End of a record: a good moment to push batched index updates.
    fn flush(&mut self) {}
    /// Everything has arrived: restore vCPU, VM and device state; do not run yet.
    fn restore(&mut self, state: &[u8]) -> Result<(), EndpointError>;
    /// Starts the guest (after the source was told).
    fn start(&mut self) -> Result<(), EndpointError>;
    /// SHA-256 of all guest memory in address order, before the guest runs.
    fn memory_digest(&mut self) -> Result<[u8; 32], EndpointError>;
}
