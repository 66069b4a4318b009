//! The IOAPIC (KVM's in-kernel one at 0xFEC00000, identity-mapped and
//! user-accessible): routes a device's GSI to a LAPIC vector.

const IOAPIC_BASE: usize = 0xfec0_0000;
const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;
const REG_VERSION: u32 = 0x01;
const REG_REDIRECTION: u32 = 0x10;
const MASKED: u32 = 1 << 16;

fn write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC page is identity-mapped; IOREGSEL/IOWIN are its
    // 32-bit index and data registers. Only the main loop (one CPU, ring 3)
    // touches the IOAPIC, so the index/data pair is not interleaved.
    unsafe {
        ((IOAPIC_BASE + IOREGSEL) as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + IOWIN) as *mut u32).write_volatile(value);
    }
}

fn read(reg: u32) -> u32 {
    // SAFETY: as in `write`.
    unsafe {
        ((IOAPIC_BASE + IOREGSEL) as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + IOWIN) as *const u32).read_volatile()
    }
}

/// Number of redirection entries (input pins).
pub fn pins() -> u32 {
    ((read(REG_VERSION) >> 16) & 0xff) + 1
}

/// Routes `gsi` to `vector` on the LAPIC with ID `apic_id`: fixed delivery,
/// physical destination, active high, edge-triggered, unmasked. Returns false
/// if the IOAPIC has no such pin.
pub fn route(gsi: u32, vector: u8, apic_id: u8) -> bool {
    if gsi >= pins() {
        return false;
    }
    let reg = REG_REDIRECTION + 2 * gsi;
    write(reg, MASKED);
    write(reg + 1, u32::from(apic_id) << 24);
    write(reg, u32::from(vector));
    true
}
