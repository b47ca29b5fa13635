//! A mock virtio driver for device tests: it negotiates through the real MMIO transport, lays
//! out queues in real guest memory, builds descriptor chains, notifies, and reads the used ring,
//! running the device's queue work synchronously where the event loop would.

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceEventLoop, Interrupt, MmioTransport, SharedDevice, TransportState, VirtioDevice, F_VERSION_1};
use crate::bus::BusDevice;
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemory;

/// Size of the guest memory tests run in.
pub const MEMORY_SIZE: u64 = 16 << 20;
/// Where test data buffers start (queues live below).
pub const DATA_START: u64 = 1 << 20;
/// Descriptor flag: the buffer continues in `next`.
pub const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};

struct RingLayout {
    desc: u64,
    avail: u64,
    used: u64,
}

/// A device under test with its transport, memory and queues.
pub struct MockDriver<D: VirtioDevice + 'static> {
    /// The device, shared as the event loop would hold it.
    pub device: Arc<Mutex<D>>,
    /// The transport the driver talks to.
    pub transport: MmioTransport,
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
    /// The interrupt line (an eventfd standing in for an irqfd).
    pub irq: EventFd,
    /// The device's interrupt state, as the transport holds it.
    pub interrupt: Arc<Interrupt>,
    /// One per queue: what a notification writes.
    pub notifiers: Vec<EventFd>,
    queue_addrs: Vec<GuestAddress>,
    /// Next free descriptor index per queue.
    next_desc: Vec<u16>,
    queue_size: u16,
}

impl<D: VirtioDevice + 'static> MockDriver<D> {
    /// Puts `device` behind a transport on fresh memory, without negotiating.
    pub fn new(device: D) -> Self {
        Self::with_memory(
            device,
            Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()),
        )
    }

    /// Puts `device` behind a transport on `memory`, without negotiating.
    fn with_memory(device: D, memory: Arc<GuestMemory>) -> Self {
        let device = Arc::new(Mutex::new(device));
        let (queues, counters) = {
            let d = device.lock().unwrap();
            (d.queue_max_sizes().len(), d.counters().clone())
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(Some(irq.try_clone().unwrap()), counters));
        let notifiers: Vec<EventFd> = (0..queues).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let shared: SharedDevice = device.clone();
        let transport = MmioTransport::new(
            shared,
            memory.clone(),
            interrupt.clone(),
            notifiers.iter().map(|e| e.try_clone().unwrap()).collect(),
        );
        // Each queue gets 64 KiB for its rings, from 0 up.
        let queue_addrs = (0..queues).map(|i| GuestAddress(i as u64 * 0x1_0000)).collect();
        Self {
            device,
            transport,
            memory,
            irq,
            interrupt,
            notifiers,
            queue_addrs,
            next_desc: vec![0; queues],
            queue_size: 16,
        }
    }

    /// The same guest on another machine: a copy of this driver's memory and of where it is in
    /// its queues, with `device` behind a fresh transport (not restored).
    pub fn fork(&self, device: D) -> Self {
        let copy = Self::new(device);
        copy.write_mem(0, &self.read_mem(0, MEMORY_SIZE as usize));
        Self { next_desc: self.next_desc.clone(), queue_size: self.queue_size, ..copy }
    }

    /// What the guest has now (its memory and where it is in its queues), to go back to.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint { memory: self.read_mem(0, MEMORY_SIZE as usize), next_desc: self.next_desc.clone() }
    }

    /// Puts the guest back as it was at `checkpoint`; the device is left alone.
    pub fn rewind(&mut self, checkpoint: &Checkpoint) {
        self.write_mem(0, &checkpoint.memory);
        self.next_desc.clone_from(&checkpoint.next_desc);
    }

    /// Saves the transport, through JSON as a state file would carry it.
    pub fn save(&self) -> TransportState {
        through_json(&self.transport.save())
    }

    /// Serves the device on `event_loop` instead of in [`notify`](Self::notify).
    pub fn serve_on(&self, event_loop: &DeviceEventLoop) {
        let notifiers = self.notifiers.iter().map(|e| e.try_clone().unwrap()).collect();
        event_loop.add(self.device.clone(), notifiers, self.interrupt.clone()).unwrap();
    }

    /// Reads a 32-bit register.
    pub fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(0, offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, value: u32) {
        self.transport.write(0, offset, &value.to_le_bytes()).unwrap();
    }

    /// Reads `len` bytes of config space at `offset`.
    pub fn config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.transport.read(0, 0x100 + offset, &mut data).unwrap();
        data
    }

    /// The device features the transport offers.
    pub fn device_features(&self) -> u64 {
        self.write(0x14, 0);
        let low = self.read(0x10) as u64;
        self.write(0x14, 1);
        low | (self.read(0x10) as u64) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, `features` (plus VERSION_1), FEATURES_OK; returns the status
    /// read back.
    pub fn negotiate(&self, features: u64) -> u32 {
        let features = features | F_VERSION_1;
        self.write(0x70, 0);
        self.write(0x70, ACKNOWLEDGE);
        self.write(0x70, ACKNOWLEDGE | DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.read(0x70)
    }

    /// Lays out every queue with `size` entries and marks it ready.
    pub fn setup_queues(&mut self, size: u16) {
        self.queue_size = size;
        for index in 0..self.queue_addrs.len() {
            let ring = self.ring(index);
            self.write(0x30, index as u32);
            self.write(0x38, size as u32);
            for (offset, addr) in [(0x80, ring.desc), (0x90, ring.avail), (0xa0, ring.used)] {
                self.write(offset, addr as u32);
                self.write(offset + 4, (addr >> 32) as u32);
            }
            self.write(0x44, 1);
        }
    }

    /// Sets DRIVER_OK; returns the status read back.
    pub fn driver_ok(&self) -> u32 {
        self.write(0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.read(0x70)
    }

    /// Negotiates `features`, sets up all queues with 16 entries and sets DRIVER_OK.
    pub fn activate(&mut self, features: u64) {
        assert_eq!(self.negotiate(features) & FEATURES_OK, FEATURES_OK, "features refused");
        self.setup_queues(16);
        assert_eq!(self.driver_ok() & (DRIVER_OK | NEEDS_RESET), DRIVER_OK, "activation failed");
    }

    /// Where queue `queue`'s descriptor table and rings are.
    fn ring(&self, queue: usize) -> RingLayout {
        let desc = self.queue_addrs[queue].0;
        let avail = desc + 16 * self.queue_size as u64;
        let used = (avail + 6 + 2 * self.queue_size as u64 + 3) & !3;
        RingLayout { desc, avail, used }
    }

    fn load_u16(&self, addr: u64) -> u16 {
        self.memory.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    fn store_u16(&self, addr: u64, value: u16) {
        self.memory.memory().write_obj(value, GuestAddress(addr)).unwrap()
    }

    /// Writes raw descriptors `descs` into queue `queue`'s table from the next free index, and
    /// publishes the first as a chain head. `next` fields are taken as given; returns the head.
    pub fn add_raw_chain(&mut self, queue: usize, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc[queue];
        let table = self.ring(queue).desc;
        for (i, desc) in descs.iter().enumerate() {
            let index = (head as u64 + i as u64) % self.queue_size as u64;
            self.memory.memory().write_obj(*desc, GuestAddress(table + 16 * index)).unwrap();
        }
        self.next_desc[queue] = ((head as usize + descs.len()) % self.queue_size as usize) as u16;
        self.publish(queue, head);
        head
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers to queue `queue`; returns its head.
    pub fn add_chain(&mut self, queue: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc[queue];
        let descs: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let last = i + 1 == buffers.len();
                let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
                let next = if last { 0 } else { (head + i as u16 + 1) % self.queue_size };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.add_raw_chain(queue, &descs)
    }

    /// Makes descriptor `head` available (without notifying).
    pub fn publish(&self, queue: usize, head: u16) {
        let avail = self.ring(queue).avail;
        let idx = self.load_u16(avail + 2);
        self.store_u16(avail + 4 + 2 * (idx % self.queue_size) as u64, head);
        self.store_u16(avail + 2, idx.wrapping_add(1));
    }

    /// Sets the available index directly (to model a driver that corrupts it).
    pub fn set_avail_idx(&self, queue: usize, idx: u16) {
        self.store_u16(self.ring(queue).avail + 2, idx);
    }

    /// The used ring of queue `queue`: `(head, len)` pairs in order.
    pub fn used(&self, queue: usize) -> Vec<(u32, u32)> {
        let used = self.ring(queue).used;
        let idx = self.load_u16(used + 2);
        (0..idx)
            .map(|i| {
                let elem = used + 4 + 8 * (i % self.queue_size) as u64;
                let id: u32 = self.memory.memory().read_obj(GuestAddress(elem)).unwrap();
                let len: u32 = self.memory.memory().read_obj(GuestAddress(elem + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    /// Notifies queue `queue` through the transport and runs what the event loop would.
    pub fn notify(&self, queue: usize) {
        self.kick(queue);
        self.run_pending();
    }

    /// Notifies queue `queue` through the transport only, for an event loop to serve.
    pub fn kick(&self, queue: usize) {
        self.write(0x50, queue as u32);
    }

    /// Serves every queue whose notifier fired, as the event loop would.
    pub fn run_pending(&self) {
        for (index, notifier) in self.notifiers.iter().enumerate() {
            if notifier.read().is_ok() {
                self.device.lock().unwrap().process_queue(index);
            }
        }
    }

    /// Whether an interrupt was raised since the last call.
    pub fn take_interrupt(&self) -> bool {
        self.irq.read().is_ok()
    }

    /// Whether the device reports DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.read(0x70) & NEEDS_RESET != 0
    }

    /// Reads guest memory.
    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.memory.memory().read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    /// Writes guest memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.memory.memory().write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// The guest's side at one moment; see [`MockDriver::checkpoint`].
pub struct Checkpoint {
    memory: Vec<u8>,
    next_desc: Vec<u16>,
}

/// `value` written as JSON and read back.
pub fn through_json<T: Serialize + DeserializeOwned>(value: &T) -> T {
    serde_json::from_str(&serde_json::to_string(value).unwrap()).unwrap()
}
