//! Local APIC (xAPIC, MMIO at 0xFEE00000), legacy PIC masking, and timer
//! calibration.
//!
//! The LAPIC timer frequency is measured once, in this order of preference:
//! 1. against the TSC, if kvmclock (KVM's paravirtual clock) gives the TSC
//!    frequency: exact, and only two LAPIC reads (VM exits) bracket the
//!    window, so exit latency hardly matters;
//! 2. against PIT channel 2 (gate on port 0x61, mode 0, output polled on
//!    port 0x61 bit 5), if the PIT answers sensibly; two windows of different
//!    length are measured and subtracted, which cancels the fixed cost of the
//!    port I/O exits around each window;
//! 3. against the TSC with its frequency from CPUID leaves 0x15/0x16;
//! 4. failing all, KVM's fixed emulated APIC bus of 1 GHz is assumed.

use crate::cpu::{self, inb, outb};
use crate::interrupts::{SPURIOUS_VECTOR, TIMER_VECTOR};

const LAPIC_BASE: usize = 0xfee0_0000;

// Register offsets.
const REG_ID: usize = 0x020;
const REG_TPR: usize = 0x080;
const REG_EOI: usize = 0x0b0;
const REG_SVR: usize = 0x0f0;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_ERROR: usize = 0x370;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const SVR_APIC_ENABLE: u32 = 1 << 8;
/// Divide configuration value for "divide by 16".
const DIVIDE_BY_16: u32 = 0x3;
/// Divide configuration value for "divide by 1".
const DIVIDE_BY_1: u32 = 0xb;

/// KVM's emulated APIC bus runs at 1 GHz (APIC_BUS_CYCLE_NS = 1).
const KVM_APIC_BUS_HZ: u64 = 1_000_000_000;

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 50 ms of PIT ticks (fits the 16-bit counter).
const PIT_CALIBRATION_TICKS: u64 = PIT_HZ / 20;

fn read(reg: usize) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped by the VMM's page tables and
    // `reg` is a valid 16-byte-aligned register offset.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as in `read`.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

/// Signals end-of-interrupt to the LAPIC.
#[allow(dead_code)]
pub fn eoi() {
    write(REG_EOI, 0);
}

/// This CPU's LAPIC ID (xAPIC: bits 31:24 of the ID register).
pub fn id() -> u8 {
    (read(REG_ID) >> 24) as u8
}

/// Masks both legacy 8259 PICs so only the LAPIC delivers interrupts.
pub fn mask_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Software-enables the LAPIC (SVR = 0x1FF) with the timer masked. (`_start`
/// already set the global enable bit in IA32_APIC_BASE.)
pub fn init() {
    write(REG_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_LVT_TIMER, LVT_MASKED);
}

/// How the timer frequency was determined.
#[derive(Clone, Copy, Debug)]
pub enum Calibration {
    Pit,
    Tsc { tsc_hz: u64, source: &'static str },
    Assumed,
}

/// Measured LAPIC timer input frequency (before the divider), in Hz.
pub struct TimerFrequency {
    pub bus_hz: u64,
    pub how: Calibration,
}

/// Measures the LAPIC timer's input clock.
pub fn calibrate() -> TimerFrequency {
    if let Some(tsc_hz) = kvmclock_tsc_hz() {
        if let Some(bus_hz) = calibrate_with_tsc(tsc_hz) {
            return TimerFrequency { bus_hz, how: Calibration::Tsc { tsc_hz, source: "kvmclock" } };
        }
    }
    if let Some(bus_hz) = calibrate_with_pit() {
        return TimerFrequency { bus_hz, how: Calibration::Pit };
    }
    if let Some((tsc_hz, source)) = cpuid_tsc_hz() {
        if let Some(bus_hz) = calibrate_with_tsc(tsc_hz) {
            return TimerFrequency { bus_hz, how: Calibration::Tsc { tsc_hz, source } };
        }
    }
    TimerFrequency { bus_hz: KVM_APIC_BUS_HZ, how: Calibration::Assumed }
}

/// Starts the LAPIC timer counting down from u32::MAX, masked, one-shot,
/// divide by 1.
fn start_free_running() {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_1);
    write(REG_TIMER_INITIAL, u32::MAX);
}

fn elapsed_since_start() -> u32 {
    u32::MAX - read(REG_TIMER_CURRENT)
}

fn stop_timer() {
    write(REG_TIMER_INITIAL, 0);
}

/// Reads PIT channel 2's current count (latched).
fn pit2_count() -> u16 {
    outb(0x43, 0x80); // latch channel 2
    let lo = inb(0x42);
    let hi = inb(0x42);
    u16::from_le_bytes([lo, hi])
}

/// Measures the LAPIC input clock against the PIT: the difference between
/// a long and a short PIT window cancels the fixed overhead of the exits.
fn calibrate_with_pit() -> Option<u64> {
    // The short window goes first with a tight bound, so that a PIT whose
    // output never rises (e.g. port 0x61 not emulated) costs little.
    let short = pit_window(PIT_CALIBRATION_TICKS / 5, 1 << 28)?;
    let long = pit_window(PIT_CALIBRATION_TICKS, 1 << 31)?;
    let diff = long.checked_sub(short)?;
    (diff > 0).then(|| diff * PIT_HZ / (PIT_CALIBRATION_TICKS - PIT_CALIBRATION_TICKS / 5))
}

/// Times a PIT channel 2 one-shot of `ticks` PIT ticks with the LAPIC timer
/// and returns the elapsed LAPIC input cycles; gives up after `limit` cycles
/// (1 << 28 is 268 ms at KVM's 1 GHz).
///
/// Same sequence as Linux's `pit_calibrate_tsc`: gate high first, then program
/// mode 0; the count starts when its high byte is written (KVM's PIT ignores
/// the gate in mode 0, real hardware counts while it is high), and OUT2 (port
/// 0x61 bit 5) goes high at terminal count.
fn pit_window(ticks: u64, limit: u32) -> Option<u64> {
    let port61 = inb(0x61);
    if port61 == 0xff {
        return None;
    }
    // Gate high, speaker off.
    outb(0x61, (port61 & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
    outb(0x43, 0xb0);
    outb(0x42, ticks as u8);
    outb(0x42, (ticks >> 8) as u8);
    start_free_running();

    // Sanity check: a missing PIT reads back as 0x0000 or 0xffff, and its
    // output would never change.
    let count = u64::from(pit2_count());
    let mut ok = count != 0 && count <= ticks && inb(0x61) & 0x20 == 0;
    if ok {
        ok = false;
        while elapsed_since_start() < limit {
            if inb(0x61) & 0x20 != 0 {
                ok = true;
                break;
            }
        }
    }
    let elapsed = u64::from(elapsed_since_start());
    stop_timer();
    outb(0x61, port61 & !0x03);
    (ok && elapsed != 0).then_some(elapsed)
}

/// KVM pvclock (kvmclock) time info structure.
#[repr(C, align(64))]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvclockTimeInfo = PvclockTimeInfo {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// TSC frequency from CPUID leaves 0x15/0x16, if the (virtual) CPU tells.
fn cpuid_tsc_hz() -> Option<(u64, &'static str)> {
    let max_leaf = cpu::cpuid(0).eax;
    if max_leaf >= 0x15 {
        let l = cpu::cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some((u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax), "cpuid 0x15"));
        }
    }
    if max_leaf >= 0x16 {
        let mhz = cpu::cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1_000_000, "cpuid 0x16"));
        }
    }
    None
}

fn kvmclock_tsc_hz() -> Option<u64> {
    let sig = cpu::cpuid(0x4000_0000);
    let kvm = sig.ebx == u32::from_le_bytes(*b"KVMK")
        && sig.ecx == u32::from_le_bytes(*b"VMKV")
        && sig.edx == u32::from_le_bytes(*b"M\0\0\0");
    if !kvm || cpu::cpuid(0x4000_0001).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let info = core::ptr::addr_of_mut!(PVCLOCK);
    // SAFETY: the MSR exists (feature bit checked); the structure is a 64-byte
    // aligned static, identity-mapped, so its address is its physical address.
    // Bit 0 enables updates.
    unsafe { cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, info as u64 | 1) };
    // SAFETY: the hypervisor writes the structure when the MSR is written; we
    // read it with volatile loads. Disable updates afterwards so the hypervisor
    // no longer writes this memory.
    let (mul, shift) = unsafe {
        let mul = core::ptr::addr_of!((*info).tsc_to_system_mul).read_volatile();
        let shift = core::ptr::addr_of!((*info).tsc_shift).read_volatile();
        cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
        (mul, shift)
    };
    if mul == 0 {
        return None;
    }
    // ns = ((tsc << shift) * mul) >> 32  =>  tsc_hz = 1e9 * 2^32 / mul / 2^shift
    let mut hz = (1_000_000_000u128 << 32) / u128::from(mul);
    if shift >= 0 {
        hz >>= shift as u32;
    } else {
        hz <<= (-shift) as u32;
    }
    Some(hz as u64)
}

/// Times about 50 ms of TSC with the LAPIC timer. Each LAPIC read is
/// bracketed by TSC reads, so the window is measured between the midpoints.
fn calibrate_with_tsc(tsc_hz: u64) -> Option<u64> {
    let window = tsc_hz / 20;
    start_free_running();
    let read_pair = || {
        let before = cpu::rdtsc();
        let count = read(REG_TIMER_CURRENT);
        let after = cpu::rdtsc();
        (before / 2 + after / 2, count)
    };
    let (t0, c0) = read_pair();
    while cpu::rdtsc().wrapping_sub(t0) < window {
        core::hint::spin_loop();
    }
    let (t1, c1) = read_pair();
    stop_timer();
    let cycles = u64::from(c0.checked_sub(c1)?);
    let tsc = t1.checked_sub(t0)?;
    (cycles != 0 && tsc != 0).then(|| (u128::from(cycles) * u128::from(tsc_hz) / u128::from(tsc)) as u64)
}

/// The TSC frequency: as found during calibration, else measured against the
/// (calibrated) LAPIC timer over about 50 ms.
pub fn tsc_hz(freq: &TimerFrequency) -> u64 {
    if let Calibration::Tsc { tsc_hz, .. } = freq.how {
        return tsc_hz;
    }
    let window = (freq.bus_hz / 20) as u32;
    start_free_running();
    let t0 = cpu::rdtsc();
    while elapsed_since_start() < window {
        core::hint::spin_loop();
    }
    let cycles = u64::from(elapsed_since_start());
    let t1 = cpu::rdtsc();
    stop_timer();
    (u128::from(t1.wrapping_sub(t0)) * u128::from(freq.bus_hz) / u128::from(cycles.max(1))) as u64
}

/// Arms the LAPIC timer in periodic mode on [`TIMER_VECTOR`] at `hz`, given
/// its measured input frequency. Returns the initial count used.
pub fn start_periodic(bus_hz: u64, hz: u64) -> u32 {
    let count = (bus_hz / 16 / hz).clamp(1, u64::from(u32::MAX)) as u32;
    start_periodic_count(count, TIMER_VECTOR);
    count
}

/// Starts this CPU's LAPIC timer, periodic, divide by 16, from `count`, on
/// `vector` (the application processors use the count the boot CPU measured).
pub fn start_periodic_count(count: u32, vector: u8) {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_TIMER_PERIODIC | u32::from(vector));
    write(REG_TIMER_INITIAL, count);
}

const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // start-up IPI

fn send_ipi(apic_id: u8, low: u32) {
    write(REG_ICR_HIGH, u32::from(apic_id) << 24);
    write(REG_ICR_LOW, low);
    for _ in 0..100_000 {
        if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Sends INIT to the CPU with `apic_id`.
pub fn send_init(apic_id: u8) {
    send_ipi(apic_id, ICR_INIT);
}

/// Sends a start-up IPI: the CPU starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u8, page: u8) {
    send_ipi(apic_id, ICR_STARTUP | u32::from(page));
}
