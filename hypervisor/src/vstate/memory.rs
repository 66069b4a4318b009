//! Guest memory (`vm-memory` with an [`AtomicBitmap`] that records every write the VMM itself
//! makes), the dirty log, page digests, and the sparse memory image used by snapshots.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use openssl::sha::Sha256;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::arch::layout::{ram_ranges, PAGE_SIZE};

/// Guest memory as used throughout the VMM: VMM-side writes mark pages in the bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        /// Requested size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// Reading or writing a memory image failed.
    #[error("memory image {what}: {source}")]
    Image {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The memory image does not match the VM's memory size.
    #[error("memory image is {found} bytes, the VM has {expected}")]
    ImageSize {
        /// Expected size.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// Accessing guest memory failed.
    #[error("guest memory access: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
}

/// Allocates `mem_size` bytes of guest RAM laid out around the MMIO hole.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_size))
        .map_err(|source| MemoryError::Allocate { size: mem_size, source })
}

/// Dirty pages of one memory region, one bit per 4 KiB page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest physical address of the region.
    pub base: u64,
    /// Pages in the region.
    pub pages: usize,
    /// Bit `i` of word `i / 64` set: page `base + i * 4096` was written.
    pub bitmap: Vec<u64>,
}

/// The pages written since dirty logging started or since the last fetch: the union of KVM's
/// log (vCPU writes) and the VMM's bitmap (device and loader writes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyLog {
    /// Per memory region.
    pub regions: Vec<RegionDirty>,
}

impl DirtyLog {
    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions.iter().map(|r| r.bitmap.iter().map(|w| w.count_ones() as usize).sum::<usize>()).sum()
    }

    /// Guest physical addresses of the dirty pages, in increasing order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|r| {
            r.bitmap.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    Some(r.base + (w as u64 * 64 + b) * PAGE_SIZE as u64)
                })
            })
        })
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.base && {
                let page = ((gpa - r.base) / PAGE_SIZE as u64) as usize;
                page < r.pages && r.bitmap[page / 64] & (1 << (page % 64)) != 0
            }
        })
    }

    /// Adds every page of `other` (same layout) to this log.
    pub fn merge(&mut self, other: &DirtyLog) {
        if self.regions.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            migrate::protocol::or_bitmap(&mut a.bitmap, &b.bitmap);
        }
    }
}

/// The VMM-side dirty bitmap of a region.
pub fn vmm_bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// Takes and clears the VMM-side dirty bitmap of a region, one bit per 4 KiB page.
pub fn take_vmm_dirty(region: &GuestRegionMmap) -> Vec<u64> {
    vmm_bitmap(region).get_and_reset()
}

/// Calls `f(gpa, block)` for every block (1 MiB, or a region's shorter tail) of guest memory, in
/// address order. `block` is a copy made with vm-memory's volatile accessors: vCPUs and device
/// threads may write guest memory meanwhile (callers pause the VM when they need a stable view).
pub fn for_each_block<F: FnMut(u64, &[u8])>(mem: &GuestMemoryMmap, mut f: F) {
    const BLOCK: usize = 1 << 20;
    let mut buf = vec![0u8; BLOCK];
    for region in mem.iter() {
        let (base, len) = (region.start_addr().0, region.len() as usize);
        let mut off = 0;
        while off < len {
            let n = BLOCK.min(len - off);
            region
                .read_slice(&mut buf[..n], vm_memory::MemoryRegionAddress(off as u64))
                .expect("a block inside the region is readable");
            f(base + off as u64, &buf[..n]);
            off += n;
        }
    }
}

/// Calls `f(gpa, page)` for every page of guest memory, in address order, on the copies of
/// [`for_each_block`].
pub fn for_each_page<F: FnMut(u64, &[u8])>(mem: &GuestMemoryMmap, mut f: F) {
    for_each_block(mem, |gpa, block| {
        for (i, page) in block.chunks(PAGE_SIZE).enumerate() {
            f(gpa + (i * PAGE_SIZE) as u64, page);
        }
    });
}

/// Whether a page is all zeroes.
pub fn is_zero_page(page: &[u8]) -> bool {
    migrate::protocol::uniform_byte(page) == Some(0)
}

/// A digest of all guest memory: SHA-256 over every page in address order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryDigest {
    /// SHA-256 of all pages, hex.
    pub sha256: String,
    /// Pages hashed.
    pub pages: u64,
    /// Pages that are not all zeroes.
    pub nonzero_pages: u64,
}

/// SHA-256 of all guest memory in address order.
pub fn sha256_all(mem: &GuestMemoryMmap) -> [u8; 32] {
    let mut total = Sha256::new();
    for_each_page(mem, |_, page| total.update(page));
    total.finish()
}

/// Digests guest memory, and writes each page's SHA-256 (32 bytes, address order) to
/// `per_page` when given.
pub fn memory_digest(
    mem: &GuestMemoryMmap,
    mut per_page: Option<&mut dyn std::io::Write>,
) -> Result<MemoryDigest, MemoryError> {
    let mut total = Sha256::new();
    let (mut pages, mut nonzero) = (0u64, 0u64);
    let mut err = None;
    for_each_page(mem, |_, page| {
        total.update(page);
        pages += 1;
        if !is_zero_page(page) {
            nonzero += 1;
        }
        if let Some(w) = per_page.as_mut() {
            if err.is_none() {
                if let Err(e) = w.write_all(&openssl::sha::sha256(page)) {
                    err = Some(e);
                }
            }
        }
    });
    if let Some(source) = err {
        return Err(MemoryError::Image { what: "write of page digests", source });
    }
    Ok(MemoryDigest { sha256: hex(&total.finish()), pages, nonzero_pages: nonzero })
}

use indexd::hash::hex;

/// Total guest RAM in bytes.
pub fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes all guest memory to `file` as one flat image (regions back to back), leaving zero
/// pages as holes. Returns the number of bytes of data written.
pub fn write_sparse_image(mem: &GuestMemoryMmap, file: &File) -> Result<u64, MemoryError> {
    let total = mem_size(mem);
    file.set_len(0)
        .and_then(|_| file.set_len(total))
        .map_err(|source| MemoryError::Image { what: "resize", source })?;
    let (mut offset, mut written) = (0u64, 0u64);
    let mut result = Ok(());
    // Each run of non-zero pages of a block is written straight from the block's copy.
    for_each_block(mem, |_, block| {
        let pages: Vec<&[u8]> = block.chunks(PAGE_SIZE).collect();
        let mut i = 0;
        while i < pages.len() && result.is_ok() {
            if is_zero_page(pages[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages.len() && !is_zero_page(pages[i]) {
                i += 1;
            }
            let (from, to) = (start * PAGE_SIZE, (i * PAGE_SIZE).min(block.len()));
            result = file.write_all_at(&block[from..to], offset + from as u64);
            written += (to - from) as u64;
        }
        offset += block.len() as u64;
    });
    result.map_err(|source| MemoryError::Image { what: "write", source })?;
    Ok(written)
}

/// Loads a flat image written by [`write_sparse_image`] into guest memory, reading only the
/// data extents (`SEEK_DATA`/`SEEK_HOLE`). Returns the bytes read.
pub fn read_sparse_image(mem: &GuestMemoryMmap, file: &mut File) -> Result<u64, MemoryError> {
    let total = mem_size(mem);
    let found = file.metadata().map_err(|source| MemoryError::Image { what: "stat", source })?.len();
    if found != total {
        return Err(MemoryError::ImageSize { expected: total, found });
    }
    let mut read = 0u64;
    let mut region_off = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut pos = region_off;
        while pos < region_off + len {
            let Some(data) = seek(file, pos, libc::SEEK_DATA)? else { break };
            if data >= region_off + len {
                break;
            }
            let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(total).min(region_off + len);
            file.seek(SeekFrom::Start(data)).map_err(|source| MemoryError::Image { what: "seek", source })?;
            let gpa = GuestAddress(region.start_addr().0 + (data - region_off));
            let mut slice = mem.get_slice(gpa, (hole - data) as usize)?;
            file.read_exact_volatile(&mut slice)
                .map_err(|e| MemoryError::Image { what: "read", source: std::io::Error::other(e.to_string()) })?;
            read += hole - data;
            pos = hole;
        }
        region_off += len;
    }
    Ok(read)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no more data (`ENXIO`).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> Result<Option<u64>, MemoryError> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid, owned fd; it has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(MemoryError::Image { what: "seek", source: e });
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn dirty_log_iterates_pages_in_order() {
        let log = DirtyLog {
            regions: vec![
                RegionDirty { base: 0, pages: 128, bitmap: vec![0b101, 1 << 63] },
                RegionDirty { base: 1 << 32, pages: 64, bitmap: vec![1 << 1] },
            ],
        };
        let pages: Vec<u64> = log.pages().collect();
        assert_eq!(pages, vec![0, 0x2000, 127 * 4096, (1 << 32) + 4096]);
        assert_eq!(log.count(), 4);
        assert!(log.is_dirty(0x2fff));
        assert!(!log.is_dirty(0x1000));
        assert!(log.is_dirty((1 << 32) + 4096));
    }

    #[test]
    fn vmm_writes_mark_the_bitmap() {
        let mem = create_guest_memory(64 << 20).unwrap();
        for r in mem.iter() {
            take_vmm_dirty(r);
        }
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5004)).unwrap();
        let bits = take_vmm_dirty(mem.iter().next().unwrap());
        assert_eq!(bits[0], 1 << 5);
        assert!(take_vmm_dirty(mem.iter().next().unwrap()).iter().all(|&w| w == 0));
    }

    #[test]
    fn sparse_image_round_trips_and_keeps_holes() {
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_slice(&[7u8; 8192], GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(42u64, GuestAddress(0x3ff_f000)).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("mem");
        let file = File::create(&path).unwrap();
        assert_eq!(write_sparse_image(&mem, &file).unwrap(), 3 * 4096);
        drop(file);
        let copy = create_guest_memory(64 << 20).unwrap();
        let read = read_sparse_image(&copy, &mut File::open(&path).unwrap()).unwrap();
        assert!(read >= 3 * 4096);
        assert_eq!(memory_digest(&mem, None).unwrap(), memory_digest(&copy, None).unwrap());
        let d = memory_digest(&copy, None).unwrap();
        assert_eq!((d.pages, d.nonzero_pages), (16384, 3));
        let wrong = create_guest_memory(32 << 20).unwrap();
        assert!(matches!(
            read_sparse_image(&wrong, &mut File::open(&path).unwrap()),
            Err(MemoryError::ImageSize { .. })
        ));
    }

    #[test]
    fn zero_page_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
    }
}
