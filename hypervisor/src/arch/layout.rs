//! Guest physical memory layout (the same for the project's guest and for Linux).
//!
//! | range                     | use                                        |
//! |---------------------------|--------------------------------------------|
//! | `0x500`                   | boot GDT                                   |
//! | `0x520`                   | boot IDT (empty)                           |
//! | `0x7000`                  | `boot_params` zero page (RSI at entry)     |
//! | `0x8ff0`                  | boot stack pointer                         |
//! | `0x9000..0x10000`         | identity page tables (PML4, PDPT, 4 × PD)  |
//! | `0x20000`                 | kernel command line                        |
//! | `0x9fc00` (EBDA)          | MP table (the vCPUs, IOAPIC, interrupts)   |
//! | `0xe0000`                 | ACPI RSDP, XSDT, MADT (the same)           |
//! | `0x100000..`              | kernel (bzImage) / ELF segments            |
//! | `MMIO_GAP_START..4 GiB`   | device MMIO (virtio-mmio), LAPIC, IOAPIC   |
//! | `4 GiB..`                 | RAM above the gap when `--mem` > 3 GiB     |

use vm_memory::GuestAddress;

/// Guest page size used for dirty tracking and snapshots.
pub const PAGE_SIZE: usize = 4096;
/// Boot GDT address.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT address.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (the guest sets up its own stack at once).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) covering the low 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, including the terminating NUL (Linux's x86 limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: end of usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (devices, LAPIC, IOAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First address of the virtio-mmio device window.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// KVM's TSS (three pages) for Intel real-mode emulation, inside the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for Intel real-mode emulation, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Smallest guest memory we accept: page tables, zero page, command line and a kernel must fit.
pub const MIN_MEM_SIZE: u64 = 32 << 20;

/// The guest RAM ranges for `mem_size` bytes of memory: below the MMIO hole, and above 4 GiB
/// for whatever does not fit below it.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (mem_size - MMIO_GAP_START) as usize),
        ]
    }
}

/// The e820 map handed to the guest: `(address, size, type)` with type 1 = usable RAM.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    const E820_RAM: u32 = 1;
    const E820_RESERVED: u32 = 2;
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for (base, size) in ram_ranges(mem_size) {
        let start = base.0.max(HIMEM_START);
        let end = base.0 + size as u64;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(1 << 32), (1 << 30) as usize));
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let m = e820_map(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, 1));
        assert_eq!(m[1].2, 2);
        assert_eq!(m[2], (HIMEM_START, (256 << 20) - HIMEM_START, 1));
        let total: u64 = m.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert!(total < 256 << 20 && total > 255 << 20);
    }
}
