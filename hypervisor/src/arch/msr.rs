//! Model-specific registers: the boot values, and the list saved in snapshots.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::Kvm;

/// Errors around MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    IndexList(kvm_ioctls::Error),
    /// The MSR list did not fit the KVM wrapper.
    #[error("cannot build the MSR list: {0}")]
    Fam(vmm_sys_util::fam::Error),
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry { index, data, ..Default::default() }
}

/// The MSRs set on the boot vCPU before it first runs.
pub fn boot_msrs() -> Result<Msrs, MsrError> {
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
    .map_err(MsrError::Fam)
}

/// Every MSR KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`), kvmclock's included.
pub fn saved_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, MsrError> {
    Ok(kvm.get_msr_index_list().map_err(MsrError::IndexList)?.as_slice().to_vec())
}

/// Splits `indices` into the MSRs `op` accepts and those it refuses. `op` is given a list and
/// returns how many of it, from the start, it did (as `KVM_GET_MSRS` and `KVM_SET_MSRS` do:
/// they stop at the first MSR refused); the refused MSR is set aside and the rest is tried again.
pub fn probe<E>(indices: &[u32], mut op: impl FnMut(&[u32]) -> Result<usize, E>) -> Result<(Vec<u32>, Vec<u32>), E> {
    let (mut kept, mut refused) = (Vec::with_capacity(indices.len()), Vec::new());
    let mut rest = indices;
    while !rest.is_empty() {
        let n = op(rest)?.min(rest.len());
        kept.extend_from_slice(&rest[..n]);
        if n < rest.len() {
            refused.push(rest[n]);
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok((kept, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU that refuses some MSRs, reading as KVM_GET_MSRS does.
    fn reader(refuse: &[u32]) -> impl FnMut(&[u32]) -> Result<usize, ()> + '_ {
        move |l: &[u32]| Ok(l.iter().position(|i| refuse.contains(i)).unwrap_or(l.len()))
    }

    #[test]
    fn probe_keeps_every_msr_a_vcpu_reads_and_sets_aside_the_refused() {
        let all = [0x10, 0x10a, 0x174, 0x175, 0xc000_0080, 0x48, 0x49];
        assert_eq!(probe(&all, reader(&[])), Ok((all.to_vec(), vec![])));
        let (kept, refused) = probe(&all, reader(&[0x10a, 0x49])).unwrap();
        assert_eq!(kept, [0x10, 0x174, 0x175, 0xc000_0080, 0x48]);
        assert_eq!(refused, [0x10a, 0x49]);
        assert_eq!(probe(&[0x10a, 0x48], reader(&[0x10a, 0x48])), Ok((vec![], vec![0x10a, 0x48])));
        assert_eq!(probe(&[], reader(&[1])), Ok((vec![], vec![])));
    }

    #[test]
    fn probe_passes_errors_on() {
        assert_eq!(probe(&[1, 2], |_| Err::<usize, _>("ioctl failed")), Err("ioctl failed"));
    }
}
