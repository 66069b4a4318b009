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

/// Offset of the QueueNotify register.
const REG_QUEUE_NOTIFY: u64 = 0x050;

/// A transport whose queue notifications are collected and sent by
/// [`DeferredNotify::flush`], once per poll of the device instead of once
/// per buffer: every notification is an exit, and smoltcp sends and recycles
/// buffers one at a time.
pub struct DeferredNotify {
    inner: Mmio,
    /// Bit `q`: queue `q` has new buffers the device was not told about.
    pending: &'static core::sync::atomic::AtomicU32,
}

impl DeferredNotify {
    pub fn new(inner: Mmio, pending: &'static core::sync::atomic::AtomicU32) -> DeferredNotify {
        DeferredNotify { inner, pending }
    }

    /// Notifies the queues of the transport at `base` marked in `pending`.
    pub fn flush(base: u64, pending: &core::sync::atomic::AtomicU32) {
        let mut queues = pending.swap(0, core::sync::atomic::Ordering::Relaxed);
        while queues != 0 {
            let q = queues.trailing_zeros();
            queues &= queues - 1;
            // SAFETY: `base` is the virtio-mmio window of this transport;
            // writing a queue index to QueueNotify is what `notify` does.
            unsafe { ((base + REG_QUEUE_NOTIFY) as *mut u32).write_volatile(q) };
        }
    }
}

use virtio_drivers::transport::{DeviceStatus, InterruptStatus};
use zerocopy::{FromBytes, Immutable, IntoBytes};

impl Transport for DeferredNotify {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        if queue < 32 {
            self.pending.fetch_or(1 << queue, core::sync::atomic::Ordering::Relaxed);
        } else {
            self.inner.notify(queue)
        }
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner.queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
