//! x86-64 architecture support: the guest physical memory layout, the long-mode entry state
//! (GDT, identity page tables, control registers), CPUID and its topology, boot MSRs, and the
//! MP table that lists the vCPUs.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
