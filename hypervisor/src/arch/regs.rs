//! The long-mode entry state of the boot vCPU: GDT, identity page tables covering the low
//! 4 GiB with 2 MiB pages, control registers, general registers and FPU state.
//!
//! The guest is entered at its 64-bit entry point exactly as the Linux x86-64 boot protocol
//! describes (`RSI` = zero page, `CS` = `__BOOT_CS` 0x10, `DS` = `__BOOT_DS` 0x18), because real
//! mode is emulated and very slow under nested KVM.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::*;

/// Errors while writing the boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT did not fit in guest memory.
    #[error("cannot write the boot GDT into guest memory")]
    WriteGdt,
    /// The IDT did not fit in guest memory.
    #[error("cannot write the boot IDT into guest memory")]
    WriteIdt,
    /// The page tables did not fit in guest memory.
    #[error("cannot write the identity page tables into guest memory")]
    WritePageTables,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selector of the 64-bit code segment (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// GDT selector of the data segments (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Builds a GDT entry from flags, base and limit (the layout of the x86 segment descriptor).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// Decodes a GDT entry into the segment register KVM expects.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // Granularity 4 KiB: the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
const BOOT_GDT: [u64; 5] =
    [0, 0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// Writes the GDT, IDT and page tables into guest memory and returns the special registers
/// that enter long mode with them.
pub fn setup_long_mode<M: GuestMemory>(mem: &M, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i * 8) as u64)).map_err(|_| RegsError::WriteGdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|_| RegsError::WriteIdt)?;
    setup_page_tables(mem)?;

    let code = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
    let data = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
    let tss = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    // Set exactly, not OR'ed into the reset values: the reset CR0 has CD and NW (caches off).
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(())
}

/// Identity-maps the low 4 GiB: PML4[0] → PDPT, PDPT[0..4] → four page directories of 2 MiB
/// pages, so that RAM, device MMIO, the IOAPIC and the LAPIC are all reachable.
///
/// Every level has the User bit set, so a guest may run its code at CPL 3 on these tables.
/// That matters on PVM-based nested KVM (the development machines): there only CPL 3 code runs
/// natively, while CPL 0 code is emulated instruction by instruction (without SSE support), so
/// the project's guest does its privileged set-up in a few instructions and runs in ring 3.
/// Linux replaces these tables early in boot.
fn setup_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x7;
    const HUGE: u64 = 0x80;
    let err = |_| RegsError::WritePageTables;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START)).map_err(err)?;
    for i in 0..4u64 {
        mem.write_obj((PDE_START + i * 0x1000) | PRESENT_RW, GuestAddress(PDPTE_START + i * 8)).map_err(err)?;
    }
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | PRESENT_RW | HUGE, GuestAddress(PDE_START + i * 8)).map_err(err)?;
    }
    Ok(())
}

/// General registers at entry: `RIP` = entry point, `RSI` = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at entry: the reset values of FCW and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn gdt_segments_decode_as_long_mode() {
        let cs = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.unusable), (0, 1, 3, 0));
        let tss = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&m, &mut sregs).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), PDPTE_START | 7);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDPTE_START + 24)).unwrap(), (PDE_START + 0x3000) | 7);
        // The last 2 MiB page holds the LAPIC at 0xfee00000.
        let last = m.read_obj::<u64>(GuestAddress(PDE_START + 2047 * 8)).unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr4 & X86_CR4_OSFXSR, 0);
        assert_eq!(sregs.cs.selector, 0x10);
    }
}
