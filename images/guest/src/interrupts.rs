//! Interrupt descriptor table, exception reporting and the timer tick.
//!
//! * Vectors 0..32 (CPU exceptions) go through assembly stubs that save the
//!   general-purpose registers and call [`exception_handler`], which prints
//!   vector, RIP, error code and CR2 on the serial console and halts forever.
//! * Vector 0x20 (LAPIC timer) is a tiny assembly handler: it increments
//!   [`TICKS`] and writes the LAPIC EOI register. Being pure assembly, it
//!   clobbers no register (in particular no SSE state of the interrupted code).
//! * Vector 0xff (LAPIC spurious) returns without EOI, as the SDM requires.
//! * Every other vector reports "unexpected interrupt" and halts.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;

/// Vector of the periodic LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of LAPIC spurious interrupts (SVR low byte).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Timer ticks since the timer was armed. Lives in guest memory, so it survives
/// snapshot/restore and migration together with everything else.
#[no_mangle]
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// Number of timer ticks seen so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Register state saved by the exception stubs (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Exception stubs. For vectors without a CPU-pushed error code a zero is pushed
// so that every frame has the same layout. The stub table `exception_stubs`
// holds the 32 entry addresses, then the generic "unexpected vector" stub.
global_asm!(
    r#"
    .section .text.interrupts, "ax"

    .macro EXC_NOERR vec
    .align 16
exc_stub_\vec:
    push 0
    push \vec
    jmp exc_common
    .endm

    .macro EXC_ERR vec
    .align 16
exc_stub_\vec:
    push \vec
    jmp exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    EXC_ERR   13
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR   21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR   29
    EXC_ERR   30
    EXC_NOERR 31
    // Any other vector: which one is unknown, report 256.
    EXC_NOERR 256

exc_common:
    cld
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp            // &ExceptionFrame; RSP is 16-byte aligned here
    call {handler}
    // The handler never returns.
2:
    cli
    hlt
    jmp 2b

    // LAPIC timer: count the tick and acknowledge it. Touches only RAX.
    .align 16
timer_stub:
    lock inc qword ptr [rip + {ticks}]
    push rax
    mov eax, 0xfee000b0     // LAPIC EOI register (zero-extended to 64 bits)
    mov dword ptr [rax], 0
    pop rax
    iretq

    // LAPIC spurious interrupt: no EOI.
    .align 16
spurious_stub:
    iretq

    .section .rodata.interrupts, "a"
    .align 8
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,256
    .quad exc_stub_\n
    .endr
timer_stub_addr:
    .quad timer_stub
spurious_stub_addr:
    .quad spurious_stub
    .globl exception_stubs
    .globl timer_stub_addr
    .globl spurious_stub_addr
"#,
    handler = sym exception_handler,
    ticks = sym TICKS,
);

extern "C" {
    static exception_stubs: [u64; 33];
    static timer_stub_addr: u64;
    static spurious_stub_addr: u64;
}

/// One 16-byte IDT gate descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    /// A present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    fn interrupt(handler: u64, selector: u16) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist: 0,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate::EMPTY; 256]);

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Fills and loads the IDT. Interrupts stay disabled.
pub fn init() {
    // Use whatever 64-bit code selector the VMM gave us (0x10 by the Linux
    // boot protocol).
    let cs = cpu::read_cs();
    // SAFETY: the stub table and addresses are defined in the global_asm above
    // and are immutable.
    let (stubs, timer, spurious) = unsafe { (&exception_stubs, timer_stub_addr, spurious_stub_addr) };
    // SAFETY: runs once on the only CPU, with interrupts disabled, before the
    // IDT is loaded: nothing else accesses IDT concurrently.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (vector, gate) in idt.0.iter_mut().enumerate() {
        let handler = match vector {
            0..=31 => stubs[vector],
            v if v == usize::from(TIMER_VECTOR) => timer,
            v if v == usize::from(SPURIOUS_VECTOR) => spurious,
            _ => stubs[32],
        };
        *gate = Gate::interrupt(handler, cs);
    }
    let pointer = IdtPointer { limit: (core::mem::size_of::<Idt>() - 1) as u16, base: idt as *const Idt as u64 };
    // SAFETY: `pointer` describes a valid, 'static IDT whose gates point at
    // the handlers above.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error",
        1 => "debug",
        2 => "NMI",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound range exceeded",
        6 => "invalid opcode",
        7 => "device not available",
        8 => "double fault",
        10 => "invalid TSS",
        11 => "segment not present",
        12 => "stack-segment fault",
        13 => "general protection fault",
        14 => "page fault",
        16 => "x87 floating-point error",
        17 => "alignment check",
        18 => "machine check",
        19 => "SIMD floating-point error",
        20 => "virtualization exception",
        21 => "control protection",
        256 => "unexpected interrupt",
        _ => "reserved",
    }
}

/// Called by the exception stubs: report and halt.
extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    crate::println!(
        "guest exception: vector {} ({}) rip=0x{:x} error=0x{:x} cr2=0x{:x} rsp=0x{:x} cs=0x{:x} rflags=0x{:x}",
        frame.vector,
        exception_name(frame.vector),
        frame.rip,
        frame.error_code,
        cpu::read_cr2(),
        frame.rsp,
        frame.cs,
        frame.rflags
    );
    crate::println!(
        "  rax=0x{:x} rbx=0x{:x} rcx=0x{:x} rdx=0x{:x} rsi=0x{:x} rdi=0x{:x} rbp=0x{:x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    );
    crate::println!("guest halted");
    cpu::halt_forever()
}
