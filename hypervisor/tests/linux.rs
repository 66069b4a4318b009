//! The Linux boot path: a Debian kernel's banner through the 64-bit boot protocol, its count of
//! the vCPUs from the MADT, and a bzImage's setup header and zero page.

use std::time::Duration;

use hypervisor::arch::layout::{CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use hypervisor::loader::{load_kernel, KernelConfig, KernelFormat};
use hypervisor::vstate::memory::create_guest_memory;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::*;

#[test]
fn debian_vmlinux_prints_its_banner_on_serial() {
    let dir = TempDir::new("linux").unwrap();
    let kernel = image("vmlinux");
    let vm = VmProcess::spawn(
        dir.path(),
        "linux",
        &["--kernel", kernel.to_str().unwrap(), "--mem", "512M", "--cmdline", "console=ttyS0 earlyprintk=serial"],
    );
    vm.wait_for("Linux version", Duration::from_secs(120));
    // The kernel read our command line and e820 map from the zero page.
    vm.wait_for("Command line: console=ttyS0 earlyprintk=serial", Duration::from_secs(60));
    vm.wait_for("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable", Duration::from_secs(60));
}

#[test]
fn debian_linux_counts_every_vcpu_in_the_madt() {
    let dir = TempDir::new("linux-smp").unwrap();
    let kernel = image("vmlinux");
    let vm = VmProcess::spawn(
        dir.path(),
        "linux4",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "512M",
            "--cpus",
            "4",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial",
        ],
    );
    // Debian's cloud kernel has no MP-table parser: it takes its processors from the MADT.
    vm.wait_for("ACPI: Using ACPI (MADT) for SMP configuration information", Duration::from_secs(180));
    vm.wait_for("IOAPIC[0]: apic_id 4, version 17, address 0xfec00000, GSI 0-23", Duration::from_secs(10));
    vm.wait_for("smpboot: Allowing 4 CPUs, 0 hotplug CPUs", Duration::from_secs(60));
}

#[test]
fn a_bzimage_loads_with_its_setup_header_and_zero_page() {
    let kernel = image("vmlinuz");
    let mem = create_guest_memory(256 << 20).unwrap();
    let cfg =
        KernelConfig { kernel: kernel.clone(), initrd: Some(image("initrd.img")), cmdline: "console=ttyS0".into() };
    let info = load_kernel(&mem, &cfg).unwrap();
    assert_eq!(info.format, KernelFormat::BzImage);
    assert_eq!(info.entry, HIMEM_START + 0x200, "64-bit entry point");
    let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    let hdr = params.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
    assert!({ hdr.version } >= 0x020c, "64-bit boot protocol");
    // The protected-mode payload sits at 1 MiB, byte for byte.
    let file = std::fs::read(&kernel).unwrap();
    let setup = (file[0x1f1].max(4) as usize + 1) * 512;
    let mut loaded = vec![0u8; 4096];
    mem.read_slice(&mut loaded, GuestAddress(HIMEM_START)).unwrap();
    assert_eq!(loaded, file[setup..setup + 4096]);
    // The initrd is placed, page aligned, and recorded.
    let initrd = std::fs::read(image("initrd.img")).unwrap();
    assert_eq!({ hdr.ramdisk_size } as usize, initrd.len());
    assert_eq!({ hdr.ramdisk_image } % 4096, 0);
    let mut head = vec![0u8; 512];
    mem.read_slice(&mut head, GuestAddress({ hdr.ramdisk_image } as u64)).unwrap();
    assert_eq!(head, initrd[..512]);
    let mut cmdline = vec![0u8; 14];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START)).unwrap();
    assert_eq!(&cmdline, b"console=ttyS0\0");
}
