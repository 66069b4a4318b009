//! The VMM: builds a VM (from a kernel or a snapshot), and controls it — pause, resume,
//! snapshot, status, memory digests and dirty logging. The control API and the migration code
//! drive it through these methods.

use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::cpuid;
use crate::arch::layout::MMIO_DEVICES_START;
use crate::arch::{acpi, mptable, msr};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::serial::{SerialDevice, SerialSnapshot, COM1_IRQ, COM1_PORT};
use crate::devices::virtio::block::{self, Block, DiskConfig};
use crate::devices::virtio::mmio::{MmioState, MmioTransport, MMIO_WINDOW, NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::VirtioDevice;
use crate::loader::{self, LoaderError};
use crate::snapshot::{self, SnapshotError, SnapshotState, SnapshotStats, SNAPSHOT_VERSION};
use crate::vstate::memory::{self, DirtyLog, MemoryDigest, MemoryError};
use crate::vstate::vcpu::{ExitCounts, StopReason, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// Errors of VMM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM or VM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// vCPU setup or control failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Reading or writing a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The MSR list could not be read.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Device setup failed.
    #[error("device setup: {0}")]
    Device(String),
    /// A saved state from a CPU of another vendor.
    #[error("the VM's state was saved on a {saved} CPU and this host's is {host}: a running guest cannot move between CPU vendors")]
    CpuVendor {
        /// The vendor the state was saved on.
        saved: String,
        /// This host's vendor.
        host: String,
    },
    /// The serial output file cannot be created.
    #[error("cannot create serial output {path}: {source}")]
    SerialFile {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The operation needs another run state.
    #[error("the VM is {0}")]
    WrongState(&'static str),
    /// A tap cannot be opened.
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::tap::TapError),
    /// A disk cannot be opened.
    #[error(transparent)]
    Disk(#[from] block::DiskError),
}

/// QEMU's self-announce frame for `mac` ([`netreconf::frames::qemu_rarp`], the frame vnetd
/// detects a moved VM by), preceded by the tap's zeroed virtio-net header.
pub fn rarp_announce(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; crate::devices::virtio::tap::VNET_HDR_LEN];
    f.extend_from_slice(&netreconf::frames::qemu_rarp(netreconf::frames::Mac(*mac)));
    f
}

/// First GSI of virtio devices (after the legacy ISA interrupts in use).
const VIRTIO_FIRST_GSI: u32 = 5;

/// What a device is, as recorded in snapshots (so that a restore re-opens the same backends).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// A NIC.
    Net(NetConfig),
    /// A disk.
    Block(DiskConfig),
}

/// A device in a snapshot: its backend and its transport state.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeviceSnapshot {
    /// Backend.
    pub config: DeviceConfig,
    /// Transport and queues.
    pub mmio: MmioState,
}

/// A virtio device as the VMM keeps it.
struct DeviceSlot {
    config: DeviceConfig,
    /// For disks: what a migration needs of it.
    disk: Option<block::DiskHandle>,
    /// For NICs: a handle on the tap, to announce the guest after a migration.
    announce: Option<Tap>,
    transport: Arc<Mutex<MmioTransport>>,
    base: u64,
    gsi: u32,
}

/// The device part of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    /// `net0`, `blk0`, ...
    pub name: String,
    /// MMIO base address.
    pub mmio_base: String,
    /// Interrupt line.
    pub irq: u32,
    /// Whether the device is in NEEDS_RESET (the guest broke the protocol).
    pub needs_reset: bool,
    /// For a disk: its overlay (the VM's own file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
}

/// The devices of a VM in their MMIO order: the disk first, then the NICs.
pub fn device_list(cfg: &VmConfig) -> Vec<DeviceConfig> {
    cfg.disk
        .iter()
        .map(|d| DeviceConfig::Block(d.clone()))
        .chain(cfg.net.iter().map(|n| DeviceConfig::Net(n.clone())))
        .collect()
}

/// The kernel command-line fragment announcing `n` virtio-mmio devices the Linux way.
pub fn virtio_cmdline(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "virtio_mmio.device=4K@{:#x}:{}",
                MMIO_DEVICES_START + i as u64 * MMIO_WINDOW,
                VIRTIO_FIRST_GSI + i as u32
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run state of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs paused by the user or the VMM.
    Paused,
    /// The guest stopped itself (shutdown, reset, error).
    Stopped(String),
}

impl RunState {
    /// The name used by the API.
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped(_) => "stopped",
        }
    }
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// VM name.
    pub name: String,
    /// "running", "paused" or "stopped".
    pub state: &'static str,
    /// Whether the vCPUs are running.
    pub running: bool,
    /// Why the guest stopped, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Whether dirty logging is on.
    pub dirty_logging: bool,
    /// vCPU exit counts, by vCPU.
    pub vcpus: Vec<VcpuStatus>,
    /// virtio devices.
    pub devices: Vec<DeviceStatus>,
}

/// Per-vCPU part of [`Status`].
#[derive(Debug, Clone, Serialize)]
pub struct VcpuStatus {
    /// vCPU index.
    pub id: u8,
    /// Exit counts by reason.
    pub exits: ExitCounts,
}

/// A running (or paused) VM and its devices.
pub struct Vmm {
    name: String,
    cmdline: String,
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    devices: Vec<DeviceSlot>,
    throttle: Arc<AtomicU8>,
    kicker: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    state: RunState,
    started: Instant,
    stopped: Receiver<(u8, StopReason)>,
}

fn serial_writer(out: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => Box::new(LineWriter::new(
            std::fs::File::create(path)
                .map_err(|source| VmmError::SerialFile { path: path.display().to_string(), source })?,
        )),
        SerialOutput::Buffer(b) => Box::new(b.clone()),
        SerialOutput::Sink => Box::new(std::io::sink()),
    })
}

/// The pieces every VM has, before its vCPUs exist.
struct Platform {
    kvm: Kvm,
    vm: Vm,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    devices: Vec<DeviceSlot>,
}

/// The backends of a restored guest: those `given` on this host's command line, kind by kind
/// (NICs, disks) in the recorded order; a kind the command line gives none of keeps the
/// recorded backends. The numbers must match for every kind given.
fn merge_devices(recorded: &[DeviceConfig], given: Vec<DeviceConfig>) -> Result<Vec<DeviceConfig>, VmmError> {
    let is_net = |d: &DeviceConfig| matches!(d, DeviceConfig::Net(_));
    let count = |v: &[DeviceConfig], net: bool| v.iter().filter(|d| is_net(d) == net).count();
    for net in [true, false] {
        let g = count(&given, net);
        if g > 0 && g != count(recorded, net) {
            return Err(VmmError::Device(format!(
                "the guest has {} NIC(s) and {} disk(s); the command line gives {} and {}",
                count(recorded, true),
                count(recorded, false),
                count(&given, true),
                count(&given, false),
            )));
        }
    }
    let (mut nets, mut disks): (Vec<_>, Vec<_>) = given.into_iter().partition(|d| is_net(d));
    nets.reverse();
    disks.reverse();
    Ok(recorded
        .iter()
        .map(|r| {
            let pool = if is_net(r) { &mut nets } else { &mut disks };
            pool.pop().unwrap_or_else(|| r.clone())
        })
        .collect())
}

/// Opens a device's backend; `index` counts devices of the same kind (`net0`, `net1`, `blk0`).
type Opened = (Box<dyn VirtioDevice>, Option<Tap>, Option<block::DiskHandle>);

fn open_device(config: &DeviceConfig, index: usize) -> Result<Opened, VmmError> {
    Ok(match config {
        DeviceConfig::Net(n) => {
            let tap = Tap::open(&n.tap, n.mac)?;
            if let Some(br) = &n.bridge {
                tap.attach_to_bridge(br)?;
            }
            let announce = tap.try_clone().map_err(|e| VmmError::Device(format!("tap {}: {e}", n.tap)))?;
            (Box::new(Net::new(format!("net{index}"), tap, n.mac)), Some(announce), None)
        }
        DeviceConfig::Block(d) => {
            let b = Block::new(format!("blk{index}"), block::open_overlay(d)?);
            let handle = b.handle(d.clone());
            (Box::new(b), None, Some(handle))
        }
    })
}

fn build_devices(vm: &Vm, configs: &[DeviceConfig], mmio: &mut Bus) -> Result<Vec<DeviceSlot>, VmmError> {
    let dev_err = |e: std::io::Error| VmmError::Device(e.to_string());
    let mut slots = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let same_kind =
            configs[..i].iter().filter(|c| std::mem::discriminant(*c) == std::mem::discriminant(config)).count();
        let (device, announce, disk) = open_device(config, same_kind)?;
        let base = MMIO_DEVICES_START + i as u64 * MMIO_WINDOW;
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(dev_err)?;
        vm.fd().register_irqfd(&irq, gsi).map_err(|e| VmmError::Device(format!("{}: irqfd: {e}", device.name())))?;
        let transport = MmioTransport::new(device, vm.memory().clone(), irq).map_err(dev_err)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(|e| VmmError::Device(format!("{}: ioeventfd: {e}", transport.name())))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, MMIO_WINDOW, transport.clone()).map_err(|e| VmmError::Device(e.to_string()))?;
        slots.push(DeviceSlot { config: config.clone(), disk, announce, transport, base, gsi });
    }
    Ok(slots)
}

fn build_platform(
    mem: memory::GuestMemoryMmap,
    serial_out: &SerialOutput,
    serial_state: Option<&SerialSnapshot>,
    devices: &[DeviceConfig],
) -> Result<Platform, VmmError> {
    let kvm = open_kvm()?;
    let vm = Vm::new(&kvm, mem)?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device(format!("serial eventfd: {e}")))?;
    vm.fd().register_irqfd(&irq, COM1_IRQ).map_err(|e| VmmError::Device(format!("serial irqfd: {e}")))?;
    let out = serial_writer(serial_out)?;
    let serial = match serial_state {
        Some(s) => SerialDevice::from_snapshot(s, irq, out).map_err(|e| VmmError::Device(e.to_string()))?,
        None => SerialDevice::new(irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut pio = Bus::new();
    pio.insert(COM1_PORT, 8, serial.clone()).map_err(|e| VmmError::Device(e.to_string()))?;
    let mut mmio = Bus::new();
    let devices = build_devices(&vm, devices, &mut mmio)?;
    Ok(Platform { kvm, vm, pio: Arc::new(pio), mmio: Arc::new(mmio), serial, devices })
}

impl Vmm {
    /// Boots a VM from a kernel.
    pub fn boot(cfg: &VmConfig) -> Result<Vmm, VmmError> {
        let devices = device_list(cfg);
        let mut kernel = cfg.kernel.clone();
        if !devices.is_empty() {
            kernel.cmdline = format!("{} {}", kernel.cmdline.trim(), virtio_cmdline(devices.len())).trim().to_owned();
        }
        // Check /dev/kvm before spending time on memory and the kernel.
        open_kvm()?;
        let mem = memory::create_guest_memory(cfg.mem_size)?;
        let entry = loader::load_kernel(&mem, &kernel)?.entry;
        mptable::write(&mem, cfg.vcpus)?;
        acpi::write(&mem, cfg.vcpus)?;
        let p = build_platform(mem, &cfg.serial, None, &devices)?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&p.vm, id, p.pio.clone(), p.mmio.clone())?;
            if id == 0 {
                vcpu.configure_boot(&p.kvm, p.vm.memory(), entry, cfg.vcpus)?;
            } else {
                vcpu.configure_ap(&p.kvm, cfg.vcpus)?;
            }
            vcpus.push(vcpu);
        }
        Self::start(cfg.name.clone(), kernel.cmdline, p, vcpus, cfg.start_paused)
    }

    /// Restores a VM from a snapshot directory. Name, serial output and whether to start paused
    /// come from `cfg`; memory size and everything else from the snapshot.
    pub fn restore(dir: &Path, name: Option<String>, serial: &SerialOutput, paused: bool) -> Result<Vmm, VmmError> {
        let state = snapshot::read_state(dir)?;
        open_kvm()?;
        let mem = memory::create_guest_memory(state.mem_size)?;
        snapshot::read_memory(dir, &mem)?;
        Self::restore_with(state, mem, name, serial, paused, None)
    }

    /// Builds a VM around memory that already holds the guest (a snapshot's, or what a
    /// migration installed) and its saved state. `devices` replaces the backends recorded in the
    /// state (a destination host has its own taps and disk paths); they must match in number
    /// and kind.
    pub fn restore_with(
        state: SnapshotState,
        mem: memory::GuestMemoryMmap,
        name: Option<String>,
        serial: &SerialOutput,
        paused: bool,
        devices: Option<Vec<DeviceConfig>>,
    ) -> Result<Vmm, VmmError> {
        // KVM cannot carry a running guest across CPU vendors (the development machines change
        // vendor from day to day): say so first, before any tap, disk or device is opened,
        // instead of failing on the first vendor-specific MSR.
        let saved = state.vcpus.first().and_then(|v| cpuid::vendor(&v.cpuid));
        let host = cpuid::host_vendor(&open_kvm()?).map_err(VcpuError::from)?;
        if let (Some(saved), Some(host)) = (saved, host) {
            if saved != host {
                return Err(VmmError::CpuVendor { saved, host });
            }
        }
        if memory::mem_size(&mem) != state.mem_size {
            return Err(VmmError::Device(format!(
                "guest memory is {} bytes, the saved state {}",
                memory::mem_size(&mem),
                state.mem_size
            )));
        }
        let recorded: Vec<DeviceConfig> = state.devices.iter().map(|d| d.config.clone()).collect();
        let configs = match devices {
            None => recorded,
            Some(given) => merge_devices(&recorded, given)?,
        };
        let p = build_platform(mem, serial, Some(&state.serial), &configs)?;
        p.vm.restore_state(&state.vm)?;
        for (slot, saved) in p.devices.iter().zip(&state.devices) {
            let mut t = slot.transport.lock().expect("device lock poisoned");
            // Restored paused: nothing may touch memory before the vCPUs run.
            t.pause();
            t.restore(&saved.mmio).map_err(|e| VmmError::Device(e.to_string()))?;
            if !paused {
                t.resume();
            }
        }
        let mut vcpus = Vec::new();
        for (id, vs) in state.vcpus.iter().enumerate() {
            let vcpu = Vcpu::new(&p.vm, id as u8, p.pio.clone(), p.mmio.clone())?;
            vcpu.restore_state(vs)?;
            vcpus.push(vcpu);
        }
        Self::start(name.unwrap_or(state.name), state.cmdline, p, vcpus, paused)
    }

    fn start(name: String, cmdline: String, p: Platform, vcpus: Vec<Vcpu>, paused: bool) -> Result<Vmm, VmmError> {
        let listed = msr::saved_msr_indices(&p.kvm)?;
        let (restorable, refused) = match vcpus.first() {
            Some(v) => v.restorable_msrs(&listed)?,
            None => (listed, Vec::new()),
        };
        if !refused.is_empty() {
            tracing::info!("KVM lists MSRs it does not read or write on this host; not saved: {refused:x?}");
        }
        let msrs = Arc::new(restorable);
        let (tx, stopped) = channel();
        let throttle = Arc::new(AtomicU8::new(0));
        let handles = vcpus
            .into_iter()
            .map(|v| v.spawn(paused, msrs.clone(), tx.clone(), throttle.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vmm {
            name,
            cmdline,
            vm: p.vm,
            vcpus: handles,
            serial: p.serial,
            devices: p.devices,
            throttle,
            kicker: None,
            state: if paused { RunState::Paused } else { RunState::Running },
            started: Instant::now(),
            stopped,
        })
    }

    /// Guest memory (shared: the mapping lives as long as any clone).
    pub fn memory(&self) -> &memory::GuestMemoryMmap {
        self.vm.memory()
    }

    /// The VM's disks, in device order.
    pub fn disks(&self) -> Vec<block::DiskHandle> {
        self.devices.iter().filter_map(|d| d.disk.clone()).collect()
    }

    /// Sends QEMU's self-announcement after a migration: for each NIC, five RARP frames (MAC →
    /// broadcast, ethertype 0x8035, opcode 3) on its tap at about 0, 50, 200, 450 and 800 ms,
    /// so that switches and site gateways learn where the guest now is.
    pub fn announce_self(&self) {
        for d in &self.devices {
            let (DeviceConfig::Net(n), Some(tap)) = (&d.config, &d.announce) else { continue };
            let tap = match tap.try_clone() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("announce on {}: {e}", n.tap);
                    continue;
                }
            };
            let frame = rarp_announce(&n.mac);
            std::thread::spawn(move || {
                let mut tap = tap;
                // As QEMU's announce timer.
                for gap in netreconf::frames::QEMU_ANNOUNCE_GAPS_MS {
                    std::thread::sleep(std::time::Duration::from_millis(gap));
                    if let Err(e) = tap.write(&frame) {
                        tracing::warn!("announce on {}: {e}", tap.name());
                    }
                }
            });
        }
    }

    /// Name of the VM.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current run state.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The VM (memory, dirty log).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Checks whether a vCPU stopped on its own; if so, pauses the others and records why.
    pub fn poll_stopped(&mut self) -> Option<String> {
        let (id, reason) = self.stopped.try_recv().ok()?;
        for v in &self.vcpus {
            let _ = v.pause();
        }
        self.flush_serial();
        let msg = format!("vCPU {id}: {reason}");
        self.state = RunState::Stopped(msg.clone());
        Some(msg)
    }

    /// Pauses every vCPU (no-op when paused).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Running => {
                for v in &self.vcpus {
                    v.pause()?;
                }
                for d in &self.devices {
                    d.transport.lock().expect("device lock poisoned").pause();
                }
                self.state = RunState::Paused;
                self.flush_serial();
                Ok(())
            }
            RunState::Paused => Ok(()),
            RunState::Stopped(_) => Err(VmmError::WrongState("stopped")),
        }
    }

    /// Resumes every vCPU (no-op when running).
    pub fn resume(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Paused => {
                for d in &self.devices {
                    d.transport.lock().expect("device lock poisoned").resume();
                }
                for v in &self.vcpus {
                    v.resume()?;
                }
                self.state = RunState::Running;
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::Stopped(_) => Err(VmmError::WrongState("stopped")),
        }
    }

    /// The status report.
    pub fn status(&self) -> Status {
        Status {
            name: self.name.clone(),
            state: self.state.name(),
            running: self.state == RunState::Running,
            stop_reason: match &self.state {
                RunState::Stopped(r) => Some(r.clone()),
                _ => None,
            },
            uptime_ms: self.started.elapsed().as_millis() as u64,
            memory_bytes: memory::mem_size(self.vm.memory()),
            dirty_logging: self.vm.dirty_logging(),
            vcpus: self
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| VcpuStatus { id: i as u8, exits: v.exit_counts() })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|d| {
                    let t = d.transport.lock().expect("device lock poisoned");
                    DeviceStatus {
                        name: t.name().to_owned(),
                        mmio_base: format!("{:#x}", d.base),
                        irq: d.gsi,
                        needs_reset: t.failed(),
                        overlay: d.disk.as_ref().map(|h| h.config.overlay.display().to_string()),
                    }
                })
                .collect(),
        }
    }

    /// Everything but memory, read from a paused VM.
    pub fn save_state(&self) -> Result<SnapshotState, VmmError> {
        if self.state == RunState::Running {
            return Err(VmmError::WrongState("running"));
        }
        Ok(SnapshotState {
            version: SNAPSHOT_VERSION,
            name: self.name.clone(),
            mem_size: memory::mem_size(self.vm.memory()),
            cmdline: self.cmdline.clone(),
            vm: self.vm.save_state()?,
            vcpus: self.vcpus.iter().map(|v| v.save_state()).collect::<Result<_, _>>()?,
            serial: self.serial.lock().expect("serial lock poisoned").snapshot(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceSnapshot {
                    config: d.config.clone(),
                    mmio: d.transport.lock().expect("device lock poisoned").state(),
                })
                .collect(),
            paused: false,
        })
    }

    /// Writes a snapshot to `dir`: pauses the VM if needed and resumes it afterwards if it was
    /// running.
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotStats, VmmError> {
        let was_running = self.state == RunState::Running;
        self.pause()?;
        let result = self.save_state().and_then(|state| Ok(snapshot::write_snapshot(dir, &state, self.vm.memory())?));
        if was_running {
            self.resume()?;
        }
        result
    }

    /// Digest of all guest memory; per-page digests go to `per_page` when given.
    pub fn memory_digest(&self, per_page: Option<&Path>) -> Result<MemoryDigest, VmmError> {
        match per_page {
            None => Ok(memory::memory_digest(self.vm.memory(), None)?),
            Some(path) => {
                let file = std::fs::File::create(path)
                    .map_err(|source| MemoryError::Image { what: "create of the page-digest file", source })?;
                let mut w = std::io::BufWriter::new(file);
                let d = memory::memory_digest(self.vm.memory(), Some(&mut w))?;
                w.flush().map_err(|source| MemoryError::Image { what: "write of page digests", source })?;
                Ok(d)
            }
        }
    }

    /// Starts dirty logging.
    pub fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        Ok(self.vm.start_dirty_log()?)
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmmError> {
        Ok(self.vm.stop_dirty_log()?)
    }

    /// Pages dirtied since logging started or the last call (then cleared).
    pub fn dirty_log(&self) -> Result<DirtyLog, VmmError> {
        Ok(self.vm.dirty_log()?)
    }

    fn flush_serial(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }

    /// Throttles the vCPUs (auto-converge): they stay off the CPU `percent` of the time.
    pub fn set_throttle(&mut self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::Relaxed);
        if percent == 0 {
            if let Some((stop, t)) = self.kicker.take() {
                stop.store(true, Ordering::Relaxed);
                let _ = t.join();
            }
        } else if self.kicker.is_none() {
            // Kick running vCPUs every 10 ms so that a busy guest reaches the throttle.
            let stop = Arc::new(AtomicBool::new(false));
            let kicks: Vec<_> = self.vcpus.iter().map(|v| v.kicker()).collect();
            let s = stop.clone();
            let t = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    for k in &kicks {
                        k.kick();
                    }
                }
            });
            self.kicker = Some((stop, t));
        }
    }

    /// Stops the vCPU threads.
    pub fn shutdown(&mut self) {
        self.set_throttle(0);
        for v in &mut self.vcpus {
            v.exit();
        }
        self.flush_serial();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destinations_backends_replace_the_recorded_ones_kind_by_kind() {
        let net = |t: &str| DeviceConfig::Net(NetConfig { tap: t.into(), mac: [2, 0, 0, 0, 0, 1], bridge: None });
        let disk =
            |o: &str| DeviceConfig::Block(DiskConfig { base: "b.qcow2".into(), overlay: o.into(), standalone: false });
        let recorded = vec![disk("a.qcow2"), net("tapA")];
        // Only the disk given: the NIC stays the recorded one.
        assert_eq!(merge_devices(&recorded, vec![disk("b/vm.qcow2")]).unwrap(), vec![disk("b/vm.qcow2"), net("tapA")]);
        assert_eq!(
            merge_devices(&recorded, vec![net("tapB"), disk("b/vm.qcow2")]).unwrap(),
            vec![disk("b/vm.qcow2"), net("tapB")]
        );
        let e = merge_devices(&recorded, vec![net("x"), net("y")]).unwrap_err().to_string();
        assert!(e.contains("the guest has 1 NIC(s) and 1 disk(s); the command line gives 2 and 0"), "{e}");
    }

    #[test]
    fn the_announcement_is_a_zeroed_vnet_header_then_qemus_rarp() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_announce(&mac);
        let hdr = crate::devices::virtio::tap::VNET_HDR_LEN;
        assert_eq!(f.len(), hdr + 60, "the header, then a minimum-size Ethernet frame");
        assert!(f[..hdr].iter().all(|&b| b == 0), "no offloads announced");
        let frame = &f[hdr..];
        assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
        assert_eq!(&frame[6..12], &mac, "from the VM");
        assert_eq!(&frame[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&frame[20..22], &[0, 3], "reverse request");
        match netreconf::frames::parse(frame).expect("vnetd parses it") {
            netreconf::frames::Frame::Rarp(a) => assert_eq!(a.sha, netreconf::frames::Mac(mac)),
            other => panic!("vnetd reads it as {other:?}"),
        }
    }
}
