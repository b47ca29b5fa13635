use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::arch::x86_64::exceptions::{
    Frame, GuestFault, FAULT_PORT, HALT_ADDR, IDT32_ADDR, IDT64_ADDR, IDT64_PLAIN_ADDR, TAIL_ADDR,
};
use crate::arch::x86_64::pagewalk::{self, PagingRegs};
use crate::error::Result;
use crate::vstate::exit::{AddressSpace, ExitReason, InternalError};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu::Vcpu;

const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;
const PAGE_FAULT: u8 = 14;

/// Whether the vCPU runs 64-bit code.
fn is_long(sregs: &kvm_sregs) -> bool {
    sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0
}

/// The linear address of `offset` in the segment based at `base`: 64-bit code has flat segments,
/// other code wraps at 4 GiB.
fn linear(sregs: &kvm_sregs, base: u64, offset: u64) -> u64 {
    if is_long(sregs) {
        offset
    } else {
        base.wrapping_add(offset) & 0xffff_ffff
    }
}

/// Reads `buf.len()` bytes at linear address `addr` through the vCPU's page tables, page by page.
fn read_linear(memory: &GuestMemory, sregs: &kvm_sregs, addr: u64, buf: &mut [u8]) -> Option<()> {
    let paging = PagingRegs::from(sregs);
    let mut read = |phys: u64, out: &mut [u8]| memory::read(memory, phys, out).is_ok();
    let mut done = 0;
    while done < buf.len() {
        let at = addr.wrapping_add(done as u64);
        let size = (pagewalk::page_rest(at) as usize).min(buf.len() - done);
        let phys = pagewalk::translate(&paging, at, &mut read)?;
        memory::read(memory, phys, &mut buf[done..done + size]).ok()?;
        done += size;
    }
    Some(())
}

/// Tells a report of kvmkit's exception stubs (the vCPU exited for a write to [`FAULT_PORT`] at the
/// stubs' `out`) from a stray write to the port, which is returned as an unhandled write.
pub fn report_or_stray(vcpu: &Vcpu) -> ExitReason {
    let at_report = (|| -> Result<bool> {
        let (regs, sregs) = (vcpu.regs()?, vcpu.sregs()?);
        // KVM may have moved RIP past the `out` already.
        let rip = linear(&sregs, sregs.cs.base, regs.rip);
        Ok(rip == TAIL_ADDR || rip == HALT_ADDR)
    })();
    match at_report {
        Ok(true) => ExitReason::GuestFault(GuestFault::default()),
        Ok(false) => stray_write(),
        Err(e) => ExitReason::VmmError(format!("a write to kvmkit's exception port cannot be told apart: {e}")),
    }
}

fn stray_write() -> ExitReason {
    ExitReason::UnhandledIo { space: AddressSpace::Pio, addr: FAULT_PORT.into(), size: 1, write: true }
}

/// Completes a report from kvmkit's exception stubs (the vCPU wrote [`FAULT_PORT`], and the write
/// has been finished; see [`report_or_stray`]): reads the frame the stub left on the stack, puts the vCPU back where the
/// exception happened (RIP, RFLAGS and the stack pointer as they were; the stubs change no other
/// register), and returns the fault.
pub fn settle(vcpu: &Vcpu, memory: Option<&GuestMemory>, reason: ExitReason) -> ExitReason {
    if !matches!(reason, ExitReason::GuestFault(_)) {
        return reason;
    }
    let settled = (|| -> Result<ExitReason> {
        let (mut regs, sregs) = (vcpu.regs()?, vcpu.sregs()?);
        let Some(memory) = memory else { return Ok(stray_write()) };
        if linear(&sregs, sregs.cs.base, regs.rip) != HALT_ADDR {
            return Ok(stray_write());
        }
        let long = is_long(&sregs);
        let frame_addr = linear(&sregs, sregs.ss.base, regs.rsp);
        let mut bytes = vec![0; Frame::size(long)];
        let frame =
            read_linear(memory, &sregs, frame_addr, &mut bytes).and_then(|()| Frame::decode(long, regs.rsp, &bytes));
        let Some(frame) = frame else {
            return Ok(ExitReason::VmmError(format!(
                "kvmkit's exception stub ran, but its frame at {frame_addr:#x} cannot be read"
            )));
        };
        restore(&mut regs, &frame);
        vcpu.set_regs(&regs)?;
        let rip = linear(&sregs, sregs.cs.base, frame.rip);
        let rip_in_memory = read_linear(memory, &sregs, rip, &mut [0]).is_some();
        let cr2 = (frame.vector == PAGE_FAULT).then_some(sregs.cr2);
        Ok(ExitReason::GuestFault(GuestFault {
            vector: frame.vector,
            error_code: frame.error_code,
            rip: frame.rip,
            cr2,
            rip_in_memory,
        }))
    })();
    settled.unwrap_or_else(|e| ExitReason::VmmError(format!("a guest exception could not be read: {e}")))
}

/// RFLAGS.RF, which the CPU sets in the frame of a fault so that returning does not hit an
/// instruction breakpoint again; the vCPU had it clear when the fault happened.
const RFLAGS_RF: u64 = 1 << 16;

fn restore(regs: &mut kvm_regs, frame: &Frame) {
    regs.rip = frame.rip;
    regs.rflags = frame.rflags & !RFLAGS_RF;
    regs.rsp = frame.rsp;
}

/// What an exit says about the vCPU that ended the run: its RIP, and for the common mistakes a
/// hint at what went wrong. Reads the registers once (and the special registers only for an
/// exit that may need a hint).
pub fn run_end_notes(vcpu: &Vcpu, reason: &ExitReason) -> (Option<u64>, Option<String>) {
    let Ok(regs) = vcpu.regs() else { return (None, None) };
    // A triple fault leaves the vCPU's state as it was on Intel hosts; AMD hosts reset it, and then
    // no hint is given.
    let needs_hint = matches!(
        reason,
        ExitReason::InternalError(_)
            | ExitReason::Shutdown
            | ExitReason::FailEntry { .. }
            | ExitReason::UnhandledIo { .. }
    );
    let hint =
        needs_hint.then(|| vcpu.sregs().ok()).flatten().and_then(|sregs| hint(vcpu.index(), reason, &regs, &sregs));
    (Some(regs.rip), hint)
}

/// A hint for the exit `reason` of vCPU `index` in state `regs`, `sregs`.
fn hint(index: u32, reason: &ExitReason, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<String> {
    let power_on = sregs.cr0 & CR0_PE == 0 && sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000;
    // After a triple fault AMD hosts reset the vCPU, so its state then says nothing.
    if power_on && *reason != ExitReason::Shutdown {
        return Some(format!(
            "vCPU {index} is still in its power-on state (CS:IP f000:{:04x}, where no guest code is): did you call \
             vcpu.setup()?",
            regs.rip
        ));
    }
    match reason {
        ExitReason::InternalError(InternalError { instruction, .. }) if instruction.is_empty() => Some(format!(
            "KVM could not read the instruction at {:#x}: is it outside guest memory?",
            linear(sregs, sregs.cs.base, regs.rip)
        )),
        ExitReason::Shutdown
            if [IDT32_ADDR, IDT64_ADDR, IDT64_PLAIN_ADDR].contains(&sregs.idt.base) && sregs.idt.limit != 0 =>
        {
            Some(format!(
                "kvmkit's exception table could not take an exception: the CPU could not push its frame on the \
                 stack at {:#x} (is the stack pointer valid?)",
                regs.rsp
            ))
        }
        ExitReason::Shutdown if sregs.idt.limit == 0 && sregs.cr0 & CR0_PE != 0 => Some(format!(
            "the vCPU has no IDT, so an exception (at or before rip {:#x}) shut it down; vcpu.setup() with \
             exceptions=True reports exceptions instead",
            regs.rip
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;

    fn power_on() -> (kvm_regs, kvm_sregs) {
        let cs = kvm_segment { selector: 0xf000, base: 0xffff_0000, ..Default::default() };
        (kvm_regs { rip: 0xfff0, ..Default::default() }, kvm_sregs { cs, ..Default::default() })
    }

    #[test]
    fn a_vcpu_never_set_up_is_named() {
        let (regs, sregs) = power_on();
        let error = ExitReason::InternalError(InternalError::new(1, vec![0]));
        let hint = hint(2, &error, &regs, &sregs).unwrap();
        assert!(hint.contains("vCPU 2") && hint.contains("f000:fff0") && hint.contains("setup()"), "{hint}");
        assert_eq!(super::hint(2, &ExitReason::Shutdown, &regs, &sregs), None);
    }

    #[test]
    fn fetches_outside_memory_and_shutdowns_without_an_idt_are_explained() {
        let regs = kvm_regs { rip: 0x1234, ..Default::default() };
        let mut sregs = kvm_sregs { cr0: CR0_PE, ..Default::default() };
        let error = ExitReason::InternalError(InternalError::new(1, vec![0]));
        assert!(hint(0, &error, &regs, &sregs).unwrap().contains("instruction at 0x1234"));
        assert!(hint(0, &ExitReason::Shutdown, &regs, &sregs).unwrap().contains("no IDT"));
        sregs.idt.limit = 511;
        assert_eq!(hint(0, &ExitReason::Shutdown, &regs, &sregs), None);
        sregs.idt.base = IDT64_ADDR;
        assert!(hint(0, &ExitReason::Shutdown, &regs, &sregs).unwrap().contains("stack"));
        assert_eq!(hint(0, &ExitReason::Hlt, &regs, &sregs), None);
    }

    #[test]
    fn linear_addresses_wrap_outside_long_mode() {
        let mut sregs = kvm_sregs::default();
        assert_eq!(linear(&sregs, 0xffff_0000, 0x1_0010), 0x10);
        sregs.efer = EFER_LMA;
        sregs.cs.l = 1;
        assert_eq!(linear(&sregs, 0xffff_0000, 0x1_0010), 0x1_0010);
    }
}
