use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};

use crate::error::{Error, Result};

/// How many debug-address registers (DR0-DR3) x86 has.
pub const HW_SLOTS: usize = 4;

/// DR7 bit 10 reads as one; GE (bit 9) asks for exact data breakpoints, which some CPUs and
/// hypervisors need to report them.
const DR7_FIXED: u64 = 1 << 10 | 1 << 9;
/// DR6: which of DR0-DR3 matched.
const DR6_HITS: u64 = 0xf;
/// The vector of `int3`.
const BP_VECTOR: u32 = 3;

/// What a debug-address register catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwKind {
    /// Executing the instruction at the address (the exit comes before it runs).
    Execute,
    /// Writes to the range (the exit comes right after the writing instruction).
    Write,
    /// Reads or writes of the range.
    ReadWrite,
}

impl HwKind {
    /// The DR7 R/W field.
    fn rw_bits(self) -> u64 {
        match self {
            Self::Execute => 0b00,
            Self::Write => 0b01,
            Self::ReadWrite => 0b11,
        }
    }

    /// A short lowercase name, stable for bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Execute => "execute",
            Self::Write => "write",
            Self::ReadWrite => "readwrite",
        }
    }
}

/// One hardware breakpoint or watchpoint: a linear address, what it catches, and how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HwSlot {
    addr: u64,
    kind: HwKind,
    len: u8,
}

impl HwSlot {
    /// A breakpoint on the instruction at `addr`.
    pub fn breakpoint(addr: u64) -> Self {
        Self { addr, kind: HwKind::Execute, len: 1 }
    }

    /// A watchpoint on `len` bytes at `addr`; `len` is 1, 2, 4 or 8 and `addr` aligned to it, as
    /// the debug registers only match aligned ranges.
    pub fn watchpoint(addr: u64, len: u8, kind: HwKind) -> Result<Self> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(Error::InvalidConfig(format!("a watchpoint covers 1, 2, 4 or 8 bytes, not {len}")));
        }
        if addr % u64::from(len) != 0 {
            return Err(Error::InvalidConfig(format!(
                "a {len}-byte watchpoint needs an address aligned to {len}, not {addr:#x}"
            )));
        }
        if kind == HwKind::Execute {
            return Err(Error::InvalidConfig("a watchpoint catches writes or reads and writes".into()));
        }
        Ok(Self { addr, kind, len })
    }

    /// The linear address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// What it catches.
    pub fn kind(&self) -> HwKind {
        self.kind
    }

    /// Bytes covered (1 for a breakpoint).
    pub fn length(&self) -> u8 {
        self.len
    }

    /// The DR7 LEN field.
    fn len_bits(&self) -> u64 {
        match self.len {
            2 => 0b01,
            4 => 0b11,
            8 => 0b10,
            _ => 0b00,
        }
    }
}

/// What `KVM_SET_GUEST_DEBUG` gets for one vCPU: single-step, software breakpoints and the four
/// debug registers. The default turns debugging off, as KVM starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Exit after every instruction.
    pub single_step: bool,
    /// Keep interrupts from being delivered while single-stepping.
    pub block_irq: bool,
    /// Have `int3` exit to the VMM instead of reaching the guest.
    pub software_breakpoints: bool,
    /// DR0-DR3.
    pub slots: [Option<HwSlot>; HW_SLOTS],
}

impl GuestDebug {
    /// Whether anything is on.
    pub fn enabled(&self) -> bool {
        self.single_step || self.software_breakpoints || self.slots.iter().any(Option::is_some)
    }

    /// DR7 enabling each used slot (globally) with its R/W and LEN fields.
    pub fn dr7(&self) -> u64 {
        self.slots.iter().enumerate().fold(DR7_FIXED, |dr7, (i, slot)| match slot {
            Some(slot) => {
                dr7 | 1 << (2 * i + 1) | slot.kind.rw_bits() << (16 + 4 * i) | slot.len_bits() << (18 + 4 * i)
            }
            None => dr7,
        })
    }

    /// The ioctl's structure; `block_irq_supported` says whether KVM knows `KVM_GUESTDBG_BLOCKIRQ`.
    pub fn to_kvm(&self, block_irq_supported: bool) -> kvm_guest_debug {
        let mut debug = kvm_guest_debug::default();
        if !self.enabled() {
            return debug;
        }
        let mut control = KVM_GUESTDBG_ENABLE;
        if self.single_step {
            control |= KVM_GUESTDBG_SINGLESTEP;
            if self.block_irq && block_irq_supported {
                control |= KVM_GUESTDBG_BLOCKIRQ;
            }
        }
        if self.software_breakpoints {
            control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if self.slots.iter().any(Option::is_some) {
            control |= KVM_GUESTDBG_USE_HW_BP;
            for (i, slot) in self.slots.iter().enumerate() {
                debug.arch.debugreg[i] = slot.map_or(0, |slot| slot.addr);
            }
            debug.arch.debugreg[7] = self.dr7();
        }
        debug.control = control;
        debug
    }

    /// The same without its instruction breakpoints, to execute one instruction that has one.
    pub fn without_breakpoints(mut self) -> Self {
        for slot in &mut self.slots {
            if slot.is_some_and(|slot| slot.kind == HwKind::Execute) {
                *slot = None;
            }
        }
        self
    }
}

/// What made a vCPU exit with `KVM_EXIT_DEBUG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugKind {
    /// A single step finished.
    Step,
    /// Debug register `n` (0-3) matched.
    Hardware(u8),
    /// An `int3` ran.
    Software,
}

/// A `KVM_EXIT_DEBUG`: what happened and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugEvent {
    /// What happened.
    pub kind: DebugKind,
    /// The linear address of the next instruction to run (for a software breakpoint, of the
    /// `int3`).
    pub pc: u64,
    /// DR6 as KVM reported it.
    pub dr6: u64,
}

impl DebugEvent {
    /// Classifies the exit: `int3`, else a debug register that matched (a watchpoint hit during a
    /// step is reported as the watchpoint), else a step.
    pub fn classify(exception: u32, pc: u64, dr6: u64) -> Self {
        let kind = if exception == BP_VECTOR {
            DebugKind::Software
        } else if dr6 & DR6_HITS != 0 {
            DebugKind::Hardware((dr6 & DR6_HITS).trailing_zeros() as u8)
        } else {
            // DR6.BS (bit 14), or a KVM that did not fill DR6 for a step.
            DebugKind::Step
        };
        Self { kind, pc, dr6 }
    }

    /// A short lowercase name of the kind, stable for bindings.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            DebugKind::Step => "step",
            DebugKind::Hardware(_) => "hardware",
            DebugKind::Software => "software",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_encodes_each_slot() {
        let mut debug = GuestDebug::default();
        assert!(!debug.enabled());
        assert_eq!(debug.to_kvm(true).control, 0);
        debug.slots[0] = Some(HwSlot::breakpoint(0x1000));
        debug.slots[2] = Some(HwSlot::watchpoint(0x2008, 8, HwKind::Write).unwrap());
        debug.slots[3] = Some(HwSlot::watchpoint(0x3002, 2, HwKind::ReadWrite).unwrap());
        // G0, G2, G3; slot 2 write (01) of 8 bytes (10); slot 3 read/write (11) of 2 bytes (01).
        let expected = DR7_FIXED | 1 << 1 | 1 << 5 | 1 << 7 | 0b1001 << 24 | 0b0111 << 28;
        assert_eq!(debug.dr7(), expected);
        let kvm = debug.to_kvm(true);
        assert_eq!(kvm.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(kvm.arch.debugreg[..4], [0x1000, 0, 0x2008, 0x3002]);
        assert_eq!(kvm.arch.debugreg[7], expected);
    }

    #[test]
    fn stepping_blocks_interrupts_only_when_asked_and_supported() {
        let step = GuestDebug { single_step: true, block_irq: true, ..Default::default() };
        assert_eq!(step.to_kvm(true).control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ);
        assert_eq!(step.to_kvm(false).control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
        let free = GuestDebug { block_irq: false, ..step };
        assert_eq!(free.to_kvm(true).control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
    }

    #[test]
    fn watchpoints_must_be_aligned_and_sized() {
        assert!(HwSlot::watchpoint(0x1001, 2, HwKind::Write).is_err());
        assert!(HwSlot::watchpoint(0x1000, 3, HwKind::Write).is_err());
        assert!(HwSlot::watchpoint(0x1000, 16, HwKind::Write).is_err());
        assert!(HwSlot::watchpoint(0x1000, 1, HwKind::Execute).is_err());
        assert!(HwSlot::watchpoint(0x1004, 4, HwKind::ReadWrite).is_ok());
    }

    #[test]
    fn stepping_over_a_breakpoint_keeps_the_watchpoints() {
        let watch = HwSlot::watchpoint(0x2000, 4, HwKind::Write).unwrap();
        let debug =
            GuestDebug { slots: [Some(HwSlot::breakpoint(0x1000)), Some(watch), None, None], ..Default::default() };
        assert_eq!(debug.without_breakpoints().slots, [None, Some(watch), None, None]);
    }

    #[test]
    fn debug_exits_are_classified() {
        assert_eq!(DebugEvent::classify(1, 0x1003, 0xffff_4ff0).kind, DebugKind::Step);
        assert_eq!(DebugEvent::classify(1, 0x1000, 0xffff_0ff4).kind, DebugKind::Hardware(2));
        assert_eq!(DebugEvent::classify(1, 0x1000, 0xffff_4ff2).kind, DebugKind::Hardware(1));
        assert_eq!(DebugEvent::classify(3, 0x1000, 0).kind, DebugKind::Software);
    }
}
