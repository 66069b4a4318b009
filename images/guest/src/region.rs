//! Hands out disjoint, page-aligned pieces of usable RAM above the heap
//! (working set of the mem workload, preloaded disk data, private data).
//! Deterministic: the same command line and memory size give the same
//! addresses.

use alloc::vec::Vec;

use crate::bootparams::{align_up, BootParams};

/// Only the low 4 GiB are identity-mapped.
const MAPPED_LIMIT: u64 = 1 << 32;

pub struct Regions {
    /// Free `[start, end)` ranges, in address order.
    free: Vec<(u64, u64)>,
}

impl Regions {
    /// The usable RAM at or above `floor` (rounded up to 2 MiB) within the
    /// mapped 4 GiB.
    pub fn new(boot: &BootParams, floor: u64) -> Regions {
        let floor = align_up(floor, 2 << 20);
        Regions { free: boot.usable_ram(floor, MAPPED_LIMIT).collect() }
    }

    /// Takes up to `size` bytes (rounded up to whole pages), aligned to
    /// `align`: from the first range where all of it fits, else as much as
    /// the roomiest range has. Returns `(base, size)`, or `None` if nothing
    /// is left.
    pub fn take(&mut self, size: u64, align: u64) -> Option<(u64, u64)> {
        let size = align_up(size.max(1), 4096);
        let room = |&(s, e): &(u64, u64)| e.saturating_sub(align_up(s, align));
        let i = match self.free.iter().position(|r| room(r) >= size) {
            Some(i) => i,
            None => (0..self.free.len()).max_by_key(|&i| room(&self.free[i]))?,
        };
        let (s, e) = self.free[i];
        let base = align_up(s, align);
        let len = size.min(e.saturating_sub(base)) & !4095;
        if len == 0 {
            return None;
        }
        self.free[i].0 = base + len;
        Some((base, len))
    }
}
