//! virtio-vsock: stream sockets between the guest and host processes, which reach the device
//! through Unix domain sockets.
//!
//! - Host to guest: a process connects to the device's socket path and writes `CONNECT <port>\n`.
//!   Once the guest accepts on `port`, the process reads `OK <host port>\n`, and the stream carries
//!   the connection from then on.
//! - Guest to host: a guest connection to CID 2, port `P`, reaches a process listening on the Unix
//!   socket `<path>_P`.
//!
//! Only stream sockets are carried. The event queue carries one event, after a restore: host
//! connections are not carried over a snapshot, and the transport reset event tells the driver
//! to drop its side of them.

mod connection;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet};
use virtio_queue::Queue;

use self::connection::BUF_ALLOC;
use self::muxer::Muxer;
use self::packet::{read_header, read_payload, Buffers, HEADER_SIZE, TYPE_STREAM};
use super::{serve_queue, ActiveQueues, DeviceCounters, ModelState, VirtioDevice, F_EVENT_IDX, TYPE_VSOCK};
use crate::ratelimit::guest_log;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const QUEUES: usize = 3;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: every connection is gone. An event is its id, a
/// little-endian u32 (`struct virtio_vsock_event`).
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Passes over tx and rx per wake-up while tx waits for rx room, before yielding the event loop.
const MAX_ROUNDS: usize = 8;

/// A vsock device that cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0 to 2, and `u32::MAX` for "any") or does not fit in 32 bits.
    #[error("guest CID {0} is reserved or out of range: it must be from 3 to 4294967294")]
    InvalidCid(u64),
    /// Something already exists at the socket path.
    #[error("vsock socket path {} already exists", .0.display())]
    PathExists(PathBuf),
    /// The directory of the socket path does not exist.
    #[error("the directory of vsock socket path {} does not exist", .0.display())]
    NoDirectory(PathBuf),
    /// Listening on the socket path failed.
    #[error("cannot listen on vsock socket path {}: {source}", .path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The eventfd that wakes the device's event loop cannot be made.
    #[error("cannot create the vsock wake-up eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A vsock device whose host side is a Unix domain socket.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues>,
    /// A transport reset event is owed to the driver, for its next event buffer.
    reset_event_pending: bool,
}

impl Vsock {
    /// A device giving the guest `guest_cid`, listening for host processes on `uds_path`, which
    /// must not exist yet and is removed when the device is dropped.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let counters = Arc::new(DeviceCounters::default());
        let muxer = Muxer::new(guest_cid, uds_path, counters.clone())?;
        Ok(Self { guest_cid, muxer, counters, active: None, reset_event_pending: false })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Takes packets from tx and fills rx until neither can go on.
    fn run(&mut self) {
        // The reset goes first, so that the driver drops its old connections before new ones.
        self.send_reset_event();
        let Some(active) = &mut self.active else { return };
        for _ in 0..MAX_ROUNDS {
            let paused = serve_tx(active, &mut self.muxer, &self.counters, self.guest_cid);
            serve_rx(active, &mut self.muxer, &self.counters);
            // tx waits for RSTs to leave; once rx has no room it resumes when the driver adds some.
            if !paused || self.muxer.backlog_full() {
                return;
            }
        }
        self.muxer.wake();
    }

    /// Puts an owed transport reset event in the driver's next event buffer, if it has one.
    fn send_reset_event(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(active) = &mut self.active else { return };
        let (pending, counters) = (&mut self.reset_event_pending, &self.counters);
        serve_queue(&mut active.queues[EVENT], &active.memory, &active.interrupt, |chain| {
            if !*pending {
                return None; // one event: the other buffers stay with the device
            }
            let event = EVENT_TRANSPORT_RESET.to_le_bytes();
            let buffers = Buffers::of(&chain, true);
            if buffers.len() < event.len() as u64 || buffers.write(chain.memory(), &event).is_err() {
                guest_log!(log::Level::Debug, "vsock: an event buffer is too short or outside guest memory");
                counters.count_error();
                counters.count_request(0, 0);
                return Some(0); // the event waits for the next buffer
            }
            *pending = false;
            counters.count_request(event.len() as u64, 0);
            Some(event.len() as u32)
        });
    }
}

/// Takes the guest's packets; returns whether it left some for want of rx room.
fn serve_tx(active: &mut ActiveQueues, muxer: &mut Muxer, counters: &DeviceCounters, guest_cid: u64) -> bool {
    let mut paused = false;
    serve_queue(&mut active.queues[TX], &active.memory, &active.interrupt, |chain| {
        if muxer.backlog_full() {
            paused = true;
            return None;
        }
        let memory = chain.memory();
        let buffers = Buffers::of(&chain, false);
        let header = match read_header(&buffers, memory) {
            Ok(header) => header,
            Err(e) => return Some(drop_packet(counters, &e)),
        };
        if header.src_cid != guest_cid {
            return Some(drop_packet(counters, &format!("source CID {} is not the guest's", header.src_cid)));
        }
        if header.kind != TYPE_STREAM {
            muxer.reply_rst(&header);
            return Some(drop_packet(counters, &format!("socket type {} is not stream", header.kind)));
        }
        match read_payload(&buffers, memory, &header, BUF_ALLOC as usize) {
            Ok(payload) => {
                // Like the receive side, the count includes the header the device read.
                counters.count_request(0, (HEADER_SIZE + payload.len()) as u64);
                muxer.handle_packet(&header, &payload);
            }
            Err(e) => {
                muxer.reset_for(&header);
                drop_packet(counters, &e);
            }
        }
        Some(0)
    });
    paused
}

/// Counts a tx packet the device drops; the driver gets its buffers back untouched.
fn drop_packet(counters: &DeviceCounters, why: &dyn std::fmt::Display) -> u32 {
    guest_log!(log::Level::Debug, "vsock: dropping a packet from the guest: {why}");
    counters.count_error();
    counters.count_request(0, 0);
    0
}

/// Fills rx buffers with what the host side has for the guest.
fn serve_rx(active: &mut ActiveQueues, muxer: &mut Muxer, counters: &DeviceCounters) {
    serve_queue(&mut active.queues[RX], &active.memory, &active.interrupt, |chain| {
        let memory = chain.memory();
        let buffers = Buffers::of(&chain, true);
        if buffers.len() < HEADER_SIZE as u64 || !buffers.in_memory(memory) {
            guest_log!(
                log::Level::Debug,
                "vsock: an rx chain of {} bytes is too short or outside guest memory",
                buffers.len()
            );
            counters.count_error();
            counters.count_request(0, 0);
            return Some(0);
        }
        let room = usize::try_from(buffers.len() - HEADER_SIZE as u64).unwrap_or(usize::MAX);
        let (header, payload) = muxer.next_packet(room)?;
        let mut packet = Vec::with_capacity(HEADER_SIZE + payload.len());
        packet.extend_from_slice(&header.to_bytes());
        packet.extend_from_slice(&payload);
        if let Err(e) = buffers.write(memory, &packet) {
            guest_log!(log::Level::Warn, "vsock: writing a packet for the guest failed: {e}");
            counters.count_error();
        }
        counters.count_request(packet.len() as u64, 0);
        Some(packet.len() as u32)
    });
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration is the guest's CID, a little-endian u64.
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), String> {
        if active.queues.len() != QUEUES {
            return Err(format!("vsock needs {QUEUES} queues, got {}", active.queues.len()));
        }
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset_event_pending = false;
        self.muxer.reset();
        self.muxer.wake_if_needed();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX | TX => self.run(),
            EVENT => self.send_reset_event(),
            _ => {}
        }
        self.muxer.wake_if_needed();
    }

    fn backend_events(&self) -> Vec<(RawFd, u32, EventSet)> {
        self.muxer.backend_events()
    }

    fn process_backend(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        self.muxer.handle_event(token, events, ops);
        self.run();
        self.muxer.apply_ops(ops);
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|active| &active.queues[..])
    }

    fn save_state(&self) -> ModelState {
        ModelState::Vsock
    }

    fn restore_state(&mut self, _state: &ModelState) {
        // Host streams cannot be carried over a snapshot (nor into another process), so, as the
        // virtio specification has it for migration, every connection ends, and the driver
        // hears of it from a transport reset event and drops its own side.
        self.muxer.drop_connections();
        if self.active.is_some() {
            self.reset_event_pending = true;
            // The event loop sends it once it runs again.
            self.muxer.wake();
        }
    }
}
