//! A minimal MC146818 CMOS real-time clock: enough for a guest to read the wall-clock time at boot
//! and keep a few bytes of NVRAM. There is no alarm, periodic or update interrupt.
//!
//! The guest selects a register through the index port and reads or writes it through the data
//! port. Time registers are computed from the host clock (UTC) on every read, so the guest's clock
//! follows the host's and never needs setting; writes to them are ignored.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};

/// Where PCs put the RTC's ports: the index port at 0x70, the data port at 0x71.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// The index port and the data port.
pub const CMOS_PORT_SIZE: u64 = 2;

const INDEX_PORT: u64 = 0;
const DATA_PORT: u64 = 1;
/// On a PC, bit 7 of the index masks NMIs; it is not part of the register number.
const INDEX_MASK: u8 = 0x7f;
const NVRAM_SIZE: usize = 128;
/// What a read of the write-only index port returns: nothing drives the bus.
const FLOATING_BUS: u8 = 0xff;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Not part of the MC146818 itself; PC firmware keeps the century here.
const REG_CENTURY: u8 = 0x32;

/// Set while the chip copies a new second into the time registers; guests wait for it to clear.
const REG_A_UPDATE_IN_PROGRESS: u8 = 1 << 7;
/// Divider 010 (32.768 kHz time base) and rate 0110 (1024 Hz), what firmware leaves programmed.
const REG_A_AT_RESET: u8 = 0x26;
/// Time registers hold binary values instead of BCD.
const REG_B_BINARY: u8 = 1 << 2;
/// Hours count 0-23 instead of 1-12 with a PM flag.
const REG_B_24_HOUR: u8 = 1 << 1;
const REG_B_AT_RESET: u8 = REG_B_24_HOUR;
/// No interrupt is ever pending.
const REG_C_AT_RESET: u8 = 0;
/// The battery never ran down: RAM and time are valid.
const REG_D_VALID_RAM_AND_TIME: u8 = 1 << 7;
/// In 12-hour mode, bit 7 of the hours register marks the afternoon.
const HOUR_PM: u8 = 1 << 7;

const SECONDS_PER_DAY: u64 = 86_400;
/// Any 400 consecutive Gregorian years have the same number of days, leap days included.
const DAYS_PER_400_YEARS: u64 = 146_097;
const EPOCH_YEAR: u64 = 1970;
/// 1970-01-01 was a Thursday, day 5 when Sunday is day 1 as the RTC counts.
const EPOCH_DAY_OF_WEEK: u64 = 5;

/// A source of the current time, in seconds since the Unix epoch (UTC).
type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// An MC146818 RTC with 128 bytes of CMOS RAM, reading the time from a clock the caller can choose.
pub struct Cmos {
    state: Mutex<CmosState>,
    clock: Clock,
    /// Accesses served.
    pub counters: AccessCounters,
}

struct CmosState {
    /// The register the index port selected last.
    index: u8,
    /// NVRAM and the control registers; the time registers' bytes stay unused.
    ram: [u8; NVRAM_SIZE],
}

impl Cmos {
    /// An RTC that tells the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_clock)
    }

    /// An RTC that tells the time `clock` returns, in seconds since the Unix epoch: lets tests and
    /// callers pin or offset the guest's clock.
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        let mut ram = [0; NVRAM_SIZE];
        ram[usize::from(REG_A)] = REG_A_AT_RESET;
        ram[usize::from(REG_B)] = REG_B_AT_RESET;
        ram[usize::from(REG_C)] = REG_C_AT_RESET;
        ram[usize::from(REG_D)] = REG_D_VALID_RAM_AND_TIME;
        Self {
            state: Mutex::new(CmosState { index: 0, ram }),
            clock: Box::new(clock),
            counters: AccessCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CmosState> {
        // The state is plain bytes that every update leaves consistent, so a poisoned lock is fine.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_port(&self, state: &CmosState, port: u64) -> Result<u8, DeviceError> {
        match port {
            INDEX_PORT => Ok(FLOATING_BUS),
            DATA_PORT => Ok(self.read_register(state)),
            _ => Err(outside_ports(port)),
        }
    }

    fn write_port(state: &mut CmosState, port: u64, value: u8) -> Result<(), DeviceError> {
        match port {
            INDEX_PORT => state.index = value & INDEX_MASK,
            DATA_PORT => write_register(state, value),
            _ => return Err(outside_ports(port)),
        }
        Ok(())
    }

    fn read_register(&self, state: &CmosState) -> u8 {
        let reg_b = state.ram[usize::from(REG_B)];
        if is_time_register(state.index) {
            // Each read takes a fresh time; guests that read several registers re-read until two
            // passes agree, as they must on real hardware around an update.
            let time = CivilTime::from_unix((self.clock)());
            time_register(state.index, &time, reg_b)
        } else {
            state.ram[usize::from(state.index)]
        }
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Cmos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmos").field("index", &self.lock().index).field("counters", &self.counters).finish()
    }
}

fn host_clock() -> u64 {
    // A host clock set before 1970 reads as the epoch rather than failing the guest's read.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

fn outside_ports(port: u64) -> DeviceError {
    DeviceError::Failed(format!(
        "CMOS port offset {port:#x} does not exist; map the RTC with {CMOS_PORT_SIZE} ports at {CMOS_PORT_BASE:#x}"
    ))
}

fn is_time_register(index: u8) -> bool {
    matches!(
        index,
        REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH | REG_MONTH | REG_YEAR | REG_CENTURY
    )
}

/// Stores a byte the guest wrote. Time registers ignore it (the time is the host's); C and D are
/// status the guest cannot change; the update-in-progress flag of A is read-only.
fn write_register(state: &mut CmosState, value: u8) {
    let index = state.index;
    match index {
        _ if is_time_register(index) => {}
        REG_C | REG_D => {}
        REG_A => state.ram[usize::from(REG_A)] = value & !REG_A_UPDATE_IN_PROGRESS,
        _ => state.ram[usize::from(index)] = value,
    }
}

fn is_binary(reg_b: u8) -> bool {
    reg_b & REG_B_BINARY != 0
}

fn is_24_hour(reg_b: u8) -> bool {
    reg_b & REG_B_24_HOUR != 0
}

/// Two decimal digits packed in one byte, tens in the high nibble.
fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// A value of 0-99 in the format register B selects.
fn encode(value: u8, reg_b: u8) -> u8 {
    if is_binary(reg_b) {
        value
    } else {
        bcd(value)
    }
}

fn encode_hours(hour: u8, reg_b: u8) -> u8 {
    if is_24_hour(reg_b) {
        return encode(hour, reg_b);
    }
    let clock_hour = match hour % 12 {
        0 => 12,
        h => h,
    };
    let pm = if hour >= 12 { HOUR_PM } else { 0 };
    encode(clock_hour, reg_b) | pm
}

/// The value of time register `index` at `time`.
fn time_register(index: u8, time: &CivilTime, reg_b: u8) -> u8 {
    let value = match index {
        REG_HOURS => return encode_hours(time.hour, reg_b),
        REG_SECONDS => time.second,
        REG_MINUTES => time.minute,
        REG_DAY_OF_WEEK => time.day_of_week,
        REG_DAY_OF_MONTH => time.day,
        REG_MONTH => time.month,
        REG_YEAR => (time.year % 100) as u8,
        REG_CENTURY => (time.year / 100 % 100) as u8,
        _ => unreachable!("register {index:#x} is not a time register"),
    };
    encode(value, reg_b)
}

/// A UTC date and time broken into the fields the RTC keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: u64,
    /// 1-12.
    month: u8,
    /// 1-31.
    day: u8,
    /// 1-7, Sunday first.
    day_of_week: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl CivilTime {
    fn from_unix(seconds: u64) -> Self {
        let days = seconds / SECONDS_PER_DAY;
        let in_day = seconds % SECONDS_PER_DAY;
        let (year, month, day) = civil_date(days);
        Self {
            year,
            month,
            day,
            day_of_week: ((days + EPOCH_DAY_OF_WEEK - 1) % 7 + 1) as u8,
            hour: (in_day / 3600) as u8,
            minute: (in_day / 60 % 60) as u8,
            second: (in_day % 60) as u8,
        }
    }
}

fn is_leap_year(year: u64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_year(year: u64) -> u64 {
    if is_leap_year(year) {
        366
    } else {
        365
    }
}

fn days_in_month(year: u64, month: u8) -> u64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The Gregorian (year, month, day) `days` days after 1970-01-01. Whole 400-year cycles are
/// skipped at once, so at most 400 years and 12 months are walked one by one.
fn civil_date(days: u64) -> (u64, u8, u8) {
    let mut year = EPOCH_YEAR + 400 * (days / DAYS_PER_400_YEARS);
    let mut left = days % DAYS_PER_400_YEARS;
    while left >= days_in_year(year) {
        left -= days_in_year(year);
        year += 1;
    }
    let mut month = 1;
    while left >= days_in_month(year, month) {
        left -= days_in_month(year, month);
        month += 1;
    }
    (year, month, left as u8 + 1)
}

impl BusDevice for Cmos {
    /// Reads each byte of the access from its own port, as the chipset splits a wide access.
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        let state = self.lock();
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            *byte = self.read_port(&state, port)?;
        }
        Ok(())
    }

    /// Writes each byte of the access to its own port: a word written at the index port selects
    /// a register and stores its high byte there.
    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        let mut state = self.lock();
        for (port, &value) in (offset..).zip(data) {
            Self::write_port(&mut state, port, value)?;
        }
        Ok(())
    }
}

impl CountedDevice for Cmos {
    fn counters(&self) -> &AccessCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY_AFTERNOON: u64 = 1_709_214_307;
    /// 1999-12-31 23:59:59 UTC, a Friday.
    const MILLENNIUM_EVE: u64 = 946_684_799;

    fn at(seconds: u64) -> Cmos {
        Cmos::with_clock(move || seconds)
    }

    fn read(cmos: &Cmos, index: u8) -> u8 {
        cmos.write(CMOS_PORT_BASE, INDEX_PORT, &[index]).unwrap();
        let mut data = [0];
        cmos.read(CMOS_PORT_BASE, DATA_PORT, &mut data).unwrap();
        data[0]
    }

    fn write(cmos: &Cmos, index: u8, value: u8) {
        cmos.write(CMOS_PORT_BASE, INDEX_PORT, &[index]).unwrap();
        cmos.write(CMOS_PORT_BASE, DATA_PORT, &[value]).unwrap();
    }

    /// Seconds, minutes, hours, day of week, day of month, month, year, century.
    fn time_fields(cmos: &Cmos) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|index| read(cmos, index))
    }

    #[test]
    fn reads_a_known_time_in_bcd() {
        assert_eq!(time_fields(&at(LEAP_DAY_AFTERNOON)), [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
        assert_eq!(time_fields(&at(MILLENNIUM_EVE)), [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]);
        assert_eq!(time_fields(&at(0)), [0, 0, 0, 0x05, 0x01, 0x01, 0x70, 0x19]);
    }

    #[test]
    fn converts_dates_across_leap_rules() {
        let date = |t: u64| {
            let c = CivilTime::from_unix(t);
            (c.year, c.month, c.day, c.day_of_week, c.hour)
        };
        assert_eq!(date(951_868_800), (2000, 3, 1, 4, 0), "2000 is a leap year");
        assert_eq!(date(4_107_585_600), (2100, 3, 1, 2, 12), "2100 is not");
        assert_eq!(date(LEAP_DAY_AFTERNOON - 14 * 3600), (2024, 2, 28, 4, 23));
        let far = CivilTime::from_unix(u64::MAX);
        assert!((1..=12).contains(&far.month) && (1..=31).contains(&far.day), "no overflow at the far end: {far:?}");
    }

    #[test]
    fn binary_mode_and_12_hour_mode_follow_register_b() {
        let cmos = at(LEAP_DAY_AFTERNOON);
        write(&cmos, REG_B, REG_B_24_HOUR | REG_B_BINARY);
        assert_eq!(time_fields(&cmos), [7, 45, 13, 5, 29, 2, 24, 20]);
        write(&cmos, REG_B, REG_B_BINARY);
        assert_eq!(read(&cmos, REG_HOURS), 1 | HOUR_PM);
        write(&cmos, REG_B, 0);
        assert_eq!(read(&cmos, REG_HOURS), 0x01 | HOUR_PM);
    }

    #[test]
    fn twelve_hour_mode_names_midnight_and_noon_twelve() {
        let hours = |hour: u64| {
            let cmos = at(hour * 3600);
            write(&cmos, REG_B, 0);
            read(&cmos, REG_HOURS)
        };
        assert_eq!(hours(0), 0x12);
        assert_eq!(hours(11), 0x11);
        assert_eq!(hours(12), 0x12 | HOUR_PM);
        assert_eq!(hours(23), 0x11 | HOUR_PM);
    }

    #[test]
    fn status_registers_start_as_after_firmware_set_up() {
        let cmos = at(0);
        assert_eq!([REG_A, REG_B, REG_C, REG_D].map(|r| read(&cmos, r)), [0x26, 0x02, 0x00, 0x80]);
        write(&cmos, REG_A, 0xff);
        assert_eq!(read(&cmos, REG_A), 0x7f, "update in progress is never set");
        write(&cmos, REG_C, 0xff);
        write(&cmos, REG_D, 0x00);
        assert_eq!((read(&cmos, REG_C), read(&cmos, REG_D)), (0x00, 0x80));
    }

    #[test]
    fn nmi_disable_bit_does_not_change_the_register() {
        let cmos = at(LEAP_DAY_AFTERNOON);
        write(&cmos, 0x80 | 0x20, 0xab);
        assert_eq!(read(&cmos, 0x20), 0xab);
        assert_eq!(read(&cmos, 0x80 | REG_MINUTES), 0x45);
    }

    #[test]
    fn nvram_keeps_what_the_guest_wrote() {
        let cmos = at(0);
        let storage: Vec<u8> = (0..128u8).filter(|&i| !is_time_register(i) && !(REG_A..=REG_D).contains(&i)).collect();
        assert_eq!(storage.len(), 128 - 8 - 4);
        for &index in &storage {
            write(&cmos, index, index ^ 0x5a);
        }
        for &index in &storage {
            assert_eq!(read(&cmos, index), index ^ 0x5a, "register {index:#x}");
        }
    }

    #[test]
    fn writes_to_time_registers_are_ignored() {
        let cmos = at(LEAP_DAY_AFTERNOON);
        for index in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
            write(&cmos, index, 0x99);
        }
        assert_eq!(time_fields(&cmos), [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
    }

    #[test]
    fn wide_accesses_reach_both_ports() {
        let cmos = at(0);
        cmos.write(CMOS_PORT_BASE, INDEX_PORT, &[0x40, 0x77]).unwrap();
        assert_eq!(read(&cmos, 0x40), 0x77);
        let mut data = [0; 2];
        cmos.read(CMOS_PORT_BASE, INDEX_PORT, &mut data).unwrap();
        assert_eq!(data, [FLOATING_BUS, 0x77]);
        assert!(cmos.write(CMOS_PORT_BASE, DATA_PORT, &[0, 0]).is_err());
        assert!(cmos.read(CMOS_PORT_BASE, 2, &mut [0]).is_err());
    }

    #[test]
    fn host_clock_reads_a_plausible_date_and_counts_accesses() {
        let cmos = Cmos::new();
        let [.., month, year, century] = time_fields(&cmos);
        assert_eq!(century, 0x20);
        assert!(year >= 0x24 && (0x01..=0x12).contains(&month));
        assert_eq!((cmos.counters().reads(), cmos.counters().writes()), (8, 8));
    }
}
