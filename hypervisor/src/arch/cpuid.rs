//! CPUID for a vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), with the vCPU's APIC ID and
//! the hypervisor bit filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors while building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM refused `KVM_GET_SUPPORTED_CPUID`.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
}

/// CPUID entries for vCPU `id` of `count`.
pub fn vcpu_cpuid(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuidError::Supported)?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                // ECX[31]: running on a hypervisor.
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = id as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}
