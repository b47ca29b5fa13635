//! A minimal MC146818 CMOS real-time clock: enough for a guest to read the wall-clock time at boot
//! and keep a few bytes of NVRAM. There is no alarm, periodic or update interrupt.
//!
//! The guest selects a register through the index port and reads or writes it through the data
//! port. Time registers are computed from the host clock (UTC) on every read, so the guest's clock
//! follows the host's and never needs setting; writes to them are ignored.
//!
//! A snapshot ([`CmosState`]) keeps what the guest programmed, the control registers, alarm
//! bytes and NVRAM, but no time: a restored RTC reads its clock as before, so after a restore, later
//! or in another process, the guest sees the current time, as a PC's RTC shows after a suspend.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, DeviceError};
use crate::devices::{AccessCounters, CountedDevice};
use crate::snapshot::{Persist, StateError};

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
    registers: Mutex<Registers>,
    clock: Clock,
    /// Accesses served.
    pub counters: AccessCounters,
}

struct Registers {
    /// The register the index port selected last.
    index: u8,
    /// NVRAM and the control registers; the time registers' bytes stay unused.
    ram: [u8; NVRAM_SIZE],
}

/// Control registers A-D as firmware leaves them, the rest of the RAM zero.
fn power_on_ram() -> [u8; NVRAM_SIZE] {
    let mut ram = [0; NVRAM_SIZE];
    ram[usize::from(REG_A)] = REG_A_AT_RESET;
    ram[usize::from(REG_B)] = REG_B_AT_RESET;
    ram[usize::from(REG_C)] = REG_C_AT_RESET;
    ram[usize::from(REG_D)] = REG_D_VALID_RAM_AND_TIME;
    ram
}

impl Cmos {
    /// An RTC that tells the host's time.
    pub fn new() -> Self {
        Self::with_clock(host_clock)
    }

    /// An RTC that tells the time `clock` returns, in seconds since the Unix epoch: lets tests and
    /// callers pin or offset the guest's clock.
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self {
            registers: Mutex::new(Registers { index: 0, ram: power_on_ram() }),
            clock: Box::new(clock),
            counters: AccessCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registers> {
        // The state is plain bytes that every update leaves consistent, so a poisoned lock is fine.
        self.registers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_port(&self, registers: &Registers, port: u64) -> Result<u8, DeviceError> {
        match port {
            INDEX_PORT => Ok(FLOATING_BUS),
            DATA_PORT => Ok(self.read_register(registers)),
            _ => Err(outside_ports(port)),
        }
    }

    fn write_port(registers: &mut Registers, port: u64, value: u8) -> Result<(), DeviceError> {
        match port {
            INDEX_PORT => registers.index = value & INDEX_MASK,
            DATA_PORT => write_register(registers, value),
            _ => return Err(outside_ports(port)),
        }
        Ok(())
    }

    fn read_register(&self, registers: &Registers) -> u8 {
        let reg_b = registers.ram[usize::from(REG_B)];
        if is_time_register(registers.index) {
            // Each read takes a fresh time; guests that read several registers re-read until two
            // passes agree, as they must on real hardware around an update.
            let time = CivilTime::from_unix((self.clock)());
            time_register(registers.index, &time, reg_b)
        } else {
            registers.ram[usize::from(registers.index)]
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

/// The saved state of a [`Cmos`]: everything the guest programmed, and no time. A restored RTC
/// reads the time from its clock, so however much later, and in whichever process, the restore
/// happens, the guest sees the current time, as a PC's RTC shows after a suspend. The guest cannot
/// set the time (writes to the time registers are ignored), so there is no offset from the clock
/// to keep either.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct CmosState {
    /// The register the index port selects, 0 to 127.
    pub index: u8,
    /// The 128 bytes of CMOS RAM, by register number: control registers A and B as the guest
    /// programmed them, the alarm bytes and NVRAM. C and D hold this RTC's fixed status, and the
    /// time registers' bytes are unused, since a read takes the time from the clock.
    pub ram: Vec<u8>,
}

impl Default for CmosState {
    /// The RTC at power-on, so that a field an older state lacks takes its power-on value.
    fn default() -> Self {
        Self { index: 0, ram: power_on_ram().to_vec() }
    }
}

impl CmosState {
    /// The registers this state holds, if the RTC could be in it.
    fn registers(&self) -> Result<Registers, StateError> {
        let invalid = |problem: String| Err(StateError::new(format!("CMOS: {problem}")));
        let Ok(ram) = <[u8; NVRAM_SIZE]>::try_from(self.ram.as_slice()) else {
            return invalid(format!("the state holds {} bytes of RAM, not {NVRAM_SIZE}", self.ram.len()));
        };
        if self.index & !INDEX_MASK != 0 {
            return invalid(format!("register index {:#x} is beyond the {NVRAM_SIZE} registers", self.index));
        }
        // Bits that neither this RTC nor the guest ever changes.
        if ram[usize::from(REG_A)] & REG_A_UPDATE_IN_PROGRESS != 0 {
            return invalid("register A has update-in-progress set, which this RTC never shows".into());
        }
        for (name, register, fixed) in [("C", REG_C, REG_C_AT_RESET), ("D", REG_D, REG_D_VALID_RAM_AND_TIME)] {
            let value = ram[usize::from(register)];
            if value != fixed {
                return invalid(format!(
                    "register {name} holds {value:#04x}, but in this RTC it is always {fixed:#04x}"
                ));
            }
        }
        Ok(Registers { index: self.index, ram })
    }
}

impl Persist for Cmos {
    type State = CmosState;

    fn save(&self) -> CmosState {
        let registers = self.lock();
        CmosState { index: registers.index, ram: registers.ram.to_vec() }
    }

    fn restore(&self, state: &CmosState) -> Result<(), StateError> {
        let registers = state.registers()?;
        *self.lock() = registers;
        Ok(())
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
fn write_register(registers: &mut Registers, value: u8) {
    let index = registers.index;
    match index {
        _ if is_time_register(index) => {}
        REG_C | REG_D => {}
        REG_A => registers.ram[usize::from(REG_A)] = value & !REG_A_UPDATE_IN_PROGRESS,
        _ => registers.ram[usize::from(index)] = value,
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
    crate::persist_on_bus!();

    /// Reads each byte of the access from its own port, as the chipset splits a wide access.
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.counters.count_read();
        let registers = self.lock();
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            *byte = self.read_port(&registers, port)?;
        }
        Ok(())
    }

    /// Writes each byte of the access to its own port: a word written at the index port selects
    /// a register and stores its high byte there.
    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.counters.count_write();
        let mut registers = self.lock();
        for (port, &value) in (offset..).zip(data) {
            Self::write_port(&mut registers, port, value)?;
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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

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

    /// An RTC whose clock reads `now`, which a test can move.
    fn with_shared_clock(now: &Arc<AtomicU64>) -> Cmos {
        let now = now.clone();
        Cmos::with_clock(move || now.load(Ordering::SeqCst))
    }

    fn round_trip(state: &CmosState) -> CmosState {
        serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap()
    }

    /// What the data port returns for the register selected now, without selecting one.
    fn read_selected(cmos: &Cmos) -> u8 {
        let mut data = [0];
        cmos.read(CMOS_PORT_BASE, DATA_PORT, &mut data).unwrap();
        data[0]
    }

    fn all_registers(cmos: &Cmos) -> Vec<u8> {
        (0..128).map(|index| read(cmos, index)).collect()
    }

    /// Programs binary 12-hour mode, a rate in A, an alarm at 06:30:15 and some NVRAM, and leaves
    /// register 0x40 selected.
    fn program(cmos: &Cmos) {
        write(cmos, REG_A, 0x2f);
        write(cmos, REG_B, REG_B_BINARY);
        for (alarm, value) in [(0x01, 15), (0x03, 30), (0x05, 6)] {
            write(cmos, alarm, value);
        }
        for index in 0x0e..0x40 {
            write(cmos, index, index.wrapping_mul(7));
        }
        write(cmos, 0x40, 0xc3);
    }

    #[test]
    fn restored_rtc_answers_as_saved() {
        let cmos = at(LEAP_DAY_AFTERNOON);
        program(&cmos);
        let state = round_trip(&cmos.save());

        let fresh = at(LEAP_DAY_AFTERNOON);
        fresh.restore(&state).unwrap();
        assert_eq!(read_selected(&fresh), 0xc3, "the selected register stays selected");
        assert_eq!(read_selected(&cmos), 0xc3);
        let registers = all_registers(&fresh);
        assert_eq!(registers, all_registers(&cmos));
        assert_eq!(registers[..0x0e], [7, 15, 45, 30, 1 | HOUR_PM, 6, 5, 29, 2, 24, 0x2f, REG_B_BINARY, 0, 0x80]);
        assert_eq!(registers[0x32], 20);

        for device in [&cmos, &fresh] {
            write(device, REG_B, REG_B_24_HOUR);
            write(device, 0x41, 0x99);
            assert_eq!(read(device, REG_HOURS), 0x13);
        }
        assert_eq!(all_registers(&fresh), all_registers(&cmos));
        assert_eq!(fresh.save(), cmos.save());
    }

    #[test]
    fn restored_rtc_tells_the_current_time() {
        let now = Arc::new(AtomicU64::new(LEAP_DAY_AFTERNOON));
        let cmos = with_shared_clock(&now);
        program(&cmos);
        let state = round_trip(&cmos.save());
        // Restored a day and two hours later: in place, and into a new RTC (another process).
        now.fetch_add(SECONDS_PER_DAY + 2 * 3600, Ordering::SeqCst);
        let fresh = with_shared_clock(&now);
        fresh.restore(&state).unwrap();
        cmos.restore(&state).unwrap();
        for device in [&cmos, &fresh] {
            // Friday 2024-03-01 15:45:07, in the binary 12-hour mode the guest programmed.
            assert_eq!(time_fields(device), [7, 45, 3 | HOUR_PM, 6, 1, 3, 24, 20]);
            assert_eq!([0x01, 0x03, 0x05].map(|alarm| read(device, alarm)), [15, 30, 6], "the alarm stays");
        }
    }

    #[test]
    fn states_the_rtc_cannot_be_in_are_refused() {
        let cmos = at(LEAP_DAY_AFTERNOON);
        program(&cmos);
        let before = cmos.save();
        let with_ram = |index: u8, value: u8| {
            let mut state = before.clone();
            state.ram[usize::from(index)] = value;
            state
        };
        let refused = [
            (CmosState { ram: vec![0; 64], ..before.clone() }, "64 bytes of RAM"),
            (CmosState { index: 0x80, ..before.clone() }, "index 0x80"),
            (with_ram(REG_A, 0xa6), "register A has update-in-progress set"),
            (with_ram(REG_C, 0x10), "register C holds 0x10"),
            (with_ram(REG_D, 0x00), "register D holds 0x00"),
        ];
        for (state, problem) in refused {
            let err = cmos.restore(&state).unwrap_err();
            assert!(err.0.starts_with("CMOS: ") && err.0.contains(problem), "{err}");
        }
        assert_eq!(cmos.save(), before, "a refused state changes nothing");
        assert_eq!(read_selected(&cmos), 0xc3);
    }

    #[test]
    fn a_state_missing_fields_takes_power_on_values() {
        let cmos = at(0);
        write(&cmos, 0x40, 0x12);
        let state: CmosState = serde_json::from_str(r#"{"index": 16}"#).unwrap();
        cmos.restore(&state).unwrap();
        assert_eq!(read_selected(&cmos), 0);
        assert_eq!([REG_A, REG_B, REG_C, REG_D, 0x40].map(|r| read(&cmos, r)), [0x26, 0x02, 0x00, 0x80, 0x00]);
    }
}
