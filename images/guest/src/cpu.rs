//! CPU access for the ring-3 Rust code (see `boot.rs` for why it runs in ring
//! 3): port I/O (TSS I/O bitmap), CPUID and TSC work directly; halting,
//! enabling interrupts and MSRs go through the ring-0 service gate
//! (`shrink_service` in `interrupts.rs`).

use core::arch::asm;

use crate::interrupts::{SYS_ENABLE_INTERRUPTS, SYS_HALT, SYS_RDMSR, SYS_WAIT_EVENT, SYS_WAIT_UNTIL, SYS_WRMSR};

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the TSS I/O
    // bitmap allows every port in ring 3.
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

/// Calls ring-0 service `nr` through the `ud2` gate (see `interrupts.rs`).
///
/// # Safety
/// The service and its arguments must be valid (e.g. an existing MSR).
#[inline]
unsafe fn service(nr: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: `shrink_service` (ud2 trap into ring 0, then ret) preserves
    // every register except RAX; the caller guarantees the request is valid.
    unsafe { asm!("call shrink_service", inout("rax") nr => ret, in("rdi") a, in("rsi") b) }
    ret
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this (virtual) CPU, otherwise the CPU raises #GP.
#[allow(dead_code)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { service(SYS_RDMSR, u64::from(msr), 0) }
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; the effects of the write
/// are the caller's responsibility.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe { service(SYS_WRMSR, u64::from(msr), value) };
}

/// Sleeps (`sti; hlt` in ring 0) until the tick counter reaches `tick`;
/// returns at once if it already has. The check and the halt are atomic with
/// respect to the timer interrupt, so no tick is slept through, and ticks
/// before `tick` are absorbed in ring 0 without returning to ring 3.
#[inline]
#[allow(dead_code)]
pub fn wait_until_tick(tick: u64) {
    // SAFETY: the wait service only reads the tick counter and halts.
    unsafe { service(SYS_WAIT_UNTIL, tick, 0) };
}

/// Sleeps until the tick counter reaches `tick` or a device interrupt is
/// pending ([`crate::interrupts::IRQ_PENDING`] set); returns at once if either
/// already holds. Ticks before `tick` are absorbed in ring 0.
#[inline]
pub fn wait_event(tick: u64) {
    // SAFETY: the service only reads the tick counter and the flag, and halts.
    unsafe { service(SYS_WAIT_EVENT, tick, 0) };
}

/// Stops the CPU for good (interrupts disabled, `hlt` in a loop in ring 0).
pub fn halt_forever() -> ! {
    // SAFETY: the halt service never returns.
    unsafe { service(SYS_HALT, 0, 0) };
    unreachable!("the halt service returned")
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
    // CPUID is available on every x86-64 CPU, in any ring, and has no side
    // effects (the intrinsic is safe).
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    Cpuid { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Enables maskable interrupts (sets IF for the ring-3 code).
#[inline]
pub fn enable_interrupts() {
    // SAFETY: the IDT is filled before this is called, so interrupts have
    // handlers.
    unsafe { service(SYS_ENABLE_INTERRUPTS, 0, 0) };
}
