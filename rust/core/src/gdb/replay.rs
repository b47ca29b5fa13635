//! Reverse execution for a VM of one vCPU. The session keeps the machine's state from where it
//! began recording and counts the instructions run since, running them one single step at a
//! time; going back restores that state in place and runs forward again, instruction by
//! instruction, to the one wanted. That makes the same instructions happen again only for a guest
//! whose course depends on nothing but its own state: no interrupts, no clock, I/O whose handlers
//! answer the same way (they are called again).

use crate::machine::{Machine, Stepping};
use crate::snapshot::MachineSnapshot;
use crate::vstate::debug::DebugKind;
use crate::vstate::exit::{Exit, ExitReason};
use crate::{Error, Result};

/// Where recording began, and how many instructions have run since.
pub(super) struct Journal {
    origin: MachineSnapshot,
    steps: u64,
}

/// Runs one instruction of the VM's only vCPU, interrupts kept out.
pub(super) fn step(machine: &Machine, interrupted: &mut dyn FnMut() -> bool) -> Result<Exit> {
    machine.run_here(0, Some(Stepping { mask_interrupts: true, count: 1 }), None, interrupted)
}

/// Whether the exit of a single step says an instruction ran: the step's trap, a watchpoint's
/// (which comes after the instruction), or a halt.
pub(super) fn ran_instruction(exit: &Exit) -> bool {
    match &exit.reason {
        ExitReason::Debug(event) => matches!(event.kind, DebugKind::Step | DebugKind::Hardware(_)),
        ExitReason::Hlt => true,
        _ => false,
    }
}

impl Journal {
    /// Begins recording from the machine's present state.
    pub(super) fn start(machine: &Machine) -> Result<Self> {
        Ok(Self { origin: machine.snapshot()?, steps: 0 })
    }

    /// Instructions run since recording began.
    pub(super) fn steps(&self) -> u64 {
        self.steps
    }

    /// Counts one more instruction run.
    pub(super) fn record(&mut self) {
        self.steps += 1;
    }

    /// Puts the machine where it was `target` instructions after recording began: back to the
    /// start, then forward step by step, showing `visit` each step's exit and how many
    /// instructions have run.
    pub(super) fn replay(&mut self, machine: &Machine, target: u64, mut visit: impl FnMut(u64, &Exit)) -> Result<()> {
        machine.restore(&self.origin)?;
        self.steps = 0;
        while self.steps < target {
            let exit = step(machine, &mut || false)?;
            if !ran_instruction(&exit) {
                return Err(Error::InvalidConfig(format!(
                    "replaying instruction {} of {target} ended with {}: the guest does not run the same way twice",
                    self.steps + 1,
                    exit.reason
                )));
            }
            self.steps += 1;
            visit(self.steps, &exit);
        }
        Ok(())
    }
}
