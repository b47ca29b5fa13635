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
}
