//! The global heap: a `linked_list_allocator` over a region of usable RAM
//! right after the kernel image (chosen from the e820 map at boot).
//!
//! (The module is called `allocator` rather than `alloc` so it does not clash
//! with the `alloc` crate.)

use linked_list_allocator::LockedHeap;

use crate::bootparams::{align_up, BootParams};

/// Heap size wanted; less is used if the e820 region is smaller.
pub const HEAP_SIZE: u64 = 4 << 20;
/// Smallest heap the kernel can live with.
const HEAP_MIN: u64 = 256 << 10;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    /// End of the kernel image including .bss (linker script).
    static __image_end: u8;
}

/// Physical end of the loaded kernel image.
pub fn image_end() -> u64 {
    // Only the address of the linker-defined symbol is taken (no read).
    core::ptr::addr_of!(__image_end) as u64
}

/// Sets the heap up right after the kernel image, inside the usable RAM
/// region that contains it. Returns `[start, end)` of the heap.
pub fn init(boot: &BootParams) -> (u64, u64) {
    let start = align_up(image_end(), 4096);
    let region = boot
        .usable_ram(0, u64::MAX)
        .find(|&(s, e)| s <= start && start < e)
        .unwrap_or_else(|| panic!("no usable e820 RAM after the kernel image (0x{start:x})"));
    let size = HEAP_SIZE.min(region.1 - start);
    assert!(size >= HEAP_MIN, "heap region too small: {size} bytes at 0x{start:x}");
    // SAFETY: [start, start + size) is usable RAM per e820, above the kernel
    // image and below the end of its region, identity-mapped, used by nothing
    // else; `init` runs once, before the first allocation.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
    (start, start + size)
}

/// Free heap bytes.
pub fn free() -> usize {
    HEAP.lock().free()
}
