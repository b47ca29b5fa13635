//! Interrupt lines for devices: an eventfd that KVM turns into an interrupt (irqfd), so raising
//! one costs a write and no trip through the VMM.

use vmm_sys_util::eventfd::EventFd;

/// A level-less interrupt line: each trigger injects one edge on its GSI.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
