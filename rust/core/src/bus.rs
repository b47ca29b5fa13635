//! One bus type for port I/O and for MMIO: a map from non-overlapping address ranges to devices.
//!
//! Lookup is `O(log n)`: a binary search of a vector of ranges sorted by base, which for the
//! handful of ranges a VM maps is a few compares in one cache line or two, on every exit.
//! An access is dispatched only when it lies entirely inside one range. One that reaches no range
//! is unhandled and left to the caller's policy; one that a range covers only in part is an
//! error (see [`Bus::read`]).

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use crate::snapshot::{DeviceState, StateError};

/// Why a device access ends the run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// The device could not serve the access; the run ends with
    /// [`ExitReason::DeviceError`](crate::ExitReason::DeviceError).
    #[error("{0}")]
    Failed(String),
    /// The access is how the guest asks for a reset (the i8042 reset command, for instance); the
    /// run ends with [`ExitReason::Reset`](crate::ExitReason::Reset).
    #[error("the guest asked for a reset")]
    Reset,
    /// The access is how the guest asks to power off (the ACPI sleep control register, for
    /// instance); the run ends with [`ExitReason::PowerOff`](crate::ExitReason::PowerOff).
    #[error("the guest asked to power off")]
    PowerOff,
}

/// Something that serves reads and writes on a bus.
///
/// Methods take `&self` so that several vCPUs can reach one device at once; a device with
/// mutable state keeps it behind its own lock. `base` is where the device's range starts and
/// `offset` is the access address relative to it.
pub trait BusDevice: Send + Sync {
    /// Fills `data` with the value read at `base + offset` (`data.len()` is the access size).
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// Accepts the bytes the guest wrote at `base + offset`.
    fn write(&self, base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// The device's state for a snapshot; `None` for a device that keeps none, or keeps it
    /// elsewhere (one served by an embedder's callbacks, whose state is the embedder's).
    fn save_state(&self) -> Option<DeviceState> {
        None
    }

    /// Puts back a state [`save_state`](Self::save_state) returned, while the VM is stopped.
    fn restore_state(&self, state: &DeviceState) -> Result<(), StateError> {
        Err(StateError::new(format!("this device keeps no state, but a {} was saved here", state.kind())))
    }
}

/// A non-empty address range `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// A range of `len` bytes from `base`; `None` when it is empty or runs past `u64::MAX`.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        (len > 0 && base.checked_add(len - 1).is_some()).then_some(Self { base, len })
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of addresses.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a range has at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    /// Whether `[addr, addr + size)` lies entirely inside this range.
    pub fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.base && size <= self.len && addr - self.base <= self.len - size
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.base, self.last())
    }
}

/// Why a device could not be put on a bus.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BusError {
    /// The new range shares addresses with one already mapped.
    #[error("range {new} overlaps {existing}, which is already mapped")]
    Overlap {
        /// The range being added.
        new: BusRange,
        /// The range in the way.
        existing: BusRange,
    },
    /// The range does not fit the address space (ports end at 0xffff).
    #[error("range {0} is outside the address space")]
    OutsideSpace(BusRange),
    /// Nothing is mapped at the address given for removal.
    #[error("nothing is mapped at {0:#x}")]
    NotMapped(u64),
}

/// Address ranges mapped to devices. Cloning shares the map itself (each vCPU of a run holds a
/// clone, so a run's start copies nothing); a change to a shared map makes a new one.
#[derive(Clone)]
pub struct Bus {
    /// Sorted by base; the ranges do not overlap.
    devices: Arc<[(BusRange, Arc<dyn BusDevice>)]>,
}

impl Default for Bus {
    fn default() -> Self {
        Self { devices: Arc::new([]) }
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Index of the first range whose base is above `addr`.
    fn after(&self, addr: u64) -> usize {
        self.devices.partition_point(|(range, _)| range.base <= addr)
    }

    /// Maps `device` at `range`, refusing a range that overlaps one already mapped.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let at = self.after(range.last());
        if let Some((existing, _)) = at.checked_sub(1).map(|i| &self.devices[i]).filter(|(r, _)| r.overlaps(&range)) {
            return Err(BusError::Overlap { new: range, existing: *existing });
        }
        self.change(|devices| devices.insert(at, (range, device)));
        Ok(())
    }

    /// Unmaps the range that starts at `base` and returns its device.
    pub fn remove(&mut self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let index =
            self.devices.binary_search_by_key(&base, |(range, _)| range.base).map_err(|_| BusError::NotMapped(base))?;
        Ok(self.change(|devices| devices.remove(index).1))
    }

    /// Applies `f` to a copy of the map, which then replaces it.
    fn change<R>(&mut self, f: impl FnOnce(&mut Vec<(BusRange, Arc<dyn BusDevice>)>) -> R) -> R {
        let mut devices = self.devices.to_vec();
        let result = f(&mut devices);
        self.devices = devices.into();
        result
    }

    /// The ranges mapped, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = BusRange> + '_ {
        self.devices.iter().map(|(range, _)| *range)
    }

    /// The devices mapped, with their ranges, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (BusRange, &Arc<dyn BusDevice>)> + '_ {
        self.devices.iter().map(|(range, device)| (*range, device))
    }

    /// The device whose range holds all of `[addr, addr + size)`.
    #[inline]
    pub fn resolve(&self, addr: u64, size: u64) -> Option<(BusRange, &Arc<dyn BusDevice>)> {
        let (range, device) = self.devices.get(self.after(addr).checked_sub(1)?)?;
        range.contains(addr, size).then_some((*range, device))
    }

    /// A range that `[addr, addr + size)` overlaps without lying inside it.
    fn straddled(&self, addr: u64, size: u64) -> Option<BusRange> {
        let access = BusRange::new(addr, size)?;
        let (range, _) = self.devices.get(self.after(access.last()).checked_sub(1)?)?;
        (range.overlaps(&access) && !range.contains(addr, size)).then_some(*range)
    }

    /// Reads through the device at `addr`; `Ok(false)` when nothing is mapped there.
    ///
    /// An access that a range covers only in part (a 4-byte `in` from a 1-port range, say) fails
    /// rather than being dropped or split: the device would get bytes outside the range it
    /// claimed, or miss part of the access, and either goes unnoticed; failing names the access
    /// and the range, so that the range can be made to fit.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<bool, DeviceError> {
        match self.resolve(addr, data.len() as u64) {
            Some((range, device)) => device.read(range.base, addr - range.base, data).map(|()| true),
            None => self.outside(addr, data.len(), "read from"),
        }
    }

    /// Writes through the device at `addr`; `Ok(false)` when nothing is mapped there. An access
    /// that a range covers only in part fails, as for [`read`](Self::read).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<bool, DeviceError> {
        match self.resolve(addr, data.len() as u64) {
            Some((range, device)) => device.write(range.base, addr - range.base, data).map(|()| true),
            None => self.outside(addr, data.len(), "write to"),
        }
    }

    /// The result of an access no range holds: unhandled, or an error if it straddles a range.
    fn outside(&self, addr: u64, size: usize, access: &str) -> Result<bool, DeviceError> {
        match self.straddled(addr, size as u64) {
            Some(range) => Err(DeviceError::Failed(format!(
                "{size}-byte {access} {addr:#x} is only partly inside the mapped range {range}"
            ))),
            None => Ok(false),
        }
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ranges()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Scratchpad;

    fn range(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len).unwrap()
    }

    #[test]
    fn range_rejects_empty_and_overflow() {
        assert!(BusRange::new(0x10, 0).is_none());
        assert!(BusRange::new(u64::MAX, 2).is_none());
        assert_eq!(BusRange::new(u64::MAX, 1).unwrap().last(), u64::MAX);
        assert_eq!(BusRange::new(0, u64::MAX).unwrap().last(), u64::MAX - 1);
    }

    #[test]
    fn range_contains_whole_accesses_only() {
        let r = range(0x100, 0x10);
        assert!(r.contains(0x100, 1));
        assert!(r.contains(0x10c, 4));
        assert!(!r.contains(0x10d, 4));
        assert!(!r.contains(0xff, 1));
        assert!(!r.contains(0x100, 0x11));
        assert!(!r.contains(0x110, 1));
    }

    #[test]
    fn insert_rejects_every_kind_of_overlap() {
        let mut bus = Bus::new();
        bus.insert(range(0x100, 0x10), Arc::new(Scratchpad::new(0x10).unwrap())).unwrap();
        for (base, len) in [(0x100, 1), (0xf0, 0x11), (0x10f, 4), (0x104, 2), (0x0, 0x1000)] {
            let err = bus.insert(range(base, len), Arc::new(Scratchpad::new(1).unwrap())).unwrap_err();
            assert_eq!(err, BusError::Overlap { new: range(base, len), existing: range(0x100, 0x10) });
        }
        // Neighbours on both sides are fine.
        bus.insert(range(0xf0, 0x10), Arc::new(Scratchpad::new(0x10).unwrap())).unwrap();
        bus.insert(range(0x110, 1), Arc::new(Scratchpad::new(1).unwrap())).unwrap();
        assert_eq!(bus.ranges().map(|r| r.base()).collect::<Vec<_>>(), [0xf0, 0x100, 0x110]);
    }

    #[test]
    fn dispatch_reaches_the_right_device_with_its_offset() {
        let mut bus = Bus::new();
        let low = Arc::new(Scratchpad::new(0x10).unwrap());
        let high = Arc::new(Scratchpad::new(0x10).unwrap());
        bus.insert(range(0x1000, 0x10), low.clone()).unwrap();
        bus.insert(range(0x2000, 0x10), high.clone()).unwrap();

        assert!(bus.write(0x2004, &[1, 2, 3, 4]).unwrap());
        assert_eq!(&high.contents()[4..8], &[1, 2, 3, 4]);
        assert_eq!(low.contents(), vec![0; 0x10]);

        let mut data = [0u8; 2];
        assert!(bus.read(0x2005, &mut data).unwrap());
        assert_eq!(data, [2, 3]);
    }

    #[test]
    fn accesses_outside_ranges_are_unhandled() {
        let mut bus = Bus::new();
        bus.insert(range(0x1000, 0x10), Arc::new(Scratchpad::new(0x10).unwrap())).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xffc, &mut data).unwrap());
        assert!(!bus.write(0x1010, &data).unwrap());
        assert!(!bus.read(u64::MAX - 3, &mut data).unwrap());
        assert!(!Bus::new().read(0, &mut data).unwrap());
    }

    #[test]
    fn accesses_straddling_a_range_fail() {
        let mut bus = Bus::new();
        bus.insert(range(0x1000, 0x10), Arc::new(Scratchpad::new(0x10).unwrap())).unwrap();
        let mut data = [0u8; 4];
        for addr in [0xffd, 0x100e, 0x100f] {
            let Err(DeviceError::Failed(message)) = bus.read(addr, &mut data) else { panic!("{addr:#x}") };
            assert!(message.contains("only partly inside the mapped range 0x1000..=0x100f"), "{message}");
            assert!(bus.write(addr, &data).is_err());
        }
    }

    #[test]
    fn remove_unmaps_only_an_exact_base() {
        let mut bus = Bus::new();
        bus.insert(range(0x1000, 0x10), Arc::new(Scratchpad::new(0x10).unwrap())).unwrap();
        assert_eq!(bus.remove(0x1004).err(), Some(BusError::NotMapped(0x1004)));
        assert!(bus.remove(0x1000).is_ok());
        assert!(!bus.write(0x1000, &[0]).unwrap());
    }
}
