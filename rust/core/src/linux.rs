//! A PC platform for Linux on a [`Machine`]: the kernel and its boot parameters, the MP table,
//! the devices a PC kernel expects (COM1, i8042, CMOS RTC, ACPI sleep control, boot timer), the VM
//! generation id, and the console.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::kvm_fpu;

use crate::arch::x86_64::layout::{BOOT_STACK_TOP, GED_GSI, MMIO_GAP_START, VMGENID_ADDR};
use crate::arch::x86_64::mode::CpuMode;
use crate::arch::x86_64::{acpi, mptable, msr};
use crate::boot::{self, EntryPoint, LinuxBoot};
use crate::bus::BusDevice;
use crate::devices::console::ConsoleOutput;
use crate::devices::{
    AcpiSleepControl, BootTimer, Cmos, SerialPort, VmGenId, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_SIZE, CMOS_PORT_BASE,
    CMOS_PORT_SIZE, I8042, I8042_PORT_BASE, I8042_PORT_SIZE, SERIAL_PORT_SIZE,
};
use crate::error::{Error, Result};
use crate::irq::IrqLine;
use crate::machine::{Machine, VirtioSlot};
use crate::vstate::exit::AddressSpace;
use crate::vstate::memory;

/// COM1's ports and interrupt.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_GSI: u32 = 4;
/// Where the guest's init writes to mark the end of boot (`devmem 0xd0000000 8 123`).
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
const BOOT_TIMER_SIZE: u64 = 0x1000;
/// x87 control word and MXCSR as after FNINIT / reset.
const FCW_DEFAULT: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// What the host keeps of a booted Linux platform.
pub struct LinuxPlatform {
    /// Everything the guest wrote to its console (COM1).
    pub console: Arc<ConsoleOutput>,
    /// COM1, for input.
    pub serial: Arc<SerialPort<IrqLine>>,
    /// When the guest's init said it finished booting.
    pub boot_timer: Arc<BootTimer>,
    /// The VM generation id, which changes with each restore.
    pub vmgenid: Arc<VmGenId>,
}

/// Loads `boot` into `machine` (which needs the in-kernel irqchip), sets up every vCPU as Linux
/// expects from firmware, points vCPU 0 at the kernel's entry, and maps the platform devices.
pub fn boot_linux(machine: &Machine, boot: &LinuxBoot) -> Result<LinuxPlatform> {
    let platform = with_platform(machine, || load(machine, boot))?;
    let timer = platform.boot_timer.clone();
    machine.on_first_start(Box::new(move || timer.restart(Instant::now())));
    Ok(platform)
}

/// Maps the platform's devices without loading a kernel, for a VM whose state comes from a
/// snapshot of a Linux VM.
pub fn attach_platform(machine: &Machine) -> Result<LinuxPlatform> {
    with_platform(machine, || Ok(()))
}

/// Maps the platform's devices, then runs `then`. The devices come off again if either fails, so
/// that a failure leaves the I/O map as it was and can be retried (guest memory may have been
/// written). Once both succeed, each restore gives the guest a new generation id.
fn with_platform(machine: &Machine, then: impl FnOnce() -> Result<()>) -> Result<LinuxPlatform> {
    if !machine.has_irqchip() {
        return Err(Error::InvalidConfig("booting Linux needs the in-kernel irqchip (irqchip=True)".into()));
    }
    let mut mapped = Vec::new();
    let platform = map_devices(machine, &mut mapped).and_then(|platform| then().map(|()| platform));
    match &platform {
        Ok(platform) => {
            let vmgenid = platform.vmgenid.clone();
            machine.on_restore(Box::new(move || {
                // A clone that kept its parent's id would go on with its parent's random numbers.
                if let Err(e) = vmgenid.change() {
                    log::error!("{e}; the restored guest is not told it is a new generation");
                }
            }));
        }
        Err(_) => {
            for (space, base) in mapped.into_iter().rev() {
                // Each was mapped by this call a moment ago, and the VM cannot have started since.
                let _ = machine.remove_device(space, base);
            }
        }
    }
    platform
}

/// Writes the platform tables and the kernel into guest memory and points the vCPUs at it.
fn load(machine: &Machine, boot: &LinuxBoot) -> Result<()> {
    let cpus = machine.vcpu_count() as u32;
    // Kernels built without MP-table support (Debian's cloud kernel) find the CPUs through ACPI.
    let table = mptable::mptable(cpus).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    memory::write(machine.memory(), mptable::MPTABLE_START, &table)?;
    let virtio = machine.virtio_devices();
    let slots: Vec<_> =
        virtio.iter().map(|d| acpi::VirtioMmioSlot { base: d.base, size: d.size, gsi: d.gsi }).collect();
    let acpi = acpi::acpi_tables(cpus, &slots).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    memory::write(machine.memory(), acpi::ACPI_TABLES_ADDR, &acpi.bytes)?;
    let boot = LinuxBoot { cmdline: with_virtio_devices(&boot.cmdline, &virtio), ..boot.clone() };
    let entry = boot::load(machine.memory(), &boot, Some(acpi.rsdp_addr))?;
    for index in 0..machine.vcpu_count() {
        machine.with_vcpu(index, |vcpu| {
            vcpu.set_msrs(&msr::boot_msrs())?;
            vcpu.wire_lapic_lint_pins()?;
            vcpu.set_fpu(&kvm_fpu { fcw: FCW_DEFAULT, mxcsr: MXCSR_DEFAULT, ..Default::default() })
        })?;
    }
    enter_kernel(machine, entry)
}

/// The command line with a `virtio_mmio.device=SIZE@ADDR:IRQ` entry per virtio device, for kernels
/// that find them there; kernels built without that option find them in the DSDT instead.
fn with_virtio_devices(cmdline: &str, devices: &[VirtioSlot]) -> String {
    let mut cmdline = cmdline.to_string();
    for device in devices {
        let entry = format!("virtio_mmio.device={}K@{:#x}:{}", device.size >> 10, device.base, device.gsi);
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&entry);
    }
    cmdline
}

fn enter_kernel(machine: &Machine, entry: EntryPoint) -> Result<()> {
    let (mode, addr) = match entry {
        EntryPoint::Linux64 { addr, .. } => (CpuMode::Long, addr),
        EntryPoint::Pvh { addr, .. } => (CpuMode::Protected, addr),
    };
    machine.enter_mode(0, mode, addr, Some(BOOT_STACK_TOP))?;
    machine.with_vcpu(0, |vcpu| {
        let mut regs = vcpu.regs()?;
        regs.rbp = BOOT_STACK_TOP;
        match entry {
            EntryPoint::Linux64 { zero_page, .. } => regs.rsi = zero_page,
            EntryPoint::Pvh { start_info, .. } => regs.rbx = start_info,
        }
        vcpu.set_regs(&regs)
    })
}

/// Maps the platform's devices, recording each in `mapped` so that a failure can unmap them, and
/// writes a generation id (the ACPI tables tell the guest where it is).
fn map_devices(machine: &Machine, mapped: &mut Vec<(AddressSpace, u64)>) -> Result<LinuxPlatform> {
    let console = Arc::new(ConsoleOutput::new());
    let serial = Arc::new(SerialPort::new(machine.irq_line(COM1_GSI)?, console.clone()));
    let boot_timer = Arc::new(BootTimer::new(Instant::now()));
    let vmgenid = Arc::new(VmGenId::new(machine.memory().clone(), VMGENID_ADDR, machine.irq_line(GED_GSI)?)?);
    let devices: [(AddressSpace, u64, u64, Arc<dyn BusDevice>); 5] = [
        (AddressSpace::Pio, COM1_PORT, SERIAL_PORT_SIZE, serial.clone()),
        (AddressSpace::Pio, I8042_PORT_BASE, I8042_PORT_SIZE, Arc::new(I8042::default())),
        (AddressSpace::Pio, CMOS_PORT_BASE, CMOS_PORT_SIZE, Arc::new(Cmos::new())),
        (AddressSpace::Pio, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_SIZE, Arc::new(AcpiSleepControl::default())),
        (AddressSpace::Mmio, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, boot_timer.clone()),
    ];
    for (space, base, size, device) in devices {
        machine.add_device(space, base, size, device)?;
        mapped.push((space, base));
    }
    Ok(LinuxPlatform { console, serial, boot_timer, vmgenid })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn virtio_devices_are_announced_on_the_command_line() {
        let slot = |base, gsi| VirtioSlot { device_type: 2, base, size: 0x1000, gsi, counters: Arc::default() };
        assert_eq!(with_virtio_devices("console=ttyS0", &[]), "console=ttyS0");
        assert_eq!(
            with_virtio_devices("console=ttyS0", &[slot(0xd010_0000, 5), slot(0xd010_1000, 6)]),
            "console=ttyS0 virtio_mmio.device=4K@0xd0100000:5 virtio_mmio.device=4K@0xd0101000:6"
        );
        assert_eq!(with_virtio_devices("", &[slot(0xd010_0000, 5)]), "virtio_mmio.device=4K@0xd0100000:5");
    }
}
