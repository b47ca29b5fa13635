//! virtio 1.x devices on the MMIO transport.
//!
//! A device model implements [`VirtioDevice`]: what it offers (type, queues, features, config
//! space) and how it serves its queues once the driver has set them up. [`MmioTransport`] puts it
//! on the MMIO bus and runs the driver handshake; [`DeviceEventLoop`] serves its queues and
//! back-end on a thread of its own, woken by ioeventfds, so that a guest notification costs no
//! exit to the VMM and device work never runs on a vCPU thread.
//!
//! A transport saves and restores its device whole ([`Persist`](crate::snapshot::Persist) into a
//! [`TransportState`]); each model adds what it keeps beyond its queues ([`ModelState`]). The
//! event loop is parked around that ([`DeviceEventLoop::park`]), so that no device runs meanwhile.

pub mod block;
mod event_loop;
mod mmio;
mod net;
mod rng;
mod state;
#[cfg(test)]
pub(crate) mod testing;
mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockError};
pub use event_loop::{DeviceEventLoop, Parked, SharedDevice};
pub use mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
pub use net::{Net, NetError, NetState, Tap};
pub use rng::Rng;
pub use state::{ModelState, TransportState, VirtqueueState};
pub use vsock::{Vsock, VsockError};

use crate::ratelimit::guest_log;
use crate::vstate::memory::GuestMemory;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// virtio device type of an entropy source.
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// virtio device type of a vsock device.
pub const TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// Feature bit of the modern (1.x) interface, which is the only one kvmkit offers.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Feature bit for notification suppression through the used and available event indexes.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActiveQueues {
    /// Guest memory the queues and buffers live in.
    pub memory: Arc<GuestMemory>,
    /// The queues as the driver configured them, by index.
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub features: u64,
    /// How the device tells the driver about used buffers.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device model.
///
/// The transport calls the configuration methods on a vCPU thread; the event loop calls
/// [`process_queue`](Self::process_queue) and [`process_backend`](Self::process_backend) on its own
/// thread. Both hold the device's lock while they do.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers, without [`F_VERSION_1`] (the transport adds it).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK`: the device takes the queues and starts serving them. An error
    /// marks the device as needing a reset.
    fn activate(&mut self, active: ActiveQueues) -> Result<(), String>;
    /// The driver reset the device: it drops its queues and driver state but keeps its back end.
    fn reset(&mut self);
    /// The driver made buffers available on queue `index`.
    fn process_queue(&mut self, index: usize);
    /// File descriptors of the back end to watch from the start, with a token for each.
    fn backend_events(&self) -> Vec<(RawFd, u32, EventSet)> {
        Vec::new()
    }
    /// A back-end file descriptor registered with `token` is ready. `ops` adds or removes watched
    /// descriptors; [`backend_data`] turns a token into the value to register them with.
    fn process_backend(&mut self, _token: u32, _events: EventSet, _ops: &mut EventOps) {}
    /// The device's counters, shared with whoever reports them.
    fn counters(&self) -> &Arc<DeviceCounters>;
    /// The queues the device serves, as far as it has served them; `None` unless it is active.
    fn active_queues(&self) -> Option<&[Queue]>;
    /// What the device keeps beyond its queues, for a snapshot. Called while no queue or back-end
    /// work runs (the event loop is parked).
    fn save_state(&self) -> ModelState;
    /// Puts back what [`save_state`](Self::save_state) returned, into a device the transport has
    /// just reset and, if the state was saved while active, activated again with the saved queues.
    /// The transport checked `state` with [`ModelState::check`] for this device's type. Called
    /// while the event loop is parked: work the restored state calls for (an interrupt, a packet)
    /// is left for the event loop, which the device wakes through a back-end descriptor.
    fn restore_state(&mut self, state: &ModelState);
}

/// Takes the chains the driver made available on `queue`, one at a time, and hands each to
/// `serve`, which returns how many bytes it wrote into the chain's buffers, or `None` to leave
/// the chain (and those after it) on the ring for later, when the back end cannot take it now.
/// Interrupts the driver once if any chain was used (unless its `used_event` says it does not
/// want to hear yet, with [`F_EVENT_IDX`]); a ring the driver corrupted marks the device broken.
///
/// While it drains the ring the driver is asked not to notify (`VRING_USED_F_NO_NOTIFY`, or with
/// [`F_EVENT_IDX`] an `avail_event` left behind): each notification costs the guest an exit and
/// the device a wake-up, and the device will see those chains anyway. Notifications are enabled
/// again before it returns, and the ring checked once more, so that no chain is missed.
pub fn serve_queue(
    queue: &mut Queue,
    memory: &GuestMemory,
    interrupt: &Interrupt,
    mut serve: impl FnMut(DescriptorChain<&GuestMemory>) -> Option<u32>,
) {
    if !queue.ready() {
        return; // a notification for a queue the driver never set up: nothing to serve
    }
    let broken_ring = |e| interrupt.mark_broken(&format!("bad available ring: {e}"));
    let mut used = false;
    // Passes since one took a chain. A chain that comes as a pass ends is taken by the next one;
    // a second pass in a row that takes nothing although the ring says there is more means it
    // cannot be read as it claims, and the device stops there rather than spin.
    let mut idle_passes = 0;
    'drain: loop {
        if let Err(e) = queue.disable_notification(memory) {
            return broken_ring(e);
        }
        idle_passes += 1;
        loop {
            let chain = match queue.iter(memory) {
                Ok(mut available) => available.next(),
                Err(e) => return broken_ring(e),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let Some(written) = serve(chain) else {
                queue.go_to_previous_position();
                if let Err(e) = queue.enable_notification(memory) {
                    return broken_ring(e);
                }
                break 'drain;
            };
            if let Err(e) = queue.add_used(memory, head, written) {
                return interrupt.mark_broken(&format!("cannot return a used buffer: {e}"));
            }
            used = true;
            idle_passes = 0;
        }
        match queue.enable_notification(memory) {
            Ok(true) if idle_passes < 2 => continue, // chains came while notifications were off
            Ok(_) => break,
            Err(e) => return broken_ring(e),
        }
    }
    if used && queue.needs_notification(memory).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Event data values at or above this one belong to a device's back end; below are queue indexes.
const BACKEND_DATA_BASE: u32 = 1 << 16;

/// The event-loop data value for a back-end descriptor registered with `token`.
pub fn backend_data(token: u32) -> u32 {
    BACKEND_DATA_BASE.saturating_add(token)
}

/// Interrupt state of one device: the `InterruptStatus` bits, the line into the irqchip, and
/// whether the device has found the driver broken.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Option<EventFd>,
    counters: Arc<DeviceCounters>,
}

/// `InterruptStatus` bit: a queue has used buffers.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl Interrupt {
    /// Interrupt state raising `line` (an irqfd), or none for a polling driver without an irqchip.
    pub fn new(line: Option<EventFd>, counters: Arc<DeviceCounters>) -> Self {
        Self { status: AtomicU32::new(0), needs_reset: AtomicBool::new(false), line, counters }
    }

    /// Tells the driver that buffers were used.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the device's configuration changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// Marks the device broken (`DEVICE_NEEDS_RESET`) because the driver did something the
    /// device cannot recover from, and tells the driver so.
    pub fn mark_broken(&self, why: &str) {
        guest_log!(log::Level::Warn, "virtio device marked as needing reset: {why}");
        self.counters.count_error();
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.raise(INT_CONFIG);
        }
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the bits the driver acknowledged.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets `InterruptStatus` and the broken state as saved, without raising the line: a pending
    /// interrupt is the interrupt controller's state, restored with it.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Forgets everything on device reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // Without a line (no irqchip) the driver polls the status; nothing is injected.
        let Some(line) = &self.line else { return };
        match line.write(1) {
            Ok(()) => _ = self.counters.interrupts.fetch_add(1, Ordering::Relaxed),
            Err(e) => log::warn!("cannot raise a virtio interrupt: {e}"),
        }
    }
}

/// What a device has done, for its owner to report.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests (descriptor chains) completed, failed ones included.
    pub requests: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_to_guest: AtomicU64,
    /// Bytes the device took from guest buffers.
    pub bytes_from_guest: AtomicU64,
    /// Requests failed and driver errors.
    pub errors: AtomicU64,
    /// Interrupts injected into the guest (none without an irqchip, where drivers poll).
    pub interrupts: AtomicU64,
    /// Queue notifications from the driver.
    pub notifications: AtomicU64,
}

/// A copy of [`DeviceCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// See [`DeviceCounters::requests`].
    pub requests: u64,
    /// See [`DeviceCounters::bytes_to_guest`].
    pub bytes_to_guest: u64,
    /// See [`DeviceCounters::bytes_from_guest`].
    pub bytes_from_guest: u64,
    /// See [`DeviceCounters::errors`].
    pub errors: u64,
    /// See [`DeviceCounters::interrupts`].
    pub interrupts: u64,
    /// See [`DeviceCounters::notifications`].
    pub notifications: u64,
}

impl DeviceCounters {
    /// Counts one completed request that moved `to_guest` and `from_guest` bytes.
    pub fn count_request(&self, to_guest: u64, from_guest: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_guest.fetch_add(to_guest, Ordering::Relaxed);
        self.bytes_from_guest.fetch_add(from_guest, Ordering::Relaxed);
    }

    /// Counts one error.
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            requests: get(&self.requests),
            bytes_to_guest: get(&self.bytes_to_guest),
            bytes_from_guest: get(&self.bytes_from_guest),
            errors: get(&self.errors),
            interrupts: get(&self.interrupts),
            notifications: get(&self.notifications),
        }
    }
}
