//! Emulated devices and the port-I/O / MMIO bus that dispatches vCPU exits to them.

pub mod bus;
pub mod serial;
pub mod virtio;
