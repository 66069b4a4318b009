//! x86-64 architecture support: the guest physical memory layout, the long-mode entry state
//! (GDT, identity page tables, control registers), CPUID and boot MSRs.

pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod regs;
