//! A one-register MMIO device that measures how long a guest takes to boot: the guest's init
//! writes [`BOOT_COMPLETE_SIGNAL`] to it when boot is done, and the device keeps the time elapsed
//! since the VM started. Only the first signal after a start counts, so a guest that signals again
//! (a restarted init, a second script) cannot move the measurement.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};

/// The byte a guest writes at offset 0 to say it has finished booting.
pub const BOOT_COMPLETE_SIGNAL: u8 = 123;
/// The register that takes the signal; the device has no other.
const SIGNAL_OFFSET: u64 = 0;

/// Records the time from the VM's start to the guest's first boot-complete signal.
#[derive(Debug)]
pub struct BootTimer {
    timing: Mutex<BootTiming>,
    /// Accesses served.
    pub counters: AccessCounters,
}

#[derive(Debug, Clone, Copy)]
struct BootTiming {
    start: Instant,
    boot_time: Option<Duration>,
}

impl BootTimer {
    /// A timer that measures from `start`, normally the moment the VM was created.
    pub fn new(start: Instant) -> Self {
        Self { timing: Mutex::new(BootTiming { start, boot_time: None }), counters: AccessCounters::default() }
    }

    /// Measures from `start` again and forgets any boot time recorded: the VM (re)starts now and
    /// its guest boots anew.
    pub fn restart(&self, start: Instant) {
        *self.lock() = BootTiming { start, boot_time: None };
    }

    /// How long the guest took to signal boot completion, if it has since the last (re)start.
    pub fn boot_time(&self) -> Option<Duration> {
        self.lock().boot_time
    }

    /// Takes the boot-complete signal at `now`; a second signal changes nothing.
    fn signal(&self, now: Instant) {
        let mut timing = self.lock();
        if timing.boot_time.is_some() {
            return;
        }
        let elapsed = now.saturating_duration_since(timing.start);
        timing.boot_time = Some(elapsed);
        log::info!("guest boot completed {:.3} ms after the VM started", elapsed.as_secs_f64() * 1e3);
    }

    fn lock(&self) -> MutexGuard<'_, BootTiming> {
        // The state is two plain values, each written whole, so a poisoned lock still holds valid data.
        self.timing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether an access is the boot-complete signal: its byte at offset 0 is the magic value,
/// whatever the width of the write.
fn is_boot_complete_signal(offset: u64, data: &[u8]) -> bool {
    offset == SIGNAL_OFFSET && data.first() == Some(&BOOT_COMPLETE_SIGNAL)
}

impl BusDevice for BootTimer {
    /// Reads return zero: the device has nothing for the guest to read.
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        data.fill(0);
        Ok(())
    }

    /// Records the boot time on the first boot-complete signal; every other write is dropped.
    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        if is_boot_complete_signal(offset, data) {
            self.signal(Instant::now());
        }
        Ok(())
    }
}

impl CountedDevice for BootTimer {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xd000_0000;

    fn started_ago(ago: Duration) -> BootTimer {
        BootTimer::new(Instant::now().checked_sub(ago).unwrap())
    }

    #[test]
    fn records_the_first_signal_only() {
        let timer = started_ago(Duration::from_millis(50));
        assert_eq!(timer.boot_time(), None);
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        let first = timer.boot_time().unwrap();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_secs(60), "{first:?}");
        std::thread::sleep(Duration::from_millis(5));
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        assert_eq!(timer.boot_time(), Some(first));
    }

    #[test]
    fn ignores_other_values_and_offsets() {
        let timer = started_ago(Duration::ZERO);
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL - 1]).unwrap();
        timer.write(BASE, 0, &[0]).unwrap();
        timer.write(BASE, 1, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        timer.write(BASE, 0, &[]).unwrap();
        assert_eq!(timer.boot_time(), None);
        // A wider write whose first byte is the signal is the signal.
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL, 0, 0, 0]).unwrap();
        assert!(timer.boot_time().is_some());
    }

    #[test]
    fn restart_clears_and_measures_from_the_new_start() {
        let timer = started_ago(Duration::from_secs(3600));
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        assert!(timer.boot_time().unwrap() >= Duration::from_secs(3600));
        timer.restart(Instant::now());
        assert_eq!(timer.boot_time(), None);
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        assert!(timer.boot_time().unwrap() < Duration::from_secs(3600));
    }

    #[test]
    fn a_start_in_the_future_records_zero() {
        let timer = BootTimer::new(Instant::now() + Duration::from_secs(60));
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        assert_eq!(timer.boot_time(), Some(Duration::ZERO));
    }

    #[test]
    fn reads_zero_and_counts() {
        let timer = started_ago(Duration::ZERO);
        let mut data = [0xff; 4];
        timer.read(BASE, 0, &mut data).unwrap();
        timer.write(BASE, 0, &[1]).unwrap();
        assert_eq!(data, [0; 4]);
        assert_eq!((timer.counters().reads(), timer.counters().writes()), (1, 1));
    }
}
