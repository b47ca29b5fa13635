//! Calling a guest function from the host: `call` runs one vCPU from a function's entry to its
//! return on the calling thread, in one `KVM_RUN` when the function makes no I/O.

use std::time::Instant;

use crate::arch::x86_64::layout::CALL_TRAMPOLINE_ADDR;
use crate::error::{Error, Result};
use crate::vstate::exit::{Exit, ExitReason};
use crate::vstate::regs::RegisterFile;
use crate::vstate::vcpu::Vcpu;

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

/// What a batch of calls did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResults {
    /// The RAX of each call that returned, in order.
    pub returned: Vec<u64>,
    /// How the run ended when a call did not return (the batch stops there).
    pub ended: Option<Exit>,
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
        let results = self.call_many(index, entry, &[args], stack, deadline, interrupted)?;
        Ok(match (results.ended, results.returned.first()) {
            (Some(exit), _) => CallOutcome::Ended(exit),
            (None, Some(&rax)) => CallOutcome::Returned(rax),
            (None, None) => unreachable!("a batch of one call that did not end returned"),
        })
    }

    /// [`call`](Self::call) once per argument list, one after the other in a single run (each
    /// call's return sets up the next without leaving the run), until one does not return.
    /// `deadline` is for the whole batch.
    pub fn call_many(
        &self,
        index: usize,
        entry: u64,
        arg_lists: &[impl AsRef<[u64]>],
        stack: Option<u64>,
        deadline: Option<Instant>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<CallResults> {
        if let Some(args) = arg_lists.iter().map(AsRef::as_ref).find(|args| args.len() > CALL_ARGS_MAX) {
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
        let Some((first, rest)) = arg_lists.split_first() else { return Ok(CallResults::default()) };
        self.plant_trampoline()?;
        let frame = |file: &RegisterFile, args: &[u64]| prepare_call(file, index, entry, args, stack);
        self.with_registers(index, true, |file| frame(file, first.as_ref()))?;
        let mut returned = Vec::with_capacity(arg_lists.len());
        let mut rest = rest.iter();
        let mut failed = None;
        let mut next_call = |vcpu: &mut Vcpu, exit: &ExitReason| {
            let file = vcpu.register_file();
            match file.regs() {
                Ok(regs) if *exit == ExitReason::Hlt && regs.rip == RETURNED_RIP => returned.push(regs.rax),
                _ => return false,
            }
            let Some(args) = rest.next() else { return false };
            vcpu.note_registers_written();
            frame(&file, args.as_ref()).map_err(|e| failed = Some(e)).is_ok()
        };
        let exit = self.run_here_with(index, None, deadline, interrupted, Some(&mut next_call))?;
        if let Some(error) = failed {
            return Err(error);
        }
        if returned.len() == arg_lists.len() {
            return Ok(CallResults { returned, ended: None });
        }
        if exit.reason == ExitReason::Hlt && self.regs(index)?.rip == WRONG_MODE_HLT + 1 {
            return Err(Error::InvalidConfig(format!(
                "call() runs 64-bit code, and vCPU {index} is not in 64-bit mode: set it up with enter_mode(Long)"
            )));
        }
        Ok(CallResults { returned, ended: Some(exit) })
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

/// Sets vCPU `index`'s registers for a call of `entry` with `args`: the arguments, the stack
/// (`stack` or the current RSP, aligned), and RIP at the trampoline with R11 and RBX for it.
fn prepare_call(file: &RegisterFile, index: usize, entry: u64, args: &[u64], stack: Option<u64>) -> Result<()> {
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
    fn a_batch_runs_its_calls_in_one_run_until_one_does_not_return() {
        let Some(_kvm) = kvm() else { return };
        let machine = machine(false);
        machine.enter_mode(0, CpuMode::Long, CODE, Some(STACK)).unwrap();
        let arg_lists: Vec<[u64; 2]> = (0..50).map(|i| [i, i + 1]).collect();
        let results = machine.call_many(0, CODE, &arg_lists, None, None, &mut || false).unwrap();
        assert_eq!(results.returned, (0..50).map(|i| i + 2 * (i + 1)).collect::<Vec<_>>());
        assert_eq!(results.ended, None);
        assert_eq!(machine.regs(0).unwrap().rsp, STACK, "every call left the stack balanced");

        // A call that does not return ends the batch: the results so far and its exit.
        let stop_at = |entry| machine.call_many(0, entry, &[[1, 2], [3, 4]], None, None, &mut || false);
        let ended = stop_at(CODE + 0x10).unwrap();
        assert_eq!((ended.returned.len(), ended.ended.map(|exit| exit.reason)), (0, Some(ExitReason::Hlt)));
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let timed_out =
            machine.call_many(0, CODE + 0x20, &[[0u64; 0]; 3], None, Some(deadline), &mut || false).unwrap();
        assert_eq!(timed_out.ended.map(|exit| exit.reason), Some(ExitReason::Timeout));
        assert_eq!(
            machine.call_many(0, CODE, &[[0u64; 0]; 0], None, None, &mut || false).unwrap(),
            CallResults::default()
        );
        let error = machine.call_many(0, CODE, &[vec![1], vec![0; 7]], None, None, &mut || false).unwrap_err();
        assert!(error.to_string().contains("at most 6 arguments"), "{error}");
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
