//! Calling a guest function from the host: `call` runs one vCPU from a function's entry to its
//! return on the calling thread, in one `KVM_RUN` when the function makes no I/O.

use std::time::Instant;

use crate::arch::x86_64::layout::CALL_TRAMPOLINE_ADDR;
use crate::error::{Error, Result};
use crate::vstate::exit::{Exit, ExitReason};

use super::Machine;

/// The System V argument registers, in order.
pub const CALL_ARGS_MAX: usize = 6;

/// What `call` plants at [`CALL_TRAMPOLINE_ADDR`]. The vCPU starts at its first byte with the
/// function's entry in R11; the function returns to the HLT after the call, which exits to the
/// VMM. The same bytes in 32- or 16-bit code read `inc ecx; call *ebx`, and RBX holds the address
/// of the second HLT, so a vCPU in the wrong mode stops there instead of running off.
const TRAMPOLINE: [u8; 12] = [
    0x41, 0xff, 0xd3, // call *%r11
    0xf4, // hlt: returned
    0xeb, 0xfd, // jmp back to it
    0x90, 0x90, //
    0xf4, // hlt: not in 64-bit mode
    0xeb, 0xfd, // jmp back to it
    0x90,
];
/// Where RIP is after the HLT of a return, and of a vCPU in the wrong mode.
const RETURNED_RIP: u64 = CALL_TRAMPOLINE_ADDR + 4;
const WRONG_MODE_HLT: u64 = CALL_TRAMPOLINE_ADDR + 8;

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The function returned this RAX.
    Returned(u64),
    /// The run ended before the function returned (a fault, a handler's error, a timeout...).
    Ended(Exit),
}

impl Machine {
    /// Calls the 64-bit function at `entry` on vCPU `index` with up to six integer arguments in
    /// the System V registers (RDI, RSI, RDX, RCX, R8, R9), and runs it on the calling thread until
    /// it returns, the run ends otherwise, or `deadline` passes (see [`run_here`](Self::run_here),
    /// which `interrupted` is for). The stack is `stack`, or the vCPU's current RSP, rounded down
    /// to 16 bytes so that the function starts with the stack alignment its compiler assumes.
    ///
    /// The vCPU must be in 64-bit mode with [`CALL_TRAMPOLINE_ADDR`] mapped to itself, as
    /// `enter_mode(Long)` leaves it, and the VM must be without KVM's irqchip (the return is a HLT,
    /// which an in-kernel LAPIC would keep in the kernel). Besides the arguments and RSP, RIP is
    /// set, R11 holds the entry and RBX a trampoline address; other registers keep their values.
    pub fn call(
        &self,
        index: usize,
        entry: u64,
        args: &[u64],
        stack: Option<u64>,
        deadline: Option<Instant>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<CallOutcome> {
        if args.len() > CALL_ARGS_MAX {
            return Err(Error::InvalidConfig(format!(
                "a call passes at most {CALL_ARGS_MAX} arguments in registers, not {}",
                args.len()
            )));
        }
        if self.irqchip {
            return Err(Error::InvalidConfig(
                "call() needs a VM without KVM's irqchip: it ends with a HLT, which KVM's local APIC would wait out \
                 in the kernel"
                    .into(),
            ));
        }
        self.plant_trampoline()?;
        self.with_registers(index, true, |file| {
            let mut regs = file.regs()?;
            let stack = stack.unwrap_or(regs.rsp);
            if stack < 16 {
                return Err(Error::InvalidConfig(format!(
                    "vCPU {index} has no stack for the call (RSP is {stack:#x}): pass one, or set RSP"
                )));
            }
            regs.rsp = stack & !0xf;
            regs.rip = CALL_TRAMPOLINE_ADDR;
            regs.r11 = entry;
            regs.rbx = WRONG_MODE_HLT;
            let registers = [&mut regs.rdi, &mut regs.rsi, &mut regs.rdx, &mut regs.rcx, &mut regs.r8, &mut regs.r9];
            for (register, value) in registers.into_iter().zip(args) {
                *register = *value;
            }
            file.set_regs(&regs)
        })?;
        let exit = self.run_here(index, None, deadline, interrupted)?;
        if exit.reason != ExitReason::Hlt {
            return Ok(CallOutcome::Ended(exit));
        }
        let regs = self.regs(index)?;
        match regs.rip {
            RETURNED_RIP => Ok(CallOutcome::Returned(regs.rax)),
            rip if rip == WRONG_MODE_HLT + 1 => Err(Error::InvalidConfig(format!(
                "call() runs 64-bit code, and vCPU {index} is not in 64-bit mode: set it up with enter_mode(Long)"
            ))),
            _ => Ok(CallOutcome::Ended(exit)),
        }
    }

    /// Writes the trampoline into guest memory unless it is there already (a write would make its
    /// page one that each in-place restore copies back).
    fn plant_trampoline(&self) -> Result<()> {
        let mut present = [0u8; TRAMPOLINE.len()];
        self.read_memory(CALL_TRAMPOLINE_ADDR, &mut present).map_err(|e| {
            Error::InvalidConfig(format!(
                "call() needs guest RAM at {CALL_TRAMPOLINE_ADDR:#x} for its return path: {e}"
            ))
        })?;
        if present != TRAMPOLINE {
            self.write_memory(CALL_TRAMPOLINE_ADDR, &TRAMPOLINE)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::mode::CpuMode;
    use crate::config::{MachineConfig, MemoryRegionConfig, UnhandledIo};
    use crate::vstate::test_util::kvm;

    const CODE: u64 = 0x1_0000;
    const STACK: u64 = 0x8000;
    /// `lea rax, [rdi + rsi * 2]; ret`, then `hlt` at +0x10 and `jmp $` at +0x20.
    const FUNCTIONS: [(u64, &[u8]); 3] =
        [(CODE, &[0x48, 0x8d, 0x04, 0x77, 0xc3]), (CODE + 0x10, &[0xf4]), (CODE + 0x20, &[0xeb, 0xfe])];

    fn machine(irqchip: bool) -> Machine {
        let config = MachineConfig {
            memory: vec![MemoryRegionConfig { guest_addr: 0, size: 2 << 20 }],
            vcpus: 1,
            irqchip,
            pit: false,
            unhandled_io: UnhandledIo::Ignore,
            cpuid_edits: Vec::new(),
        };
        let machine = Machine::new(&config).unwrap();
        for (addr, code) in FUNCTIONS {
            machine.write_memory(addr, code).unwrap();
        }
        machine
    }

    fn call(machine: &Machine, entry: u64, args: &[u64], deadline: Option<Instant>) -> Result<CallOutcome> {
        machine.call(0, entry, args, None, deadline, &mut || false)
    }

    #[test]
    fn calls_pass_arguments_and_return_rax_every_time() {
        let Some(_kvm) = kvm() else { return };
        let machine = machine(false);
        machine.enter_mode(0, CpuMode::Long, CODE, Some(STACK)).unwrap();
        for i in 0..20 {
            assert_eq!(call(&machine, CODE, &[i, 3], None).unwrap(), CallOutcome::Returned(i + 6));
            let regs = machine.regs(0).unwrap();
            assert_eq!((regs.rsp, regs.rdi, regs.rsi), (STACK, i, 3), "the stack is balanced again");
        }
    }

    #[test]
    fn calls_that_do_not_return_end_with_the_run() {
        let Some(_kvm) = kvm() else { return };
        let machine = machine(false);
        machine.enter_mode(0, CpuMode::Long, CODE, Some(STACK)).unwrap();
        let CallOutcome::Ended(exit) = call(&machine, CODE + 0x10, &[], None).unwrap() else { panic!("returned") };
        assert_eq!((exit.reason, machine.regs(0).unwrap().rip), (ExitReason::Hlt, CODE + 0x11));
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let CallOutcome::Ended(exit) = call(&machine, CODE + 0x20, &[], Some(deadline)).unwrap() else {
            panic!("returned")
        };
        assert_eq!(exit.reason, ExitReason::Timeout);
        assert!(Instant::now() >= deadline);
        assert_eq!(call(&machine, CODE, &[1, 1], None).unwrap(), CallOutcome::Returned(3), "usable afterwards");
    }

    #[test]
    fn calls_refuse_what_they_cannot_do() {
        let Some(_kvm) = kvm() else { return };
        let machine = machine(false);
        machine.enter_mode(0, CpuMode::Protected, CODE, Some(STACK)).unwrap();
        let error = call(&machine, CODE, &[], None).unwrap_err().to_string();
        assert!(error.contains("not in 64-bit mode"), "{error}");
        let error = call(&machine, CODE, &[0; 7], None).unwrap_err().to_string();
        assert!(error.contains("at most 6 arguments"), "{error}");
        let error = call(&self::machine(true), CODE, &[], None).unwrap_err().to_string();
        assert!(error.contains("irqchip"), "{error}");
    }
}
