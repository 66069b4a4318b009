//! virtio-mmio devices (found through `virtio_mmio.device=` on the command
//! line) and the identity-mapped HAL the `virtio-drivers` crate needs.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::config::MmioDevice;
use crate::println;

/// Guest-physical = virtual everywhere (identity page tables), so DMA memory
/// is plain heap memory and sharing a buffer is taking its address.
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: allocations are page-aligned, zeroed heap memory that stays valid
// until `dma_dealloc`; physical addresses equal virtual ones.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (virtio-drivers never asks
        // for 0 pages).
        let ptr = unsafe { alloc_zeroed(dma_layout(pages.max(1))) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as PhysAddr, p),
            None => {
                println!("virtio: DMA allocation of {pages} pages failed (heap free {})", crate::allocator::free());
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: `vaddr` came from `dma_alloc` with the same page count.
        unsafe { dealloc(vaddr.as_ptr(), dma_layout(pages.max(1))) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The transport type of every device here.
pub type Mmio = MmioTransport<'static>;

/// A device found on the command line, with its transport.
pub struct Found {
    pub dev: MmioDevice,
    pub kind: DeviceType,
    pub transport: Mmio,
}

/// Opens the transport of every announced device (skipping, with a message,
/// windows that hold no virtio device).
pub fn discover(devices: &[MmioDevice]) -> alloc::vec::Vec<Found> {
    let mut found = alloc::vec::Vec::new();
    for &dev in devices {
        let Some(header) = NonNull::new(dev.base as *mut VirtIOHeader) else { continue };
        // SAFETY: the VMM announced a virtio-mmio window of `dev.size` bytes at
        // `dev.base` (identity-mapped, below 4 GiB); each window is used by
        // exactly one transport, for the rest of the kernel's life.
        match unsafe { MmioTransport::new(header, dev.size as usize) } {
            Ok(transport) => {
                let kind = transport.device_type();
                found.push(Found { dev, kind, transport });
            }
            Err(e) => println!("virtio: no device at 0x{:x}: {e:?}", dev.base),
        }
    }
    found
}

/// Offset of the Status register in a virtio-mmio window.
const REG_STATUS: u64 = 0x070;
/// DEVICE_NEEDS_RESET.
const STATUS_NEEDS_RESET: u32 = 0x40;

/// Whether the device at `base` reports NEEDS_RESET (one MMIO read).
pub fn needs_reset(base: u64) -> bool {
    // SAFETY: `base` is an announced virtio-mmio window; reading Status has no
    // side effect.
    unsafe { ((base + REG_STATUS) as *const u32).read_volatile() & STATUS_NEEDS_RESET != 0 }
}
