//! The Linux x86 `boot_params` "zero page" the VMM passes in RSI.
//!
//! Only the fields this kernel needs are read: the command line pointer
//! (`hdr.cmd_line_ptr` + `ext_cmd_line_ptr`) and the e820 memory map.

/// Offsets inside `struct boot_params` (arch/x86/include/uapi/asm/bootparam.h).
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
/// Longest command line we accept (Linux's COMMAND_LINE_SIZE on x86).
const CMDLINE_MAX: usize = 2048;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 memory-map entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    /// Exclusive end address (saturating).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the kernel keeps from the zero page.
pub struct BootParams {
    cmdline: &'static [u8],
    e820: [E820Entry; E820_MAX_ENTRIES],
    e820_len: usize,
}

impl BootParams {
    /// Parses the zero page at physical address `addr`.
    ///
    /// # Safety
    /// `addr` must be the identity-mapped address of a valid `boot_params`
    /// page, and the command line it points to (if any) must stay untouched
    /// for as long as [`BootParams::cmdline`] is used.
    pub unsafe fn parse(addr: u64) -> BootParams {
        let base = addr as *const u8;
        // SAFETY: the caller guarantees `base` points to a readable 4 KiB
        // page; every offset read below is inside it.
        let read_u8 = |off: usize| unsafe { base.add(off).read_volatile() };
        // SAFETY: as above; unaligned reads because the fields are packed.
        let read_u32 = |off: usize| unsafe { (base.add(off) as *const u32).read_unaligned() };
        // SAFETY: as above.
        let read_u64 = |off: usize| unsafe { (base.add(off) as *const u64).read_unaligned() };

        let mut e820 = [E820Entry::default(); E820_MAX_ENTRIES];
        let e820_len = usize::from(read_u8(E820_ENTRIES)).min(E820_MAX_ENTRIES);
        for (i, entry) in e820.iter_mut().enumerate().take(e820_len) {
            let off = E820_TABLE + i * E820_ENTRY_SIZE;
            *entry = E820Entry { addr: read_u64(off), size: read_u64(off + 8), kind: read_u32(off + 16) };
        }

        let ptr = u64::from(read_u32(CMD_LINE_PTR)) | (u64::from(read_u32(EXT_CMD_LINE_PTR)) << 32);
        let cmdline: &'static [u8] = if ptr == 0 {
            &[]
        } else {
            let p = ptr as *const u8;
            let mut len = 0;
            // SAFETY: the caller guarantees the command line is a readable,
            // NUL-terminated string; we stop at CMDLINE_MAX in any case.
            while len < CMDLINE_MAX && unsafe { p.add(len).read_volatile() } != 0 {
                len += 1;
            }
            // SAFETY: the `len` bytes at `p` were just read and are not written
            // by anyone while the kernel runs (caller contract).
            unsafe { core::slice::from_raw_parts(p, len) }
        };

        BootParams { cmdline, e820, e820_len }
    }

    /// The raw command line (without the NUL terminator).
    pub fn cmdline(&self) -> &'static [u8] {
        self.cmdline
    }

    /// The e820 memory map, as the VMM gave it.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// Usable RAM ranges (`[start, end)`), clipped to `[floor, ceiling)` and
    /// page-aligned inwards. Empty ranges are skipped.
    pub fn usable_ram(&self, floor: u64, ceiling: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.e820().iter().filter(|e| e.kind == E820_RAM).filter_map(move |e| {
            let start = align_up(e.addr.max(floor), 4096);
            let end = e.end().min(ceiling) & !4095;
            (start < end).then_some((start, end))
        })
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}
