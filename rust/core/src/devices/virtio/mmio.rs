//! The virtio-mmio transport (version 2, the modern interface): registers, feature negotiation,
//! the device status state machine, queue setup, configuration space and reset.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActiveQueues, Interrupt, SharedDevice, TransportState, VirtqueueState, F_EVENT_IDX, F_VERSION_1, TYPE_NET,
};
use crate::bus::{BusDevice, DeviceError};
use crate::ratelimit::guest_log;
use crate::snapshot::{Persist, StateError};
use crate::vstate::memory::GuestMemory;

const MAGIC: u32 = u32::from_le_bytes(*b"virt");
const VERSION: u32 = 2;
/// "KVMK", so a driver can tell who made the device.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"KVMK");
/// Where the driver writes a queue index to notify the device (an ioeventfd catches it).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Where the device-specific configuration space starts.
const CONFIG_OFFSET: u64 = 0x100;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: SharedDevice,
    memory: Arc<GuestMemory>,
    interrupt: Arc<Interrupt>,
    /// Written when the driver notifies a queue through a VMM exit (no ioeventfd registered, or
    /// a write the ioeventfd did not match); the event loop watches them.
    queue_events: Vec<EventFd>,
    state: Mutex<DriverState>,
}

/// What the driver has told the transport.
#[derive(Default)]
struct DriverState {
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    /// The configuration never changes behind the driver's back, so this stays as it starts (0)
    /// or as a restored state has it.
    config_generation: u32,
    /// `DRIVER_OK` activated the device, which has not been reset since.
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, whose queues are notified through `queue_events` (one per queue).
    pub fn new(
        device: SharedDevice,
        memory: Arc<GuestMemory>,
        interrupt: Arc<Interrupt>,
        queue_events: Vec<EventFd>,
    ) -> Self {
        let transport = Self { device, memory, interrupt, queue_events, state: Mutex::default() };
        transport.lock_state().queues = transport.fresh_queues();
        transport
    }

    fn fresh_queues(&self) -> Vec<Queue> {
        let device = self.lock_device();
        // Queue::new only fails for a size that is zero or not a power of two: such a queue
        // cannot be set up by any driver, so it is offered with size 0 (not available).
        device.queue_max_sizes().iter().map(|&max| Queue::new(max).unwrap_or_default()).collect()
    }

    fn lock_state(&self) -> MutexGuard<'_, DriverState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn super::VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn offered_features(&self) -> u64 {
        self.lock_device().features() | F_VERSION_1
    }

    fn read_register(&self, offset: u64) -> u32 {
        let state = self.lock_state();
        let queue = state.queues.get(state.queue_select as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.lock_device().device_type(),
            0x0c => VENDOR_ID,
            0x10 => match state.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| q.max_size().into()),
            0x44 => queue.is_some_and(|q| q.ready()).into(),
            0x60 => self.interrupt.status(),
            0x70 => state.status | if self.interrupt.needs_reset() { NEEDS_RESET } else { 0 },
            0xfc => state.config_generation,
            _ => 0,
        }
    }

    fn write_register(&self, offset: u64, value: u32) {
        let mut state = self.lock_state();
        match offset {
            0x14 => state.device_features_select = value,
            0x20 => self.write_driver_features(&mut state, value),
            0x24 => state.driver_features_select = value,
            0x30 => state.queue_select = value,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                self.write_queue_register(&mut state, offset, value)
            }
            0x50 => self.notify(value),
            0x64 => self.interrupt.acknowledge(value),
            0x70 => self.write_status(&mut state, value),
            _ => guest_log!(
                log::Level::Debug,
                "virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&self, state: &mut DriverState, value: u32) {
        if state.status & FEATURES_OK != 0 {
            return self.interrupt.mark_broken("the driver changed its features after FEATURES_OK");
        }
        let shift = match state.driver_features_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        state.driver_features = (state.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
    }

    fn write_queue_register(&self, state: &mut DriverState, offset: u64, value: u32) {
        // Queues may be set up between FEATURES_OK and DRIVER_OK only.
        if state.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK {
            return self.interrupt.mark_broken("the driver set up a queue outside FEATURES_OK..DRIVER_OK");
        }
        let select = state.queue_select as usize;
        let Some(queue) = state.queues.get_mut(select) else {
            return guest_log!(
                log::Level::Debug,
                "virtio-mmio: queue register {offset:#x} written for absent queue {select}"
            );
        };
        // A ready queue's layout is fixed until reset.
        if queue.ready() && offset != 0x44 {
            return self.interrupt.mark_broken("the driver changed a queue that is ready");
        }
        match offset {
            0x38 => queue.set_size(value.try_into().unwrap_or(0)),
            0x44 => queue.set_ready(value == 1),
            0x80 => queue.set_desc_table_address(Some(value), None),
            0x84 => queue.set_desc_table_address(None, Some(value)),
            0x90 => queue.set_avail_ring_address(Some(value), None),
            0x94 => queue.set_avail_ring_address(None, Some(value)),
            0xa0 => queue.set_used_ring_address(Some(value), None),
            _ => queue.set_used_ring_address(None, Some(value)),
        }
    }

    fn notify(&self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => self.interrupt.mark_broken("the driver notified a queue that does not exist"),
        }
    }

    fn write_status(&self, state: &mut DriverState, value: u32) {
        if value == 0 {
            return self.reset(state);
        }
        let old = state.status;
        if value & old != old {
            // Only a reset clears bits.
            return self.interrupt.mark_broken("the driver cleared device status bits without a reset");
        }
        let mut new = value & !NEEDS_RESET;
        let added = new & !old;
        if added & FEATURES_OK != 0 && !self.features_acceptable(state.driver_features) {
            // Left clear, the driver reads back that the device refuses its features.
            new &= !FEATURES_OK;
        }
        if added & DRIVER_OK != 0 && new & FAILED == 0 {
            if new & FEATURES_OK == 0 {
                state.status = new & !DRIVER_OK;
                return self.interrupt.mark_broken("the driver set DRIVER_OK without FEATURES_OK");
            }
            if let Err(why) = self.activate(state) {
                state.status = new & !DRIVER_OK;
                return self.interrupt.mark_broken(&why);
            }
            state.activated = true;
        }
        state.status = new;
    }

    fn features_acceptable(&self, features: u64) -> bool {
        features & F_VERSION_1 != 0 && features & !self.offered_features() == 0
    }

    fn activate(&self, state: &DriverState) -> Result<(), String> {
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, queue) in state.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(self.memory.as_ref()) {
                return Err(format!("queue {index} does not fit in guest memory or is misaligned"));
            }
            let mut copy = Queue::try_from(queue.state()).map_err(|e| format!("queue {index}: {e}"))?;
            copy.set_event_idx(state.driver_features & F_EVENT_IDX != 0);
            queues.push(copy);
        }
        let active = ActiveQueues {
            memory: self.memory.clone(),
            queues,
            features: state.driver_features,
            interrupt: self.interrupt.clone(),
        };
        self.lock_device().activate(active)
    }

    fn reset(&self, state: &mut DriverState) {
        if state.activated {
            self.lock_device().reset();
        }
        self.interrupt.reset();
        *state = DriverState { queues: self.fresh_queues(), ..DriverState::default() };
    }
}

impl BusDevice for MmioTransport {
    crate::persist_on_bus!();

    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if offset >= CONFIG_OFFSET {
            self.lock_device().read_config(offset - CONFIG_OFFSET, data);
        } else if let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) {
            *bytes = self.read_register(offset).to_le_bytes();
        } else {
            // Registers are 32 bits wide; other widths read as zero.
            data.fill(0);
        }
        Ok(())
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if offset >= CONFIG_OFFSET {
            self.lock_device().write_config(offset - CONFIG_OFFSET, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            guest_log!(log::Level::Debug, "virtio-mmio: {}-byte write to register {offset:#x} ignored", data.len());
        }
        Ok(())
    }
}

impl MmioTransport {
    /// The queues `saved` gives this transport, if the state fits it; changes nothing.
    fn check_state(&self, saved: &TransportState) -> Result<Vec<Queue>, StateError> {
        let device = self.lock_device();
        let device_type = device.device_type();
        if saved.device_type != device_type {
            return Err(StateError::new(format!(
                "the state is of virtio device type {}, this device is of type {device_type}",
                saved.device_type
            )));
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if saved.queues.len() != max_sizes.len() {
            return Err(StateError::new(format!(
                "the state has {} queues, this device has {}",
                saved.queues.len(),
                max_sizes.len()
            )));
        }
        let unknown = saved.driver_features & !(device.features() | F_VERSION_1);
        if unknown != 0 {
            // A card offers the offloads of its tap: restored onto another tap, it may lack some.
            let why = if device_type == TYPE_NET {
                " (checksum or segmentation offloads its tap does not support)"
            } else {
                ""
            };
            return Err(StateError::new(format!(
                "the driver accepted features {unknown:#x} this device does not offer{why}"
            )));
        }
        saved.model.check(device_type)?;
        drop(device);
        if saved.activated && saved.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK | DRIVER_OK {
            return Err(StateError::new(format!(
                "the device is activated but its status {:#x} lacks FEATURES_OK or DRIVER_OK",
                saved.status
            )));
        }
        let queues = saved.queues.iter().zip(max_sizes);
        queues.enumerate().map(|(index, (saved, max_size))| self.check_queue(index, saved, max_size)).collect()
    }

    /// Queue `index` as `saved`, if it is valid here, with `max_size` entries at most.
    fn check_queue(&self, index: usize, saved: &VirtqueueState, max_size: u16) -> Result<Queue, StateError> {
        if saved.max_size != max_size {
            return Err(StateError::new(format!(
                "queue {index} holds at most {} entries in the state, {max_size} on this device",
                saved.max_size
            )));
        }
        let queue = saved.to_queue().map_err(|e| StateError::new(format!("queue {index}: {e}")))?;
        if queue.ready() && !queue.is_valid(self.memory.as_ref()) {
            return Err(StateError::new(format!("queue {index} does not fit in guest memory")));
        }
        Ok(queue)
    }
}

/// Saves and restores the transport with its device, while the VM is paused and the device
/// event loop parked.
///
/// Restoring an activated state activates the device again with the saved queues, on this
/// transport's memory, interrupt and notifiers, as `DRIVER_OK` does; the device then goes on
/// from the saved ring positions, and looks at every ring once the event loop runs again, so
/// that chains made available before the snapshot are served. Restoring a state from before
/// activation leaves the device reset. A state of another device type or queue count, or one
/// that does not fit guest memory, is refused and the transport left as it was; if activation
/// itself fails, the transport is left reset.
impl Persist for MmioTransport {
    type State = TransportState;

    fn save(&self) -> TransportState {
        let state = self.lock_state();
        let device = self.lock_device();
        // Once active, the device's own queues have moved on from the transport's copies.
        let served = device.active_queues().filter(|_| state.activated);
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, queue)| served.and_then(|served| served.get(index)).unwrap_or(queue).state().into())
            .collect();
        TransportState {
            device_type: device.device_type(),
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: state.config_generation,
            activated: state.activated,
            queues,
            model: device.save_state(),
        }
    }

    fn restore(&self, saved: &TransportState) -> Result<(), StateError> {
        let mut state = self.lock_state();
        let queues = self.check_state(saved)?;
        // From here on the device starts over from the state, whatever it is doing now.
        self.lock_device().reset();
        self.interrupt.reset();
        *state = DriverState {
            status: saved.status,
            device_features_select: saved.device_features_select,
            driver_features_select: saved.driver_features_select,
            driver_features: saved.driver_features,
            queue_select: saved.queue_select,
            queues,
            config_generation: saved.config_generation,
            activated: false,
        };
        if saved.activated {
            if let Err(why) = self.activate(&state) {
                self.reset(&mut state);
                return Err(StateError::new(format!("the restored device cannot be activated: {why}")));
            }
            state.activated = true;
            // Notifications the event loop had not taken at the snapshot are not in the state:
            // one per queue has the device look at every ring once the loop runs again.
            for index in 0..state.queues.len() {
                self.notify(index as u32);
            }
        }
        self.interrupt.restore(saved.interrupt_status, saved.needs_reset);
        self.lock_device().restore_state(&saved.model);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{ModelState, Rng, VirtioDevice, INT_USED_RING, TYPE_BLOCK, TYPE_RNG};

    fn driver() -> MockDriver<Rng> {
        MockDriver::new(Rng::new())
    }

    #[test]
    fn identifies_itself() {
        let driver = driver();
        assert_eq!(driver.read(0x00), 0x7472_6976);
        assert_eq!(driver.read(0x04), 2);
        assert_eq!(driver.read(0x08), TYPE_RNG);
        assert_eq!(driver.read(0x0c), u32::from_le_bytes(*b"KVMK"));
        assert_eq!(driver.device_features(), F_VERSION_1);
        driver.write(0x30, 0);
        assert_eq!(driver.read(0x34), 256);
        driver.write(0x30, 1);
        assert_eq!(driver.read(0x34), 0, "queue 1 does not exist");
    }

    #[test]
    fn features_must_include_version_1_and_nothing_unknown() {
        let driver = driver();
        assert_eq!(driver.negotiate(0) & FEATURES_OK, FEATURES_OK);
        assert_eq!(driver.negotiate(1 << 3) & FEATURES_OK, 0, "unknown feature bit accepted");
        // A legacy driver that does not accept VERSION_1.
        driver.write(0x70, 0);
        driver.write(0x70, ACKNOWLEDGE | DRIVER);
        driver.write(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(driver.read(0x70) & FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_marks_the_device_broken() {
        let driver = driver();
        driver.write(0x70, ACKNOWLEDGE | DRIVER);
        driver.write(0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert!(driver.needs_reset());
        assert!(driver.take_interrupt());
        assert_eq!(driver.read(0x60) & INT_CONFIG_BIT, INT_CONFIG_BIT);
        // Reset clears it.
        driver.write(0x70, 0);
        assert_eq!(driver.read(0x70), 0);
    }

    const INT_CONFIG_BIT: u32 = crate::devices::virtio::INT_CONFIG;

    #[test]
    fn queue_outside_memory_refuses_driver_ok() {
        let driver = driver();
        driver.negotiate(0);
        driver.write(0x30, 0);
        driver.write(0x38, 16);
        driver.write(0x80, 0);
        driver.write(0x84, 0x10); // descriptor table at 64 GiB: no memory there
        driver.write(0x44, 1);
        assert_eq!(driver.driver_ok() & DRIVER_OK, 0);
        assert!(driver.needs_reset());
    }

    #[test]
    fn notifying_before_setup_or_a_missing_queue_is_harmless() {
        let mut driver = driver();
        driver.notify(0); // before any setup
        assert!(!driver.needs_reset());
        driver.write(0x50, 7); // no such queue
        assert!(driver.needs_reset());
        driver.activate(0);
        assert!(!driver.needs_reset(), "reset clears the broken state");
        let head = driver.add_chain(0, &[(DATA_START, 8, true)]);
        driver.notify(0);
        assert_eq!(driver.used(0), [(head as u32, 8)]);
    }

    #[test]
    fn queue_registers_are_fixed_once_ready_and_after_driver_ok() {
        let mut driver = driver();
        driver.activate(0);
        driver.write(0x30, 0);
        driver.write(0x38, 4);
        assert!(driver.needs_reset());
    }

    #[test]
    fn descriptor_loop_is_cut_off() {
        let mut driver = driver();
        driver.activate(0);
        // Two descriptors pointing at each other.
        let flags = NEXT | WRITE;
        let head = driver.add_raw_chain(
            0,
            &[
                RawDescriptor::from(Descriptor::new(DATA_START, 8, flags, 1)),
                RawDescriptor::from(Descriptor::new(DATA_START + 8, 8, flags, 0)),
            ],
        );
        driver.notify(0);
        // virtio-queue stops a chain after queue-size descriptors: the request completes, bounded.
        let used = driver.used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head as u32);
        assert!(used[0].1 <= 16 * 8);
    }

    #[test]
    fn corrupt_available_index_marks_the_device_broken() {
        let mut driver = driver();
        driver.activate(0);
        driver.set_avail_idx(0, 1000); // far more entries than the queue holds
        driver.notify(0);
        assert!(driver.needs_reset());
        assert!(driver.used(0).is_empty());
    }

    #[test]
    fn interrupt_status_is_acknowledged() {
        let mut driver = driver();
        driver.activate(0);
        driver.add_chain(0, &[(DATA_START, 8, true)]);
        driver.notify(0);
        assert_eq!(driver.read(0x60), crate::devices::virtio::INT_USED_RING);
        driver.write(0x64, crate::devices::virtio::INT_USED_RING);
        assert_eq!(driver.read(0x60), 0);
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let mut driver = driver();
        driver.activate(0);
        driver.write(0x70, 0);
        assert_eq!(driver.read(0x70), 0);
        driver.write(0x30, 0);
        assert_eq!(driver.read(0x44), 0, "queue no longer ready");
        // The device no longer serves the old queue.
        driver.add_chain(0, &[(DATA_START, 8, true)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty());
    }

    #[test]
    fn odd_width_register_access_is_ignored() {
        let driver = driver();
        let mut byte = [0xffu8; 1];
        driver.transport.read(0, 0, &mut byte).unwrap();
        assert_eq!(byte, [0]);
        driver.transport.write(0, 0x70, &[1]).unwrap();
        assert_eq!(driver.read(0x70), 0);
    }

    /// Makes `count` one-buffer requests from `DATA_START + 0x1000 * first` on, and has each
    /// served; returns their heads.
    fn serve(driver: &mut MockDriver<Rng>, first: u64, count: u64) -> Vec<u16> {
        (first..first + count)
            .map(|i| {
                let head = driver.add_chain(0, &[(DATA_START + 0x1000 * i, 8, true)]);
                driver.notify(0);
                head
            })
            .collect()
    }

    #[test]
    fn a_restored_transport_reads_back_as_saved() {
        let mut driver = driver();
        driver.activate(0);
        serve(&mut driver, 0, 1); // its interrupt is left unacknowledged
        driver.write(0x14, 1);
        driver.write(0x24, 1);
        let state = driver.save();
        assert!(state.activated);
        assert_eq!(
            (state.status, state.interrupt_status),
            (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, INT_USED_RING)
        );
        let queue = state.queues[0];
        assert_eq!((queue.size, queue.ready, queue.next_avail, queue.next_used), (16, true, 1, 1));
        assert_eq!(state.model, ModelState::Rng);

        let restored = driver.fork(Rng::new());
        restored.transport.restore(&state).unwrap();
        for register in [0x10, 0x34, 0x44, 0x60, 0x70, 0xfc] {
            assert_eq!(restored.read(register), driver.read(register), "register {register:#x}");
        }
        assert!(!restored.take_interrupt(), "a restore raises no interrupt");
        assert_eq!(restored.save(), state);
    }

    #[test]
    fn a_broken_device_stays_broken_after_restore() {
        let mut driver = driver();
        driver.activate(0);
        driver.write(0x50, 7); // no such queue
        let state = driver.save();
        let restored = driver.fork(Rng::new());
        restored.transport.restore(&state).unwrap();
        assert!(restored.needs_reset());
        restored.write(0x70, 0);
        assert!(!restored.needs_reset());
    }

    #[test]
    fn a_state_for_another_device_or_queue_count_is_refused_and_changes_nothing() {
        let mut driver = driver();
        driver.activate(0);
        serve(&mut driver, 0, 2);
        let good = driver.save();
        let queue = good.queues[0];
        let refused = [
            (TransportState { device_type: TYPE_BLOCK, model: ModelState::Block, ..good.clone() }, "device type 2"),
            (TransportState { queues: vec![queue; 2], ..good.clone() }, "has 2 queues"),
            (TransportState { model: ModelState::Vsock, ..good.clone() }, "model state"),
            (TransportState { driver_features: good.driver_features | 1 << 3, ..good.clone() }, "features 0x8"),
            (TransportState { queues: vec![VirtqueueState { size: 3, ..queue }], ..good.clone() }, "queue 0"),
            (TransportState { queues: vec![VirtqueueState { max_size: 64, ..queue }], ..good.clone() }, "at most 64"),
            (
                TransportState { queues: vec![VirtqueueState { desc_table: 1 << 36, ..queue }], ..good.clone() },
                "memory",
            ),
            (TransportState { status: ACKNOWLEDGE | DRIVER, ..good.clone() }, "DRIVER_OK"),
        ];
        for (state, problem) in refused {
            let error = driver.transport.restore(&state).unwrap_err();
            assert!(error.to_string().contains(problem), "{error:?} does not say {problem:?}");
            assert_eq!(driver.save(), good, "a refused state changed the transport");
        }
        // The device goes on where it was.
        let heads = serve(&mut driver, 2, 1);
        assert_eq!(driver.used(0).len(), 3);
        assert_eq!(driver.used(0)[2], (heads[0] as u32, 8));
    }

    #[test]
    fn restoring_a_state_from_before_activation_resets_the_device() {
        let mut driver = driver();
        driver.negotiate(0);
        driver.setup_queues(16);
        let (before, state) = (driver.checkpoint(), driver.save());
        assert!(!state.activated);
        driver.driver_ok();
        serve(&mut driver, 0, 2);

        driver.rewind(&before);
        driver.transport.restore(&state).unwrap();
        assert_eq!(driver.read(0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert!(driver.device.lock().unwrap().active_queues().is_none(), "the device is still active");
        let head = driver.add_chain(0, &[(DATA_START, 8, true)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty(), "a device that is not active served a queue");
        // The driver goes on from there.
        assert_eq!(driver.driver_ok() & DRIVER_OK, DRIVER_OK);
        driver.notify(0);
        assert_eq!(driver.used(0), [(head as u32, 8)]);
    }
}
