//! The saved state of a virtio device: its transport ([`TransportState`]), its queues
//! ([`VirtqueueState`]) and what its device model keeps beyond them ([`ModelState`]).
//!
//! All of it is plain data. What cannot be saved (guest memory, eventfds, the tap, the disk
//! image, host sockets) comes from the device the state is restored into.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::net::NetState;
use super::{TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK};
use crate::snapshot::StateError;

/// Everything an [`MmioTransport`](super::MmioTransport) and its device hold, as
/// [`Persist`](crate::snapshot::Persist) saves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device type ([`TYPE_BLOCK`], ...); a state only goes back into the same type.
    pub device_type: u32,
    /// The device status the driver wrote (`ACKNOWLEDGE`, `DRIVER`, `FEATURES_OK`, ...), without
    /// `DEVICE_NEEDS_RESET`, which is [`needs_reset`](Self::needs_reset).
    pub status: u32,
    /// Which half of the device features the driver reads.
    pub device_features_select: u32,
    /// Which half of the driver features the driver writes.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The queue the queue registers address.
    pub queue_select: u32,
    /// The `InterruptStatus` bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// Whether the device found the driver broken and waits for a reset.
    pub needs_reset: bool,
    /// The configuration generation the driver reads.
    pub config_generation: u32,
    /// Whether the device was activated (`DRIVER_OK` succeeded) and serves its queues.
    pub activated: bool,
    /// Every queue, by index: as the driver set it up and, once activated, as far as the device
    /// has served it.
    pub queues: Vec<VirtqueueState>,
    /// The device model's own state.
    pub model: ModelState,
}

/// One virtqueue: its layout and the device's position in its rings (virtio-queue's
/// [`QueueState`], as plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// The next available ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
    /// Whether notifications are suppressed through the event indexes (`VIRTIO_F_EVENT_IDX`).
    pub event_idx: bool,
}

impl From<QueueState> for VirtqueueState {
    fn from(state: QueueState) -> Self {
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx: state.event_idx_enabled,
        }
    }
}

impl From<VirtqueueState> for QueueState {
    fn from(state: VirtqueueState) -> Self {
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx,
        }
    }
}

impl VirtqueueState {
    /// The queue this state describes, if it is a valid one (sizes powers of two, the size at
    /// most the largest, rings aligned).
    pub fn to_queue(&self) -> Result<Queue, StateError> {
        Queue::try_from(QueueState::from(*self)).map_err(|e| StateError::new(format!("invalid queue: {e}")))
    }
}

/// What a device model keeps beyond its queues and configuration, one variant per device type.
///
/// The device's [`DeviceCounters`](super::DeviceCounters) are not part of it: they report what
/// the device did, and a restore does not undo that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// virtio-blk: nothing. Requests complete on the event-loop thread before it goes idle, so
    /// none is in flight at a snapshot, and the write mode follows from the driver's features.
    Block,
    /// virtio-net: the received frame waiting for a receive buffer, if any.
    Net(NetState),
    /// virtio-rng: nothing.
    Rng,
    /// virtio-vsock: nothing. Connections are not carried over: a restore drops them all and
    /// tells the driver so with a transport reset event.
    Vsock,
}

impl ModelState {
    /// The virtio device type the state belongs to.
    pub fn device_type(&self) -> u32 {
        match self {
            Self::Block => TYPE_BLOCK,
            Self::Net(_) => TYPE_NET,
            Self::Rng => TYPE_RNG,
            Self::Vsock => TYPE_VSOCK,
        }
    }

    /// Checks that the state can go into a device of type `device_type`.
    pub fn check(&self, device_type: u32) -> Result<(), StateError> {
        if self.device_type() != device_type {
            return Err(StateError::new(format!(
                "the device model state is for virtio device type {}, not {device_type}",
                self.device_type()
            )));
        }
        match self {
            Self::Net(net) => net.check(),
            Self::Block | Self::Rng | Self::Vsock => Ok(()),
        }
    }
}
