//! shrink-guest: a tiny freestanding x86-64 kernel for testing shrink-vmm.
//!
//! Boot contract (Linux x86-64 64-bit boot protocol, as for a vmlinux): the VMM
//! loads the ELF segments at their physical addresses and jumps to `_start` in
//! long mode with interrupts disabled, identity-mapped low 4 GiB, and RSI
//! pointing to the `boot_params` zero page. The same ELF also boots by PVH
//! (QEMU: `qemu-system-x86_64 -M microvm -kernel shrink-guest`), entered at
//! the address of its `XEN_ELFNOTE_PHYS32_ENTRY` note (see `boot.rs`).
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
mod clock;
mod config;
mod cpu;
mod disk;
mod interrupts;
mod ioapic;
mod mem;
mod net;
mod probe;
mod region;
mod serial;
mod smp;
mod virtio;
mod workload;

use alloc::string::String;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::transport::DeviceType;

use bootparams::BootParams;
use config::{Config, DiskTest};
use disk::{Disk, IoWorkload};
use net::{MacFmt, Net};
use region::Regions;
use workload::MemWorkload;

/// Timer frequency.
const HZ: u64 = 100;
/// Milliseconds per tick.
const TICK_MS: u64 = 1000 / HZ;

/// Heartbeats printed so far. In guest memory, so a restored or migrated VM
/// continues counting where it left off.
static HEARTBEATS: AtomicU64 = AtomicU64::new(0);

/// Entered from `_start` (boot.rs) in ring 3, interrupts disabled: `boot_info`
/// is the zero page (`pvh` 0: Linux's 64-bit boot protocol, shrink-vmm) or the
/// `hvm_start_info` (`pvh` 1: the PVH entry, QEMU's `-kernel`).
pub extern "C" fn kernel_main(boot_info: u64, pvh: u64) -> ! {
    serial::init();

    // SAFETY: the entry passes the identity-mapped boot structure of its
    // protocol; the command line and memory map it points to lie outside this
    // kernel's image, heap and working set, and are copied right away.
    let boot = unsafe {
        if pvh == 1 {
            BootParams::parse_pvh(boot_info)
        } else {
            BootParams::parse(boot_info)
        }
    };
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
    clock::init(apic::tsc_hz(&freq));

    // Memory above the heap, handed out in a fixed order so that the same
    // options give the same addresses.
    let mut regions = Regions::new(&boot, heap_end);

    // The other vCPUs (MP table), started now so that the workloads can be
    // shared among all of them.
    let cpus = smp::start(&smp::discover(), count, &mut regions);
    println!("cpus: {cpus}");
    let mut mem_workload = if config.mem_workload {
        match regions.take(config.mem, 4096) {
            Some((base, size)) => {
                println!("workload mem: base=0x{base:x} size={size} rate={}", config.rate);
                // Every vCPU rewrites its own part of the working set at its
                // share of the rate (the boot CPU the first part; what is
                // left over, less than a page per vCPU, stays unused). A set
                // of fewer pages than vCPUs stays the boot CPU's.
                let n = if size / 4096 >= cpus as u64 { cpus as u64 } else { 1 };
                let part = if n > 1 { (size / n) & !4095 } else { size };
                if n > 1 {
                    println!("workload mem: shared by {n} vcpus, {part} bytes each");
                }
                let w = MemWorkload::new(base, part, config.rate / n, config.memtrace, HZ, interrupts::ticks());
                Some((w, part, n as usize))
            }
            None => {
                println!("workload mem: no usable memory above 0x{heap_end:x}, running idle");
                None
            }
        }
    } else {
        None
    };

    // Devices: the first disk and the first NIC are used; each device's GSI
    // is routed to its own vector.
    let apic_id = apic::id();
    let mut disk: Option<Disk> = None;
    let mut net: Option<Net> = None;
    for (i, found) in virtio::discover(&config.devices).into_iter().enumerate() {
        let base = found.dev.base;
        match found.kind {
            DeviceType::Block if disk.is_none() => match Disk::new(found.transport, base) {
                Ok(d) => {
                    println!("disk: {} bytes", d.capacity);
                    disk = Some(d);
                }
                Err(e) => println!("disk: virtio-blk at 0x{base:x} failed: {e:?}"),
            },
            DeviceType::Network if net.is_none() => match Net::new(found.transport, base, &config, clock::now_ms()) {
                Ok(n) => {
                    match n.ip {
                        Some(([a, b, c, d], len)) => match config.gw {
                            Some([w, x, y, z]) => {
                                println!("net: mac={} ip={a}.{b}.{c}.{d}/{len} gw={w}.{x}.{y}.{z}", MacFmt(n.mac))
                            }
                            None => println!("net: mac={} ip={a}.{b}.{c}.{d}/{len}", MacFmt(n.mac)),
                        },
                        None => println!("net: mac={} ip=none", MacFmt(n.mac)),
                    }
                    net = Some(n);
                }
                Err(e) => println!("net: virtio-net at 0x{base:x} failed: {e:?}"),
            },
            kind => {
                println!("virtio: {kind:?} at 0x{base:x} not used");
                continue;
            }
        }
        let vector = interrupts::DEVICE_VECTOR_BASE + (i as u8 % interrupts::DEVICE_VECTORS);
        if !ioapic::route(found.dev.gsi, vector, apic_id) {
            println!("virtio: gsi {} of 0x{base:x} is not an IOAPIC pin, polling only", found.dev.gsi);
        }
    }
    // Per-VM data derive from the MAC, else from `seed=`.
    let seed = match &net {
        Some(n) => u64::from_be_bytes([0, 0, n.mac[0], n.mac[1], n.mac[2], n.mac[3], n.mac[4], n.mac[5]]),
        None => config.seed,
    };
    if let Some((w, part, n)) = mem_workload.as_mut() {
        w.start(seed, interrupts::ticks());
        for i in 1..*n {
            smp::give_mem_work(i, w.base() + i as u64 * *part, *part, config.rate / *n as u64, seed);
        }
    }
    let mut mem_workload = mem_workload.map(|(w, _, _)| w);

    if config.preload > 0 {
        match disk.as_mut() {
            None => println!("preload: no disk"),
            Some(d) => {
                let want = config.preload.min(d.capacity) & !4095;
                match regions.take(want, 4096) {
                    Some((base, size)) => {
                        // SAFETY: the region is usable RAM handed out to the
                        // preload alone, identity-mapped, kept for good.
                        let buf = unsafe { core::slice::from_raw_parts_mut(base as *mut u8, size as usize) };
                        let t0 = clock::now_us();
                        let result = d.preload(buf);
                        let us = (clock::now_us() - t0).max(1);
                        match result {
                            Ok(()) => println!(
                                "preload: {size} bytes in {} ms ({}.{} MB/s)",
                                us / 1000,
                                size / us,
                                size * 10 / us % 10
                            ),
                            Err(e) => println!("preload: failed: {e:?}"),
                        }
                    }
                    None => println!("preload: no memory left"),
                }
            }
        }
    }

    if config.private > 0 {
        match regions.take(config.private, 4096) {
            Some((base, size)) => {
                workload::fill_private(base, size, seed);
                println!("private: {size} bytes");
            }
            None => println!("private: no memory left"),
        }
    }

    for test in &config.disktests {
        let Some(d) = disk.as_mut() else {
            println!("disktest: no disk");
            break;
        };
        match *test {
            DiskTest::Write(sector) => match d.test_write(sector, seed) {
                Ok(()) => println!("disktest: wrote {sector}"),
                Err(e) => println!("disktest: error {sector}: {e:?}"),
            },
            DiskTest::Check(sector) => match d.test_check(sector, seed) {
                Ok(true) => println!("disktest: ok {sector}"),
                Ok(false) => println!("disktest: mismatch {sector}"),
                Err(e) => println!("disktest: error {sector}: {e:?}"),
            },
        }
    }

    let mut io_workload = if config.io_workload {
        match disk.as_ref() {
            None => {
                println!("workload io: no disk");
                None
            }
            Some(d) => {
                let start = config.preload.next_multiple_of(1 << 20);
                match IoWorkload::new(d, start, config.ioarea, config.iorate, seed, HZ, interrupts::ticks()) {
                    Some(w) => {
                        let (start, size) = w.area();
                        println!("workload io: disk area {start}+{size} rate={}", config.iorate);
                        Some(w)
                    }
                    None => {
                        println!("workload io: no room on the disk after {start}");
                        None
                    }
                }
            }
        }
    } else {
        None
    };

    cpu::enable_interrupts();
    println!("shrink-guest ready");

    let mut last_tick = interrupts::ticks();
    let mut reported_reset = [false; 2];
    loop {
        // Clear the device flag first: an interrupt arriving while we poll
        // makes the wait below return at once.
        interrupts::take_irq();
        let now = interrupts::ticks();
        let now_ms = clock::now_ms();

        if let Some(n) = net.as_mut() {
            n.poll(now_ms);
        }
        let mut io_inflight = false;
        if let (Some(w), Some(d)) = (io_workload.as_mut(), disk.as_mut()) {
            io_inflight = w.step(d, now);
        }
        if now != last_tick {
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
                    let aps: u64 = (1..cpus).map(|i| smp::report(i).1).sum();
                    println!("mem: dirtied {}", w.dirtied() + aps);
                }
                for i in 1..cpus {
                    let (beats, dirtied) = smp::report(i);
                    println!("vcpu {i}: heartbeat {beats} dirtied {dirtied}");
                }
                if let Some(w) = io_workload.as_ref() {
                    println!("io: read={} written={}", w.read, w.written);
                }
                if let Some(p) = net.as_ref().and_then(|n| n.probe.as_ref()) {
                    p.report();
                }
                if let Some(u) = net.as_ref().and_then(|n| n.sender.as_ref()) {
                    u.report();
                }
                for (i, base) in
                    [disk.as_ref().map(|d| d.mmio_base), net.as_ref().map(|n| n.mmio_base)].into_iter().enumerate()
                {
                    if let Some(base) = base {
                        if !reported_reset[i] && virtio::needs_reset(base) {
                            reported_reset[i] = true;
                            println!("virtio: {} at 0x{base:x} needs reset", ["disk", "net"][i]);
                        }
                    }
                }
            }
        }

        // Sleep until there is work: a device interrupt, the next tick for
        // the workloads, the network stack's next timer, else the next
        // heartbeat (idle ticks then stay in ring 0).
        let mut wake_at = (HEARTBEATS.load(Ordering::Relaxed) + 1) * HZ;
        if mem_workload.is_some() || (io_workload.is_some() && !io_inflight) {
            wake_at = wake_at.min(now + 1);
        }
        if let Some(deadline) = net.as_mut().and_then(|n| n.next_deadline(now_ms)) {
            let ticks = deadline.saturating_sub(now_ms).div_ceil(TICK_MS).max(1);
            wake_at = wake_at.min(now + ticks);
        }
        cpu::wait_event(wake_at);
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
