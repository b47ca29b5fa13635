//! A VM's two I/O address spaces, and the policy for accesses that reach no device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::arch::x86_64::exceptions::FAULT_PORT;
use crate::bus::{Bus, BusDevice, BusError, BusRange};
use crate::config::UnhandledIo;
use crate::ratelimit::guest_log;
use crate::vstate::exit::{AddressSpace, IoError, IoHandler};
use crate::vstate::memory::GuestMemory;

/// Ports are 16 bits wide.
const PIO_SPACE_END: u64 = 0x1_0000;

/// Counts of the I/O exits a VM has taken.
#[derive(Debug, Default)]
pub struct IoStats {
    /// Port I/O exits.
    pub pio_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Port accesses that reached no device.
    pub unhandled_pio: AtomicU64,
    /// MMIO accesses that reached no device.
    pub unhandled_mmio: AtomicU64,
}

/// The port bus, the MMIO bus and what to do with accesses that reach neither.
///
/// Cloning shares the devices and the statistics; the vCPU threads of a run each hold a clone,
/// so the map can only change while the VM is stopped.
#[derive(Clone, Default)]
pub struct IoSpaces {
    pio: Bus,
    mmio: Bus,
    unhandled: UnhandledIo,
    stats: Arc<IoStats>,
    /// Guest memory, where kvmkit's exception stubs leave what they report.
    memory: Option<Arc<GuestMemory>>,
}

impl IoSpaces {
    /// Empty buses with the given policy.
    pub fn new(unhandled: UnhandledIo) -> Self {
        Self { unhandled, ..Self::default() }
    }

    /// Gives the run loop access to guest memory, to read the guest exceptions kvmkit's
    /// exception stubs report through [`FAULT_PORT`].
    pub fn with_memory(mut self, memory: Arc<GuestMemory>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// The statistics, shared with every clone.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Maps `device` on the bus of `space`.
    pub fn insert(&mut self, space: AddressSpace, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if space == AddressSpace::Pio && range.last() >= PIO_SPACE_END {
            return Err(BusError::OutsideSpace(range));
        }
        self.bus_mut(space).insert(range, device)
    }

    /// Unmaps the range that starts at `base`.
    pub fn remove(&mut self, space: AddressSpace, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        self.bus_mut(space).remove(base)
    }

    /// Every mapped device with its place, ports first, each bus in address order.
    pub fn devices(&self) -> impl Iterator<Item = (AddressSpace, BusRange, &Arc<dyn BusDevice>)> + '_ {
        let on = |space| self.bus(space).devices().map(move |(range, device)| (space, range, device));
        on(AddressSpace::Pio).chain(on(AddressSpace::Mmio))
    }

    /// The device whose range starts at `base` in `space`.
    pub fn device_at(&self, space: AddressSpace, base: u64) -> Option<(BusRange, Arc<dyn BusDevice>)> {
        self.bus(space).resolve(base, 1).filter(|(range, _)| range.base() == base).map(|(r, d)| (r, d.clone()))
    }

    /// The bus of `space`.
    pub fn bus(&self, space: AddressSpace) -> &Bus {
        match space {
            AddressSpace::Pio => &self.pio,
            AddressSpace::Mmio => &self.mmio,
        }
    }

    fn bus_mut(&mut self, space: AddressSpace) -> &mut Bus {
        match space {
            AddressSpace::Pio => &mut self.pio,
            AddressSpace::Mmio => &mut self.mmio,
        }
    }

    fn read(&self, space: AddressSpace, addr: u64, data: &mut [u8]) -> Result<(), IoError> {
        if self.bus(space).read(addr, data).map_err(IoError::Device)? {
            return Ok(());
        }
        self.unhandled(space, addr, data.len(), false)?;
        data.fill(0xff);
        Ok(())
    }

    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), IoError> {
        if self.bus(space).write(addr, data).map_err(IoError::Device)? {
            return Ok(());
        }
        if space == AddressSpace::Pio && addr == u64::from(FAULT_PORT) && self.memory.is_some() {
            return Err(IoError::FaultReport);
        }
        self.unhandled(space, addr, data.len(), true)
    }

    fn unhandled(&self, space: AddressSpace, addr: u64, size: usize, write: bool) -> Result<(), IoError> {
        let counter = match space {
            AddressSpace::Pio => &self.stats.unhandled_pio,
            AddressSpace::Mmio => &self.stats.unhandled_mmio,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        guest_log!(
            log::Level::Debug,
            "unhandled {size}-byte {} {space} {addr:#x}",
            if write { "write to" } else { "read from" }
        );
        match self.unhandled {
            UnhandledIo::Ignore => Ok(()),
            UnhandledIo::Stop => Err(IoError::Unhandled),
        }
    }
}

impl IoHandler for IoSpaces {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), IoError> {
        self.stats.pio_exits.fetch_add(1, Ordering::Relaxed);
        self.read(AddressSpace::Pio, port.into(), data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), IoError> {
        self.stats.pio_exits.fetch_add(1, Ordering::Relaxed);
        self.write(AddressSpace::Pio, port.into(), data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), IoError> {
        self.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
        self.read(AddressSpace::Mmio, addr, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError> {
        self.stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
        self.write(AddressSpace::Mmio, addr, data)
    }

    fn guest_memory(&self) -> Option<&GuestMemory> {
        self.memory.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Scratchpad;

    #[test]
    fn ignore_policy_reads_all_ones_and_counts() {
        let io = IoSpaces::new(UnhandledIo::Ignore);
        let mut data = [0u8; 4];
        io.pio_read(0x70, &mut data).unwrap();
        io.mmio_write(0xd000_0000, &[1]).unwrap();
        assert_eq!(data, [0xff; 4]);
        assert_eq!(io.stats().unhandled_pio.load(Ordering::Relaxed), 1);
        assert_eq!(io.stats().unhandled_mmio.load(Ordering::Relaxed), 1);
        assert_eq!(io.stats().pio_exits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stop_policy_reports_unhandled() {
        let io = IoSpaces::new(UnhandledIo::Stop);
        assert_eq!(io.pio_write(0x70, &[1]), Err(IoError::Unhandled));
        assert_eq!(io.mmio_read(0, &mut [0; 2]), Err(IoError::Unhandled));
    }

    #[test]
    fn spaces_are_separate_and_ports_stop_at_64k() {
        let mut io = IoSpaces::new(UnhandledIo::Stop);
        let range = BusRange::new(0x80, 4).unwrap();
        io.insert(AddressSpace::Pio, range, Arc::new(Scratchpad::new(4).unwrap())).unwrap();
        io.insert(AddressSpace::Mmio, range, Arc::new(Scratchpad::new(4).unwrap())).unwrap();
        io.pio_write(0x80, &[9]).unwrap();
        let mut data = [0u8; 1];
        io.mmio_read(0x80, &mut data).unwrap();
        assert_eq!(data, [0]);
        let high = BusRange::new(0xfffe, 4).unwrap();
        assert_eq!(
            io.insert(AddressSpace::Pio, high, Arc::new(Scratchpad::new(4).unwrap())),
            Err(BusError::OutsideSpace(high))
        );
        assert!(io.remove(AddressSpace::Pio, 0x80).is_ok());
        assert_eq!(io.pio_write(0x80, &[9]), Err(IoError::Unhandled));
    }
}
