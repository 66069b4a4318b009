//! shrink-guest: a tiny freestanding x86-64 kernel for testing shrink-vmm.
//!
//! Boot contract (Linux x86-64 64-bit boot protocol, as for a vmlinux): the VMM
//! loads the ELF segments at their physical addresses and jumps to `_start` in
//! long mode with interrupts disabled, identity-mapped low 4 GiB, and RSI
//! pointing to the `boot_params` zero page.
//!
//! The kernel sets up its own stack, heap (from e820), IDT and LAPIC timer
//! (100 Hz), prints `shrink-guest ready`, then `heartbeat <n>` every second and
//! runs the workload chosen on the command line between `sti; hlt` idles.

#![no_std]
#![no_main]

extern crate alloc;

mod allocator;
mod apic;
mod bootparams;
mod cpu;
mod interrupts;
mod mem;
mod serial;
mod workload;

use alloc::string::String;
use core::arch::global_asm;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use bootparams::BootParams;
use workload::{Config, Kind, MemWorkload};

/// Timer frequency.
const HZ: u64 = 100;
/// Size of the boot stack.
const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// Heartbeats printed so far. In guest memory, so a restored or migrated VM
/// continues counting where it left off.
static HEARTBEATS: AtomicU64 = AtomicU64::new(0);

// Entry point. The first instructions switch away from the VMM's stack: clear
// .bss (it holds our stack and statics; the loader need not zero it), load our
// stack pointer, and call `kernel_main(boot_params)`.
global_asm!(
    r#"
    .section .text._start, "ax"
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov r12, rsi                    // boot_params (RSI per the boot protocol)
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + {stack} + {stack_size}]
    xor ebp, ebp
    mov rdi, r12
    call {main}
1:
    cli
    hlt
    jmp 1b
"#,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym kernel_main,
);

extern "C" fn kernel_main(boot_params: u64) -> ! {
    serial::init();

    // SAFETY: RSI at entry is the identity-mapped zero page (boot protocol);
    // the command line it points to lies outside this kernel's image, heap and
    // working set, and is copied to the heap right away.
    let boot = unsafe { BootParams::parse(boot_params) };
    let (heap_start, heap_end) = allocator::init(&boot);

    let cmdline = String::from_utf8_lossy(boot.cmdline()).into_owned();
    println!("cmdline: {cmdline}");
    let usable: u64 = boot.usable_ram(0, u64::MAX).map(|(s, e)| e - s).sum();
    println!(
        "memory: {} MiB usable in {} e820 entries, heap 0x{heap_start:x}-0x{heap_end:x}",
        usable >> 20,
        boot.e820().len()
    );
    let config = Config::from_cmdline(&cmdline);

    interrupts::init();
    apic::mask_pic();
    apic::init();
    let freq = apic::calibrate();
    let count = apic::start_periodic(freq.bus_hz, HZ);
    match freq.how {
        apic::Calibration::Pit => println!("timer: lapic {} Hz (pit), {HZ} Hz tick, count {count}", freq.bus_hz),
        apic::Calibration::Tsc { tsc_hz, source } => {
            println!("timer: lapic {} Hz (tsc {tsc_hz} Hz from {source}), {HZ} Hz tick, count {count}", freq.bus_hz)
        }
        apic::Calibration::Assumed => {
            println!("timer: lapic {} Hz (assumed, no pit/tsc info), {HZ} Hz tick, count {count}", freq.bus_hz)
        }
    }

    let mut mem_workload = match config.kind {
        Kind::Idle => None,
        Kind::Mem => {
            let w = MemWorkload::new(&config, &boot, heap_end, HZ, interrupts::ticks());
            match &w {
                Some(w) => {
                    println!("workload mem: base=0x{:x} size={} rate={}", w.base(), w.size(), w.rate())
                }
                None => println!("workload mem: no usable memory above 0x{heap_end:x}, running idle"),
            }
            w
        }
    };

    println!("shrink-guest ready");

    let mut last_tick = interrupts::ticks();
    loop {
        // Check for new ticks with interrupts off, so that a tick arriving
        // between the check and the `hlt` still wakes us (sti's shadow).
        cpu::cli();
        let now = interrupts::ticks();
        if now == last_tick {
            cpu::enable_interrupts_and_halt();
            continue;
        }
        cpu::sti();
        last_tick = now;

        if let Some(w) = mem_workload.as_mut() {
            w.step(now);
        }
        let mut beats = HEARTBEATS.load(Ordering::Relaxed);
        while now >= (beats + 1) * HZ {
            beats += 1;
            HEARTBEATS.store(beats, Ordering::Relaxed);
            println!("heartbeat {beats}");
            if let Some(w) = mem_workload.as_ref() {
                println!("mem: dirtied {}", w.dirtied());
            }
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("guest panic: {}", info.message());
    if let Some(location) = info.location() {
        println!("  at {}:{}", location.file(), location.line());
    }
    cpu::halt_forever()
}
