//! What the VMM tells the kernel at boot: the command line and the memory map.
//!
//! Two boot protocols hand them over:
//! * Linux's 64-bit boot protocol (shrink-vmm): the `boot_params` "zero page"
//!   in RSI, of which the command line pointer (`hdr.cmd_line_ptr` +
//!   `ext_cmd_line_ptr`) and the e820 map are read;
//! * the x86/HVM direct boot ABI, "PVH" (QEMU's `-kernel` with an ELF that
//!   carries the `XEN_ELFNOTE_PHYS32_ENTRY` note): `struct hvm_start_info`
//!   (Xen's `public/arch-x86/hvm/start_info.h`) in EBX, whose command line and
//!   memory map (version 1 and later) are read. Its memory map entries carry
//!   e820 types.

/// Offsets inside `struct boot_params` (arch/x86/include/uapi/asm/bootparam.h).
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
/// Longest command line we accept (Linux's COMMAND_LINE_SIZE on x86).
const CMDLINE_MAX: usize = 2048;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Offsets inside `struct hvm_start_info`.
const PVH_VERSION: usize = 4;
const PVH_CMDLINE_PADDR: usize = 24;
const PVH_MEMMAP_PADDR: usize = 40;
const PVH_MEMMAP_ENTRIES: usize = 48;
/// Size of one `struct hvm_memmap_table_entry` (addr, size, type, reserved).
const PVH_MEMMAP_ENTRY_SIZE: usize = 24;

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
        let read_u32 = |off: usize| unsafe { read_u32_at(base, off) };
        // SAFETY: as above.
        let read_u64 = |off: usize| unsafe { read_u64_at(base, off) };

        let mut e820 = [E820Entry::default(); E820_MAX_ENTRIES];
        let e820_len = usize::from(read_u8(E820_ENTRIES)).min(E820_MAX_ENTRIES);
        for (i, entry) in e820.iter_mut().enumerate().take(e820_len) {
            let off = E820_TABLE + i * E820_ENTRY_SIZE;
            *entry = E820Entry { addr: read_u64(off), size: read_u64(off + 8), kind: read_u32(off + 16) };
        }

        let ptr = u64::from(read_u32(CMD_LINE_PTR)) | (u64::from(read_u32(EXT_CMD_LINE_PTR)) << 32);
        // SAFETY: the caller guarantees the command line is a readable,
        // NUL-terminated string that stays untouched.
        let cmdline = unsafe { c_string(ptr) };
        BootParams { cmdline, e820, e820_len }
    }

    /// Parses the PVH `hvm_start_info` at physical address `addr`. A bad
    /// magic, or a version without a memory map, is a panic that says so:
    /// the kernel cannot place its heap without one.
    ///
    /// # Safety
    /// `addr` must be the identity-mapped address of the start info the
    /// loader passed in EBX; its command line and memory map must stay
    /// untouched for as long as the result is used.
    pub unsafe fn parse_pvh(addr: u64) -> BootParams {
        let base = addr as *const u8;
        // SAFETY: the caller guarantees `base` is a valid `hvm_start_info`
        // (56 bytes in version 1); every offset read is inside it.
        let (magic, version) = unsafe { (read_u32_at(base, 0), read_u32_at(base, PVH_VERSION)) };
        assert!(magic == PVH_MAGIC, "PVH start info at 0x{addr:x}: magic 0x{magic:x}, not 0x{PVH_MAGIC:x}");
        assert!(version >= 1, "PVH start info version {version} has no memory map");
        // SAFETY: as above.
        let (cmdline_paddr, memmap, entries) = unsafe {
            (
                read_u64_at(base, PVH_CMDLINE_PADDR),
                read_u64_at(base, PVH_MEMMAP_PADDR),
                read_u32_at(base, PVH_MEMMAP_ENTRIES),
            )
        };
        let mut e820 = [E820Entry::default(); E820_MAX_ENTRIES];
        let e820_len = (entries as usize).min(E820_MAX_ENTRIES);
        let table = memmap as *const u8;
        for (i, entry) in e820.iter_mut().enumerate().take(e820_len) {
            let off = i * PVH_MEMMAP_ENTRY_SIZE;
            // SAFETY: the loader's memory map holds `entries` entries of
            // PVH_MEMMAP_ENTRY_SIZE bytes at `memmap` (caller contract).
            *entry = unsafe {
                E820Entry {
                    addr: read_u64_at(table, off),
                    size: read_u64_at(table, off + 8),
                    kind: read_u32_at(table, off + 16),
                }
            };
        }
        // SAFETY: the caller guarantees the command line is a readable,
        // NUL-terminated string that stays untouched.
        let cmdline = unsafe { c_string(cmdline_paddr) };
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

/// # Safety
/// `base + off` must be readable for 4 bytes.
unsafe fn read_u32_at(base: *const u8, off: usize) -> u32 {
    // SAFETY: caller contract; unaligned because boot structures are packed.
    unsafe { (base.add(off) as *const u32).read_unaligned() }
}

/// # Safety
/// `base + off` must be readable for 8 bytes.
unsafe fn read_u64_at(base: *const u8, off: usize) -> u64 {
    // SAFETY: caller contract; unaligned because boot structures are packed.
    unsafe { (base.add(off) as *const u64).read_unaligned() }
}

/// The NUL-terminated string at physical address `ptr` (empty for 0), at most
/// [`CMDLINE_MAX`] bytes.
///
/// # Safety
/// A non-zero `ptr` must be a readable, NUL-terminated string, identity
/// mapped, that nobody writes while the kernel runs.
unsafe fn c_string(ptr: u64) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    let p = ptr as *const u8;
    let mut len = 0;
    // SAFETY: the caller guarantees a readable, NUL-terminated string; we
    // stop at CMDLINE_MAX in any case.
    while len < CMDLINE_MAX && unsafe { p.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes at `p` were just read and are not written by
    // anyone while the kernel runs (caller contract).
    unsafe { core::slice::from_raw_parts(p, len) }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}
