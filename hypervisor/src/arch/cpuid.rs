//! CPUID for a vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), with the vCPU's APIC ID and
//! the hypervisor bit filled in.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors while building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM refused `KVM_GET_SUPPORTED_CPUID`.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
}

/// The CPU vendor string of CPUID leaf 0 (`GenuineIntel`, `AuthenticAMD`, ...), if present.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let e = entries.iter().find(|e| e.function == 0)?;
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    Some(String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_owned())
}

/// The vendor of this host's CPU, as KVM reports it.
pub fn host_vendor(kvm: &Kvm) -> Result<Option<String>, CpuidError> {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuidError::Supported)?;
    Ok(vendor(cpuid.as_slice()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf0(ebx: &[u8; 4], edx: &[u8; 4], ecx: &[u8; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*ebx),
            edx: u32::from_le_bytes(*edx),
            ecx: u32::from_le_bytes(*ecx),
            ..Default::default()
        }
    }

    #[test]
    fn the_vendor_is_read_from_leaf_0_in_ebx_edx_ecx_order() {
        assert_eq!(vendor(&[leaf0(b"Genu", b"ineI", b"ntel")]).as_deref(), Some("GenuineIntel"));
        assert_eq!(vendor(&[leaf0(b"Auth", b"enti", b"cAMD")]).as_deref(), Some("AuthenticAMD"));
        assert_eq!(vendor(&[kvm_cpuid_entry2 { function: 1, ..Default::default() }]), None);
    }
}
