//! virtio 1.x devices on the virtio-mmio transport (version 2), as Linux finds them through
//! `virtio_mmio.device=<size>@<base>:<irq>` on its command line.
//!
//! - [`mmio`]: the register file of the transport, feature negotiation and queue set-up.
//! - [`worker`]: the thread each active device runs, which can be paused and resumed (so that
//!   a paused VM's memory does not change under a snapshot or a migration).
//! - [`net`] (tap-backed) and [`block`] (qcow2 through `imago`): the devices.
//!
//! Notifications arrive through ioeventfds (the guest's write to `QueueNotify` never leaves the
//! kernel) and interrupts leave through irqfds. Everything a device writes into guest memory goes
//! through `vm-memory`, so it lands in the VMM's dirty bitmap. A guest that breaks the protocol
//! (bad ring addresses, a descriptor outside RAM, a malformed request) gets the device marked
//! `NEEDS_RESET` with a configuration-change interrupt; the VMM carries on.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = 1;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up every queue the device needs.
    #[error("queue {0} is not ready or not valid")]
    BadQueue(usize),
    /// Creating the worker failed.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// The interrupt line of one device: the interrupt status register and the irqfd behind it.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt raised through `irqfd` (registered with KVM as an irqfd).
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt { status: AtomicU32::new(0), irqfd, needs_reset: AtomicBool::new(false) }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    /// Signals that used buffers are available.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Marks the device as needing a reset (the guest broke the protocol) and tells the driver.
    pub fn fail(&self, why: impl std::fmt::Display) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            tracing::warn!("virtio device needs reset: {why}");
            self.raise(INT_CONFIG);
        }
    }

    /// Whether the device has failed.
    pub fn failed(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Acknowledges interrupt bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Back to the reset state.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }
}

/// Queues shared between the transport (snapshots) and the device worker (processing).
pub type SharedQueues = Arc<Mutex<Vec<Queue>>>;

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and ready.
    pub queues: SharedQueues,
    /// One notification eventfd per queue (ioeventfds on `QueueNotify`).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The device's worker thread, when active.
    fn worker(&mut self) -> &mut Option<worker::Worker>;
    /// Stops processing and forgets the queues (driver reset).
    fn reset(&mut self) {
        *self.worker() = None;
    }
    /// Stops touching guest memory until [`VirtioDevice::resume`]; returns once quiescent.
    fn pause(&mut self) {
        if let Some(w) = self.worker() {
            w.pause();
        }
    }
    /// Resumes processing (and catches up on what arrived meanwhile).
    fn resume(&mut self) {
        if let Some(w) = self.worker() {
            w.resume();
        }
    }
    /// A short name for logs (`net0`, `blk0`).
    fn name(&self) -> &str;
}

/// Reads `data.len()` bytes of a configuration space `space` at `offset` (zeros past its end).
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = space.get(offset as usize + i).copied().unwrap_or(0);
    }
}

/// Serialisable form of a queue (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> QueueSnapshot {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds the queue.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// New, unconfigured queues of the given maximum sizes.
pub fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes.iter().map(|&m| Queue::new(m).expect("queue maximum sizes are powers of two")).collect()
}

/// Signals used buffers on queue `index` unless the driver suppressed interrupts
/// (`VIRTQ_AVAIL_F_NO_INTERRUPT`, or the event index when negotiated).
pub fn notify_used(queues: &SharedQueues, index: usize, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    let needed = queues
        .lock()
        .expect("queues poisoned")
        .get_mut(index)
        .map(|q| q.needs_notification(mem).unwrap_or(true))
        .unwrap_or(true);
    if needed {
        interrupt.signal_used();
    }
}

/// Marks a queue as not ready after a reset (virtio-queue keeps max_size).
pub fn reset_queue(q: &mut Queue) {
    q.reset();
}
