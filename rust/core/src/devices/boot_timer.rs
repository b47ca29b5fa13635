//! A one-register MMIO device that measures how long a guest takes to boot: the guest's init
//! writes [`BOOT_COMPLETE_SIGNAL`] to it when boot is done, and the device keeps the time elapsed
//! since the VM started. Only the first signal after a start counts, so a guest that signals again
//! (a restarted init, a second script) cannot move the measurement.
//!
//! A snapshot keeps the boot time if there is one, and otherwise how long the VM had been booting
//! when it was saved: a restored timer reports the same boot time, or goes on measuring from where
//! the saved one stopped, so the time between save and restore, when the guest did not run, does
//! not count.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};
use crate::snapshot::{Persist, StateError};

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

/// The saved state of a [`BootTimer`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct BootTimerState {
    /// How long the guest took to signal boot completion, if it had when the state was saved.
    pub boot_time: Option<Duration>,
    /// The time from the (re)start to the save. A restored timer measures on from here: if the
    /// guest had not yet signalled, its boot time counts this much plus the time it runs after
    /// the restore.
    pub since_start: Duration,
}

impl Persist for BootTimer {
    type State = BootTimerState;

    fn save(&self) -> BootTimerState {
        let timing = *self.lock();
        BootTimerState {
            boot_time: timing.boot_time,
            since_start: Instant::now().saturating_duration_since(timing.start),
        }
    }

    fn restore(&self, state: &BootTimerState) -> Result<(), StateError> {
        if let Some(boot_time) = state.boot_time.filter(|&boot_time| boot_time > state.since_start) {
            return Err(StateError::new(format!(
                "boot timer: the boot completed after {boot_time:?}, later than the save {:?} after the start",
                state.since_start
            )));
        }
        let start = Instant::now().checked_sub(state.since_start).ok_or_else(|| {
            StateError::new(format!(
                "boot timer: a start {:?} ago is further back than this host's clock reaches",
                state.since_start
            ))
        })?;
        *self.lock() = BootTiming { start, boot_time: state.boot_time };
        Ok(())
    }
}

/// Whether an access is the boot-complete signal: its byte at offset 0 is the magic value,
/// whatever the width of the write.
fn is_boot_complete_signal(offset: u64, data: &[u8]) -> bool {
    offset == SIGNAL_OFFSET && data.first() == Some(&BOOT_COMPLETE_SIGNAL)
}

impl BusDevice for BootTimer {
    crate::persist_on_bus!();

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

    fn round_trip(state: &BootTimerState) -> BootTimerState {
        serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap()
    }

    #[test]
    fn a_restored_timer_reports_the_saved_boot_time() {
        let timer = started_ago(Duration::from_millis(50));
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        let state = round_trip(&timer.save());

        let fresh = started_ago(Duration::ZERO);
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.boot_time(), timer.boot_time());
        for device in [&timer, &fresh] {
            device.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
            let mut data = [0xff];
            device.read(BASE, 0, &mut data).unwrap();
            assert_eq!(data, [0]);
        }
        assert_eq!(fresh.boot_time(), timer.boot_time(), "a later signal moves neither");
    }

    #[test]
    fn a_restored_timer_measures_on_from_the_save() {
        let timer = started_ago(Duration::from_secs(2));
        let state = round_trip(&timer.save());
        assert_eq!(state.boot_time, None);
        assert!(state.since_start >= Duration::from_secs(2));

        let fresh = started_ago(Duration::from_secs(3600));
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.boot_time(), None);
        fresh.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        let boot_time = fresh.boot_time().unwrap();
        assert!(boot_time >= Duration::from_secs(2) && boot_time < Duration::from_secs(60), "{boot_time:?}");
    }

    #[test]
    fn impossible_states_are_refused() {
        let timer = started_ago(Duration::from_millis(10));
        timer.write(BASE, 0, &[BOOT_COMPLETE_SIGNAL]).unwrap();
        let before = timer.boot_time();
        let state = BootTimerState { boot_time: Some(Duration::from_secs(5)), since_start: Duration::from_secs(1) };
        let err = timer.restore(&state).unwrap_err();
        assert!(err.0.starts_with("boot timer:") && err.0.contains("later than the save"), "{err}");
        let state = BootTimerState { boot_time: None, since_start: Duration::MAX };
        let err = timer.restore(&state).unwrap_err();
        assert!(err.0.starts_with("boot timer:") && err.0.contains("clock"), "{err}");
        assert_eq!(timer.boot_time(), before, "a refused state changes nothing");
    }
}
