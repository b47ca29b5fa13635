//! A bank of byte registers: reads return what was last written. Useful to check that values
//! cross the bus intact in both directions.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};
use crate::error::{Error, Result};
use crate::snapshot::{Persist, StateError};

/// The largest scratchpad: register space, not memory (guest RAM is for bulk data), and small
/// enough that asking for one never exhausts the host.
pub const MAX_SCRATCHPAD_SIZE: usize = 16 << 20;

/// `size` bytes of register space, zero at start.
#[derive(Debug)]
pub struct Scratchpad {
    bytes: Mutex<Vec<u8>>,
    /// Accesses served.
    pub counters: AccessCounters,
}

impl Scratchpad {
    /// A zeroed scratchpad of `size` bytes, from 1 to [`MAX_SCRATCHPAD_SIZE`].
    pub fn new(size: usize) -> Result<Self> {
        if !(1..=MAX_SCRATCHPAD_SIZE).contains(&size) {
            return Err(Error::InvalidConfig(format!("a scratchpad has 1 to {MAX_SCRATCHPAD_SIZE} bytes, not {size}")));
        }
        Ok(Self { bytes: Mutex::new(vec![0; size]), counters: AccessCounters::default() })
    }

    /// A copy of the registers.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Overwrites registers from `offset` on, as the host side of the device.
    pub fn fill(&self, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        let mut bytes = self.lock();
        let window = window(&mut bytes, offset as u64, data.len())?;
        window.copy_from_slice(data);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // The lock only guards plain bytes, so a poisoned one still holds valid data.
        self.bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The saved state of a [`Scratchpad`]: its registers. It restores only into a scratchpad of the
/// same size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct ScratchpadState {
    /// Every register, from offset 0.
    pub bytes: Vec<u8>,
}

impl Persist for Scratchpad {
    type State = ScratchpadState;

    fn save(&self) -> ScratchpadState {
        ScratchpadState { bytes: self.contents() }
    }

    fn restore(&self, state: &ScratchpadState) -> Result<(), StateError> {
        let mut bytes = self.lock();
        if state.bytes.len() != bytes.len() {
            return Err(StateError::new(format!(
                "scratchpad: the state holds {} bytes, but this scratchpad has {}",
                state.bytes.len(),
                bytes.len()
            )));
        }
        bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

fn window(bytes: &mut [u8], offset: u64, len: usize) -> Result<&mut [u8], DeviceError> {
    let size = bytes.len();
    usize::try_from(offset).ok().and_then(|start| bytes.get_mut(start..start.checked_add(len)?)).ok_or_else(|| {
        DeviceError::Failed(format!(
            "access of {len} bytes at offset {offset:#x} is outside the {size}-byte scratchpad"
        ))
    })
}

impl BusDevice for Scratchpad {
    crate::persist_on_bus!();

    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        data.copy_from_slice(window(&mut self.lock(), offset, data.len())?);
        Ok(())
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        window(&mut self.lock(), offset, data.len())?.copy_from_slice(data);
        Ok(())
    }
}

impl CountedDevice for Scratchpad {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_outside_the_limits_are_refused() {
        for size in [0, MAX_SCRATCHPAD_SIZE + 1, usize::MAX] {
            assert!(matches!(Scratchpad::new(size), Err(Error::InvalidConfig(_))), "{size}");
        }
        assert_eq!(Scratchpad::new(MAX_SCRATCHPAD_SIZE).unwrap().contents().len(), MAX_SCRATCHPAD_SIZE);
    }

    #[test]
    fn reads_back_what_was_written() {
        let pad = Scratchpad::new(8).unwrap();
        pad.write(0, 2, &[0xde, 0xad]).unwrap();
        let mut data = [0; 4];
        pad.read(0, 1, &mut data).unwrap();
        assert_eq!(data, [0, 0xde, 0xad, 0]);
        assert_eq!((pad.counters.reads(), pad.counters.writes()), (1, 1));
    }

    #[test]
    fn out_of_range_access_is_a_device_error() {
        let pad = Scratchpad::new(4).unwrap();
        assert!(pad.write(0, 2, &[0; 4]).is_err());
        assert!(pad.read(0, u64::MAX, &mut [0; 1]).is_err());
        assert!(pad.fill(3, &[1, 2]).is_err());
        pad.fill(2, &[1, 2]).unwrap();
        assert_eq!(pad.contents(), [0, 0, 1, 2]);
    }

    fn read(pad: &Scratchpad, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        pad.read(0, offset, &mut data).unwrap();
        data
    }

    #[test]
    fn restored_registers_read_as_saved() {
        let pad = Scratchpad::new(8).unwrap();
        pad.write(0, 1, &[0xde, 0xad, 0xbe, 0xef]).unwrap();
        pad.write(0, 7, &[0x42]).unwrap();
        let json = serde_json::to_string(&pad.save()).unwrap();

        let fresh = Scratchpad::new(8).unwrap();
        fresh.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(read(&fresh, 0, 8), [0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0x42]);
        assert_eq!(read(&fresh, 0, 8), read(&pad, 0, 8));
        for device in [&pad, &fresh] {
            device.write(0, 2, &[0x11, 0x22]).unwrap();
        }
        assert_eq!(read(&fresh, 0, 8), read(&pad, 0, 8));
        assert_eq!(fresh.save(), pad.save());
    }

    #[test]
    fn a_state_of_another_size_is_refused() {
        let pad = Scratchpad::new(4).unwrap();
        pad.write(0, 0, &[1, 2, 3, 4]).unwrap();
        for len in [0, 3, 5] {
            let err = pad.restore(&ScratchpadState { bytes: vec![9; len] }).unwrap_err();
            assert!(err.0.contains("scratchpad") && err.0.contains(&format!("{len} bytes")), "{err}");
        }
        assert_eq!(pad.contents(), [1, 2, 3, 4], "a refused state changes nothing");
        let missing: ScratchpadState = serde_json::from_str("{}").unwrap();
        assert!(pad.restore(&missing).is_err(), "a state without bytes is not an empty scratchpad");
    }
}
