//! virtio-rng: the guest's entropy comes from the host's `getrandom`.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use super::{serve_queue, ActiveQueues, DeviceCounters, ModelState, VirtioDevice, TYPE_RNG};
use crate::vstate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request, so one greedy driver cannot stall the event loop.
const MAX_REQUEST: usize = 64 << 10;

/// An entropy device.
pub struct Rng {
    counters: Arc<DeviceCounters>,
    active: Option<ActiveQueues>,
    /// Where random bytes wait on their way into guest buffers; allocated once.
    scratch: Vec<u8>,
}

impl Rng {
    /// A new device, not yet set up by a driver.
    pub fn new() -> Self {
        Self { counters: Arc::default(), active: None, scratch: vec![0; MAX_REQUEST] }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills the chain's writable buffers with random bytes; returns how many it wrote.
fn fill(chain: DescriptorChain<&GuestMemory>, random: &mut [u8], counters: &DeviceCounters) -> u32 {
    let memory = chain.memory();
    let mut written = 0usize;
    for desc in chain.clone().writable() {
        let len = (desc.len() as usize).min(MAX_REQUEST - written);
        if len == 0 {
            break;
        }
        let bytes = &mut random[..len];
        // SAFETY: getrandom writes at most `len` bytes into the `len`-byte buffer it is given.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), len, 0) };
        let Ok(got) = usize::try_from(got) else {
            log::warn!("getrandom failed: {}", std::io::Error::last_os_error());
            counters.count_error();
            break;
        };
        if memory.write_slice(&bytes[..got], GuestAddress(desc.addr().0)).is_err() {
            // A buffer outside guest memory: the request fails with what was written so far.
            counters.count_error();
            break;
        }
        written += got;
    }
    counters.count_request(written as u64, 0);
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), String> {
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, _index: usize) {
        let Some(active) = &mut self.active else { return };
        let (counters, scratch) = (&self.counters, &mut self.scratch);
        serve_queue(&mut active.queues[0], &active.memory, &active.interrupt, |chain| {
            Some(fill(chain, scratch, counters))
        });
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|active| &active.queues[..])
    }

    fn save_state(&self) -> ModelState {
        ModelState::Rng
    }

    fn restore_state(&mut self, _state: &ModelState) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{MockDriver, DATA_START};
    use crate::snapshot::Persist;

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        let head = driver.add_chain(0, &[(DATA_START, 64, true), (DATA_START + 0x1000, 192, true)]);
        driver.notify(0);
        assert_eq!(driver.used(0), [(head as u32, 256)]);
        let first = driver.read_mem(DATA_START, 64);
        let second = driver.read_mem(DATA_START + 0x1000, 192);
        // 64 zero bytes from a working random source has probability 2^-512.
        assert!(first.iter().any(|&b| b != 0) && second.iter().any(|&b| b != 0));
        assert_ne!(first, second[..64]);
        assert!(driver.take_interrupt());
        let counters = driver.device.lock().unwrap().counters().snapshot();
        assert_eq!((counters.requests, counters.bytes_to_guest, counters.notifications), (1, 256, 0));
    }

    #[test]
    fn a_buffer_outside_memory_completes_short_and_counts_an_error() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        let head = driver.add_chain(0, &[(DATA_START, 16, true), (u64::MAX - 8, 64, true)]);
        driver.notify(0);
        let used = driver.used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head as u32);
        assert!(used[0].1 <= 16, "only the valid buffer may be reported written");
        assert_eq!(driver.device.lock().unwrap().counters().snapshot().errors, 1);
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        driver.write_mem(DATA_START, &[0; 32]);
        driver.add_chain(0, &[(DATA_START, 32, false)]);
        driver.notify(0);
        assert_eq!(driver.used(0)[0].1, 0);
        assert_eq!(driver.read_mem(DATA_START, 32), [0; 32]);
        assert_eq!(driver.config(0, 8), [0; 8], "virtio-rng has no configuration");
    }

    const REQUEST_LEN: u32 = 64;

    /// Makes a request for random bytes at `DATA_START + 0x1000 * slot`; returns its head.
    fn request(driver: &mut MockDriver<Rng>, slot: u64) -> u16 {
        driver.add_chain(0, &[(DATA_START + 0x1000 * slot, REQUEST_LEN, true)])
    }

    fn filled(driver: &MockDriver<Rng>, slot: u64) -> bool {
        driver.read_mem(DATA_START + 0x1000 * slot, REQUEST_LEN as usize).iter().any(|&b| b != 0)
    }

    #[test]
    fn restored_into_a_fresh_transport_it_serves_where_the_original_left_off() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        for slot in 0..3 {
            request(&mut driver, slot);
            driver.notify(0);
        }
        // Made available before the snapshot, not yet served.
        let pending = request(&mut driver, 3);
        let state = driver.save();

        let mut restored = driver.fork(Rng::new());
        let served = restored.read_mem(DATA_START, 3 * 0x1000);
        restored.transport.restore(&state).unwrap();
        // No notification: the restored device looks at its ring anyway.
        restored.run_pending();
        assert_eq!(restored.used(0).len(), 4, "the chain available at the snapshot was not served");
        let next = request(&mut restored, 4);
        restored.notify(0);
        let used = restored.used(0);
        assert_eq!(used[..3], driver.used(0), "the used ring before the snapshot");
        assert_eq!(used[3..], [(pending as u32, REQUEST_LEN), (next as u32, REQUEST_LEN)]);
        assert!(filled(&restored, 3) && filled(&restored, 4));
        assert_eq!(restored.read_mem(DATA_START, 3 * 0x1000), served, "requests before the snapshot served again");
        assert_eq!(restored.device.lock().unwrap().counters().snapshot().requests, 2);
        assert!(restored.take_interrupt());
        assert_eq!(driver.used(0).len(), 3, "the original is left alone");
    }

    #[test]
    fn restored_in_place_it_goes_back_to_the_snapshot_point() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        for slot in 0..2 {
            request(&mut driver, slot);
            driver.notify(0);
        }
        let (checkpoint, state) = (driver.checkpoint(), driver.save());
        let (used, served) = (driver.used(0), driver.read_mem(DATA_START, 0x2000));
        for slot in 2..5 {
            request(&mut driver, slot);
            driver.notify(0);
        }
        assert_eq!(driver.used(0).len(), 5);

        driver.rewind(&checkpoint);
        driver.transport.restore(&state).unwrap();
        let next = request(&mut driver, 2);
        driver.notify(0);
        assert_eq!(driver.used(0)[..2], used);
        assert_eq!(driver.used(0)[2..], [(next as u32, REQUEST_LEN)], "the used ring goes on from the snapshot");
        assert_eq!(driver.read_mem(DATA_START, 0x2000), served, "requests before the snapshot served again");
        assert!(filled(&driver, 2));
        assert!(!filled(&driver, 3), "a request after the snapshot served again");
    }
}
