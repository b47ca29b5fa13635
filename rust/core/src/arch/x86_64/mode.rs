use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;

use super::gdt::{self, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR};
use super::paging;

const CR0_PE: u64 = 1;
/// Monitor coprocessor: with TS, `wait` traps too; set for SSE.
const CR0_MP: u64 = 1 << 1;
/// Emulation: x87 and SSE instructions raise #NM/#UD; cleared for compiled code.
const CR0_EM: u64 = 1 << 2;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// The OS saves SSE state with FXSAVE: SSE instructions no longer raise #UD.
const CR4_OSFXSR: u64 = 1 << 9;
/// The OS handles SIMD floating-point exceptions (#XM) rather than getting #UD.
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and reads as one.
const RFLAGS_RESERVED: u64 = 0x2;
/// Real mode reaches 1 MiB with a 64 KiB offset from the segment base.
const REAL_MODE_LIMIT: u64 = 1 << 20;

/// The CPU modes a vCPU can be started in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode.
    Real,
    /// 32-bit protected mode with flat segments and paging off.
    Protected,
    /// 64-bit long mode with an identity-mapped low 4 GiB.
    Long,
}

/// A mode name or entry point that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModeError {
    /// The name is none of `real`, `protected`, `long`.
    #[error("unknown CPU mode {0:?} (expected \"real\", \"protected\" or \"long\")")]
    UnknownMode(String),
    /// Real mode cannot reach the entry point.
    #[error("entry point {0:#x} is beyond real mode's first MiB")]
    EntryOutOfReach(u64),
}

impl FromStr for CpuMode {
    type Err = ModeError;

    fn from_str(name: &str) -> Result<Self, ModeError> {
        match name {
            "real" => Ok(Self::Real),
            "protected" => Ok(Self::Protected),
            "long" => Ok(Self::Long),
            _ => Err(ModeError::UnknownMode(name.to_owned())),
        }
    }
}

impl fmt::Display for CpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Real => "real",
            Self::Protected => "protected",
            Self::Long => "long",
        })
    }
}

impl CpuMode {
    /// Guest memory the mode needs: `(address, bytes)` for the GDT and, in long mode, the page
    /// tables. Real mode needs none.
    pub fn tables(self) -> Vec<(u64, Vec<u8>)> {
        let mut tables = Vec::new();
        if self != Self::Real {
            tables.push((GDT_ADDR, gdt::boot_gdt_bytes()));
        }
        if self == Self::Long {
            tables.extend(paging::identity_map());
        }
        tables
    }

    /// Rewrites `sregs` and `regs` so the vCPU starts at `entry` in this mode. Registers the
    /// mode does not concern (general registers other than RIP, RSP and RFLAGS, CR2, APIC base)
    /// keep their values.
    pub fn enter(
        self,
        entry: u64,
        stack: Option<u64>,
        sregs: &mut kvm_sregs,
        regs: &mut kvm_regs,
    ) -> Result<(), ModeError> {
        match self {
            Self::Real => enter_real(entry, sregs, regs)?,
            Self::Protected | Self::Long => {
                let code = if self == Self::Long { CODE64_SELECTOR } else { CODE32_SELECTOR };
                set_flat_segments(sregs, gdt::boot_segment(code), gdt::boot_segment(DATA_SELECTOR));
                sregs.tr = gdt::boot_segment(TSS_SELECTOR);
                sregs.gdt.base = GDT_ADDR;
                sregs.gdt.limit = (gdt::BOOT_GDT.len() * 8 - 1) as u16;
                sregs.idt.base = IDT_ADDR;
                sregs.idt.limit = 0;
                regs.rip = entry;
                // What compiled code expects: x87 and SSE usable (XSAVE and AVX need CPUID, and
                // are turned on by the machine).
                sregs.cr0 = (sregs.cr0 | CR0_MP) & !CR0_EM;
                sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
                if self == Self::Long {
                    sregs.cr3 = PML4_ADDR;
                    sregs.cr4 |= CR4_PAE;
                    sregs.cr0 |= CR0_PE | CR0_PG;
                    sregs.efer |= EFER_LME | EFER_LMA;
                } else {
                    sregs.cr0 = (sregs.cr0 | CR0_PE) & !CR0_PG;
                    sregs.cr4 &= !CR4_PAE;
                    sregs.efer &= !(EFER_LME | EFER_LMA);
                }
            }
        }
        regs.rflags = RFLAGS_RESERVED;
        if let Some(stack) = stack {
            regs.rsp = stack;
        }
        Ok(())
    }
}

fn enter_real(entry: u64, sregs: &mut kvm_sregs, regs: &mut kvm_regs) -> Result<(), ModeError> {
    if entry >= REAL_MODE_LIMIT {
        return Err(ModeError::EntryOutOfReach(entry));
    }
    // The code segment starts at the 64 KiB boundary below the entry point; data segments at 0,
    // so a small guest addresses its first 64 KiB directly.
    let code_selector = ((entry >> 4) & 0xf000) as u16;
    let real_segment = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    set_flat_segments(sregs, real_segment(code_selector, 0xb), real_segment(0, 0x3));
    sregs.cr0 &= !(CR0_PE | CR0_PG);
    sregs.efer &= !(EFER_LME | EFER_LMA);
    regs.rip = entry - (u64::from(code_selector) << 4);
    Ok(())
}

fn set_flat_segments(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    for segment in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *segment = data;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entered(mode: CpuMode, entry: u64) -> (kvm_sregs, kvm_regs) {
        let (mut sregs, mut regs) = (kvm_sregs::default(), kvm_regs { rax: 7, rsp: 9, ..Default::default() });
        mode.enter(entry, None, &mut sregs, &mut regs).unwrap();
        (sregs, regs)
    }

    #[test]
    fn parses_mode_names() {
        assert_eq!("long".parse(), Ok(CpuMode::Long));
        assert_eq!(CpuMode::Protected.to_string().parse(), Ok(CpuMode::Protected));
        assert_eq!("64bit".parse::<CpuMode>(), Err(ModeError::UnknownMode("64bit".into())));
    }

    #[test]
    fn real_mode_reaches_entry_through_cs() {
        let (sregs, regs) = entered(CpuMode::Real, 0x1_2345);
        assert_eq!(sregs.cs.base + regs.rip, 0x1_2345);
        assert_eq!((sregs.cs.selector, sregs.cs.base), (0x1000, 0x1_0000));
        assert_eq!((sregs.ds.base, sregs.ss.limit, sregs.cr0 & CR0_PE), (0, 0xffff, 0));
        assert_eq!((regs.rax, regs.rsp, regs.rflags), (7, 9, 2));
        let mut sregs = kvm_sregs::default();
        assert_eq!(
            CpuMode::Real.enter(1 << 20, None, &mut sregs, &mut kvm_regs::default()),
            Err(ModeError::EntryOutOfReach(1 << 20))
        );
    }

    #[test]
    fn protected_mode_is_flat_32_bit_without_paging() {
        let (sregs, regs) = entered(CpuMode::Protected, 0x1000);
        assert_eq!((sregs.cr0 & (CR0_PE | CR0_PG), sregs.efer & EFER_LMA), (CR0_PE, 0));
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l, sregs.cs.limit), (CODE32_SELECTOR, 1, 0, 0xffff_ffff));
        assert_eq!((sregs.ss.selector, sregs.gdt.base, sregs.gdt.limit), (DATA_SELECTOR, GDT_ADDR, 39));
        assert_eq!(regs.rip, 0x1000);
    }

    #[test]
    fn long_mode_enables_paging_through_the_identity_map() {
        let (sregs, regs) = entered(CpuMode::Long, 0x40_0000);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!((sregs.cr3, sregs.cr4 & CR4_PAE), (PML4_ADDR, CR4_PAE));
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.tr.type_), (1, 0, 0xb));
        assert_eq!(regs.rip, 0x40_0000);
        let tables = CpuMode::Long.tables();
        assert!(tables.iter().any(|(addr, _)| *addr == PML4_ADDR));
        assert!(tables.iter().any(|(addr, bytes)| *addr == GDT_ADDR && bytes.len() == 40));
        assert!(CpuMode::Real.tables().is_empty());
    }

    #[test]
    fn protected_and_long_mode_turn_on_sse() {
        for mode in [CpuMode::Protected, CpuMode::Long] {
            let mut sregs = kvm_sregs { cr0: CR0_EM, ..Default::default() };
            mode.enter(0x1000, None, &mut sregs, &mut kvm_regs::default()).unwrap();
            assert_eq!(sregs.cr0 & (CR0_MP | CR0_EM), CR0_MP, "{mode}");
            assert_eq!(sregs.cr4 & (CR4_OSFXSR | CR4_OSXMMEXCPT), CR4_OSFXSR | CR4_OSXMMEXCPT, "{mode}");
        }
    }

    #[test]
    fn stack_is_set_only_when_given() {
        let (mut sregs, mut regs) = (kvm_sregs::default(), kvm_regs::default());
        CpuMode::Long.enter(0x1000, Some(0x8000), &mut sregs, &mut regs).unwrap();
        assert_eq!(regs.rsp, 0x8000);
    }
}
