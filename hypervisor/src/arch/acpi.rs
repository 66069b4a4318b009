//! The ACPI tables that tell a guest its processors: an RSDP, an XSDT and a MADT.
//!
//! Linux kernels built without MP-table parsing (Debian's cloud kernel has
//! `CONFIG_X86_MPPARSE` off) find their CPUs only in the MADT. It says what the MP table
//! ([`super::mptable`]) says: one enabled local APIC per vCPU (APIC ID = ACPI processor UID =
//! vCPU index), the IOAPIC (ID = vCPU count, GSI base 0, pins routed as the ISA IRQs of the same
//! number, as KVM's in-kernel irqchip does), NMI on LINT1, and 8259 PICs present.
//!
//! A FADT says the platform is hardware-reduced (no SCI, no PM timer, no fixed ACPI hardware):
//! without it, Linux would set up an SCI on IRQ 0 with ACPI's defaults for it (level,
//! active-low), against the edge-triggered PIT. There is no DSDT: the guest gets no ACPI
//! namespace (power button, sleep states), only the processor topology; Linux turns the rest of
//! ACPI off when it finds none.
//!
//! | at                 | table                                           |
//! |--------------------|-------------------------------------------------|
//! | [`RSDP_START`]     | RSDP (ACPI 2.0, 36 bytes), pointing at the XSDT |
//! | `+ 0x30`           | XSDT: the MADT and the FADT                     |
//! | next 16 bytes      | MADT                                            |
//! | next 16 bytes      | FADT (ACPI 6, 276 bytes)                        |
//!
//! The RSDP sits in the BIOS area that ACPI's search covers (0xE0000..0xFFFFF, 16-byte
//! aligned), reserved in the e820 map. [`build`] is pure; [`write`] puts the bytes in guest
//! memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::mptable::{checksum, IOAPIC_ADDRESS, LAPIC_ADDRESS, MAX_VCPUS};

/// Where the RSDP goes (the XSDT and MADT follow it).
pub const RSDP_START: u64 = 0xe_0000;
const XSDT_OFFSET: usize = 0x30;
/// FADT length for ACPI 6.0 and later (revision 6).
const FADT_LENGTH: usize = 276;
/// FADT flags: HW_REDUCED_ACPI.
const FADT_HW_REDUCED: u32 = 1 << 20;
const HEADER: usize = 36;
const OEM_ID: &[u8; 6] = b"SHRINK";
const OEM_TABLE_ID: &[u8; 8] = b"SHRINKVM";

/// Errors of the ACPI tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// A vCPU count outside 1..=[`MAX_VCPUS`].
    #[error("{0} vCPUs: a VM has 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Memory(String),
}

/// A system description table: the standard header, then `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER + body.len()) as u32).to_le_bytes());
    t.extend_from_slice(&[revision, 0]);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"SHRK"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The RSDP, XSDT and MADT for `vcpus` vCPUs, as one block to place at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount(vcpus));
    }
    // MADT: local APIC address, flags (PCAT_COMPAT: 8259s present), then the entries.
    let mut madt = Vec::new();
    madt.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    madt.extend_from_slice(&1u32.to_le_bytes());
    for id in 0..vcpus {
        // Processor local APIC: UID, APIC ID, flags (enabled).
        madt.extend_from_slice(&[0, 8, id, id]);
        madt.extend_from_slice(&1u32.to_le_bytes());
    }
    // IOAPIC: ID, reserved, address, GSI base.
    madt.extend_from_slice(&[1, 12, vcpus, 0]);
    madt.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    madt.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: every processor (0xff), flags 0 (conforming), LINT1.
    madt.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    let madt = table(b"APIC", 4, &madt);

    // FADT body (after the header): everything zero (no FACS, no DSDT, no fixed hardware)
    // but the flags, the minor version and the hypervisor's name.
    let mut fadt = vec![0u8; FADT_LENGTH - HEADER];
    fadt[112 - HEADER..116 - HEADER].copy_from_slice(&FADT_HW_REDUCED.to_le_bytes());
    fadt[131 - HEADER] = 3; // FADT minor version (ACPI 6.3)
    fadt[268 - HEADER..276 - HEADER].copy_from_slice(b"SHRINKVM");
    let fadt = table(b"FACP", 6, &fadt);

    // The XSDT's two entries, then the MADT and the FADT, each 16-byte aligned.
    let madt_at = (XSDT_OFFSET + HEADER + 16).next_multiple_of(16);
    let fadt_at = (madt_at + madt.len()).next_multiple_of(16);
    let mut entries = Vec::new();
    for at in [madt_at, fadt_at] {
        entries.extend_from_slice(&(base + at as u64).to_le_bytes());
    }
    let xsdt = table(b"XSDT", 1, &entries);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0 and later (the XSDT is used)
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&(base + XSDT_OFFSET as u64).to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut out = vec![0u8; fadt_at + fadt.len()];
    out[..rsdp.len()].copy_from_slice(&rsdp);
    out[XSDT_OFFSET..XSDT_OFFSET + xsdt.len()].copy_from_slice(&xsdt);
    out[madt_at..madt_at + madt.len()].copy_from_slice(&madt);
    out[fadt_at..].copy_from_slice(&fadt);
    Ok(out)
}

/// Writes the tables for `vcpus` vCPUs at [`RSDP_START`].
pub fn write<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<(), AcpiError> {
    let bytes = build(vcpus, RSDP_START)?;
    mem.write_slice(&bytes, GuestAddress(RSDP_START)).map_err(|e| AcpiError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn the_rsdp_leads_to_a_madt_that_lists_every_vcpu() {
        for n in [1u8, 4, MAX_VCPUS] {
            let t = build(n, RSDP_START).unwrap();
            assert_eq!(&t[..8], b"RSD PTR ");
            assert_eq!(checksum(&t[..20]), 0, "RSDP checksum");
            assert_eq!(checksum(&t[..36]), 0, "RSDP extended checksum");
            assert_eq!(t[15], 2, "ACPI 2.0");
            let xsdt_at = (u64_at(&t, 24) - RSDP_START) as usize;
            let xsdt = &t[xsdt_at..xsdt_at + u32_at(&t, xsdt_at + 4) as usize];
            assert_eq!(&xsdt[..4], b"XSDT");
            assert_eq!(checksum(xsdt), 0, "XSDT checksum");
            assert_eq!(xsdt.len(), HEADER + 16, "two entries");
            let fadt_at = (u64_at(xsdt, HEADER + 8) - RSDP_START) as usize;
            let fadt = &t[fadt_at..fadt_at + u32_at(&t, fadt_at + 4) as usize];
            assert_eq!((&fadt[..4], fadt.len(), fadt[8]), (&b"FACP"[..], FADT_LENGTH, 6));
            assert_eq!(checksum(fadt), 0, "FADT checksum");
            assert_eq!(u32_at(fadt, 112), FADT_HW_REDUCED, "hardware-reduced, nothing else");
            assert_eq!(u32_at(fadt, 40), 0, "no DSDT");
            let madt_at = (u64_at(xsdt, HEADER) - RSDP_START) as usize;
            let madt = &t[madt_at..madt_at + u32_at(&t, madt_at + 4) as usize];
            assert_eq!(&madt[..4], b"APIC");
            assert_eq!(checksum(madt), 0, "MADT checksum");
            assert_eq!(u32_at(madt, HEADER), LAPIC_ADDRESS);
            // Walk the entries: every vCPU's LAPIC, enabled, then the IOAPIC and the NMI.
            let (mut at, mut cpus, mut ioapic) = (HEADER + 8, Vec::new(), None);
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, at + 4), 1, "enabled");
                        cpus.push((madt[at + 2], madt[at + 3]));
                    }
                    1 => ioapic = Some((madt[at + 2], u32_at(madt, at + 4))),
                    4 => assert_eq!(madt[at + 5], 1, "NMI on LINT1"),
                    k => panic!("unexpected MADT entry {k}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len());
            assert_eq!(cpus, (0..n).map(|i| (i, i)).collect::<Vec<_>>());
            assert_eq!(ioapic, Some((n, IOAPIC_ADDRESS)));
            assert!(RSDP_START + t.len() as u64 <= 0xf_0000, "inside the BIOS area");
            assert!(xsdt_at + xsdt.len() <= madt_at && madt_at + madt.len() <= fadt_at, "no overlap");
        }
    }

    #[test]
    fn counts_outside_1_to_32_are_refused() {
        assert_eq!(build(0, RSDP_START), Err(AcpiError::VcpuCount(0)));
        assert_eq!(build(33, RSDP_START), Err(AcpiError::VcpuCount(33)));
    }
}
