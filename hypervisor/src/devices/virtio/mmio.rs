//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2).
//!
//! | offset | register            | offset | register                    |
//! |--------|---------------------|--------|-----------------------------|
//! | 0x000  | MagicValue "virt"   | 0x044  | QueueReady                  |
//! | 0x004  | Version (2)         | 0x050  | QueueNotify (ioeventfd)     |
//! | 0x008  | DeviceID            | 0x060  | InterruptStatus             |
//! | 0x00c  | VendorID            | 0x064  | InterruptACK                |
//! | 0x010  | DeviceFeatures      | 0x070  | Status                      |
//! | 0x014  | DeviceFeaturesSel   | 0x080  | QueueDescLow / High (0x084) |
//! | 0x020  | DriverFeatures      | 0x090  | QueueDriverLow / High       |
//! | 0x024  | DriverFeaturesSel   | 0x0a0  | QueueDeviceLow / High       |
//! | 0x030  | QueueSel            | 0x0fc  | ConfigGeneration            |
//! | 0x034  | QueueNumMax         | 0x100+ | device configuration        |
//! | 0x038  | QueueNum            |        |                             |

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{new_queues, ActivateContext, Interrupt, QueueSnapshot, SharedQueues, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// A saved transport state that does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Another number of queues.
    #[error("{device}: snapshot has {saved} queues, the device {device_has}")]
    QueueCount {
        /// The device.
        device: String,
        /// Queues saved.
        saved: usize,
        /// Queues the device has.
        device_has: usize,
    },
    /// A queue the virtio-queue crate refuses.
    #[error("{device}: bad queue in snapshot: {why}")]
    Queue {
        /// The device.
        device: String,
        /// virtio-queue's complaint.
        why: String,
    },
}
/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the notify register (the ioeventfd address).
pub const NOTIFY_OFFSET: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5348_524b; // "SHRK"

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

/// Saved state of a transport and its queues.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmioState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device is in NEEDS_RESET.
    pub needs_reset: bool,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: SharedQueues,
    status: u32,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    active: bool,
    paused: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irqfd` is its interrupt (registered as a KVM irqfd by the caller).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irqfd: EventFd) -> std::io::Result<MmioTransport> {
        let queue_evts =
            device.queue_max_sizes().iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        let queues = Arc::new(Mutex::new(new_queues(device.queue_max_sizes())));
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queue_evts,
            queues,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            active: false,
            paused: false,
        })
    }

    /// The queue notification eventfds, to register as ioeventfds (datamatch = queue index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// Whether the device has been marked NEEDS_RESET.
    pub fn failed(&self) -> bool {
        self.interrupt.failed()
    }

    /// The device status register as the driver sees it.
    pub fn device_status(&self) -> u32 {
        self.status | if self.interrupt.failed() { S_NEEDS_RESET } else { 0 }
    }

    fn with_queue<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
        let mut qs = self.queues.lock().expect("queues poisoned");
        qs.get_mut(self.queue_sel as usize).map(f)
    }

    fn queue_configurable(&self) -> bool {
        // Queues are set up after FEATURES_OK and before DRIVER_OK.
        self.status & S_FEATURES_OK != 0 && self.status & S_DRIVER_OK == 0 && !self.interrupt.failed()
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
        *self.queues.lock().expect("queues poisoned") = new_queues(self.device.queue_max_sizes());
    }

    fn activate(&mut self) {
        {
            let qs = self.queues.lock().expect("queues poisoned");
            for (i, q) in qs.iter().enumerate() {
                if !q.ready() || !q.is_valid(&self.mem) {
                    drop(qs);
                    self.interrupt.fail(format!("{}: queue {i} not ready or invalid at DRIVER_OK", self.device.name()));
                    return;
                }
            }
        }
        let evts = match self.queue_evts.iter().map(|e| e.try_clone()).collect::<std::io::Result<Vec<_>>>() {
            Ok(e) => e,
            Err(e) => {
                self.interrupt.fail(format!("{}: {e}", self.device.name()));
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: self.queues.clone(),
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.active = true;
                if self.paused {
                    self.device.pause();
                }
            }
            Err(e) => self.interrupt.fail(format!("{}: {e}", self.device.name())),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (virtio 1.x 3.1.1); anything else is a broken driver.
        if value & self.status != self.status || value & S_NEEDS_RESET != 0 {
            self.interrupt.fail(format!(
                "{}: invalid status transition {:#x} -> {value:#x}",
                self.device.name(),
                self.status
            ));
            return;
        }
        let added = value & !self.status;
        if added & S_FAILED != 0 {
            self.status = value;
            return;
        }
        if added & S_FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                // Leave FEATURES_OK clear: the driver sees the features were refused.
                self.status = value & !S_FEATURES_OK;
                return;
            }
        }
        if added & S_DRIVER_OK != 0
            && (value & S_FEATURES_OK == 0 || value & (S_ACKNOWLEDGE | S_DRIVER) != (S_ACKNOWLEDGE | S_DRIVER))
        {
            self.interrupt.fail(format!("{}: DRIVER_OK before FEATURES_OK", self.device.name()));
            return;
        }
        self.status = value;
        if added & S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    /// Pauses the device (no more guest-memory writes until resume).
    pub fn pause(&mut self) {
        self.paused = true;
        if self.active {
            self.device.pause();
        }
    }

    /// Resumes the device.
    pub fn resume(&mut self) {
        self.paused = false;
        if self.active {
            self.device.resume();
        }
    }

    /// The transport state, for a snapshot. The device must be paused.
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.failed(),
            queues: self.queues.lock().expect("queues poisoned").iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Restores a saved state, activating the device when the driver had it running. The device
    /// stays paused when the transport is paused.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), RestoreError> {
        let device = self.device.name().to_owned();
        if state.queues.len() != self.device.queue_max_sizes().len() {
            return Err(RestoreError::QueueCount {
                device,
                saved: state.queues.len(),
                device_has: self.device.queue_max_sizes().len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .map(|q| q.to_queue().map_err(|e| RestoreError::Queue { device: device.clone(), why: format!("{e:?}") }))
            .collect::<Result<Vec<_>, _>>()?;
        *self.queues.lock().expect("queues poisoned") = queues;
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(state.interrupt_status, state.needs_reset);
        if self.status & S_DRIVER_OK != 0 && !state.needs_reset {
            self.activate();
        }
        Ok(())
    }
}

fn read_u32(data: &mut [u8], v: u32) {
    if data.len() == 4 {
        data.copy_from_slice(&v.to_le_bytes());
    } else {
        data.fill(0);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.with_queue(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => self.with_queue(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.device_status(),
            0x0fc => 0,
            _ => 0,
        };
        read_u32(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.interrupt.fail(format!("{}: {}-byte access to register {offset:#x}", self.device.name(), data.len()));
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let lo_hi = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | ((v as u64) << 32)
            } else {
                (old & !0xffff_ffff) | v as u64
            }
        };
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & S_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.acked_features = lo_hi(self.acked_features, false),
                        1 => self.acked_features = lo_hi(self.acked_features, true),
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if self.queue_configurable() => {
                let ok = self.with_queue(|q| q.try_set_size(v as u16).is_ok() && v <= u16::MAX as u32);
                if ok != Some(true) {
                    self.interrupt.fail(format!("{}: invalid queue size {v}", self.device.name()));
                }
            }
            0x044 if self.queue_configurable() => {
                self.with_queue(|q| q.set_ready(v == 1));
            }
            0x050 => {
                // Normally handled in the kernel by the ioeventfd; forward if it ever exits here.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.write_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if self.queue_configurable() => {
                let hi = offset & 4 != 0;
                let r = self.with_queue(|q| {
                    let (lo, high) = if hi { (None, Some(v)) } else { (Some(v), None) };
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, high),
                        0x090 => q.set_avail_ring_address(lo, high),
                        _ => q.set_used_ring_address(lo, high),
                    }
                });
                if r.is_none() {
                    self.interrupt.fail(format!("{}: queue {} does not exist", self.device.name(), self.queue_sel));
                }
            }
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                self.interrupt.fail(format!(
                    "{}: queue register {offset:#x} written in status {:#x}",
                    self.device.name(),
                    self.status
                ));
            }
            _ => {
                self.interrupt
                    .fail(format!("{}: write to read-only or unknown register {offset:#x}", self.device.name()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn worker(&mut self) -> &mut Option<crate::devices::virtio::worker::Worker> {
            unreachable!("the dummy device has no worker")
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn pause(&mut self) {}
        fn resume(&mut self) {}
        fn name(&self) -> &str {
            "dummy"
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let a = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(AtomicUsize::new(0));
        let dev = Dummy { activations: a.clone(), resets: r.clone() };
        (MmioTransport::new(Box::new(dev), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap(), a, r)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            w(t, 0x030, q);
            w(t, 0x038, 16);
            let base = 0x10_0000 + q * 0x1000;
            w(t, 0x080, base);
            w(t, 0x090, base + 0x100);
            w(t, 0x0a0, base + 0x200);
            w(t, 0x044, 1);
        }
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 in the high word");
        w(&mut t, 0x030, 1);
        assert_eq!(r(&mut t, 0x034), 16);
        w(&mut t, 0x030, 7);
        assert_eq!(r(&mut t, 0x034), 0, "no queue 7");
        let mut c = [0u8; 2];
        t.read(0x104, &mut c);
        assert_eq!(c, [4, 4]);
    }

    #[test]
    fn negotiation_and_activation() {
        let (mut t, acts, resets) = transport();
        w(&mut t, 0x070, S_ACKNOWLEDGE);
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 1); // VERSION_1
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r(&mut t, 0x070) & S_FEATURES_OK, 0);
        setup_queues(&mut t);
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(acts.load(Ordering::SeqCst), 1);
        assert!(!t.failed());
        let saved = t.state();
        assert_eq!(saved.queues[1].size, 16);
        w(&mut t, 0x070, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, 0x070), 0);
        t.restore(&saved).unwrap();
        assert_eq!(acts.load(Ordering::SeqCst), 2, "restore re-activates a running device");
    }

    #[test]
    fn refused_features_leave_features_ok_clear() {
        let (mut t, _, _) = transport();
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        w(&mut t, 0x020, 1 << 7); // not offered, and no VERSION_1
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        assert_eq!(r(&mut t, 0x070) & S_FEATURES_OK, 0);
        assert!(!t.failed());
    }

    #[test]
    fn garbage_marks_the_device_needs_reset() {
        let (mut t, acts, _) = transport();
        // Queue set-up before FEATURES_OK.
        w(&mut t, 0x038, 16);
        assert!(t.failed());
        assert_ne!(r(&mut t, 0x070) & S_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x060) & 2, 0, "config-change interrupt");
        // A reset clears it.
        w(&mut t, 0x070, 0);
        assert!(!t.failed());
        // Rings outside guest memory at DRIVER_OK.
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        w(&mut t, 0x024, 1);
        w(&mut t, 0x020, 1);
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        for q in 0..2u32 {
            w(&mut t, 0x030, q);
            w(&mut t, 0x038, 16);
            w(&mut t, 0x080, 0xffff_0000);
            w(&mut t, 0x084, 0xffff);
            w(&mut t, 0x044, 1);
        }
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert!(t.failed());
        assert_eq!(acts.load(Ordering::SeqCst), 0);
        // Odd-sized register access, bad queue size, bad status transitions.
        w(&mut t, 0x070, 0);
        t.write(0x070, &[1, 2]);
        assert!(t.failed());
        w(&mut t, 0x070, 0);
        w(&mut t, 0x070, S_ACKNOWLEDGE | S_DRIVER);
        w(&mut t, 0x070, S_ACKNOWLEDGE);
        assert!(t.failed(), "clearing status bits");
    }
}
