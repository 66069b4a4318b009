//! Guest memory as the engine sees it: pages, the per-region dirty bitmaps of the source, and
//! chunks that must lie inside one region (both ends check every address they are handed).

use super::MigrationError;
use crate::protocol::Region;

/// Guest page size (dirty-log granularity).
pub const PAGE_SIZE: usize = 4096;

/// Sets every page bit of a region of `len` bytes.
pub fn full_bitmap(len: u64) -> Vec<u64> {
    let pages = (len as usize) / PAGE_SIZE;
    let mut v = vec![u64::MAX; pages.div_ceil(64)];
    if !pages.is_multiple_of(64) {
        *v.last_mut().expect("non-empty") = (1u64 << (pages % 64)) - 1;
    }
    v
}

/// ORs the per-region dirty bitmaps `more` into `dirty`.
pub(super) fn or_into(dirty: &mut [Vec<u64>], more: &[Vec<u64>]) {
    for (d, m) in dirty.iter_mut().zip(more) {
        crate::protocol::or_bitmap(d, m);
    }
}

/// Pages set in the per-region bitmaps `maps`.
pub(super) fn count_bits(maps: &[Vec<u64>]) -> u64 {
    maps.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

/// The region and offset of the chunk at `gpa`, which must lie inside guest memory.
pub(super) fn locate(regions: &[Region], gpa: u64, chunk: usize) -> Result<(usize, usize), MigrationError> {
    regions
        .iter()
        .enumerate()
        .find(|(_, r)| gpa >= r.gpa && gpa.saturating_add(chunk as u64) <= r.gpa + r.len)
        .map(|(i, r)| (i, (gpa - r.gpa) as usize))
        .ok_or_else(|| MigrationError::Invalid(format!("chunk at {gpa:#x} outside guest memory")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bitmap_has_one_bit_per_page_and_no_more() {
        assert!(full_bitmap(0).is_empty());
        assert_eq!(full_bitmap(PAGE_SIZE as u64), vec![1]);
        assert_eq!(full_bitmap(128 * PAGE_SIZE as u64), vec![u64::MAX, u64::MAX]);
        assert_eq!(full_bitmap(100 * PAGE_SIZE as u64), vec![u64::MAX, (1 << 36) - 1]);
        // A partial page at the end is not a page.
        assert_eq!(full_bitmap(3 * PAGE_SIZE as u64 + 100), vec![0b111]);
        assert_eq!(count_bits(&[full_bitmap(100 * PAGE_SIZE as u64), full_bitmap(7 * PAGE_SIZE as u64)]), 107);
    }

    #[test]
    fn dirty_bitmaps_merge_region_by_region() {
        let mut dirty = vec![vec![0b0101, 0], vec![1 << 63]];
        or_into(&mut dirty, &[vec![0b0011, 1 << 5], vec![1]]);
        assert_eq!(dirty, vec![vec![0b0111, 1 << 5], vec![(1 << 63) | 1]]);
        assert_eq!(count_bits(&dirty), 6);
    }

    #[test]
    fn chunks_are_located_inside_one_region() {
        let regions = [Region { gpa: 0, len: 0x10000 }, Region { gpa: 0x10_0000, len: 0x2000 }];
        assert_eq!(locate(&regions, 0, 4096).unwrap(), (0, 0));
        assert_eq!(locate(&regions, 0xf000, 4096).unwrap(), (0, 0xf000));
        assert_eq!(locate(&regions, 0x10_1000, 4096).unwrap(), (1, 0x1000));
        assert_eq!(locate(&regions, 0x10_1800, 2048).unwrap(), (1, 0x1800));
        for (gpa, chunk) in [(0x10000, 4096), (0xf800, 4096), (0x10_1800, 4096), (u64::MAX - 10, 4096)] {
            let e = locate(&regions, gpa, chunk).unwrap_err().to_string();
            assert_eq!(e, format!("invalid stream: chunk at {gpa:#x} outside guest memory"));
        }
    }
}
