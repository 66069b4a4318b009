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
    let amd = vendor(cpuid.as_slice()).is_some_and(|v| v == "AuthenticAMD");
    set_topology(cpuid.as_mut_slice(), id, count, amd);
    Ok(cpuid)
}

/// Bits needed to number `count` APIC IDs.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// The topology leaves of vCPU `id` of `count`, all in one package: one thread per core and one
/// core per vCPU, APIC ID = x2APIC ID = `id` (KVM's default LAPIC ID is the vCPU index), so a
/// guest counting processors from CPUID agrees with the MP table. Also sets the hypervisor bit.
pub fn set_topology(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8, amd: bool) {
    let (id32, n) = (u32::from(id), u32::from(count.max(1)));
    for entry in entries {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id32 << 24) | ((1 << id_bits(count)) << 16);
                // EDX[28] HTT: EBX[23:16] is valid (more than one logical processor).
                if n > 1 {
                    entry.edx |= 1 << 28;
                } else {
                    entry.edx &= !(1 << 28);
                }
                // ECX[31]: running on a hypervisor.
                entry.ecx |= 1 << 31;
            }
            4 if !amd => {
                // EAX[31:26] cores per package - 1; EAX[25:14] logical processors sharing the
                // cache - 1: the core's own caches, and an L3 shared by the package.
                let level = (entry.eax >> 5) & 7;
                let sharing = if level >= 3 { (1 << id_bits(count)) - 1 } else { 0 };
                if entry.eax & 0x1f != 0 {
                    entry.eax = (entry.eax & 0x3fff) | (((1 << id_bits(count)) - 1) << 26) | (sharing << 14);
                }
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: core (the package's vCPUs).
                let (shift, logical, kind) = match entry.index {
                    0 => (0, 1, 1),
                    1 => (id_bits(count), n, 2),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = logical;
                entry.ecx = (kind << 8) | entry.index;
                entry.edx = id32;
            }
            0x8000_0001 if amd => {
                // ECX[1] CmpLegacy: the cores of leaf 0x80000008 are real cores.
                if n > 1 {
                    entry.ecx |= 1 << 1;
                } else {
                    entry.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 if amd => {
                // ECX[7:0] cores - 1, ECX[15:12] APIC ID bits for the core.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (n - 1);
            }
            0x8000_001e if amd => {
                // Extended APIC ID, compute unit (core) ID with one thread each, node 0.
                entry.eax = id32;
                entry.ebx = id32;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
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

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    fn get(e: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == function && x.index == index).unwrap()
    }

    #[test]
    fn every_topology_leaf_names_the_vcpu_and_the_count() {
        let base = || {
            let mut l4 = leaf(4, 3);
            l4.eax = (3 << 5) | 3; // an L3 unified cache
            vec![leaf(1, 0), l4, leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2), leaf(0x8000_0008, 0), leaf(0x8000_001e, 0)]
        };
        let mut e = base();
        set_topology(&mut e, 2, 4, false);
        let l1 = get(&e, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (2, 4));
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_eq!(get(&e, 4, 3).eax >> 26, 3, "cores per package - 1");
        assert_eq!((get(&e, 4, 3).eax >> 14) & 0xfff, 3, "the L3 is shared by the package");
        let (smt, core, end) = (get(&e, 0xb, 0), get(&e, 0xb, 1), get(&e, 0xb, 2));
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0), "no level past the core");
        assert_eq!(get(&e, 0x8000_0008, 0).ecx, 0, "AMD leaves untouched on Intel");

        let mut e = base();
        set_topology(&mut e, 5, 6, true);
        assert_eq!(get(&e, 0x8000_0008, 0).ecx, (3 << 12) | 5);
        assert_eq!(get(&e, 0x8000_001e, 0).eax, 5);
        assert_eq!((get(&e, 1, 0).ebx >> 16) & 0xff, 8, "addressable IDs: a power of two");

        let mut e = base();
        set_topology(&mut e, 0, 1, false);
        assert_eq!(get(&e, 1, 0).edx & (1 << 28), 0, "no HTT with one vCPU");
        assert_eq!(get(&e, 0xb, 1).ebx, 1);
    }

    #[test]
    fn the_vendor_is_read_from_leaf_0_in_ebx_edx_ecx_order() {
        assert_eq!(vendor(&[leaf0(b"Genu", b"ineI", b"ntel")]).as_deref(), Some("GenuineIntel"));
        assert_eq!(vendor(&[leaf0(b"Auth", b"enti", b"cAMD")]).as_deref(), Some("AuthenticAMD"));
        assert_eq!(vendor(&[kvm_cpuid_entry2 { function: 1, ..Default::default() }]), None);
    }
}
