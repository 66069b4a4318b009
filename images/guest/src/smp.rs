//! Application processors (APs): found in the MP table, started the way a
//! BIOS and Linux start them (INIT, then two start-up IPIs), and put to work.
//!
//! * [`discover`] reads the MP table (the VMM's, at 639 KiB; QEMU's
//!   firmware's, in the BIOS area) and lists the enabled processors' APIC IDs.
//!   Without a table there is one CPU.
//! * [`start`] copies the real-mode trampoline below to page 1 (start-up
//!   vector 1), gives each AP a kernel stack, a TSS (with an all-zero I/O
//!   bitmap, as the boot CPU's) and a GDT slot for it, all in memory above
//!   the heap, and starts the APs one
//!   at a time. The trampoline switches straight from real mode to long mode
//!   (PAE, EFER.LME, then PE and PG together) on the boot CPU's page tables and
//!   GDT; `ap_start64` loads the AP's TSS and the shared IDT and drops to
//!   ring 3 in [`ap_main`]. Real-mode and ring-0 code is emulated on this
//!   platform (see `boot.rs`), so both stay a few dozen instructions.
//! * Each AP runs its own LAPIC timer (vector [`AP_TIMER_VECTOR`], whose
//!   handler only acknowledges it: the tick count is the boot CPU's), counts
//!   its own heartbeat, and runs its share of `workload=mem` when the boot CPU
//!   hands it one ([`give_mem_work`]). The boot CPU prints what they report.

use alloc::vec;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::GDT_AP_TSS;
use crate::region::Regions;
use crate::workload::{splitmix64, MemWorkload};
use crate::{apic, clock, cpu, interrupts, println, HZ};

/// Most CPUs the guest uses (the VMM's limit too).
pub const MAX_CPUS: usize = 32;
/// Vector of the APs' LAPIC timers.
pub const AP_TIMER_VECTOR: u8 = 0x21;
/// Start-up vector: the trampoline's page (physical page 1, free low memory).
const TRAMPOLINE_PAGE: u8 = 1;
const AP_KERNEL_STACK: u64 = 16 * 1024;
const AP_USER_STACK: u64 = 64 * 1024;
/// A 64-bit TSS (104 bytes), then the I/O permission bitmap and its 0xff end.
const TSS_SIZE: u64 = 104 + 8192 + 1;
/// Each AP's memory: its TSS (in 12 KiB), kernel stack and user stack.
const AP_MEMORY: u64 = 12 * 1024 + AP_KERNEL_STACK + AP_USER_STACK;

/// What `ap_start64` reads for the AP being started (one at a time).
#[repr(C)]
pub struct ApBoot {
    index: AtomicU64,
    kernel_stack_top: AtomicU64,
    user_stack_top: AtomicU64,
}

#[no_mangle]
static AP_BOOT: ApBoot =
    ApBoot { index: AtomicU64::new(0), kernel_stack_top: AtomicU64::new(0), user_stack_top: AtomicU64::new(0) };

/// One AP's mailbox: written by the AP (started, beats, dirtied) or by the
/// boot CPU (the work). Index 0 is the boot CPU's and stays unused.
pub struct ApSlot {
    started: AtomicU64,
    beats: AtomicU64,
    dirtied: AtomicU64,
    go: AtomicU64,
    base: AtomicU64,
    size: AtomicU64,
    rate: AtomicU64,
    seed: AtomicU64,
}

impl ApSlot {
    const fn new() -> ApSlot {
        ApSlot {
            started: AtomicU64::new(0),
            beats: AtomicU64::new(0),
            dirtied: AtomicU64::new(0),
            go: AtomicU64::new(0),
            base: AtomicU64::new(0),
            size: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            seed: AtomicU64::new(0),
        }
    }
}

static SLOTS: [ApSlot; MAX_CPUS] = [const { ApSlot::new() }; MAX_CPUS];
/// CPUs running: the boot CPU and the APs started.
static CPUS: AtomicU64 = AtomicU64::new(1);
/// The boot CPU's LAPIC timer count, for the APs' timers.
static TIMER_COUNT: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    // Copied to page 1 and entered there by a start-up IPI: real mode,
    // CS = 0x100, IP = 0. Hand-encoded where the operand size matters.
    .section .rodata.ap_trampoline, "a"
    .code16
    .globl ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    mov ax, cs
    mov ds, ax
    .byte 0x66, 0x0f, 0x01, 0x16        // lgdt (32-bit base) [tr_gdt_ptr]
    .word tr_gdt_ptr - ap_trampoline_start
    .byte 0x66, 0xa1                    // mov eax, [tr_cr3]
    .word tr_cr3 - ap_trampoline_start
    mov cr3, eax
    mov eax, cr4
    or eax, 0x620                       // PAE | OSFXSR | OSXMMEXCPT
    mov cr4, eax
    mov ecx, 0xc0000080                 // EFER.LME
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, 0x80000033                 // PG | NE | ET | MP | PE, set exactly:
    mov cr0, eax                        // caches on (INIT leaves CD | NW), EM off
    .byte 0x66, 0xff, 0x2e              // ljmp (m16:32) [tr_entry]
    .word tr_entry - ap_trampoline_start
    .balign 4
tr_gdt_ptr:
    .short {gdt_limit}
    .long BOOT_GDT
tr_cr3:
    .long BOOT_PML4
tr_entry:
    .long ap_start64
    .short 0x10
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64

    // Long mode, ring 0, on the boot CPU's GDT and page tables.
    .section .text.ap_start, "ax"
ap_start64:
    mov eax, 0x18
    mov ds, eax
    mov es, eax
    mov ss, eax
    xor eax, eax
    mov fs, eax
    mov gs, eax
    mov rsp, [rip + {boot} + 8]         // kernel_stack_top
    mov rdi, [rip + {boot}]             // index
    lea rax, [rdi - 1]
    shl rax, 4
    add rax, {ap_tss}                   // this AP's TSS selector
    ltr ax
    lidt [rip + BOOT_IDT_PTR]
    mov rax, [rip + {boot} + 16]        // user_stack_top
    push 0x23
    push rax
    push 0x0002
    push 0x2b
    lea rax, [rip + {main}]
    push rax
    iretq
"#,
    gdt_limit = const crate::boot::GDT_SIZE - 1,
    ap_tss = const GDT_AP_TSS,
    boot = sym AP_BOOT,
    main = sym ap_main,
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static mut BOOT_GDT: [u64; crate::boot::GDT_SIZE / 8];
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// A view of guest physical memory (identity-mapped, user-accessible).
///
/// # Safety
/// `[addr, addr + len)` must be mapped memory that nothing writes meanwhile.
unsafe fn phys(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: per the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// The enabled processors' APIC IDs from the MP table, the boot processor
/// first; just this CPU's when there is no valid table.
pub fn discover() -> vec::Vec<u8> {
    let mut ids = vec::Vec::new();
    // Where a BIOS puts the floating pointer: the first KiB of the EBDA
    // (which the VMM puts at the end of base memory, 639 KiB; the pointer in
    // the BIOS data area is not consulted) and the BIOS ROM area.
    for (start, len) in [(0x9_fc00u64, 0x400usize), (0xf_0000, 0x1_0000)] {
        // SAFETY: low memory and the BIOS area are identity-mapped and only
        // read here (the VMM or the firmware wrote them before boot).
        let area = unsafe { phys(start, len) };
        for fp in area.chunks_exact(16) {
            if &fp[..4] != b"_MP_" || sum(fp) != 0 {
                continue;
            }
            let table = u64::from(u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]));
            if table == 0 || table + 44 > 0x10_0000 {
                continue;
            }
            // SAFETY: as above; the table lies below 1 MiB (checked).
            let header = unsafe { phys(table, 44) };
            let length = usize::from(u16::from_le_bytes([header[4], header[5]]));
            if &header[..4] != b"PCMP" || length < 44 || table + length as u64 > 0x10_0000 {
                continue;
            }
            // SAFETY: as above, within 1 MiB.
            let t = unsafe { phys(table, length) };
            if sum(t) != 0 {
                continue;
            }
            let mut rest = &t[44..];
            while let Some(&kind) = rest.first() {
                let size = if kind == 0 { 20 } else { 8 };
                if kind > 4 || rest.len() < size {
                    break;
                }
                // Processor entry: APIC ID, version, flags (enabled, boot).
                if kind == 0 && rest[3] & 1 != 0 {
                    if rest[3] & 2 != 0 {
                        ids.insert(0, rest[1]);
                    } else {
                        ids.push(rest[1]);
                    }
                }
                rest = &rest[size..];
            }
            if !ids.is_empty() {
                ids.truncate(MAX_CPUS);
                return ids;
            }
        }
    }
    vec![apic::id()]
}

/// The 16-byte available 64-bit TSS descriptor of a TSS at `base`.
fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = TSS_SIZE - 1;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

fn wait_us(us: u64) {
    let t0 = clock::now_us();
    while clock::now_us() - t0 < us {
        core::hint::spin_loop();
    }
}

/// Starts the APs of `ids` (all but this CPU), one at a time, with their
/// stacks and TSSs in memory taken from `regions`; the APs run their timers
/// from `timer_count`. Returns the number of CPUs running.
pub fn start(ids: &[u8], timer_count: u32, regions: &mut Regions) -> usize {
    let me = apic::id();
    let aps = ids.iter().filter(|&&id| id != me).count().min(MAX_CPUS - 1) as u64;
    if aps == 0 {
        return cpus();
    }
    let Some((mut next, got)) = regions.take(aps * AP_MEMORY, 4096) else {
        println!("smp: no memory for the other {aps} vcpus");
        return cpus();
    };
    // As many APs as the memory found holds.
    let aps = aps.min(got / AP_MEMORY);
    TIMER_COUNT.store(u64::from(timer_count), Ordering::Relaxed);
    // SAFETY: page 1 is free low memory (below the EBDA, unused by the boot
    // protocols once the boot structures are copied), identity-mapped; the
    // trampoline is read-only data of this image.
    unsafe {
        let src = core::ptr::addr_of!(ap_trampoline_start);
        let len = core::ptr::addr_of!(ap_trampoline_end) as usize - src as usize;
        core::ptr::copy_nonoverlapping(src, (u64::from(TRAMPOLINE_PAGE) << 12) as *mut u8, len);
    }
    let mut index = 0usize;
    for &id in ids.iter().filter(|&&id| id != me) {
        if index as u64 >= aps {
            break;
        }
        index += 1;
        let tss = next;
        let kernel_top = tss + 12 * 1024 + AP_KERNEL_STACK;
        let user_top = kernel_top + AP_USER_STACK;
        next += AP_MEMORY;
        // SAFETY: `tss` starts this AP's own piece of usable RAM (taken from
        // `regions` above, identity-mapped): a zeroed TSS with RSP0, the I/O
        // bitmap offset, and the bitmap's closing byte.
        unsafe {
            core::ptr::write_bytes(tss as *mut u8, 0, TSS_SIZE as usize);
            ((tss + 4) as *mut u64).write_unaligned(kernel_top);
            ((tss + 102) as *mut u16).write_unaligned(104);
            ((tss + TSS_SIZE - 1) as *mut u8).write(0xff);
        }
        // SAFETY: the GDT slot of AP `index` is used by nobody else (the boot
        // CPU's TSS has its own); the GDT is ordinary, user-accessible memory.
        unsafe {
            let gdt = &mut *core::ptr::addr_of_mut!(BOOT_GDT);
            let slot = (GDT_AP_TSS as usize + (index - 1) * 16) / 8;
            let [low, high] = tss_descriptor(tss);
            gdt[slot] = low;
            gdt[slot + 1] = high;
        }
        let slot = &SLOTS[index];
        AP_BOOT.index.store(index as u64, Ordering::Relaxed);
        AP_BOOT.kernel_stack_top.store(kernel_top, Ordering::Relaxed);
        AP_BOOT.user_stack_top.store(user_top - 8, Ordering::Release);
        // Everything above is in memory before the IPIs (plain MMIO writes) go out.
        core::sync::atomic::fence(Ordering::SeqCst);
        apic::send_init(id);
        wait_us(10_000);
        for _ in 0..2 {
            if slot.started.load(Ordering::Acquire) != 0 {
                break;
            }
            apic::send_startup(id, TRAMPOLINE_PAGE);
            wait_us(200);
        }
        let t0 = clock::now_us();
        while slot.started.load(Ordering::Acquire) == 0 && clock::now_us() - t0 < 2_000_000 {
            core::hint::spin_loop();
        }
        if slot.started.load(Ordering::Acquire) == 0 {
            // It might still start later, on this AP_BOOT: start no other.
            println!("smp: vcpu {index} (apic {id}) did not start");
            break;
        }
        CPUS.store(index as u64 + 1, Ordering::Release);
    }
    cpus()
}

/// CPUs running (the boot CPU and the APs started).
pub fn cpus() -> usize {
    CPUS.load(Ordering::Acquire) as usize
}

/// Hands AP `index` its share of `workload=mem`: `[base, base + size)` at
/// `rate` bytes/s, with data from `seed`.
pub fn give_mem_work(index: usize, base: u64, size: u64, rate: u64, seed: u64) {
    let s = &SLOTS[index];
    s.base.store(base, Ordering::Relaxed);
    s.size.store(size, Ordering::Relaxed);
    s.rate.store(rate, Ordering::Relaxed);
    s.seed.store(seed, Ordering::Relaxed);
    s.go.store(1, Ordering::Release);
}

/// AP `index`'s heartbeats and pages dirtied so far.
pub fn report(index: usize) -> (u64, u64) {
    let s = &SLOTS[index];
    (s.beats.load(Ordering::Relaxed), s.dirtied.load(Ordering::Relaxed))
}

/// An AP, in ring 3: its LAPIC and timer, then its heartbeat and its share of
/// the work, sleeping between ticks.
extern "C" fn ap_main(index: u64) -> ! {
    let slot = &SLOTS[index as usize];
    apic::init();
    apic::start_periodic_count(TIMER_COUNT.load(Ordering::Relaxed) as u32, AP_TIMER_VECTOR);
    cpu::enable_interrupts();
    slot.started.store(1, Ordering::Release);
    let mut work: Option<MemWorkload> = None;
    let mut beats = 0u64;
    let mut last_beat = interrupts::ticks();
    loop {
        let now = interrupts::ticks();
        if work.is_none() && slot.go.load(Ordering::Acquire) != 0 {
            let (base, size) = (slot.base.load(Ordering::Relaxed), slot.size.load(Ordering::Relaxed));
            let mut w = MemWorkload::new(base, size, slot.rate.load(Ordering::Relaxed), false, HZ, now);
            w.start(splitmix64(slot.seed.load(Ordering::Relaxed) ^ index), now);
            work = Some(w);
        }
        if let Some(w) = work.as_mut() {
            w.step(now);
            slot.dirtied.store(w.dirtied(), Ordering::Relaxed);
        }
        if now >= last_beat + HZ {
            last_beat = now;
            beats += 1;
            slot.beats.store(beats, Ordering::Relaxed);
        }
        cpu::wait_until_tick(now + 1);
    }
}
