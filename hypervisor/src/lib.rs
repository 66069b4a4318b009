//! `shrink-vmm`: a KVM virtual machine monitor built on the rust-vmm crates.
//!
//! It boots the project's `no_std` guest or a Linux kernel directly in long mode, with a
//! serial console, a control API, snapshot/restore and the dirty-page tracking that live
//! migration builds on.
//!
//! - [`arch`]: memory layout, long-mode entry, CPUID, MSRs.
//! - [`vstate`]: KVM VM, vCPUs, guest memory and dirty logs.
//! - [`devices`]: the I/O bus and the serial port.
//! - [`loader`]: ELF and bzImage kernels with the Linux 64-bit boot protocol.
//! - [`vmm`]: building and controlling a VM; [`snapshot`]: its on-disk form.
//! - [`api`] and [`control`]: the JSON control socket and the loop that serves it.
//! - [`migration`]: the two ends of a live migration (Shrinker's deduplication, both halves,
//!   is in `migrate::shrinker`; the VMM gives it guest memory to read).
//! - [`repository`]: the site's image repository as a host sees it (base image digests,
//!   content indexes, reads by offset).
//! - [`test_hooks`]: fault injection for the integration tests (the `test-hooks` feature).
#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
pub mod loader;
pub mod migration;
pub mod repository;
pub mod snapshot;
pub mod test_hooks;
pub mod vmm;
pub mod vstate;
