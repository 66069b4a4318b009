//! Ring-0 entry and the privilege split.
//!
//! Two entries, one per boot protocol, meet at the same 64-bit code:
//! * `_start`, the ELF entry: shrink-vmm enters it in 64-bit mode (Linux's
//!   64-bit boot protocol, RSI = zero page);
//! * `_start_pvh`, named by the `XEN_ELFNOTE_PHYS32_ENTRY` ELF note: QEMU's
//!   `-kernel` (the x86/HVM direct boot ABI) enters it in 32-bit protected
//!   mode, paging off, EBX = `hvm_start_info`. It switches to long mode on
//!   static page tables (identity map of the low 4 GiB, 2 MiB pages) and the
//!   GDT below, then joins `_start`'s path. `kernel_main` learns which
//!   protocol it was from its second argument.
//!
//! The VMM enters the kernel at CPL 0. On the nested KVM this
//! project runs on (PVM-based), **all CPL 0 guest code is executed by KVM's
//! instruction emulator** (about a million instructions per second, and no SSE
//! arithmetic such as `xorps`), while CPL 3 code runs natively. So the kernel is
//! split:
//!
//! * a small ring-0 part, hand-written assembly only (this file and the stubs
//!   in `interrupts.rs`): clear .bss, build identity page tables with the user
//!   bit set, load our GDT (with user segments and a TSS), the IDT and CR3,
//!   enable the LAPIC in IA32_APIC_BASE, mask the PIC, then `iretq` to ring 3;
//! * everything written in Rust runs in ring 3, with an all-zero I/O
//!   permission bitmap in the TSS (so port I/O is allowed; the nested
//!   hypervisor forces IOPL to 0 in ring 3) on pages mapped user-accessible
//!   (so the LAPIC MMIO page and all RAM are reachable). What ring 3 cannot do
//!   (halt, enabling interrupts, MSRs) goes through a `ud2` service gate (see
//!   [`crate::cpu`] and `interrupts.rs`).

use core::arch::global_asm;

/// Kernel code segment (as Linux's __BOOT_CS).
pub const KERNEL_CS: u16 = 0x10;
/// Size of the ring-0 stack (TSS.RSP0), used by interrupts and the service gate.
pub const KERNEL_STACK_SIZE: usize = 16 * 1024;
/// Size of the ring-3 stack the Rust code runs on.
pub const USER_STACK_SIZE: usize = 1024 * 1024;
/// Size of the ring-3 stack used to report exceptions.
pub const REPORT_STACK_SIZE: usize = 32 * 1024;
/// GDT selector of the first application processor's TSS (16 bytes each,
/// after the boot CPU's at 0x30; see `smp.rs`).
pub const GDT_AP_TSS: u16 = 0x40;
/// GDT size: the boot CPU's entries, then a TSS slot per application processor.
pub const GDT_SIZE: usize = GDT_AP_TSS as usize + 16 * (crate::smp::MAX_CPUS - 1);

global_asm!(
    r#"
    .section .text._start, "ax"
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov r12, rsi                        // boot_params (RSI per the boot protocol)
    xor r13d, r13d                      // protocol: Linux 64-bit
.Lcommon:
    lea rsp, [rip + KERNEL_STACK_TOP]   // never use the VMM's stack

    // Clear .bss (statics, page tables, IDT). The stacks live in .noinit.
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq

    // Identity-map the low 4 GiB with 2 MiB pages, user-accessible (U|RW|P).
    lea rdi, [rip + BOOT_PML4]
    lea rax, [rip + BOOT_PDPT]
    or rax, 7
    mov [rdi], rax
    lea rdi, [rip + BOOT_PDPT]
    lea rax, [rip + BOOT_PD]
    or rax, 7
    mov ecx, 4
1:
    mov [rdi], rax
    add rax, 4096
    add rdi, 8
    dec ecx
    jnz 1b
    lea rdi, [rip + BOOT_PD]
    mov eax, 0x87                       // PS | U | RW | P
    mov ecx, 2048
2:
    mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    dec ecx
    jnz 2b
    lea rax, [rip + BOOT_PML4]
    mov cr3, rax

    // TSS: RSP0 = top of the kernel stack; an I/O permission bitmap right
    // after the 104-byte TSS, all zero (every port allowed in ring 3), ended
    // by the required 0xff byte. (The nested hypervisor forces IOPL to 0 in
    // ring 3, so the bitmap is what grants port access.)
    lea rax, [rip + KERNEL_STACK_TOP]
    mov [rip + BOOT_TSS + 4], rax
    mov word ptr [rip + BOOT_TSS + 102], 104
    mov byte ptr [rip + BOOT_TSS + 104 + 8192], 0xff
    // TSS descriptor (16 bytes) at GDT offset 0x30.
    lea rax, [rip + BOOT_TSS]
    lea rdi, [rip + BOOT_GDT + 0x30]
    mov word ptr [rdi], 104 + 8192      // limit (TSS + bitmap + 0xff byte - 1)
    mov [rdi + 2], ax                   // base 15:0
    shr rax, 16
    mov [rdi + 4], al                   // base 23:16
    mov byte ptr [rdi + 5], 0x89        // present, 64-bit TSS (available)
    mov byte ptr [rdi + 6], 0
    mov [rdi + 7], ah                   // base 31:24
    shr rax, 16
    mov [rdi + 8], eax                  // base 63:32
    mov dword ptr [rdi + 12], 0

    lgdt [rip + BOOT_GDT_PTR]
    // Reload CS with a far return, then the data segments.
    push 0x10
    lea rax, [rip + 3f]
    push rax
    retfq
3:
    mov eax, 0x18
    mov ds, eax
    mov es, eax
    mov ss, eax
    xor eax, eax
    mov fs, eax
    mov gs, eax
    mov eax, 0x30
    ltr ax
    lidt [rip + BOOT_IDT_PTR]

    // LAPIC globally enabled (IA32_APIC_BASE bit 11); legacy PICs masked.
    mov ecx, 0x1b
    rdmsr
    or eax, 0x800
    wrmsr
    mov al, 0xff
    out 0x21, al
    out 0xa1, al


    // Drop to ring 3: kernel_main(boot_params) on the user stack, IOPL 3,
    // interrupts still disabled. RSP is 8 mod 16, as after a call.
    mov rdi, r12
    mov rsi, r13
    lea rax, [rip + USER_STACK_TOP]
    sub rax, 8
    push 0x23                           // SS: user data | RPL 3
    push rax                            // RSP
    push 0x0002                         // RFLAGS: IF 0
    push 0x2b                           // CS: user code | RPL 3
    lea rax, [rip + {main}]
    push rax
    iretq

    // PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info.
    // No stack is needed: nothing here pushes.
    .code32
    .globl _start_pvh
    .type _start_pvh, @function
_start_pvh:
    cli
    cld
    mov edi, ebx
    mov eax, offset PVH_PML4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x620                       // PAE | OSFXSR | OSXMMEXCPT
    mov cr4, eax
    mov ecx, 0xc0000080                 // EFER.LME
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb                 // EM off (the compiler emits SSE)
    or eax, 0x80000023                  // PG | NE | MP | PE
    mov cr0, eax
    lgdt [BOOT_GDT_PTR]                 // a 32-bit LGDT reads limit and base 31:0
    // ljmp 0x10:.Lpvh64 (into the 64-bit kernel code segment)
    .byte 0xea
    .long .Lpvh64
    .short 0x10
    .code64
.Lpvh64:
    mov r12d, edi                       // hvm_start_info (zero-extended)
    mov r13d, 1                         // protocol: PVH
    jmp .Lcommon

    // The note QEMU's loader looks for; the entry as a quad, as Linux does
    // (loaders read 4 or 8 bytes of it).
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                             // namesz
    .long 8                             // descsz
    .long 18                            // XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad _start_pvh
    .balign 4

    // The PVH entry's page tables: the low 4 GiB identity-mapped with 2 MiB
    // pages, supervisor only. Static (loaded with the image), used until
    // `_start`'s path loads BOOT_PML4.
    .section .data.pvh, "aw"
    .balign 4096
PVH_PML4:
    .quad PVH_PDPT + 3
    .skip 4096 - 8
PVH_PDPT:
    .quad PVH_PD + 3
    .quad PVH_PD + 0x1003
    .quad PVH_PD + 0x2003
    .quad PVH_PD + 0x3003
    .skip 4096 - 32
PVH_PD:
    .set pvh_page, 0
    .rept 2048
    .quad (pvh_page << 21) | 0x83       // PS | RW | P
    .set pvh_page, pvh_page + 1
    .endr

    // GDT: null, (unused), kernel code 0x10, kernel data 0x18,
    // user data 0x20 (selector 0x23), user code 0x28 (selector 0x2b), the
    // TSS at 0x30 (filled above), then the APs' TSSs (filled by `smp.rs`).
    .section .data.boot, "aw"
    .align 16
    .globl BOOT_GDT
BOOT_GDT:
    .quad 0
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad 0, 0
    .skip {gdt_size} - 0x40
BOOT_GDT_END:
    .align 16
BOOT_GDT_PTR:
    .short BOOT_GDT_END - BOOT_GDT - 1
    .quad BOOT_GDT
    .align 16
    .globl BOOT_IDT_PTR
BOOT_IDT_PTR:
    .short 4095
    .quad BOOT_IDT

    .section .bss.boot, "aw", @nobits
    .align 4096
    .globl BOOT_PML4
BOOT_PML4:
    .skip 4096
BOOT_PDPT:
    .skip 4096
BOOT_PD:
    .skip 4 * 4096
    .globl BOOT_IDT
BOOT_IDT:
    .skip 4096
    .align 16
BOOT_TSS:
    .skip 104 + 8192 + 1

    // Stacks are not cleared at boot (nobody relies on their contents).
    .section .noinit, "aw", @nobits
    .align 16
    .skip {kstack}
KERNEL_STACK_TOP:
    .skip {ustack}
    .globl USER_STACK_TOP
USER_STACK_TOP:
    .skip {rstack}
    .globl REPORT_STACK_TOP
REPORT_STACK_TOP:
"#,
    main = sym crate::kernel_main,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    rstack = const REPORT_STACK_SIZE,
    gdt_size = const GDT_SIZE,
);
