//! Thin wrappers around privileged x86-64 instructions (port I/O, MSRs,
//! CPUID, TSC, interrupt flag).

use core::arch::asm;

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the guest runs at
    // CPL 0, so the instruction cannot fault.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: see `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this (virtual) CPU, otherwise the CPU raises #GP.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; the effects of the write
/// are the caller's responsibility.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Result of the CPUID instruction.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID for `leaf` (sub-leaf 0).
#[inline]
pub fn cpuid(leaf: u32) -> Cpuid {
    // CPUID is available on every x86-64 CPU and has no side effects (the
    // intrinsic is safe).
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    Cpuid { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is always available in long mode at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads CR2 (the faulting linear address of the last page fault).
#[inline]
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads the current code segment selector.
#[inline]
pub fn read_cs() -> u16 {
    let value: u16;
    // SAFETY: reading a segment register has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Disables maskable interrupts.
#[inline]
pub fn cli() {
    // SAFETY: only changes RFLAGS.IF; the guest runs at CPL 0.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Atomically enables interrupts and halts until the next one arrives.
///
/// The one-instruction interrupt shadow of `sti` guarantees that an interrupt
/// which became pending while interrupts were disabled wakes the `hlt`.
#[inline]
pub fn enable_interrupts_and_halt() {
    // SAFETY: an IDT is loaded before this is called, so the interrupts that
    // become deliverable have handlers.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}

/// Stops the CPU for good (interrupts disabled, `hlt` in a loop).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts disabled `hlt` only returns on NMI/SMI, after
        // which we halt again.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Enables maskable interrupts.
#[inline]
pub fn sti() {
    // SAFETY: an IDT is loaded before this is called.
    unsafe { asm!("sti", options(nomem, nostack)) }
}
