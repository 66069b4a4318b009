//! The KVM VM: in-kernel irqchip and PIT, memory slots, dirty logging, and the VM-wide state
//! (PIC, IOAPIC, PIT, kvmclock) saved in snapshots.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{take_vmm_dirty, vmm_bitmap, DirtyLog, GuestMemoryMmap, RegionDirty};
use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, PAGE_SIZE};

/// Errors of VM-level KVM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks the capability {0}")]
    Capability(&'static str),
    /// A KVM VM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens `/dev/kvm` and checks the API version and the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::ApiVersion(version));
    }
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::Capability(name));
        }
    }
    Ok(kvm)
}

/// VM-wide device state kept by KVM: the two PICs, the IOAPIC, the PIT and the clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with its memory registered.
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
    dirty_logging: bool,
}

impl Vm {
    /// Creates the VM: TSS and identity map, in-kernel irqchip, PIT, and the memory slots.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let vm = Vm { fd, memory, dirty_logging: false };
        vm.register_slots(false)?;
        Ok(vm)
    }

    fn register_slots(&self, log_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let host =
                region.get_host_address(vm_memory::MemoryRegionAddress(0)).expect("a mapped region has a host address");
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            };
            // SAFETY: the region is a live mmap owned by `self.memory`, which lives as long as
            // the VM fd (both are fields of `self` and the slot is never pointed elsewhere).
            unsafe { self.fd.set_user_memory_region(mem_region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Starts dirty logging: KVM logs vCPU writes from now on, and the VMM bitmap is cleared.
    pub fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.register_slots(true)?;
        for region in self.memory.iter() {
            vmm_bitmap(region).reset();
        }
        self.dirty_logging = true;
        Ok(())
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.register_slots(false)?;
        self.dirty_logging = false;
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Pages written since logging started or the last call, then cleared: KVM's log of vCPU
    /// writes OR the VMM's bitmap of its own writes.
    pub fn dirty_log(&self) -> Result<DirtyLog, VmError> {
        let mut log = DirtyLog::default();
        for (slot, region) in self.memory.iter().enumerate() {
            let pages = region.len() as usize / PAGE_SIZE;
            let mut bitmap = if self.dirty_logging {
                self.fd.get_dirty_log(slot as u32, region.len() as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?
            } else {
                vec![0; pages.div_ceil(64)]
            };
            migrate::protocol::or_bitmap(&mut bitmap, &take_vmm_dirty(region));
            log.regions.push(RegionDirty { base: region.start_addr().0, pages, bitmap });
        }
        Ok(log)
    }

    /// Reads the VM-wide device state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes VM-wide device state read by [`Vm::save_state`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        let mut clock = state.clock;
        // Only the clock value may be set; the flags describe the source host.
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
