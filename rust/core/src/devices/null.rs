//! A device that reads as zero and drops writes: the cheapest thing an exit can reach.

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};

/// Reads return zeros, writes are dropped; both are counted.
#[derive(Debug, Default)]
pub struct NullDevice {
    /// Accesses served.
    pub counters: AccessCounters,
}

impl BusDevice for NullDevice {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        data.fill(0);
        Ok(())
    }

    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        Ok(())
    }
}

impl CountedDevice for NullDevice {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_and_counts() {
        let null = NullDevice::default();
        let mut data = [0xaa; 4];
        null.read(0, 0, &mut data).unwrap();
        null.write(0, 0, &[1]).unwrap();
        null.write(0, 0, &[2]).unwrap();
        assert_eq!(data, [0; 4]);
        assert_eq!((null.counters.reads(), null.counters.writes()), (1, 2));
    }
}
