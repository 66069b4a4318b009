//! x86-64 architecture support: the guest physical memory layout, the long-mode entry state
//! (GDT, identity page tables, control registers), CPUID and its topology, boot MSRs, and the
//! MP table and ACPI MADT that list the vCPUs.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
