/// `IA32_SYSENTER_CS`, `_ESP`, `_EIP`.
const SYSENTER: [u32; 3] = [0x174, 0x175, 0x176];
/// `STAR`, `LSTAR`, `CSTAR`, `SYSCALL_MASK`, `KERNEL_GS_BASE`.
const SYSCALL: [u32; 5] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102];
const IA32_TSC: u32 = 0x10;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it every access is uncached.
const MTRR_ENABLED_WRITE_BACK: u64 = (1 << 11) | 6;

/// `IA32_PERF_CAPABILITIES`: says which PMU MSRs and values the vCPU accepts.
const IA32_PERF_CAPABILITIES: u32 = 0x345;
/// KVM's async page fault interrupt vector; must be set before async page faults are enabled
/// with delivery as an interrupt (`MSR_KVM_ASYNC_PF_EN`, 0x4b56_4d02).
const KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// MSRs other MSRs' values depend on, in the order they must be written first: the TSC (the
/// TSC deadline and KVM's clock pages are read against it), the PMU capabilities (which decide
/// what the counters accept) and the async page fault vector (enabling delivery needs it).
const WRITE_FIRST: [u32; 3] = [IA32_TSC, IA32_PERF_CAPABILITIES, KVM_ASYNC_PF_INT];

/// Orders MSR indices for writing them back: those others depend on first, the rest in the
/// order given.
pub fn restore_order(indices: &mut [u32]) {
    indices.sort_by_key(|index| WRITE_FIRST.iter().position(|first| first == index).unwrap_or(WRITE_FIRST.len()));
}

/// The MSR values a vCPU starts Linux with.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    SYSENTER
        .iter()
        .chain(SYSCALL.iter())
        .map(|&index| (index, 0))
        .chain([(IA32_TSC, 0), (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING), (MTRR_DEF_TYPE, MTRR_ENABLED_WRITE_BACK)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_write_back_and_syscall_state_clear() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&(0x2ff, 0x806)));
        assert!(msrs.contains(&(0xc000_0082, 0)));
        assert_eq!(msrs.len(), 11);
    }

    #[test]
    fn msrs_others_depend_on_are_written_first() {
        let mut indices = [0x174, 0x6e0, 0x4b56_4d02, 0x10, 0x4b56_4d06, 0x175, 0x345];
        restore_order(&mut indices);
        assert_eq!(indices, [0x10, 0x345, 0x4b56_4d06, 0x174, 0x6e0, 0x4b56_4d02, 0x175]);
    }
}
