//! shrink-guest: a tiny freestanding x86-64 kernel for testing shrink-vmm.
//!
//! Boot contract (Linux x86-64 64-bit boot protocol, as for a vmlinux): the VMM
//! loads the ELF segments at their physical addresses and jumps to `_start` in
//! long mode with interrupts disabled, identity-mapped low 4 GiB, and RSI
//! pointing to the `boot_params` zero page.
//!
//! The kernel sets up its own stack, page tables, GDT/TSS and IDT in a small
//! ring-0 assembly part (`boot.rs`), then runs the Rust code in ring 3 (ring 0
//! is emulated on this platform, ring 3 runs natively): heap (from e820),
//! LAPIC timer (100 Hz), `shrink-guest ready`, then `heartbeat <n>` every
//! second and the workload chosen on the command line between `sti; hlt`
//! idles.

#![no_std]
#![no_main]

extern crate alloc;

mod allocator;
mod apic;
mod boot;
mod bootparams;
mod cpu;
mod interrupts;
mod mem;
mod serial;
mod workload;

use alloc::string::String;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use bootparams::BootParams;
use workload::{Config, Kind, MemWorkload};

/// Timer frequency.
const HZ: u64 = 100;

/// Heartbeats printed so far. In guest memory, so a restored or migrated VM
/// continues counting where it left off.
static HEARTBEATS: AtomicU64 = AtomicU64::new(0);

/// Entered from `_start` (boot.rs) in ring 3, interrupts disabled.
pub extern "C" fn kernel_main(boot_params: u64) -> ! {
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

    cpu::enable_interrupts();
    println!("shrink-guest ready");

    let mut last_tick = interrupts::ticks();
    loop {
        // Sleep until there is work: every tick for the mem workload, else
        // until the next heartbeat is due (idle ticks then stay in ring 0).
        let next_heartbeat = (HEARTBEATS.load(Ordering::Relaxed) + 1) * HZ;
        let wake_at = if mem_workload.is_some() { last_tick + 1 } else { next_heartbeat };
        cpu::wait_until_tick(wake_at);
        let now = interrupts::ticks();
        if now == last_tick {
            continue;
        }
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
