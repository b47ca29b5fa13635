//! Setting a vCPU up for raw code: a CPU mode, the extensions compiled code uses, a default stack,
//! and the exception table that turns guest exceptions into exits.

use kvm_bindings::{kvm_cpuid_entry2, kvm_xcrs};

use super::Machine;
use crate::arch::x86_64::exceptions::{self, HALT_ADDR, STUBS_ADDR};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::mode::CpuMode;
use crate::error::{Error, Result};
use crate::vstate::memory;

/// CR4.OSXSAVE: XSAVE, XGETBV and the XCR0-enabled state (AVX) are usable.
const CR4_OSXSAVE: u64 = 1 << 18;
/// CPUID.1:ECX bits for XSAVE and AVX.
const CPUID1_ECX_XSAVE: u32 = 1 << 26;
const CPUID1_ECX_AVX: u32 = 1 << 28;
/// XCR0 bits: x87, SSE and AVX state.
const XCR0_X87: u64 = 1;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;

/// How to set a vCPU up for raw code (see [`Machine::setup_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSetup {
    /// The CPU mode.
    pub mode: CpuMode,
    /// Where the vCPU starts.
    pub entry: u64,
    /// The stack pointer; None gives the vCPU its default stack.
    pub stack: Option<u64>,
    /// Whether exceptions go to kvmkit's exception table (protected and long mode).
    pub exceptions: bool,
}

/// XCR0 for a vCPU whose CPUID is `cpuid`: x87 and SSE, and AVX when the vCPU has it; None
/// without XSAVE.
pub fn xcr0_for(cpuid: &[kvm_cpuid_entry2]) -> Option<u64> {
    let leaf1 = cpuid.iter().find(|e| e.function == 1)?;
    if leaf1.ecx & CPUID1_ECX_XSAVE == 0 {
        return None;
    }
    // Leaf 0xD, subleaf 0: the XCR0 bits the CPU supports.
    let supported = cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(XCR0_X87 | XCR0_SSE, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
    let avx = if leaf1.ecx & CPUID1_ECX_AVX != 0 { XCR0_AVX } else { 0 };
    Some((XCR0_X87 | XCR0_SSE | avx) & (supported | XCR0_X87))
}

impl Machine {
    /// Puts vCPU `index` in a mode for raw code, as [`enter_mode`](Self::enter_mode) does, and in
    /// protected and long mode also makes it ready for compiled code: SSE on (CR0.MP set, CR0.EM
    /// clear, CR4.OSFXSR and OSXMMEXCPT), and where its CPUID has XSAVE, CR4.OSXSAVE with XCR0
    /// holding x87, SSE and (where CPUID has it) AVX.
    ///
    /// Without a stack, a vCPU in protected or long mode gets its default one
    /// ([`layout::default_stack`]) when it has one and guest RAM holds it. It starts as if called
    /// there: the stack pointer is one return address below the 16-byte aligned top (as the SysV
    /// ABI has it at function entry), and that return address is a `hlt`, so an entry function that
    /// returns halts the vCPU. Otherwise (and in real mode) the stack pointer is left as it is.
    ///
    /// With `exceptions`, the IDT leads the 32 exception vectors to kvmkit's stubs (see
    /// [`exceptions`]), whose report ends the run with [`GuestFault`](crate::ExitReason::GuestFault);
    /// without, the IDT is empty and an exception shuts the vCPU down (a triple fault). In long
    /// mode the first [`IST_VCPUS`](exceptions::IST_VCPUS) vCPUs take exceptions on a stack of
    /// their own (through a TSS of their own), so that a broken stack is reported too and the
    /// red zone below the stack pointer is left alone; the others, and protected mode, take them
    /// on the current stack. Real mode keeps the interrupt vector table as it is.
    pub fn setup_raw(&self, index: usize, setup: &RawSetup) -> Result<()> {
        let RawSetup { mode, entry, stack, exceptions } = *setup;
        let word = match mode {
            CpuMode::Long => 8,
            _ => 4,
        };
        let in_ram = |addr: u64, len: usize| memory::check_range(self.memory(), addr, len).is_ok();
        let default_stack = match (stack, mode) {
            (Some(_), _) | (None, CpuMode::Real) => None,
            (None, _) => layout::default_stack(index)
                .filter(|top| in_ram(top - layout::DEFAULT_STACK_SIZE, layout::DEFAULT_STACK_SIZE as usize)),
        };
        let rsp = stack.or(default_stack.map(|top| top - word));
        self.enter_mode(index, mode, entry, rsp)?;
        if mode == CpuMode::Real {
            return Ok(());
        }
        let write = |addr: u64, bytes: &[u8]| {
            memory::write(self.memory(), addr, bytes).map_err(|_| {
                Error::InvalidConfig(format!(
                    "kvmkit's exception table needs guest memory at {addr:#x}..{:#x}",
                    addr + bytes.len() as u64
                ))
            })
        };
        write(STUBS_ADDR, &exceptions::code())?;
        if let (Some(rsp), None) = (rsp, stack) {
            write(rsp, &HALT_ADDR.to_le_bytes()[..word as usize])?;
        }
        // In long mode each of the first vCPUs takes exceptions on a stack of its own, when RAM
        // holds it.
        let tss = exceptions::tss(index)
            .filter(|(addr, bytes)| mode == CpuMode::Long && exceptions && in_ram(*addr, bytes.len()));
        if let Some((addr, bytes)) = &tss {
            write(*addr, bytes)?;
        }
        let idt = if exceptions {
            let (addr, bytes, limit) = exceptions::idt(mode == CpuMode::Long, tss.is_some());
            write(addr, &bytes)?;
            Some((addr, limit))
        } else {
            None
        };
        self.with_vcpu(index, |vcpu| {
            let mut sregs = vcpu.sregs()?;
            if let Some((base, limit)) = idt {
                sregs.idt.base = base;
                sregs.idt.limit = limit;
            }
            if let Some((base, _)) = tss {
                sregs.tr.base = base;
                sregs.tr.limit = exceptions::TSS_LIMIT;
            }
            let xcr0 = xcr0_for(&vcpu.cpuid()?);
            if xcr0.is_some() {
                sregs.cr4 |= CR4_OSXSAVE;
            }
            vcpu.set_sregs(&sregs)?;
            if let Some(xcr0) = xcr0 {
                let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
                xcrs.xcrs[0].xcr = 0;
                xcrs.xcrs[0].value = xcr0;
                vcpu.set_xcrs(&xcrs)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ecx, ..Default::default() }
    }

    #[test]
    fn xcr0_follows_cpuid() {
        assert_eq!(xcr0_for(&[]), None);
        assert_eq!(xcr0_for(&[leaf(1, 0, 0, 0)]), None);
        let xsave = leaf(1, 0, 0, CPUID1_ECX_XSAVE);
        assert_eq!(xcr0_for(&[xsave, leaf(0xd, 0, 0x7, 0)]), Some(0x3));
        let avx = leaf(1, 0, 0, CPUID1_ECX_XSAVE | CPUID1_ECX_AVX);
        assert_eq!(xcr0_for(&[avx, leaf(0xd, 0, 0xe7, 0)]), Some(0x7));
        // AVX in leaf 1 but not among the XCR0 bits leaf 0xD allows: left out.
        assert_eq!(xcr0_for(&[avx, leaf(0xd, 0, 0x3, 0)]), Some(0x3));
    }
}
