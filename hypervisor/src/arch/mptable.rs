//! The MP table (Intel MultiProcessor Specification 1.4), through which a guest finds its
//! processors, its IOAPIC and how the ISA interrupts reach it, as a BIOS would describe them.
//!
//! Linux reads it (`find_smp_config` scans 639–640 KiB, among other places) when there is no
//! ACPI MADT, and so does the project's guest. It lives at [`MPTABLE_START`], the start of the
//! extended BIOS data area, which the e820 map reserves: a floating pointer structure, then the
//! configuration table it points to:
//!
//! | entries                  | what they say                                          |
//! |--------------------------|--------------------------------------------------------|
//! | one processor per vCPU   | APIC ID = vCPU index, enabled; vCPU 0 is the boot CPU |
//! | one bus                  | ISA, bus 0                                             |
//! | one IOAPIC               | ID = vCPU count, at `0xfec00000`                       |
//! | an I/O interrupt per IRQ | ISA IRQ n to IOAPIC pin n (n < 16)                     |
//! | two local interrupts     | ExtINT on LINT0 of CPU 0, NMI on LINT1 of every CPU    |
//!
//! [`build`] is pure; [`write`] puts its bytes into guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{EBDA_START, HIMEM_START};

/// Where the MP floating pointer goes (the configuration table follows it).
pub const MPTABLE_START: u64 = EBDA_START;
/// The most vCPUs a VM may have (`--cpus`): one MP processor entry and one 8-bit APIC ID each.
pub const MAX_VCPUS: u8 = 32;
/// The local APIC's address, as the MP table and the APIC base MSR give it.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The IOAPIC's address (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// ISA interrupts (routed to the IOAPIC pins of the same number).
const ISA_IRQS: u8 = 16;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
/// Processor entry flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// Family 6, as a BIOS reports a modern CPU (Linux does not use it).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
/// Interrupt types.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

/// Errors of the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// A vCPU count outside 1..=[`MAX_VCPUS`].
    #[error("{0} vCPUs: a VM has 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// The table does not fit where it goes.
    #[error("the MP table ({0} bytes) does not fit in a KiB below 1 MiB")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(String),
}

/// The byte that makes `bytes` sum to 0 (MP and ACPI structures alike).
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)).wrapping_neg()
}

/// The MP floating pointer and configuration table for `vcpus` vCPUs, to be placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for pin in 0..ISA_IRQS {
        // Type, interrupt type, flags (conforming to the bus), source bus and IRQ, IOAPIC, pin.
        entries.extend_from_slice(&[3, INT_VECTORED, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[4, INT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const FLOATING: usize = 16;
    const HEADER: usize = 44;
    let table_len = HEADER + entries.len();
    let total = FLOATING + table_len;
    // Within a KiB (at MPTABLE_START: the EBDA's first, where Linux looks) and below 1 MiB.
    if total > 1024 || base + total as u64 > HIMEM_START {
        return Err(MpTableError::TooLarge(total));
    }
    let table_addr = (base + FLOATING as u64) as u32;

    let mut fp = Vec::with_capacity(FLOATING);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, spec revision, checksum, then feature bytes: 0 = a configuration
    // table is present, and the interrupt mode is virtual wire (no IMCR).
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]);
    table.extend_from_slice(b"SHRINK  ");
    table.extend_from_slice(b"SHRINK-VMM  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `vcpus` vCPUs at [`MPTABLE_START`].
pub fn write<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|e| MpTableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's entries, as (type, bytes).
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &t[16 + 44..];
        while let Some(&ty) = rest.first() {
            let len = if ty == 0 { 20 } else { 8 };
            out.push((ty, &rest[..len]));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn both_structures_check_and_point_at_each_other() {
        for n in [1, 2, 4, MAX_VCPUS] {
            let t = build(n, MPTABLE_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(checksum(&t[..16]), 0, "floating pointer checksum, {n} vCPUs");
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0, "table checksum, {n} vCPUs");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as usize;
            assert_eq!(count, entries(&t).len());
            assert!(MPTABLE_START + t.len() as u64 <= EBDA_START + 1024, "within the first KiB of the EBDA");
        }
    }

    #[test]
    fn one_enabled_processor_per_vcpu_and_only_the_first_boots() {
        let t = build(4, MPTABLE_START).unwrap();
        let cpus: Vec<(u8, u8)> = entries(&t).iter().filter(|e| e.0 == 0).map(|e| (e.1[1], e.1[3])).collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        // The IOAPIC's ID follows the CPUs', and every pin is routed to it.
        let ioapic = entries(&t).into_iter().find(|e| e.0 == 2).unwrap().1;
        assert_eq!(ioapic[1], 4);
        assert_eq!(u32::from_le_bytes(ioapic[4..8].try_into().unwrap()), IOAPIC_ADDRESS);
        let pins: Vec<u8> = entries(&t).iter().filter(|e| e.0 == 3).map(|e| e.1[7]).collect();
        assert_eq!(pins, (0..ISA_IRQS).collect::<Vec<_>>());
    }

    #[test]
    fn counts_outside_1_to_32_are_refused() {
        assert_eq!(build(0, MPTABLE_START), Err(MpTableError::VcpuCount(0)));
        assert_eq!(build(33, MPTABLE_START), Err(MpTableError::VcpuCount(33)));
        assert!(matches!(build(32, HIMEM_START - 100), Err(MpTableError::TooLarge(_))));
    }
}
