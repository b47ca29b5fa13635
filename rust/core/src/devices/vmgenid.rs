//! The VM Generation ID device (Microsoft's "Virtual Machine Generation ID" specification): a
//! 128-bit id in guest memory that changes whenever the VM starts again from saved state (a
//! restore, a fork), and an interrupt that tells the guest it changed. Linux's `vmgenid` driver
//! then reseeds its random number generator, so that clones of one VM do not go on drawing the
//! same random numbers.
//!
//! The guest finds the id's address and the interrupt in the ACPI tables (`VGEN`, and the Generic
//! Event Device whose event method notifies it). The device itself is only the id's bytes and the
//! interrupt: it has no registers, and no state to save, since a restore must always bring a new
//! id ([`VmGenId::change`]).

use std::io;
use std::sync::Arc;

use thiserror::Error;
use vm_superio::Trigger;

use crate::irq::IrqLine;
use crate::vstate::memory::{self, GuestMemory, MemoryError};

/// The size of the generation id in bytes.
pub const VMGENID_SIZE: usize = 16;

/// Why the generation id could not be written or announced.
#[derive(Debug, Error)]
pub enum VmGenIdError {
    /// The id's address is not in guest memory.
    #[error("the VM generation id cannot be written: {0}")]
    Memory(#[from] MemoryError),
    /// The host's random source failed.
    #[error("cannot draw a VM generation id from the host's random source: {0}")]
    Random(#[source] io::Error),
    /// The interrupt could not be raised.
    #[error("cannot tell the guest its VM generation id changed: {0}")]
    Notify(String),
}

/// A generation id at a fixed guest address, and the interrupt that announces a new one.
pub struct VmGenId<T: Trigger = IrqLine> {
    memory: Arc<GuestMemory>,
    addr: u64,
    notify: T,
}

impl<T: Trigger> VmGenId<T> {
    /// Writes a random id at `addr` in `memory` (which must hold its 16 bytes); `notify` is the
    /// interrupt raised by each [`change`](Self::change). The first id is not announced: the
    /// guest reads it when its driver starts.
    pub fn new(memory: Arc<GuestMemory>, addr: u64, notify: T) -> Result<Self, VmGenIdError> {
        let device = Self { memory, addr, notify };
        device.write_new_id()?;
        Ok(device)
    }

    /// The guest address of the id.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Writes a new random id and notifies the guest: the VM is now another generation.
    pub fn change(&self) -> Result<(), VmGenIdError> {
        self.write_new_id()?;
        // Raised after the write, so the guest's handler reads the new id.
        self.notify.trigger().map_err(|e| VmGenIdError::Notify(format!("{e:?}")))
    }

    fn write_new_id(&self) -> Result<(), VmGenIdError> {
        let id = random_id().map_err(VmGenIdError::Random)?;
        Ok(memory::write(&self.memory, self.addr, &id)?)
    }
}

/// 16 bytes from the host's `getrandom`, waiting (as the kernel does) until its pool is ready.
fn random_id() -> io::Result<[u8; VMGENID_SIZE]> {
    let mut id = [0u8; VMGENID_SIZE];
    loop {
        // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
        let got = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
        // Requests of up to 256 bytes are never cut short; only a signal before the pool is
        // ready interrupts one.
        if got == id.len() as isize {
            return Ok(id);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryRegionConfig;
    use crate::devices::test_util::CountingIrq;

    const ADDR: u64 = 0xef000;

    /// An interrupt line that cannot be raised.
    struct BrokenIrq;

    impl Trigger for BrokenIrq {
        type E = &'static str;
        fn trigger(&self) -> Result<(), &'static str> {
            Err("no line")
        }
    }

    fn memory() -> Arc<GuestMemory> {
        Arc::new(memory::create(&[MemoryRegionConfig { guest_addr: 0, size: 1 << 20 }], 1).unwrap())
    }

    fn id_at(memory: &GuestMemory, addr: u64) -> [u8; VMGENID_SIZE] {
        let mut id = [0; VMGENID_SIZE];
        memory::read(memory, addr, &mut id).unwrap();
        id
    }

    #[test]
    fn a_new_device_writes_a_random_id_without_notifying() {
        let (memory, irq) = (memory(), CountingIrq::default());
        let device = VmGenId::new(memory.clone(), ADDR, irq.clone()).unwrap();
        assert_eq!(device.addr(), ADDR);
        let id = id_at(&memory, ADDR);
        assert_ne!(id, [0; VMGENID_SIZE]);
        assert_eq!(id_at(&memory, ADDR - 16), [0; 16], "only the id's 16 bytes are written");
        assert_eq!(id_at(&memory, ADDR + 16), [0; 16], "only the id's 16 bytes are written");
        assert_eq!(irq.count(), 0, "the first id is read by the driver, not announced");
        let other = VmGenId::new(memory.clone(), ADDR + 0x100, CountingIrq::default()).unwrap();
        assert_ne!(id_at(&memory, other.addr()), id, "each device draws its own id");
    }

    #[test]
    fn change_writes_a_new_id_then_raises_the_interrupt() {
        let (memory, irq) = (memory(), CountingIrq::default());
        let device = VmGenId::new(memory.clone(), ADDR, irq.clone()).unwrap();
        let mut seen = vec![id_at(&memory, ADDR)];
        for changes in 1..=3 {
            device.change().unwrap();
            let id = id_at(&memory, ADDR);
            assert!(!seen.contains(&id), "change {changes} gave an id seen before");
            seen.push(id);
            assert_eq!(irq.count(), changes);
        }
    }

    #[test]
    fn an_id_outside_guest_memory_is_an_error() {
        let error = VmGenId::new(memory(), (1 << 20) - 8, CountingIrq::default()).err().unwrap();
        assert!(matches!(error, VmGenIdError::Memory(MemoryError::OutOfRange { addr: 0xffff8, len: 16 })));
        assert!(error.to_string().contains("0xffff8"), "{error}");
    }

    #[test]
    fn an_interrupt_that_cannot_be_raised_is_an_error() {
        let device = VmGenId::new(memory(), ADDR, BrokenIrq).unwrap();
        let error = device.change().unwrap_err();
        assert!(matches!(&error, VmGenIdError::Notify(why) if why.contains("no line")), "{error}");
    }
}
