//! The sleep control and status registers of a hardware-reduced ACPI platform, only as far as a
//! guest uses them in a VM: entering S5 (soft off) is how it powers off.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};
use crate::snapshot::{Persist, StateError};

/// The one port that holds both registers (the FADT names it twice). On a PC it is the first
/// port of the VGA attribute controller; kvmkit's platform has no VGA, and its FADT says so, so
/// no other device needs the port.
pub const ACPI_SLEEP_PORT: u64 = 0x3c0;
/// Both registers are one byte wide.
pub const ACPI_SLEEP_PORT_SIZE: u64 = 1;
/// The sleep type the DSDT's `_S5_` object gives S5, and so the one a guest writes to power off.
/// Any 3-bit value would do; 5 matches the state it stands for.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control register: SLP_TYP, the sleep type, in bits 2-4.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7 << SLEEP_TYPE_SHIFT;
/// Sleep control register: SLP_EN, "enter the sleep state SLP_TYP names now".
const SLEEP_ENABLE: u8 = 1 << 5;
/// What the guest writes to power off.
const S5_SLEEP_CONTROL: u8 = SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT);

/// The sleep control and status registers at [`ACPI_SLEEP_PORT`]: entering S5 ends the run with
/// [`ExitReason::PowerOff`](crate::ExitReason::PowerOff); every other write, such as clearing
/// WAK_STS before sleeping, has no effect.
#[derive(Default)]
pub struct AcpiSleepControl {
    counters: AccessCounters,
}

impl BusDevice for AcpiSleepControl {
    crate::persist_on_bus!();

    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        // The status register's WAK_STS (bit 7) would tell a guest it woke from sleep; nothing
        // here sleeps and comes back, so every bit reads as zero.
        data.fill(0);
        Ok(())
    }

    fn write(&self, _base: u64, _offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        // Only SLP_EN and SLP_TYP count; the other bits are reserved.
        if data[0] & (SLEEP_ENABLE | SLEEP_TYPE_MASK) == S5_SLEEP_CONTROL {
            return Err(DeviceError::PowerOff);
        }
        Ok(())
    }
}

impl CountedDevice for AcpiSleepControl {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

/// The saved state of an [`AcpiSleepControl`]. The registers keep nothing between accesses (the
/// status reads as zero, a write acts at once), so it is empty; it is a struct so that fields can
/// be added later without breaking saved states.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct AcpiSleepControlState {}

impl Persist for AcpiSleepControl {
    type State = AcpiSleepControlState;

    fn save(&self) -> AcpiSleepControlState {
        AcpiSleepControlState {}
    }

    fn restore(&self, _state: &AcpiSleepControlState) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_s5_powers_off() {
        let sleep = AcpiSleepControl::default();
        // SLP_EN (0x20) with SLP_TYP 5 (0x14), as a guest writes it; reserved bits do not matter.
        assert_eq!(S5_SLEEP_CONTROL, 0x34);
        assert_eq!(sleep.write(0x3c0, 0, &[0x34]), Err(DeviceError::PowerOff));
        assert_eq!(sleep.write(0x3c0, 0, &[0x35]), Err(DeviceError::PowerOff));
        assert_eq!(sleep.write(0x3c0, 0, &[0x34]), Err(DeviceError::PowerOff), "every time it is asked");
    }

    #[test]
    fn other_writes_are_ignored() {
        let sleep = AcpiSleepControl::default();
        for value in [
            0x00, // nothing
            0x80, // clearing WAK_STS, which a guest does before it sleeps
            0x14, // S5's type without SLP_EN
            0x20, // SLP_EN with another sleep type (0)
            0x2c, // SLP_EN with sleep type 3
            0x3c, // SLP_EN with sleep type 7
        ] {
            assert_eq!(sleep.write(0x3c0, 0, &[value]), Ok(()), "{value:#x}");
        }
        assert_eq!(sleep.counters().writes(), 6);
    }

    #[test]
    fn status_reads_as_zero() {
        let sleep = AcpiSleepControl::default();
        let mut status = [0xff];
        sleep.read(0x3c0, 0, &mut status).unwrap();
        assert_eq!(status, [0]);
        assert_eq!(sleep.counters().reads(), 1);
    }

    #[test]
    fn restored_registers_behave_as_saved() {
        let sleep = AcpiSleepControl::default();
        sleep.write(0x3c0, 0, &[0x80]).unwrap(); // clears WAK_STS, as before a sleep
        let json = serde_json::to_string(&sleep.save()).unwrap();
        assert_eq!(json, "{}");

        let fresh = AcpiSleepControl::default();
        fresh.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        for device in [&sleep, &fresh] {
            let mut status = [0xff];
            device.read(0x3c0, 0, &mut status).unwrap();
            assert_eq!(status, [0]);
            assert_eq!(device.write(0x3c0, 0, &[0x14]), Ok(()));
            assert_eq!(device.write(0x3c0, 0, &[S5_SLEEP_CONTROL]), Err(DeviceError::PowerOff));
        }
        assert_eq!(fresh.save(), sleep.save());
    }
}
