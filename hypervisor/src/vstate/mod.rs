//! KVM state: guest memory, the VM (irqchip, PIT, clock, dirty logging) and vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
