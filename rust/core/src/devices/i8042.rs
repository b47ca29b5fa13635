//! The i8042 keyboard controller, only as far as guests use it in a VM: its reset command.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};
use crate::snapshot::{Persist, StateError};

/// The controller's ports: data at 0x60 and command/status at 0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// From the data port to the command port, inclusive.
pub const I8042_PORT_SIZE: u64 = 5;

/// Remembers that the model asked for a reset, for the write that caused it to report.
#[derive(Default)]
struct ResetRequest(AtomicBool);

impl Trigger for ResetRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// An i8042 whose reset command (0xFE to port 0x64, as Linux's `reboot=k` sends) ends the run
/// with [`ExitReason::Reset`](crate::ExitReason::Reset).
pub struct I8042 {
    model: Mutex<I8042Device<ResetRequest>>,
    counters: AccessCounters,
}

impl Default for I8042 {
    fn default() -> Self {
        Self { model: Mutex::new(I8042Device::new(ResetRequest::default())), counters: AccessCounters::default() }
    }
}

impl BusDevice for I8042 {
    crate::persist_on_bus!();

    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        data.fill(0);
        data[0] = self.model.lock().unwrap_or_else(|p| p.into_inner()).read(offset as u8);
        Ok(())
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        let mut model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(()) = model.write(offset as u8, data[0]);
        if model.reset_evt().0.swap(false, Ordering::SeqCst) {
            return Err(DeviceError::Reset);
        }
        Ok(())
    }
}

impl CountedDevice for I8042 {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

/// The saved state of an [`I8042`]. The model keeps no register values (its reads return zero)
/// and a reset request is reported by the write that makes it, so there is nothing to keep; it is
/// a struct so that fields can be added later without breaking saved states.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(&self, _state: &I8042State) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_ends_the_run() {
        let i8042 = I8042::default();
        assert_eq!(i8042.write(0x60, 4, &[0xaa]), Ok(()));
        assert_eq!(i8042.write(0x60, 0, &[0xfe]), Ok(()));
        assert_eq!(i8042.write(0x60, 4, &[0xfe]), Err(DeviceError::Reset));
        assert_eq!(i8042.write(0x60, 4, &[0xaa]), Ok(()), "a reset is reported once");
        let mut status = [0xffu8];
        i8042.read(0x60, 4, &mut status).unwrap();
        assert_eq!(status, [0]);
    }

    #[test]
    fn restored_controller_behaves_as_saved() {
        let i8042 = I8042::default();
        i8042.write(0x60, 4, &[0xaa]).unwrap(); // self-test, as firmware sends it
        i8042.write(0x60, 0, &[0xfe]).unwrap();
        let json = serde_json::to_string(&i8042.save()).unwrap();

        let fresh = I8042::default();
        fresh.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        for device in [&i8042, &fresh] {
            let mut data = [0xff; 2];
            device.read(0x60, 0, &mut data[..1]).unwrap();
            device.read(0x60, 4, &mut data[1..]).unwrap();
            assert_eq!(data, [0, 0]);
            assert_eq!(device.write(0x60, 4, &[0xfe]), Err(DeviceError::Reset));
            assert_eq!(device.write(0x60, 4, &[0xaa]), Ok(()));
        }
        assert_eq!(fresh.save(), i8042.save());
    }
}
