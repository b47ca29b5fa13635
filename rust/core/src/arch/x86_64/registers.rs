//! x86 registers by name, as debuggers and emulators spell them: the 64-bit registers and their
//! 32-, 16- and 8-bit parts, RIP and RFLAGS, control registers, EFER, segment selectors and the
//! FS and GS bases.

use std::str::FromStr;

use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;

/// The general registers in `kvm_regs` order, which is also the order of the names below.
const GENERAL: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
];
/// 32-bit names of the general registers, by the same index.
const GENERAL32: [&str; 18] = [
    "eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", "r8d", "r9d", "r10d", "r11d", "r12d", "r13d", "r14d",
    "r15d", "eip", "eflags",
];
/// 16-bit names, by the same index.
const GENERAL16: [&str; 18] = [
    "ax", "bx", "cx", "dx", "si", "di", "sp", "bp", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w", "r14w", "r15w", "ip",
    "flags",
];
/// Low-byte names, by the same index (RIP and RFLAGS have none).
const GENERAL8: [&str; 16] =
    ["al", "bl", "cl", "dl", "sil", "dil", "spl", "bpl", "r8b", "r9b", "r10b", "r11b", "r12b", "r13b", "r14b", "r15b"];
/// The legacy high bytes: AH, BH, CH, DH.
const GENERAL8_HIGH: [&str; 4] = ["ah", "bh", "ch", "dh"];

/// A special register that has a name of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    Cr0,
    Cr2,
    Cr3,
    Cr4,
    Cr8,
    Efer,
    ApicBase,
    FsBase,
    GsBase,
    Selector(usize),
}

const SPECIAL: [(&str, Special); 9] = [
    ("cr0", Special::Cr0),
    ("cr2", Special::Cr2),
    ("cr3", Special::Cr3),
    ("cr4", Special::Cr4),
    ("cr8", Special::Cr8),
    ("efer", Special::Efer),
    ("apic_base", Special::ApicBase),
    ("fs_base", Special::FsBase),
    ("gs_base", Special::GsBase),
];
/// Segment selectors, in the order of [`segment`].
const SELECTORS: [&str; 6] = ["cs", "ds", "es", "fs", "gs", "ss"];

/// Where a named register's bits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Bits `shift..shift + bits` of a general register (by `kvm_regs` index).
    General {
        index: usize,
        shift: u32,
    },
    Special(Special),
}

/// A register name, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Register {
    place: Place,
    bits: u32,
}

/// A name that is no register kvmkit knows.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown register {0:?} (known: the 64-, 32-, 16- and 8-bit general registers such as rax, eax, ax, al, ah, r8d; rip, eip, rflags, eflags; cr0, cr2, cr3, cr4, cr8, efer, apic_base, fs_base, gs_base; cs, ds, es, fs, gs, ss)")]
pub struct UnknownRegister(pub String);

impl FromStr for Register {
    type Err = UnknownRegister;

    /// Resolves a name, in any case.
    fn from_str(name: &str) -> Result<Self, UnknownRegister> {
        let lower = name.to_ascii_lowercase();
        let find = |names: &[&str]| names.iter().position(|n| *n == lower);
        let general = |index, shift, bits| Some(Self { place: Place::General { index, shift }, bits });
        let found = if let Some(index) = find(&GENERAL) {
            general(index, 0, 64)
        } else if let Some(index) = find(&GENERAL32) {
            general(index, 0, 32)
        } else if let Some(index) = find(&GENERAL16) {
            general(index, 0, 16)
        } else if let Some(index) = find(&GENERAL8) {
            general(index, 0, 8)
        } else if let Some(index) = find(&GENERAL8_HIGH) {
            general(index, 8, 8)
        } else if let Some(index) = find(&SELECTORS) {
            Some(Self { place: Place::Special(Special::Selector(index)), bits: 16 })
        } else {
            SPECIAL
                .iter()
                .find(|(n, _)| *n == lower)
                .map(|(_, special)| Self { place: Place::Special(*special), bits: 64 })
        };
        found.ok_or(UnknownRegister(name.to_owned()))
    }
}

impl Register {
    /// Whether the register is in `kvm_sregs` rather than `kvm_regs`.
    pub fn is_special(self) -> bool {
        matches!(self.place, Place::Special(_))
    }

    /// Its width in bits.
    pub fn bits(self) -> u32 {
        self.bits
    }

    fn mask(self) -> u64 {
        u64::MAX >> (64 - self.bits)
    }

    /// Its value in `regs` or `sregs` (whichever [`is_special`](Self::is_special) names).
    pub fn read(self, regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
        let shift = match self.place {
            Place::General { shift, .. } => shift,
            Place::Special(_) => 0,
        };
        (self.storage(regs, sregs) >> shift) & self.mask()
    }

    /// Writes `value`, cut to the register's width, leaving the other bits of a wider register
    /// as they were.
    pub fn write(self, regs: &mut kvm_regs, sregs: &mut kvm_sregs, value: u64) {
        let shift = match self.place {
            Place::General { shift, .. } => shift,
            Place::Special(_) => 0,
        };
        let mask = self.mask() << shift;
        let merged = (self.storage(regs, sregs) & !mask) | ((value << shift) & mask);
        match self.place {
            Place::General { index, .. } => *general_mut(regs, index) = merged,
            Place::Special(Special::Selector(index)) => segments_mut(sregs)[index].selector = merged as u16,
            Place::Special(special) => *special_mut(sregs, special) = merged,
        }
    }

    /// The whole register this one is part of.
    fn storage(self, regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
        match self.place {
            Place::General { index, .. } => *general_mut(&mut regs.clone(), index),
            Place::Special(Special::Selector(index)) => u64::from(segments_mut(&mut sregs.clone())[index].selector),
            Place::Special(special) => *special_mut(&mut sregs.clone(), special),
        }
    }
}

fn general_mut(regs: &mut kvm_regs, index: usize) -> &mut u64 {
    let all = [
        &mut regs.rax,
        &mut regs.rbx,
        &mut regs.rcx,
        &mut regs.rdx,
        &mut regs.rsi,
        &mut regs.rdi,
        &mut regs.rsp,
        &mut regs.rbp,
        &mut regs.r8,
        &mut regs.r9,
        &mut regs.r10,
        &mut regs.r11,
        &mut regs.r12,
        &mut regs.r13,
        &mut regs.r14,
        &mut regs.r15,
        &mut regs.rip,
        &mut regs.rflags,
    ];
    all.into_iter().nth(index).expect("general register indices come from GENERAL")
}

fn segments_mut(sregs: &mut kvm_sregs) -> [&mut kvm_bindings::kvm_segment; 6] {
    [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss]
}

fn special_mut(sregs: &mut kvm_sregs, special: Special) -> &mut u64 {
    match special {
        Special::Cr0 => &mut sregs.cr0,
        Special::Cr2 => &mut sregs.cr2,
        Special::Cr3 => &mut sregs.cr3,
        Special::Cr4 => &mut sregs.cr4,
        Special::Cr8 => &mut sregs.cr8,
        Special::Efer => &mut sregs.efer,
        Special::ApicBase => &mut sregs.apic_base,
        Special::FsBase => &mut sregs.fs.base,
        Special::GsBase => &mut sregs.gs.base,
        Special::Selector(_) => unreachable!("selectors are 16-bit fields, handled by the callers"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str) -> Register {
        name.parse().unwrap()
    }

    #[test]
    fn parts_of_a_register_read_and_write_their_bits_only() {
        let (mut regs, mut sregs) =
            (kvm_regs { rax: 0x1122_3344_5566_7788, ..Default::default() }, kvm_sregs::default());
        let read = |name: &str, regs: &kvm_regs, sregs: &kvm_sregs| reg(name).read(regs, sregs);
        assert_eq!(read("EAX", &regs, &sregs), 0x5566_7788);
        assert_eq!(read("ax", &regs, &sregs), 0x7788);
        assert_eq!((read("al", &regs, &sregs), read("ah", &regs, &sregs)), (0x88, 0x77));
        reg("ah").write(&mut regs, &mut sregs, 0x1ff);
        assert_eq!(regs.rax, 0x1122_3344_5566_ff88, "cut to 8 bits, only AH changes");
        reg("eax").write(&mut regs, &mut sregs, u64::MAX);
        assert_eq!(regs.rax, 0x1122_3344_ffff_ffff);
        reg("r9d").write(&mut regs, &mut sregs, 7);
        assert_eq!(regs.r9, 7);
    }

    #[test]
    fn special_registers_selectors_and_bases_resolve() {
        let (mut regs, mut sregs) = (kvm_regs::default(), kvm_sregs::default());
        assert!(reg("fs_base").is_special() && !reg("rip").is_special());
        reg("fs_base").write(&mut regs, &mut sregs, 0xdead_0000);
        reg("CS").write(&mut regs, &mut sregs, 0x1_0008);
        reg("cr4").write(&mut regs, &mut sregs, 0x20);
        assert_eq!((sregs.fs.base, sregs.cs.selector, sregs.cr4), (0xdead_0000, 0x8, 0x20));
        assert_eq!(reg("cs").read(&regs, &sregs), 8);
        assert_eq!(reg("flags").bits(), 16);
        let error = "xmm0".parse::<Register>().unwrap_err().to_string();
        assert!(error.contains("unknown register \"xmm0\""), "{error}");
    }
}
