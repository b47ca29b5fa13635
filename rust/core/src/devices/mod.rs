//! Devices that sit on a [`Bus`](crate::Bus), and the VM generation id, which is guest memory
//! and an interrupt instead.

mod acpi_pm;
mod boot_timer;
mod cmos;
pub mod console;
mod i8042;
mod null;
mod scratchpad;
mod serial;
#[cfg(test)]
mod test_util;
pub mod virtio;
mod vmgenid;

use std::sync::atomic::{AtomicU64, Ordering};

pub use acpi_pm::{AcpiSleepControl, AcpiSleepControlState, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_SIZE, S5_SLEEP_TYPE};
pub use boot_timer::{BootTimer, BootTimerState, BOOT_COMPLETE_SIGNAL};
pub use cmos::{Cmos, CmosState, CMOS_PORT_BASE, CMOS_PORT_SIZE};
pub use i8042::{I8042State, I8042, I8042_PORT_BASE, I8042_PORT_SIZE};
pub use null::NullDevice;
pub use scratchpad::{Scratchpad, ScratchpadState, MAX_SCRATCHPAD_SIZE};
pub use serial::{SerialPort, SerialPortState, SERIAL_PORT_SIZE};
pub use vmgenid::{VmGenId, VmGenIdError, VMGENID_SIZE};

use crate::bus::BusDevice;

/// A bus device that counts the accesses it serves.
pub trait CountedDevice: BusDevice {
    /// Its counters.
    fn counters(&self) -> &AccessCounters;
}

/// How often a device was read and written.
#[derive(Debug, Default)]
pub struct AccessCounters {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl AccessCounters {
    /// Counts one read.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one write.
    pub fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}
