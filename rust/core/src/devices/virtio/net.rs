//! virtio-net on a tap: one receive and one transmit queue, frames passed through with their
//! virtio-net header, checksum and TCP segmentation offload when the tap takes them.
//!
//! A card may also have no back end ([`Net::unplugged`]): its link is down, what the driver
//! transmits is dropped, and nothing is received. A fork gets one when it may not share the
//! parent's tap, so that the guest's driver keeps the device it was using.
//!
//! Mergeable receive buffers are not offered. Without them a driver that accepts the TSO
//! features posts receive buffers big enough for the largest segment (Linux's "big packets"
//! mode), so every frame fits one chain; offering them would only save guest memory, at the
//! cost of splitting frames over chains.

mod tap;
#[cfg(test)]
mod test_util;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as bindings;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub use tap::{NetError, Tap, VNET_HDR_LEN};

use super::{serve_queue, ActiveQueues, DeviceCounters, ModelState, VirtioDevice, F_EVENT_IDX, TYPE_NET};
use crate::ratelimit::guest_log;
use crate::snapshot::StateError;
use crate::vstate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// The largest frame the device moves, header included: a 64 KiB IP packet, its Ethernet
/// header and the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65562;
/// Frames received per pass, so that a busy network does not starve the VM's other devices.
const RX_BUDGET: usize = 64;
/// Shortest frame a tap can hand over: the header and an Ethernet header.
const MIN_RX_LEN: usize = VNET_HDR_LEN + 14;

/// Back-end token of the tap.
const TAP_TOKEN: u32 = 0;
/// Back-end token of the eventfd that resumes receiving after a pass ran out of budget.
const RX_RETRY_TOKEN: u32 = 1;

/// Where the MAC address is in the configuration space (6 bytes).
pub const CONFIG_MAC: usize = 0;
/// Where the link status is in the configuration space (`u16`, little-endian).
pub const CONFIG_STATUS: usize = 6;
const CONFIG_LEN: usize = 8;

const fn feature(bit: u32) -> u64 {
    1 << bit
}
const F_CSUM: u64 = feature(bindings::VIRTIO_NET_F_CSUM);
const F_GUEST_CSUM: u64 = feature(bindings::VIRTIO_NET_F_GUEST_CSUM);
const F_MAC: u64 = feature(bindings::VIRTIO_NET_F_MAC);
const F_GUEST_TSO4: u64 = feature(bindings::VIRTIO_NET_F_GUEST_TSO4);
const F_GUEST_TSO6: u64 = feature(bindings::VIRTIO_NET_F_GUEST_TSO6);
const F_HOST_TSO4: u64 = feature(bindings::VIRTIO_NET_F_HOST_TSO4);
const F_HOST_TSO6: u64 = feature(bindings::VIRTIO_NET_F_HOST_TSO6);
const F_STATUS: u64 = feature(bindings::VIRTIO_NET_F_STATUS);

/// The features to offer for a tap that accepts `offloads` (`TUN_F_*`).
fn offered_features(offloads: u32) -> u64 {
    let mut features = F_MAC | F_STATUS | F_EVENT_IDX;
    // Both directions need checksum offload first; segmentation builds on it.
    if offloads & libc::TUN_F_CSUM != 0 {
        features |= F_CSUM | F_GUEST_CSUM;
        if offloads & libc::TUN_F_TSO4 != 0 {
            features |= F_HOST_TSO4 | F_GUEST_TSO4;
        }
        if offloads & libc::TUN_F_TSO6 != 0 {
            features |= F_HOST_TSO6 | F_GUEST_TSO6;
        }
    }
    features
}

/// The tap offloads that give the driver what its accepted `features` let it receive.
fn tap_offloads(features: u64) -> u32 {
    if features & F_GUEST_CSUM == 0 {
        return 0; // segmentation without checksum offload is not allowed, by virtio or the tap
    }
    let mut offloads = libc::TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        offloads |= libc::TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        offloads |= libc::TUN_F_TSO6;
    }
    offloads
}

/// A locally administered unicast MAC address from the host's random source.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let got = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if got != mac.len() as isize {
        // Interrupted before the pool was ready: std's hasher keys are random too.
        mac.copy_from_slice(&RandomState::new().build_hasher().finish().to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// What a [`Net`] keeps beyond its queues. The tap is not part of it: the card restored into
/// keeps its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The frame read from the tap that no receive buffer has taken yet, its virtio-net header
    /// first, as the driver will get it.
    pub rx_frame: Option<Vec<u8>>,
}

impl NetState {
    /// Checks that the waiting frame is one the card could have read.
    pub(super) fn check(&self) -> Result<(), StateError> {
        match &self.rx_frame {
            Some(frame) if !(MIN_RX_LEN..=MAX_FRAME_LEN).contains(&frame.len()) => Err(StateError::new(format!(
                "the waiting received frame has {} bytes, not {MIN_RX_LEN} to {MAX_FRAME_LEN}",
                frame.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// Where a card's frames go.
enum Backend {
    /// To and from a tap on the host.
    Tap(Tap),
    /// Nowhere: the link is down.
    Unplugged,
}

/// A network card whose other end is a tap on the host, or nothing.
pub struct Net {
    backend: Backend,
    mac: [u8; 6],
    features: u64,
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues>,
    /// Whether the driver accepted `GUEST_CSUM`, without which received headers carry no flags.
    guest_csum: bool,
    /// A frame read from the tap, waiting for a receive buffer: `rx_frame[..len]`.
    rx_pending: Option<usize>,
    rx_frame: Box<[u8]>,
    tx_frame: Box<[u8]>,
    /// Written when a receive pass stops with frames possibly left, to come back to them after
    /// the event loop served the others. Without it (no eventfd to be had) passes are unbounded.
    rx_retry: Option<EventFd>,
    /// Whether the driver must be told that the link went down: set when an unplugged card is
    /// restored with an active driver, which last saw the link up.
    link_change_pending: bool,
}

impl Net {
    /// A network card on `tap` with MAC address `mac`, or a random locally administered one.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> Net {
        let features = offered_features(tap.supported_offloads());
        Net::with_backend(Backend::Tap(tap), features, mac)
    }

    /// A network card with no back end and MAC address `mac`, or a random one. Its link is down,
    /// transmitted frames are dropped (each counted as a failed request), and nothing is ever
    /// received. It offers every offload a tap can take, so that the state of any card restores
    /// into it.
    pub fn unplugged(mac: Option<[u8; 6]>) -> Net {
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        Net::with_backend(Backend::Unplugged, offered_features(all), mac)
    }

    fn with_backend(backend: Backend, features: u64, mac: Option<[u8; 6]>) -> Net {
        let rx_retry = EventFd::new(libc::EFD_NONBLOCK)
            .inspect_err(|e| log::warn!("virtio-net: no eventfd, receive passes are unbounded: {e}"))
            .ok();
        Net {
            features,
            backend,
            mac: mac.unwrap_or_else(random_mac),
            counters: Arc::default(),
            active: None,
            guest_csum: false,
            rx_pending: None,
            rx_frame: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            tx_frame: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            rx_retry,
            link_change_pending: false,
        }
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap the card is connected to, if any.
    pub fn tap(&self) -> Option<&Tap> {
        match &self.backend {
            Backend::Tap(tap) => Some(tap),
            Backend::Unplugged => None,
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&self.mac);
        let status = match self.backend {
            Backend::Tap(_) => bindings::VIRTIO_NET_S_LINK_UP as u16,
            Backend::Unplugged => 0,
        };
        config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&status.to_le_bytes());
        config
    }

    /// Asks the event loop for another receive pass.
    fn kick_rx(&self) {
        if let Some(retry) = &self.rx_retry {
            if let Err(e) = retry.write(1) {
                log::warn!("virtio-net: cannot schedule receiving: {e}");
            }
        }
    }

    /// Moves frames from the tap into the driver's receive buffers until either runs out (or
    /// the pass's budget does). A frame read without a buffer to take it waits in `rx_pending`.
    /// First tells the driver of a link change still to be reported.
    fn rx(&mut self) {
        let Some(active) = &mut self.active else { return };
        if std::mem::take(&mut self.link_change_pending) {
            active.interrupt.signal_config();
        }
        let Backend::Tap(tap) = &self.backend else { return };
        let budget = if self.rx_retry.is_some() { RX_BUDGET } else { usize::MAX };
        let mut reads = 0usize;
        let mut exhausted = false;
        let (frame, pending, counters) = (&mut self.rx_frame, &mut self.rx_pending, &self.counters);
        let guest_csum = self.guest_csum;
        serve_queue(&mut active.queues[RX], &active.memory, &active.interrupt, |chain| {
            let len = match *pending {
                Some(len) => len,
                None => loop {
                    if reads == budget {
                        exhausted = true;
                        return None;
                    }
                    reads += 1;
                    match tap.read(frame) {
                        Ok(len) if len >= MIN_RX_LEN => break prepare_rx_header(&mut frame[..len], guest_csum),
                        Ok(len) => {
                            log::debug!("virtio-net: dropped a {len}-byte frame from the tap");
                            counters.count_error();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            log::warn!("virtio-net: cannot read from tap {}: {e}", tap.name());
                            counters.count_error();
                            return None;
                        }
                    }
                },
            };
            *pending = Some(len);
            match write_frame(chain, &frame[..len]) {
                Ok(()) => {
                    *pending = None;
                    counters.count_request(len as u64, 0);
                    return Some(len as u32);
                }
                Err(RxError::TooSmall) => {
                    // Dropped: the driver's next buffer is most likely no bigger.
                    guest_log!(log::Level::Debug, "virtio-net: a {len}-byte frame does not fit the receive buffers");
                    *pending = None;
                }
                // The frame waits for the next chain.
                Err(RxError::Memory) => {
                    guest_log!(log::Level::Debug, "virtio-net: a receive buffer outside guest memory")
                }
            }
            // The chain goes back empty, so that a bad one does not block the queue.
            counters.count_request(0, 0);
            counters.count_error();
            Some(0)
        });
        if exhausted {
            self.kick_rx();
        }
    }

    /// Sends every frame the driver made available on the transmit queue.
    fn tx(&mut self) {
        let Some(active) = &mut self.active else { return };
        let (backend, frame, counters) = (&self.backend, &mut self.tx_frame, &self.counters);
        serve_queue(&mut active.queues[TX], &active.memory, &active.interrupt, |chain| {
            let sent = gather_frame(chain, frame).and_then(|len| match backend {
                Backend::Unplugged => Err("the link is down".into()),
                Backend::Tap(tap) => match tap.write(&frame[..len]) {
                    Ok(n) if n == len => Ok(len),
                    Ok(n) => Err(format!("the tap took {n} of {len} bytes")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err("the tap is full".into()),
                    Err(e) => Err(format!("cannot write to the tap: {e}")),
                },
            });
            match sent {
                Ok(len) => counters.count_request(0, len as u64),
                Err(why) => {
                    guest_log!(log::Level::Debug, "virtio-net: transmitted frame dropped: {why}");
                    counters.count_request(0, 0);
                    counters.count_error();
                }
            }
            Some(0)
        });
    }
}

/// Makes the header the tap wrote (`frame` is at least [`MIN_RX_LEN`] bytes) one the driver may
/// read; returns the frame's length.
fn prepare_rx_header(frame: &mut [u8], guest_csum: bool) -> usize {
    if let (Some(flags), false) = (frame.first_mut(), guest_csum) {
        *flags = 0; // only for a driver that accepted GUEST_CSUM
    }
    // num_buffers: without mergeable buffers, each frame is in one chain.
    if let Some(num_buffers) = frame.get_mut(10..12) {
        num_buffers.copy_from_slice(&1u16.to_le_bytes());
    }
    frame.len()
}

enum RxError {
    /// The chain's writable buffers cannot hold the frame.
    TooSmall,
    /// A writable buffer is outside guest memory.
    Memory,
}

/// Writes `frame` into the chain's writable buffers.
fn write_frame(chain: DescriptorChain<&GuestMemory>, frame: &[u8]) -> Result<(), RxError> {
    let memory = chain.memory();
    let capacity: u64 = chain.clone().writable().map(|desc| u64::from(desc.len())).sum();
    if capacity < frame.len() as u64 {
        return Err(RxError::TooSmall);
    }
    let mut rest = frame;
    for desc in chain.clone().writable() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(rest.len().min(desc.len() as usize));
        memory.write_slice(now, GuestAddress(desc.addr().0)).map_err(|_| RxError::Memory)?;
        rest = later;
    }
    // The driver may have shrunk the chain since it was measured.
    if rest.is_empty() {
        Ok(())
    } else {
        Err(RxError::TooSmall)
    }
}

/// Copies a transmit chain (header and frame, all device-readable) into `frame`; returns its
/// length.
fn gather_frame(chain: DescriptorChain<&GuestMemory>, frame: &mut [u8]) -> Result<usize, String> {
    let memory = chain.memory();
    let mut len = 0usize;
    for desc in chain.clone() {
        if desc.is_write_only() {
            return Err("a device-writable buffer in a transmit chain".into());
        }
        let end = len.saturating_add(desc.len() as usize);
        let Some(dst) = frame.get_mut(len..end) else {
            return Err(format!("a transmit chain longer than {MAX_FRAME_LEN} bytes"));
        };
        if memory.read_slice(dst, GuestAddress(desc.addr().0)).is_err() {
            return Err("a transmit buffer outside guest memory".into());
        }
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(format!("a {len}-byte transmit chain, shorter than the virtio-net header"));
    }
    Ok(len)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|offset| offset.checked_add(i));
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), String> {
        if active.queues.len() != 2 {
            return Err(format!("virtio-net has 2 queues, not {}", active.queues.len()));
        }
        if let Backend::Tap(tap) = &self.backend {
            tap.set_offload(tap_offloads(active.features)).map_err(|e| e.to_string())?;
        }
        self.guest_csum = active.features & F_GUEST_CSUM != 0;
        self.active = Some(active);
        // Frames that came while the device was down are waiting, and so may receive buffers.
        self.kick_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        self.link_change_pending = false;
        if let Backend::Tap(tap) = &self.backend {
            if let Err(e) = tap.set_offload(0) {
                guest_log!(log::Level::Warn, "virtio-net: {e}");
            }
        }
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.rx(),
            TX => self.tx(),
            _ => {}
        }
    }

    fn backend_events(&self) -> Vec<(RawFd, u32, EventSet)> {
        // Edge-triggered: a tap that stays readable while the driver has no buffers wakes the
        // loop once, not continuously; the driver's next receive notification resumes.
        let mut events = Vec::new();
        if let Backend::Tap(tap) = &self.backend {
            events.push((tap.as_raw_fd(), TAP_TOKEN, EventSet::IN | EventSet::EDGE_TRIGGERED));
        }
        if let Some(retry) = &self.rx_retry {
            events.push((retry.as_raw_fd(), RX_RETRY_TOKEN, EventSet::IN));
        }
        events
    }

    fn process_backend(&mut self, token: u32, _events: EventSet, _ops: &mut EventOps) {
        if token == RX_RETRY_TOKEN {
            if let Some(retry) = &self.rx_retry {
                let _ = retry.read(); // clears it; a failure means it was already clear
            }
        }
        self.rx();
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|active| &active.queues[..])
    }

    fn save_state(&self) -> ModelState {
        ModelState::Net(NetState { rx_frame: self.rx_pending.map(|len| self.rx_frame[..len].to_vec()) })
    }

    fn restore_state(&mut self, state: &ModelState) {
        let ModelState::Net(NetState { rx_frame }) = state else { return };
        if let Backend::Unplugged = self.backend {
            // Nothing is received on a card without a link, not even what the last tap sent.
            // The driver saw the link up: it learns otherwise from a configuration change,
            // raised from the event loop once the VM runs, so that the interrupt controller's
            // restored state does not swallow it.
            self.link_change_pending = self.active.is_some();
            self.kick_rx();
            return;
        }
        self.rx_pending = rx_frame.as_ref().and_then(|frame| {
            self.rx_frame.get_mut(..frame.len())?.copy_from_slice(frame);
            Some(frame.len())
        });
        // Activation has already asked for a receive pass, which will deliver it.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, Events, MutEventSubscriber, SubscriberOps};

    use super::test_util::{frame, in_private_netns, wait_readable, HostSide, ETHTOOL_GTSO, ETHTOOL_GTXCSUM};
    use super::*;
    use crate::devices::virtio::testing::{MockDriver, DATA_START, MEMORY_SIZE};
    use crate::devices::virtio::{CounterSnapshot, F_VERSION_1};
    use crate::snapshot::Persist;

    const MAC: [u8; 6] = [0x02, 0x6b, 0x76, 0x6d, 0x00, 0x01];
    const OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO6;
    const WAIT_MS: i32 = 2000;

    /// A card on a new tap `name`, the tap up, and the host's end of it.
    fn setup(name: &str) -> (MockDriver<Net>, HostSide) {
        let tap = Tap::open(name).unwrap();
        let host = HostSide::attach(name);
        (MockDriver::new(Net::new(tap, Some(MAC))), host)
    }

    fn tap_fd(driver: &MockDriver<Net>) -> RawFd {
        driver.device.lock().unwrap().tap().unwrap().as_raw_fd()
    }

    fn counters(driver: &MockDriver<Net>) -> CounterSnapshot {
        driver.device.lock().unwrap().counters().snapshot()
    }

    /// What the tap's readiness event does, once the frames sent so far can be read.
    fn rx_ready(driver: &MockDriver<Net>) {
        assert!(wait_readable(tap_fd(driver), WAIT_MS), "no frame reached the tap");
        driver.device.lock().unwrap().rx();
    }

    /// The header a received frame gets: no offload, one buffer.
    fn rx_header() -> [u8; VNET_HDR_LEN] {
        let mut header = [0; VNET_HDR_LEN];
        header[10] = 1;
        header
    }

    #[test]
    fn config_holds_the_given_mac_and_link_up() {
        in_private_netns(|| {
            let (driver, _host) = setup("cfg0");
            assert_eq!(driver.config(0, 6), MAC);
            assert_eq!(driver.config(6, 2), [1, 0], "VIRTIO_NET_S_LINK_UP");
            assert_eq!(driver.config(4, 4), [MAC[4], MAC[5], 1, 0]);
            assert_eq!(driver.config(8, 8), [0; 8], "past the end reads as zero");
            let device = driver.device.lock().unwrap();
            assert_eq!((device.device_type(), device.queue_max_sizes()), (TYPE_NET, &[256u16, 256][..]));
            assert_eq!(device.mac(), MAC);
            assert_eq!(device.tap().unwrap().name(), "cfg0");
        });
    }

    #[test]
    fn a_generated_mac_is_random_locally_administered_and_unicast() {
        for _ in 0..64 {
            let mac = random_mac();
            assert_eq!(mac[0] & 0x03, 0x02, "{mac:02x?}");
        }
        in_private_netns(|| {
            let first = MockDriver::new(Net::new(Tap::open("mac0").unwrap(), None));
            let second = MockDriver::new(Net::new(Tap::open("mac1").unwrap(), None));
            let (a, b) = (first.config(0, 6), second.config(0, 6));
            assert_eq!((a[0] & 0x03, b[0] & 0x03), (0x02, 0x02));
            // Equal with probability 2^-46.
            assert_ne!(a, b);
            assert_eq!(a, first.device.lock().unwrap().mac());
        });
    }

    #[test]
    fn offered_features_follow_the_taps_offloads() {
        use libc::{TUN_F_CSUM as CSUM, TUN_F_TSO4 as TSO4, TUN_F_TSO6 as TSO6};
        let base = F_MAC | F_STATUS | F_EVENT_IDX;
        assert_eq!(offered_features(0), base);
        assert_eq!(offered_features(CSUM), base | F_CSUM | F_GUEST_CSUM);
        assert_eq!(offered_features(CSUM | TSO4), base | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4);
        assert_eq!(offered_features(TSO4 | TSO6), base, "segmentation needs checksum offload");
        assert_eq!(offered_features(CSUM | TSO4 | TSO6), base | OFFLOADS);
        assert_eq!(offered_features(CSUM | TSO4 | TSO6) & feature(bindings::VIRTIO_NET_F_MRG_RXBUF), 0);

        assert_eq!(tap_offloads(F_MAC | F_CSUM | F_HOST_TSO4), 0, "host-side features need no tap offload");
        assert_eq!(tap_offloads(F_GUEST_TSO4), 0, "no segmentation without checksum offload");
        assert_eq!(tap_offloads(F_GUEST_CSUM), CSUM);
        assert_eq!(tap_offloads(F_GUEST_CSUM | F_GUEST_TSO6), CSUM | TSO6);
        assert_eq!(tap_offloads(OFFLOADS), CSUM | TSO4 | TSO6);

        in_private_netns(|| {
            // This kernel's tap takes them all, so the card offers them all.
            let (driver, _host) = setup("feat0");
            assert_eq!(driver.device_features(), base | OFFLOADS | F_VERSION_1);
        });
    }

    #[test]
    fn activation_sets_the_tap_offloads_the_driver_accepted() {
        in_private_netns(|| {
            let (mut driver, host) = setup("offl0");
            let state = |host: &HostSide| (host.ethtool(ETHTOOL_GTXCSUM), host.ethtool(ETHTOOL_GTSO));
            assert_eq!(state(&host), (false, false), "off until a driver asks");
            driver.activate(F_MAC | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4);
            assert_eq!(state(&host), (true, true));
            driver.activate(F_MAC | F_GUEST_CSUM);
            assert_eq!(state(&host), (true, false));
            driver.negotiate(0); // resets first
            assert_eq!(state(&host), (false, false), "a reset turns them off");
            driver.activate(F_MAC | F_CSUM | F_HOST_TSO4);
            assert_eq!(state(&host), (false, false));
        });
    }

    #[test]
    fn transmitted_frames_reach_the_host_byte_for_byte() {
        in_private_netns(|| {
            let (mut driver, host) = setup("tx0");
            driver.activate(F_MAC);
            // Header and frame spread over three buffers, the header split across two.
            let sent = frame(100, 7);
            let mut packet = vec![0u8; VNET_HDR_LEN];
            packet.extend(&sent);
            driver.write_mem(DATA_START, &packet[..8]);
            driver.write_mem(DATA_START + 0x1000, &packet[8..50]);
            driver.write_mem(DATA_START + 0x2000, &packet[50..]);
            let head = driver.add_chain(
                1,
                &[(DATA_START, 8, false), (DATA_START + 0x1000, 42, false), (DATA_START + 0x2000, 62, false)],
            );
            driver.notify(1);
            assert_eq!(driver.used(1), [(head as u32, 0)]);
            assert!(driver.take_interrupt());
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&sent[..]));
            // One buffer, a bigger frame.
            let sent = frame(1514, 42);
            driver.write_mem(DATA_START + 0x4000, &[0; VNET_HDR_LEN]);
            driver.write_mem(DATA_START + 0x4000 + VNET_HDR_LEN as u64, &sent);
            driver.add_chain(1, &[(DATA_START + 0x4000, 1526, false)]);
            driver.notify(1);
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&sent[..]));
            let counters = counters(&driver);
            assert_eq!((counters.requests, counters.bytes_from_guest, counters.errors), (2, 112 + 1526, 0));
            assert_eq!(host.recv(100), None, "nothing else was sent");
        });
    }

    #[test]
    fn bad_transmit_chains_are_dropped_and_counted_and_the_next_frame_goes() {
        in_private_netns(|| {
            let (mut driver, host) = setup("txbad0");
            driver.activate(F_MAC);
            let good = frame(80, 1);
            driver.write_mem(DATA_START + 0x1000, &good);
            let chains: [&[(u64, u32, bool)]; 7] = [
                &[(DATA_START, 8, false)], // shorter than the header
                &[(DATA_START, VNET_HDR_LEN as u32, false), (DATA_START + 0x1000, 80, true)], // writable buffer
                &[(DATA_START, VNET_HDR_LEN as u32, false), (MEMORY_SIZE - 16, 80, false)], // runs out of memory
                &[(DATA_START, VNET_HDR_LEN as u32, false), (u64::MAX - 8, 80, false)], // wraps around
                &[(DATA_START, 40_000, false), (DATA_START + 0x10000, 40_000, false)], // too long
                &[(DATA_START, VNET_HDR_LEN as u32, false)], // no frame: the tap refuses it
                &[(DATA_START, VNET_HDR_LEN as u32, false), (DATA_START + 0x1000, 80, false)],
            ];
            let heads: Vec<u16> = chains.iter().map(|chain| driver.add_chain(1, chain)).collect();
            driver.notify(1);
            let expected: Vec<(u32, u32)> = heads.iter().map(|&head| (head as u32, 0)).collect();
            assert_eq!(driver.used(1), expected);
            assert!(driver.take_interrupt());
            assert!(!driver.take_interrupt(), "one interrupt for the batch");
            assert!(!driver.needs_reset());
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&good[..]));
            assert_eq!(host.recv(100), None, "the bad chains sent nothing");
            let counters = counters(&driver);
            assert_eq!((counters.requests, counters.errors, counters.bytes_from_guest), (7, 6, 92));
        });
    }

    #[test]
    fn nothing_is_served_before_activation() {
        in_private_netns(|| {
            let (mut driver, host) = setup("early0");
            assert_eq!(driver.negotiate(F_MAC) & 0x8, 0x8);
            driver.setup_queues(16);
            let sent = frame(60, 5);
            driver.write_mem(DATA_START + VNET_HDR_LEN as u64, &sent);
            driver.add_chain(1, &[(DATA_START, 72, false)]);
            driver.notify(1);
            driver.device.lock().unwrap().rx();
            assert_eq!((driver.used(1), driver.take_interrupt()), (vec![], false));
            assert_eq!(host.recv(100), None);
            driver.driver_ok();
            driver.notify(1);
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&sent[..]));
        });
    }

    #[test]
    fn received_frames_reach_the_guest_with_their_header() {
        in_private_netns(|| {
            let (mut driver, host) = setup("rx0");
            driver.activate(F_MAC);
            driver.write_mem(DATA_START, &[0xff; 0x2000]);
            let head = driver.add_chain(0, &[(DATA_START, 20, true), (DATA_START + 0x1000, 2000, true)]);
            let sent = frame(200, 3);
            host.send(&sent);
            rx_ready(&driver);
            assert_eq!(driver.used(0), [(head as u32, 212)]);
            assert!(driver.take_interrupt());
            let mut got = driver.read_mem(DATA_START, 20);
            got.extend(driver.read_mem(DATA_START + 0x1000, 192));
            assert_eq!(got[..VNET_HDR_LEN], rx_header());
            assert_eq!(got[VNET_HDR_LEN..], sent);
            assert_eq!(driver.read_mem(DATA_START + 0x1000 + 192, 1), [0xff], "nothing past the frame");
            let counters = counters(&driver);
            assert_eq!((counters.requests, counters.bytes_to_guest, counters.errors), (1, 212, 0));
        });
    }

    #[test]
    fn frames_wait_for_receive_buffers_without_loss() {
        in_private_netns(|| {
            let (mut driver, host) = setup("rxwait0");
            let (first, second) = (frame(100, 10), frame(300, 20));
            host.send(&first);
            // Not active yet: the frame stays in the tap.
            rx_ready(&driver);
            driver.activate(F_MAC);
            host.send(&second);
            // No buffers: the first frame is read and kept, the second stays in the tap.
            rx_ready(&driver);
            rx_ready(&driver);
            assert_eq!((driver.used(0), driver.take_interrupt()), (vec![], false));
            for (i, sent) in [&first, &second].into_iter().enumerate() {
                let addr = DATA_START + 0x1000 * i as u64;
                let head = driver.add_chain(0, &[(addr, 1526, true)]);
                driver.notify(0);
                let len = (VNET_HDR_LEN + sent.len()) as u32;
                assert_eq!(driver.used(0).last(), Some(&(head as u32, len)));
                assert!(driver.take_interrupt());
                assert_eq!(driver.read_mem(addr + VNET_HDR_LEN as u64, sent.len()), *sent);
            }
            driver.add_chain(0, &[(DATA_START + 0x4000, 1526, true)]);
            driver.notify(0);
            assert_eq!((driver.used(0).len(), driver.take_interrupt()), (2, false), "no third frame");
            assert_eq!(counters(&driver).errors, 0);
        });
    }

    #[test]
    fn a_frame_too_big_for_the_receive_buffers_is_dropped_and_counted() {
        in_private_netns(|| {
            let (mut driver, host) = setup("rxbig0");
            driver.activate(F_MAC);
            driver.write_mem(DATA_START, &[0xff; 64]);
            let small = driver.add_chain(0, &[(DATA_START, 64, true)]);
            // Readable buffers do not count: this chain holds nothing.
            let readable = driver.add_chain(0, &[(DATA_START + 0x1000, 2048, false)]);
            host.send(&frame(200, 1));
            host.send(&frame(100, 2));
            rx_ready(&driver);
            assert_eq!(driver.used(0), [(small as u32, 0), (readable as u32, 0)]);
            assert_eq!(driver.read_mem(DATA_START, 64), [0xff; 64], "nothing written into a buffer too small");
            let good = driver.add_chain(0, &[(DATA_START + 0x2000, 2048, true)]);
            let sent = frame(150, 3);
            host.send(&sent);
            rx_ready(&driver);
            assert_eq!(driver.used(0)[2], (good as u32, 162));
            assert_eq!(driver.read_mem(DATA_START + 0x2000 + VNET_HDR_LEN as u64, 150), sent);
            let counters = counters(&driver);
            assert_eq!((counters.requests, counters.errors, counters.bytes_to_guest), (3, 2, 162));
        });
    }

    #[test]
    fn a_receive_buffer_outside_memory_fails_and_the_frame_goes_to_the_next() {
        in_private_netns(|| {
            let (mut driver, host) = setup("rxmem0");
            driver.activate(F_MAC);
            let bad = driver.add_chain(0, &[(MEMORY_SIZE - 8, 2048, true)]);
            let good = driver.add_chain(0, &[(DATA_START, 2048, true)]);
            let sent = frame(120, 4);
            host.send(&sent);
            rx_ready(&driver);
            assert_eq!(driver.used(0), [(bad as u32, 0), (good as u32, 132)]);
            assert_eq!(driver.read_mem(DATA_START, 132)[VNET_HDR_LEN..], sent);
            assert_eq!(counters(&driver).errors, 1);
            assert!(!driver.needs_reset());
            // A corrupt available index breaks the device instead.
            driver.set_avail_idx(0, 1000);
            driver.notify(0);
            assert!(driver.needs_reset());
        });
    }

    /// Serves a card's back end the way the VM's event loop does.
    struct Backend(Arc<Mutex<Net>>);

    impl MutEventSubscriber for Backend {
        fn init(&mut self, ops: &mut EventOps) {
            for (fd, token, events) in self.0.lock().unwrap().backend_events() {
                ops.add(Events::with_data_raw(fd, token, events)).unwrap();
            }
        }

        fn process(&mut self, events: Events, ops: &mut EventOps) {
            self.0.lock().unwrap().process_backend(events.data(), events.event_set(), ops);
        }
    }

    /// Runs `manager` until it has nothing to do; returns the events it handled.
    fn run_until_idle(manager: &mut EventManager<Box<dyn MutEventSubscriber + Send>>) -> usize {
        let mut handled = 0;
        for _ in 0..20 {
            match manager.run_with_timeout(100).unwrap() {
                0 => return handled,
                n => handled += n,
            }
        }
        panic!("the event loop never went idle: the device spins");
    }

    fn event_loop(driver: &MockDriver<Net>) -> EventManager<Box<dyn MutEventSubscriber + Send>> {
        let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
        manager.add_subscriber(Box::new(Backend(driver.device.clone())));
        manager
    }

    #[test]
    fn a_readable_tap_without_receive_buffers_does_not_spin_the_event_loop() {
        in_private_netns(|| {
            let (mut driver, host) = setup("spin0");
            let events = driver.device.lock().unwrap().backend_events();
            assert!(events.contains(&(tap_fd(&driver), TAP_TOKEN, EventSet::IN | EventSet::EDGE_TRIGGERED)));
            let mut manager = event_loop(&driver);
            driver.activate(F_MAC);
            let (first, second) = (frame(64, 1), frame(64, 2));
            host.send(&first);
            host.send(&second);
            assert!(wait_readable(tap_fd(&driver), WAIT_MS));
            assert!(run_until_idle(&mut manager) >= 1);
            assert!(wait_readable(tap_fd(&driver), 0), "the second frame is still in the tap");
            assert_eq!(manager.run_with_timeout(100).unwrap(), 0, "a readable tap woke the loop again");
            assert_eq!(driver.used(0), vec![]);
            driver.add_chain(0, &[(DATA_START, 1526, true)]);
            driver.add_chain(0, &[(DATA_START + 0x1000, 1526, true)]);
            driver.notify(0);
            assert_eq!(driver.used(0).len(), 2);
            assert_eq!(driver.read_mem(DATA_START + VNET_HDR_LEN as u64, 64), first);
            assert_eq!(driver.read_mem(DATA_START + 0x1000 + VNET_HDR_LEN as u64, 64), second);
            assert_eq!(run_until_idle(&mut manager), 0);
        });
    }

    #[test]
    fn a_receive_pass_is_bounded_and_the_event_loop_resumes_it() {
        in_private_netns(|| {
            let (mut driver, host) = setup("budget0");
            let mut manager = event_loop(&driver);
            assert_eq!(driver.negotiate(F_MAC) & 0x8, 0x8);
            driver.setup_queues(128);
            driver.driver_ok();
            run_until_idle(&mut manager); // the pass activation asks for finds nothing
            const FRAMES: usize = 100;
            for i in 0..FRAMES {
                driver.add_chain(0, &[(DATA_START + 0x1000 * i as u64, 256, true)]);
            }
            for i in 0..FRAMES {
                host.send(&frame(100, i as u8));
            }
            assert!(wait_readable(tap_fd(&driver), WAIT_MS));
            run_until_idle(&mut manager);
            let used = driver.used(0);
            assert_eq!(used.len(), FRAMES);
            for (i, &(head, len)) in used.iter().enumerate() {
                assert_eq!((head, len), (i as u32, 112));
                let addr = DATA_START + 0x1000 * i as u64;
                assert_eq!(driver.read_mem(addr, 112)[..VNET_HDR_LEN], rx_header());
                assert_eq!(driver.read_mem(addr + VNET_HDR_LEN as u64, 100), frame(100, i as u8));
            }
            let counters = counters(&driver);
            assert!(counters.interrupts >= 2, "{FRAMES} frames took more than one pass: {counters:?}");
            assert_eq!((counters.requests, counters.errors), (FRAMES as u64, 0));
        });
    }

    /// Sends a frame of `len` bytes from the buffer at `DATA_START + 0x1000 * slot`; returns the
    /// chain's head and the frame.
    fn transmit(driver: &mut MockDriver<Net>, slot: u64, len: usize, seed: u8) -> (u32, Vec<u8>) {
        let addr = DATA_START + 0x1000 * slot;
        let sent = frame(len, seed);
        driver.write_mem(addr, &[0; VNET_HDR_LEN]);
        driver.write_mem(addr + VNET_HDR_LEN as u64, &sent);
        let head = driver.add_chain(TX, &[(addr, (VNET_HDR_LEN + len) as u32, false)]);
        driver.notify(TX);
        (head.into(), sent)
    }

    #[test]
    fn restored_into_a_fresh_card_it_delivers_the_waiting_frame_and_goes_on() {
        in_private_netns(|| {
            let (mut driver, host) = setup("snap0");
            driver.activate(F_MAC);
            let (sent_head, sent) = transmit(&mut driver, 0, 60, 1);
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&sent[..]));
            // Received into a buffer outside memory: it waits in the card for the next one.
            let bad = driver.add_chain(RX, &[(MEMORY_SIZE - 8, 2048, true)]);
            let waiting = frame(100, 2);
            host.send(&waiting);
            rx_ready(&driver);
            assert_eq!(driver.used(RX), [(bad as u32, 0)]);
            let state = driver.save();
            let ModelState::Net(NetState { rx_frame: Some(saved) }) = &state.model else {
                panic!("no waiting frame saved: {:?}", state.model)
            };
            assert_eq!(saved[VNET_HDR_LEN..], waiting);

            // Another card, on a tap of its own.
            let tap = Tap::open("snap1").unwrap();
            let other_host = HostSide::attach("snap1");
            let mut restored = driver.fork(Net::new(tap, Some(MAC)));
            restored.transport.restore(&state).unwrap();
            let head = restored.add_chain(RX, &[(DATA_START + 0x4000, 1526, true)]);
            restored.notify(RX);
            assert_eq!(restored.used(RX), [(bad as u32, 0), (head as u32, (VNET_HDR_LEN + 100) as u32)]);
            assert_eq!(restored.read_mem(DATA_START + 0x4000, VNET_HDR_LEN), rx_header());
            assert_eq!(restored.read_mem(DATA_START + 0x4000 + VNET_HDR_LEN as u64, 100), waiting);
            // Transmitting goes on after the frame sent before the snapshot, out of the new tap.
            let (next_head, next) = transmit(&mut restored, 1, 80, 3);
            assert_eq!(restored.used(TX), [(sent_head, 0), (next_head, 0)]);
            assert_eq!(other_host.recv(WAIT_MS).as_deref(), Some(&next[..]));
            assert_eq!(host.recv(100), None, "the original tap sent nothing more");
        });
    }

    #[test]
    fn restored_in_place_it_goes_back_to_the_snapshot_point() {
        in_private_netns(|| {
            let (mut driver, host) = setup("snapin0");
            driver.activate(F_MAC);
            let (first, _) = transmit(&mut driver, 0, 60, 1);
            assert!(host.recv(WAIT_MS).is_some());
            let (checkpoint, state) = (driver.checkpoint(), driver.save());
            assert_eq!(state.model, ModelState::Net(NetState::default()));
            for slot in 1..4 {
                transmit(&mut driver, slot, 60, slot as u8);
                assert!(host.recv(WAIT_MS).is_some());
            }
            assert_eq!(driver.used(TX).len(), 4);

            driver.rewind(&checkpoint);
            driver.transport.restore(&state).unwrap();
            let (head, sent) = transmit(&mut driver, 1, 70, 9);
            assert_eq!(host.recv(WAIT_MS).as_deref(), Some(&sent[..]));
            assert_eq!(host.recv(100), None, "frames after the snapshot were sent again");
            assert_eq!(driver.used(TX), [(first, 0), (head, 0)], "the used ring goes on from the snapshot");
        });
    }

    #[test]
    fn an_unplugged_card_reports_its_mac_and_the_link_down_and_offers_every_offload() {
        let driver = MockDriver::new(Net::unplugged(Some(MAC)));
        assert_eq!(driver.config(0, 8), [MAC[0], MAC[1], MAC[2], MAC[3], MAC[4], MAC[5], 0, 0]);
        assert_eq!(driver.device_features(), F_MAC | F_STATUS | F_EVENT_IDX | OFFLOADS | F_VERSION_1);
        let device = driver.device.lock().unwrap();
        assert!(device.tap().is_none());
        let events = device.backend_events();
        assert!(events.iter().all(|&(_, token, _)| token == RX_RETRY_TOKEN), "no tap to watch: {events:?}");
        assert_eq!(Net::unplugged(None).mac()[0] & 0x03, 0x02, "a generated MAC is local and unicast");
    }

    #[test]
    fn an_unplugged_card_drops_and_counts_what_the_driver_sends_and_receives_nothing() {
        let mut driver = MockDriver::new(Net::unplugged(Some(MAC)));
        driver.activate(OFFLOADS);
        driver.add_chain(RX, &[(DATA_START + 0x8000, 1526, true)]);
        driver.notify(RX);
        let (first, _) = transmit(&mut driver, 0, 60, 1);
        let (second, _) = transmit(&mut driver, 1, 1500, 2);
        assert_eq!(driver.used(TX), [(first, 0), (second, 0)], "the chains go back, unsent");
        assert!(driver.take_interrupt());
        driver.device.lock().unwrap().rx();
        assert_eq!(driver.used(RX), vec![], "the receive buffer stays with the device");
        let counters = counters(&driver);
        assert_eq!((counters.requests, counters.errors, counters.bytes_from_guest), (2, 2, 0));
        assert!(!driver.needs_reset());
    }

    #[test]
    fn restored_into_an_unplugged_card_the_driver_is_told_the_link_went_down() {
        in_private_netns(|| {
            let (mut driver, host) = setup("unplug0");
            driver.activate(OFFLOADS);
            // A frame waits in the card for a receive buffer.
            let bad = driver.add_chain(RX, &[(MEMORY_SIZE - 8, 2048, true)]);
            host.send(&frame(100, 2));
            rx_ready(&driver);
            assert_eq!(driver.used(RX), [(bad as u32, 0)]);
            let state = driver.save();
            assert!(matches!(&state.model, ModelState::Net(NetState { rx_frame: Some(_) })));

            let mut restored = driver.fork(Net::unplugged(Some(MAC)));
            restored.transport.restore(&state).unwrap();
            assert_eq!(restored.read(0x60) & crate::devices::virtio::INT_CONFIG, 0, "not before the VM runs");
            restored.add_chain(RX, &[(DATA_START + 0x4000, 1526, true)]);
            restored.notify(RX);
            assert!(restored.take_interrupt());
            assert_ne!(restored.read(0x60) & crate::devices::virtio::INT_CONFIG, 0, "a configuration change");
            assert_eq!(restored.config(CONFIG_STATUS as u64, 2), [0, 0], "link down");
            assert_eq!(restored.used(RX), [(bad as u32, 0)], "the waiting frame is not delivered");
            restored.write(0x64, crate::devices::virtio::INT_CONFIG);
            restored.notify(RX);
            assert_eq!(restored.read(0x60) & crate::devices::virtio::INT_CONFIG, 0, "told once");
            transmit(&mut restored, 1, 80, 3);
            assert_eq!(host.recv(100), None, "nothing reaches the parent's tap");
        });
    }
}
