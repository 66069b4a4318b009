//! Interrupt descriptor table, exception reporting, the timer tick and the
//! ring-3 service gate.
//!
//! All handlers are ring-0 assembly (ring-0 code is emulated instruction by
//! instruction on this platform, see `boot.rs`, so they stay tiny and free of
//! SSE).
//!
//! * Vectors 0..32 (CPU exceptions) go through stubs that save the
//!   general-purpose registers and CR2, then `iretq` to ring 3 into
//!   [`exception_report`] on a dedicated stack, which prints vector, RIP,
//!   error code and CR2 on the serial console and halts forever.
//! * Vector 0x20 (LAPIC timer) is a tiny assembly handler: it increments
//!   [`TICKS`] and writes the LAPIC EOI register. Being pure assembly, it
//!   clobbers no register (in particular no SSE state of the interrupted code).
//! * Vector 0x21 (the application processors' LAPIC timers, see `smp.rs`)
//!   only writes the EOI: it wakes the AP from `hlt`.
//! * Vectors 0x30..0x40 (device interrupts routed through the IOAPIC) share
//!   one tiny stub: it sets [`IRQ_PENDING`] and writes the LAPIC EOI. The
//!   "wait for an event" service returns to ring 3 as soon as that flag is
//!   set, so an arriving frame is handled at once, not at the next tick.
//! * Vector 0xff (LAPIC spurious) returns without EOI, as the SDM requires.
//! * Vector 6 (#UD) doubles as the service gate: ring 3 calls
//!   `shrink_service`, whose `ud2` traps into ring 0, for the few privileged
//!   services it needs: sleep until a given tick (`sti; hlt`), sleep until a
//!   given tick or a device interrupt, halt forever,
//!   enable interrupts, and RDMSR/WRMSR (see [`crate::cpu`]). (Neither
//!   `int 0x80` nor SYSCALL work on the nested hypervisor: `int n` in ring 3
//!   becomes #UD, and SYSCALL does not switch to ring 0.)
//! * Every other vector reports "unexpected interrupt" and halts.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::KERNEL_CS;
use crate::cpu;

/// Vector of the periodic LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of LAPIC spurious interrupts (SVR low byte).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Ring-3 services (number in RAX), see `shrink_service`.
#[allow(dead_code)]
pub const SYS_WAIT_UNTIL: u64 = 0;
pub const SYS_HALT: u64 = 1;
pub const SYS_RDMSR: u64 = 2;
pub const SYS_WRMSR: u64 = 3;
pub const SYS_ENABLE_INTERRUPTS: u64 = 4;
pub const SYS_WAIT_EVENT: u64 = 5;
/// First vector used for device interrupts (IOAPIC pins); vectors
/// `DEVICE_VECTOR_BASE..DEVICE_VECTOR_BASE + DEVICE_VECTORS` all go to the
/// device stub.
pub const DEVICE_VECTOR_BASE: u8 = 0x30;
pub const DEVICE_VECTORS: u8 = 16;

/// Timer ticks since the timer was armed. Lives in guest memory, so it survives
/// snapshot/restore and migration together with everything else.
#[no_mangle]
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// Number of timer ticks seen so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Set to 1 by the device interrupt stub; ring 3 clears it before it polls
/// the devices, and the wait service returns while it is set.
#[no_mangle]
pub static IRQ_PENDING: AtomicU64 = AtomicU64::new(0);

/// Clears the device-interrupt flag; returns whether it was set.
pub fn take_irq() -> bool {
    IRQ_PENDING.swap(0, Ordering::AcqRel) != 0
}

/// Register state saved by the exception stubs (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub cr2: u64,
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
    mov rax, cr2
    push rax
    mov rdi, rsp            // &ExceptionFrame
    // Report only once: a fault while reporting just halts.
    lock bts qword ptr [rip + {reporting}], 0
    jc 2f
    // Continue in ring 3 (where Rust code runs natively) on the report stack:
    // exception_report(frame), interrupts off.
    lea rax, [rip + REPORT_STACK_TOP]
    sub rax, 8
    push 0x23
    push rax
    push 0x0002
    push 0x2b
    lea rax, [rip + {report}]
    push rax
    iretq
2:
    cli
    hlt
    jmp 2b

    // LAPIC timer: count the tick and acknowledge it.
    .align 16
timer_stub:
    lock inc qword ptr [rip + {ticks}]
    jmp eoi_return

    // Device interrupt (IOAPIC, edge): flag it for ring 3 and acknowledge
    // it. The wait service sees the flag and returns to ring 3, which polls
    // every device.
    .align 16
device_stub:
    mov qword ptr [rip + {irq_pending}], 1
    jmp eoi_return

    // An application processor's LAPIC timer: only acknowledged, which wakes
    // it (the tick count is the boot CPU's). Also the end of the two stubs
    // above: write the LAPIC EOI register and return. Touches only RAX,
    // which it restores.
    .align 16
ap_timer_stub:
eoi_return:
    push rax
    mov eax, 0xfee000b0     // LAPIC EOI register (zero-extended to 64 bits)
    mov dword ptr [rax], 0
    pop rax
    iretq

    // LAPIC spurious interrupt: no EOI.
    .align 16
spurious_stub:
    iretq

    // Ring-3 services. Ring 3 calls `shrink_service`, whose UD2 raises #UD
    // (the nested hypervisor delivers exceptions from ring 3 faithfully, but
    // turns `int n` into #UD and does not switch privilege on SYSCALL). The
    // #UD stub recognises that UD2 by its address, skips it and dispatches:
    // RAX = service, RDI/RSI = arguments, result in RAX, every other register
    // preserved. Entered with IF = 0 on the ring-0 stack (TSS.RSP0).
    .align 16
    .globl shrink_service
shrink_service:
    ud2
    ret

    .align 16
ud_stub:
    push rax
    lea rax, [rip + shrink_service]
    cmp rax, [rsp + 8]      // faulting RIP
    pop rax
    jne exc_stub_6          // a genuine #UD: report it
    add qword ptr [rsp], 2  // resume after the UD2
    cmp rax, 0
    je 10f
    cmp rax, 1
    je 11f
    cmp rax, 2
    je 12f
    cmp rax, 3
    je 13f
    cmp rax, 4
    je 15f
    cmp rax, 5
    je 16f
    mov rax, -1
    iretq
10:                         // sleep until TICKS >= RDI (stays in ring 0
    mov rax, [rip + {ticks}]    // across ticks, so idle ticks cost no
    cmp rax, rdi                // return to ring 3)
    jae 14f
    sti                     // the interrupt shadow makes sti; hlt atomic
    hlt
    cli
    jmp 10b
14:
    iretq
11:                         // halt forever
    cli
    hlt
    jmp 11b
12:                         // rdmsr(ecx = RDI) -> RAX
    push rcx
    push rdx
    mov ecx, edi
    rdmsr
    shl rdx, 32
    or rax, rdx
    pop rdx
    pop rcx
    iretq
13:                         // wrmsr(ecx = RDI, RSI)
    push rcx
    push rdx
    mov ecx, edi
    mov eax, esi
    mov rdx, rsi
    shr rdx, 32
    wrmsr
    pop rdx
    pop rcx
    xor eax, eax
    iretq
15:                         // set IF in the caller's RFLAGS
    or qword ptr [rsp + 16], 0x200
    xor eax, eax
    iretq
16:                         // sleep until TICKS >= RDI or a device
    cmp qword ptr [rip + {irq_pending}], 0  // interrupt is pending
    jne 17f
    mov rax, [rip + {ticks}]
    cmp rax, rdi
    jae 17f
    sti
    hlt
    cli
    jmp 16b
17:
    xor eax, eax
    iretq

    .section .rodata.interrupts, "a"
    .align 8
exception_stubs:
    .irp n, 0,1,2,3,4,5
    .quad exc_stub_\n
    .endr
    .quad ud_stub
    .irp n, 7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,256
    .quad exc_stub_\n
    .endr
timer_stub_addr:
    .quad timer_stub
spurious_stub_addr:
    .quad spurious_stub
device_stub_addr:
    .quad device_stub
ap_timer_stub_addr:
    .quad ap_timer_stub
    .globl ap_timer_stub_addr
    .globl device_stub_addr
    .globl exception_stubs
    .globl timer_stub_addr
    .globl spurious_stub_addr
"#,
    report = sym exception_report,
    reporting = sym REPORTING,
    ticks = sym TICKS,
    irq_pending = sym IRQ_PENDING,
);

/// Set (bit 0) by the first exception; later ones just halt.
#[no_mangle]
static REPORTING: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static exception_stubs: [u64; 33];
    static timer_stub_addr: u64;
    static spurious_stub_addr: u64;
    static device_stub_addr: u64;
    static ap_timer_stub_addr: u64;
    /// The IDT itself (4 KiB in .bss, loaded by `_start`).
    static mut BOOT_IDT: [Gate; 256];
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
    /// A present 64-bit interrupt gate (IF cleared on entry), callable with
    /// `int` from privilege level `dpl`.
    fn interrupt(handler: u64, selector: u16, dpl: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist: 0,
            type_attr: 0x8e | (dpl << 5),
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// Fills the IDT that `_start` loaded (still empty until now). Runs in ring 3:
/// the table is ordinary (user-accessible) memory. Interrupts stay disabled.
pub fn init() {
    // SAFETY: the stub table and addresses are defined in the global_asm above
    // and are immutable.
    let (stubs, timer, spurious, device, ap_timer) =
        unsafe { (&exception_stubs, timer_stub_addr, spurious_stub_addr, device_stub_addr, ap_timer_stub_addr) };
    let devices = usize::from(DEVICE_VECTOR_BASE)..usize::from(DEVICE_VECTOR_BASE + DEVICE_VECTORS);
    // SAFETY: runs once, before any other CPU starts, with interrupts disabled; nothing else
    // reads or writes the IDT memory concurrently (the CPU reads it only on
    // interrupt delivery, and none can happen while IF = 0 and no exception is
    // raised here).
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(BOOT_IDT) };
    for (vector, gate) in idt.iter_mut().enumerate() {
        *gate = match vector {
            0..=31 => Gate::interrupt(stubs[vector], KERNEL_CS, 0),
            v if v == usize::from(TIMER_VECTOR) => Gate::interrupt(timer, KERNEL_CS, 0),
            v if v == usize::from(crate::smp::AP_TIMER_VECTOR) => Gate::interrupt(ap_timer, KERNEL_CS, 0),
            v if v == usize::from(SPURIOUS_VECTOR) => Gate::interrupt(spurious, KERNEL_CS, 0),
            v if devices.contains(&v) => Gate::interrupt(device, KERNEL_CS, 0),
            _ => Gate::interrupt(stubs[32], KERNEL_CS, 0),
        };
    }
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

/// Entered (in ring 3) from the exception stubs: report and halt.
extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    crate::println!(
        "guest exception: vector {} ({}) rip=0x{:x} error=0x{:x} cr2=0x{:x} rsp=0x{:x} cs=0x{:x} rflags=0x{:x}",
        frame.vector,
        exception_name(frame.vector),
        frame.rip,
        frame.error_code,
        frame.cr2,
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
