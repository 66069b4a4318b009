//! Kernel loading with the Linux x86-64 64-bit boot protocol: ELF kernels (the project's
//! guest, an uncompressed Linux `vmlinux`) and bzImages, a `boot_params` zero page with the
//! e820 map, the command line and an optional initrd.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel or initrd file cannot be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("kernel {0}: not an x86-64 ELF or bzImage kernel")]
    NotAKernel(PathBuf),
    /// linux-loader rejected the image.
    #[error("kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: linux_loader::loader::Error,
    },
    /// The command line is too long or has bad characters.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// Reading the initrd failed.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing the zero page failed.
    #[error("cannot write boot_params: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// ELF or bzImage kernel.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// The kind of kernel image, from its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF (`\x7fELF`).
    Elf,
    /// bzImage (`HdrS` at offset 0x202).
    BzImage,
}

/// Recognises a kernel image by its header bytes.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.len() >= 4 && &header[..4] == b"\x7fELF" {
        Some(KernelFormat::Elf)
    } else if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// Where the kernel was loaded.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// Format of the image.
    pub format: KernelFormat,
}

fn open(what: &'static str, path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Open { what, path: path.to_owned(), source })
}

/// Loads the kernel, command line, initrd and zero page into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, cfg: &KernelConfig) -> Result<BootInfo, LoaderError> {
    let mut file = open("kernel", &cfg.kernel)?;
    let mut header = vec![0u8; 0x400];
    let n = file.read(&mut header).map_err(|source| LoaderError::Open {
        what: "kernel",
        path: cfg.kernel.clone(),
        source,
    })?;
    let format = detect_format(&header[..n]).ok_or_else(|| LoaderError::NotAKernel(cfg.kernel.clone()))?;
    let load_err = |source| LoaderError::Load { path: cfg.kernel.clone(), source };
    let himem = Some(GuestAddress(HIMEM_START));
    let (entry, setup_header) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            (r.kernel_load.0, None)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            // The 64-bit entry point is 0x200 past the start of the protected-mode code.
            (r.kernel_load.0 + 0x200, r.setup_header)
        }
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    if !cfg.cmdline.trim().is_empty() {
        cmdline.insert_str(cfg.cmdline.trim()).map_err(LoaderError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(LoaderError::WriteCmdline)?;

    let mut params = boot_params::default();
    match setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes().len() as u32).map_err(LoaderError::Cmdline)?;

    let mem_size = crate::vstate::memory::mem_size(mem);
    if let Some(initrd) = &cfg.initrd {
        let (addr, size) = load_initrd(mem, initrd, mem_size, params.hdr.initrd_addr_max)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    for (i, (addr, size, type_)) in e820_map(mem_size).into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: type_ };
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(LoaderError::BootParams)?;
    Ok(BootInfo { entry, format })
}

/// Places the initrd as high as possible below the MMIO hole and the kernel's limit.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, mem_size: u64, addr_max: u32) -> Result<(u64, u64), LoaderError> {
    let mut file = open("initrd", path)?;
    let read_err = |source| LoaderError::ReadInitrd { path: path.to_owned(), source };
    let size = file.metadata().map_err(read_err)?.len();
    let mut limit = mem_size.min(MMIO_GAP_START);
    if addr_max != 0 {
        limit = limit.min(addr_max as u64 + 1);
    }
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE as u64 - 1))
        .filter(|&a| a >= HIMEM_START)
        .ok_or_else(|| LoaderError::InitrdTooBig { path: path.to_owned(), size, limit })?;
    let mut data = Vec::with_capacity(size as usize);
    file.read_to_end(&mut data).map_err(read_err)?;
    mem.write_slice(&data, GuestAddress(addr)).map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("notes.txt");
        std::fs::write(&path, "not a kernel").unwrap();
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let cfg = KernelConfig { kernel: path, initrd: None, cmdline: String::new() };
        let err = load_kernel(&mem, &cfg).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("notes.txt"));
    }
}
