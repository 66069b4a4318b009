//! vCPUs: boot configuration, full state save/restore, and the vCPU thread.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and takes requests (pause, resume, save state,
//! exit) over a channel. A request is followed by kicks — a real-time signal whose handler does
//! nothing, so that a thread blocked in `KVM_RUN` (e.g. a guest idling in `hlt`) returns with
//! `EINTR`. Kicks repeat until the thread answers, which closes the race where a kick lands
//! just before the thread enters `KVM_RUN`.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::memory::GuestMemoryMmap;
use super::vm::Vm;
use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::Bus;

/// Errors of vCPU operations.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The operation.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Building CPUID failed.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Building the MSR list failed.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// Writing the long-mode boot structures failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Not every MSR could be read or written.
    #[error("vCPU {id}: {what}: KVM stopped at MSR {stopped_at:#x} ({done} of {wanted} MSRs done)")]
    MsrCount {
        /// vCPU index.
        id: u8,
        /// The operation.
        what: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        wanted: usize,
        /// The MSR KVM refused.
        stopped_at: u32,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is gone")]
    ThreadGone(u8),
    /// The vCPU thread answered a request with an error.
    #[error("vCPU {id}: {msg}")]
    Request {
        /// vCPU index.
        id: u8,
        /// What went wrong.
        msg: String,
    },
}

/// Everything KVM holds about a vCPU, enough to resume it in a new VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID entries the vCPU ran with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs, kvmclock's included.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Counts of vCPU exits by reason (`status` reports them).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// HLT exits (rare with the in-kernel irqchip).
    pub hlt: AtomicU64,
    /// Returns from `KVM_RUN` because of a signal (kicks).
    pub intr: AtomicU64,
    /// Everything else.
    pub other: AtomicU64,
}

/// A serialisable copy of [`ExitCounters`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ExitCounts {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub intr: u64,
    pub other: u64,
}

impl ExitCounters {
    /// A snapshot of the counters.
    pub fn counts(&self) -> ExitCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            io: l(&self.io),
            mmio: l(&self.mmio),
            hlt: l(&self.hlt),
            intr: l(&self.intr),
            other: l(&self.other),
        }
    }
}

/// Why a vCPU stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Triple fault or `KVM_EXIT_SHUTDOWN`.
    Shutdown,
    /// The guest asked for a reset (i8042 `0xfe`).
    Reset,
    /// The guest executed `hlt` with interrupts off (or KVM reported a HLT exit).
    Halted,
    /// KVM reported an error.
    Error(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Shutdown => write!(f, "guest shut down (triple fault)"),
            StopReason::Reset => write!(f, "guest requested a reset"),
            StopReason::Halted => write!(f, "guest halted"),
            StopReason::Error(e) => write!(f, "vCPU error: {e}"),
        }
    }
}

/// One vCPU and the buses its exits go to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    counters: Arc<ExitCounters>,
}

const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Vcpu, VcpuError> {
        let fd =
            vm.fd().create_vcpu(id as u64).map_err(|source| VcpuError::Kvm { id, what: "KVM_CREATE_VCPU", source })?;
        Ok(Vcpu { id, fd, pio, mmio, counters: Arc::new(ExitCounters::default()) })
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// Exit counters, shared with the VMM.
    pub fn counters(&self) -> Arc<ExitCounters> {
        self.counters.clone()
    }

    /// Prepares the vCPU to enter a kernel at `entry` in long mode (the boot vCPU, index 0, of
    /// `count`).
    pub fn configure_boot(&self, kvm: &Kvm, mem: &GuestMemoryMmap, entry: u64, count: u8) -> Result<(), VcpuError> {
        self.configure_cpu(kvm, count)?;
        let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        regs::setup_long_mode(mem, &mut sregs)?;
        self.fd.set_sregs(&sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs::boot_regs(entry)).map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(self.kvm_err("KVM_SET_FPU"))?;
        self.set_lint()
    }

    /// Prepares an application processor (index > 0) of `count`: its CPUID and MSRs as for the
    /// boot vCPU, its registers and LAPIC as at reset (LINT pins masked: the MP table and MADT
    /// route ExtINT to the boot vCPU only). KVM keeps it waiting for INIT and a
    /// startup IPI (`KVM_MP_STATE_UNINITIALIZED`), which the guest sends, as on hardware.
    pub fn configure_ap(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        self.configure_cpu(kvm, count)?;
        let mp = self.fd.get_mp_state().map_err(self.kvm_err("KVM_GET_MP_STATE"))?;
        if mp.mp_state != kvm_bindings::KVM_MP_STATE_UNINITIALIZED {
            self.fd
                .set_mp_state(kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED })
                .map_err(self.kvm_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// What every vCPU starts with: CPUID (its place in the topology) and boot MSRs.
    fn configure_cpu(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        let cpuid = cpuid::vcpu_cpuid(kvm, self.id, count)?;
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs()?;
        let n = self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            return Err(VcpuError::MsrCount {
                id: self.id,
                what: "boot MSRs",
                done: n,
                wanted: msrs.as_slice().len(),
                stopped_at: msrs.as_slice()[n].index,
            });
        }
        Ok(())
    }

    /// LINT0 as ExtINT and LINT1 as NMI, as a BIOS leaves them (Linux expects this).
    fn set_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const APIC_MODE_NMI: u32 = 0x4;
        const APIC_MODE_EXTINT: u32 = 0x7;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        let mut set = |reg: usize, mode: u32| {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        };
        set(APIC_LVT0, APIC_MODE_EXTINT);
        set(APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))
    }

    /// `KVM_GET_MSRS` of `indices`: the MSRs, and how many of them (from the start) KVM read.
    fn get_msrs(&self, indices: &[u32]) -> Result<(Msrs, usize), VcpuError> {
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(msr::MsrError::Fam)?;
        let n = self.fd.get_msrs(&mut msrs).map_err(self.kvm_err("KVM_GET_MSRS"))?;
        Ok((msrs, n))
    }

    /// Of `indices`, the MSRs KVM both reads and writes on this vCPU, and those it refuses.
    ///
    /// `KVM_GET_MSR_INDEX_LIST` lists what KVM knows how to save, but which of those a vCPU
    /// accepts depends on the CPU vendor and, under nested KVM, on the outer hypervisor (it
    /// differs between the Intel and AMD hosts of the development machines; the nested KVM on
    /// AMD lists MSR 0x10a and refuses its write). Every state read by [`Vcpu::save_state`] must
    /// succeed whole, and be written back whole on restore, so the list is probed once, here,
    /// before the vCPU first runs: a read, then a write of the values read (a no-op for the
    /// guest, as QEMU's every state put is).
    pub fn restorable_msrs(&self, indices: &[u32]) -> Result<(Vec<u32>, Vec<u32>), VcpuError> {
        let (readable, mut refused) = msr::probe(indices, |chunk| self.get_msrs(chunk).map(|(_, n)| n))?;
        let (values, _) = self.get_msrs(&readable)?;
        let value = |index: u32| values.as_slice().iter().find(|e| e.index == index).map_or(0, |e| e.data);
        let (kept, unwritable) = msr::probe(&readable, |chunk| {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, data: value(index), ..Default::default() }).collect();
            let msrs = Msrs::from_entries(&entries).map_err(msr::MsrError::Fam)?;
            self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))
        })?;
        refused.extend(unwritable);
        Ok((kept, refused))
    }

    /// Reads the full vCPU state. The vCPU must not be running.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let cpuid = self.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(self.kvm_err("KVM_GET_CPUID2"))?;
        let (msrs, n) = self.get_msrs(msr_indices)?;
        if n != msr_indices.len() {
            return Err(VcpuError::MsrCount {
                id: self.id,
                what: "save",
                done: n,
                wanted: msr_indices.len(),
                stopped_at: msr_indices[n],
            });
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            msrs: msrs.as_slice().to_vec(),
            regs: self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(self.kvm_err("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(self.kvm_err("KVM_GET_XCRS"))?,
            debug_regs: self.fd.get_debug_regs().map_err(self.kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(self.kvm_err("KVM_GET_MP_STATE"))?,
            vcpu_events: self.fd.get_vcpu_events().map_err(self.kvm_err("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Writes a state read by [`Vcpu::save_state`] (possibly in another process).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(msr::MsrError::Fam)?;
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = state.tsc_khz {
            // Not every host can scale the TSC; the guest keeps time through kvmclock anyway.
            if let Err(e) = self.fd.set_tsc_khz(khz) {
                tracing::debug!("vCPU {}: KVM_SET_TSC_KHZ {khz}: {e}", self.id);
            }
        }
        self.fd.set_mp_state(state.mp_state).map_err(self.kvm_err("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&state.regs).map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd.set_sregs(&state.sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `state.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE (the legacy 4 KiB
        // area), so KVM reads no more than the struct holds.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.kvm_err("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(self.kvm_err("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&state.debug_regs).map_err(self.kvm_err("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&state.lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(msr::MsrError::Fam)?;
        let n = self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if n != state.msrs.len() {
            return Err(VcpuError::MsrCount {
                id: self.id,
                what: "restore",
                done: n,
                wanted: state.msrs.len(),
                stopped_at: state.msrs[n].index,
            });
        }
        self.fd.set_vcpu_events(&state.vcpu_events).map_err(self.kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Runs the vCPU until its next exit and handles it.
    fn run_once(&mut self) -> Result<(), StopReason> {
        let Vcpu { fd, pio, mmio, counters, .. } = self;
        let inc = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                inc(&counters.io);
                if port == I8042_COMMAND_PORT && data == [I8042_RESET] {
                    return Err(StopReason::Reset);
                }
                pio.write(port as u64, data);
                Ok(())
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                inc(&counters.io);
                if !pio.read(port as u64, data) {
                    data.fill(0xff);
                }
                Ok(())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                inc(&counters.mmio);
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
                Ok(())
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                inc(&counters.mmio);
                mmio.write(addr, data);
                Ok(())
            }
            Ok(VcpuExit::Hlt) => {
                inc(&counters.hlt);
                Err(StopReason::Halted)
            }
            Ok(VcpuExit::Shutdown) => Err(StopReason::Shutdown),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Err(StopReason::Error(format!("KVM_EXIT_FAIL_ENTRY reason {reason:#x} on cpu {cpu}")))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the kvm_run union.
                let (suberror, data) = unsafe {
                    let i = fd.get_kvm_run().__bindgen_anon_1.internal;
                    (i.suberror, i.data[..(i.ndata as usize).min(16)].to_vec())
                };
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let s = fd.get_sregs().unwrap_or_default();
                Err(StopReason::Error(format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {suberror} data {data:x?} at rip {rip:#x} (cr0 {:#x} cr4 {:#x} efer {:#x})",
                    s.cr0, s.cr4, s.efer
                )))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Err(StopReason::Error(format!("system event {kind}"))),
            Ok(other) => {
                inc(&counters.other);
                tracing::debug!("unhandled vCPU exit {other:?}");
                Ok(())
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                inc(&counters.intr);
                Ok(())
            }
            Err(e) => Err(StopReason::Error(format!("KVM_RUN: {e}"))),
        }
    }

    /// Starts the vCPU thread, paused or running. `stopped` learns when the guest stops the
    /// vCPU by itself (shutdown, reset, error).
    pub fn spawn(
        self,
        paused: bool,
        msr_indices: Arc<Vec<u32>>,
        stopped: Sender<(u8, StopReason)>,
        throttle: Arc<AtomicU8>,
    ) -> Result<VcpuHandle, VcpuError> {
        static KICK_HANDLER: Once = Once::new();
        KICK_HANDLER.call_once(|| {
            extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
            register_signal_handler(SIGRTMIN(), kick).expect("SIGRTMIN is a valid signal");
        });
        let id = self.id;
        let counters = self.counters.clone();
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(self, paused, msr_indices, req_rx, resp_tx, stopped, throttle))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { id, requests: req_tx, responses: resp_rx, thread: Some(thread), counters })
    }
}

enum VcpuRequest {
    Pause,
    Resume,
    SaveState,
    Exit,
}

enum VcpuResponse {
    Done,
    State(Box<Result<VcpuState, VcpuError>>),
}

fn vcpu_loop(
    mut vcpu: Vcpu,
    mut paused: bool,
    msr_indices: Arc<Vec<u32>>,
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
    stopped: Sender<(u8, StopReason)>,
    throttle: Arc<AtomicU8>,
) {
    // Returns false when the thread must end.
    let handle = |req: VcpuRequest, vcpu: &Vcpu, paused: &mut bool| -> bool {
        let resp = match req {
            VcpuRequest::Pause => {
                *paused = true;
                VcpuResponse::Done
            }
            VcpuRequest::Resume => {
                *paused = false;
                VcpuResponse::Done
            }
            VcpuRequest::SaveState => VcpuResponse::State(Box::new(vcpu.save_state(&msr_indices))),
            VcpuRequest::Exit => {
                let _ = responses.send(VcpuResponse::Done);
                return false;
            }
        };
        responses.send(resp).is_ok()
    };
    loop {
        if paused {
            match requests.recv() {
                Ok(req) => {
                    if !handle(req, &vcpu, &mut paused) {
                        return;
                    }
                }
                Err(_) => return,
            }
            continue;
        }
        loop {
            match requests.try_recv() {
                Ok(req) => {
                    if !handle(req, &vcpu, &mut paused) {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if paused {
            continue;
        }
        let ran = std::time::Instant::now();
        if let Err(reason) = vcpu.run_once() {
            paused = true;
            let _ = stopped.send((vcpu.id, reason));
        }
        // Auto-converge: stay off the CPU for `p` percent of the time (the VMM kicks running
        // vCPUs every few milliseconds while throttling, so a busy guest comes back here).
        let p = throttle.load(Ordering::Relaxed).min(99) as u32;
        if p > 0 {
            let off = ran.elapsed() * p / (100 - p);
            std::thread::sleep(off.min(Duration::from_millis(100)));
        }
    }
}

/// Kicks a vCPU thread out of `KVM_RUN` (see [`VcpuHandle::kicker`]).
#[derive(Clone, Copy)]
pub struct Kicker(Option<libc::pthread_t>);

impl Kicker {
    /// Sends the kick signal; a thread outside `KVM_RUN` ignores it.
    pub fn kick(&self) {
        if let Some(t) = self.0 {
            // SAFETY: the pthread_t belongs to a vCPU thread, which the VMM joins only after
            // stopping every kicker (Vmm::set_throttle(0) in shutdown); the handler is a no-op.
            unsafe { libc::pthread_kill(t, SIGRTMIN()) };
        }
    }
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<ExitCounters>,
}

impl VcpuHandle {
    fn request(&self, req: VcpuRequest) -> Result<VcpuResponse, VcpuError> {
        self.requests.send(req).map_err(|_| VcpuError::ThreadGone(self.id))?;
        loop {
            if let Some(t) = &self.thread {
                // Best effort: a thread that already left KVM_RUN ignores the signal.
                let _ = t.kill(SIGRTMIN());
            }
            match self.responses.recv_timeout(Duration::from_millis(2)) {
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::ThreadGone(self.id)),
            }
        }
    }

    /// A handle that can kick this vCPU out of `KVM_RUN` from another thread, while the vCPU
    /// thread lives.
    pub fn kicker(&self) -> Kicker {
        use std::os::unix::thread::JoinHandleExt;
        Kicker(self.thread.as_ref().map(|t| t.as_pthread_t()))
    }

    /// Stops the vCPU and waits until it is out of `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request(VcpuRequest::Pause).map(|_| ())
    }

    /// Lets the vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.request(VcpuRequest::Resume).map(|_| ())
    }

    /// Reads the vCPU state; the vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        match self.request(VcpuRequest::SaveState)? {
            VcpuResponse::State(s) => *s,
            VcpuResponse::Done => {
                Err(VcpuError::Request { id: self.id, msg: "unexpected answer to save-state".into() })
            }
        }
    }

    /// Exit counters of this vCPU.
    pub fn exit_counts(&self) -> ExitCounts {
        self.counters.counts()
    }

    /// Ends the vCPU thread.
    pub fn exit(&mut self) {
        let _ = self.request(VcpuRequest::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}
