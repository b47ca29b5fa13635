//! The thread that serves virtio queues and device back ends: one per VM, built on
//! `event-manager`. It wakes on queue ioeventfds and back-end descriptors, so device work runs
//! neither on a vCPU thread nor under any language runtime's lock.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint};
use vmm_sys_util::eventfd::EventFd;

use super::{backend_data, Interrupt, VirtioDevice, BACKEND_DATA_BASE};

/// A device model shared by its transport (on vCPU threads) and the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The event loop thread of one VM's devices; stopped and joined on drop.
pub struct DeviceEventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceEventLoop {
    /// Starts the thread, with nothing to watch yet.
    pub fn start() -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new().name("kvmkit-devices".into()).spawn(move || {
            while !stopping.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    log::error!("virtio event loop failed, devices stop: {e}");
                    break;
                }
            }
        })?;
        Ok(Self { endpoint, stop, thread: Some(thread) })
    }

    /// Serves `device`: its queue `notifiers` (by queue index) and its back-end descriptors.
    pub fn add(&self, device: SharedDevice, notifiers: Vec<EventFd>, interrupt: Arc<Interrupt>) -> std::io::Result<()> {
        let worker: Subscriber = Box::new(DeviceWorker { device, notifiers, interrupt });
        self.endpoint
            .call_blocking(move |ops| Ok::<_, event_manager::Error>(ops.add_subscriber(worker)))
            .map(drop)
            .map_err(std::io::Error::other)
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.endpoint.kick() {
            log::error!("cannot wake the virtio event loop to stop it: {e}");
            return; // leave the thread rather than block forever joining it
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects one device to the event loop.
struct DeviceWorker {
    device: SharedDevice,
    notifiers: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
}

impl DeviceWorker {
    /// Runs device code, turning a panic into a broken device instead of a dead event loop.
    fn guarded(&self, what: &str, f: impl FnOnce(&mut dyn VirtioDevice)) {
        let mut device = self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if catch_unwind(AssertUnwindSafe(|| f(&mut *device))).is_err() {
            self.interrupt.mark_broken(&format!("the device failed while serving {what}"));
        }
    }
}

impl MutEventSubscriber for DeviceWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, notifier) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(notifier, index as u32, EventSet::IN)) {
                log::error!("cannot watch virtio queue {index}: {e}");
            }
        }
        let backend = self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).backend_events();
        for (fd, token, events) in backend {
            if let Err(e) = ops.add(Events::with_data_raw(fd, backend_data(token), events)) {
                log::error!("cannot watch a virtio back-end descriptor: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data >= BACKEND_DATA_BASE {
            let token = data - BACKEND_DATA_BASE;
            return self.guarded("its back end", |device| device.process_backend(token, events.event_set(), ops));
        }
        let index = data as usize;
        let Some(notifier) = self.notifiers.get(index) else { return };
        // Several notifications coalesce into one pass over the queue.
        if notifier.read().is_err() {
            return;
        }
        self.guarded("a queue", |device| {
            device.counters().notifications.fetch_add(1, Ordering::Relaxed);
            device.process_queue(index)
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::virtio::{ActiveQueues, DeviceCounters};

    /// Counts the notifications it serves; panics on queue 1.
    struct Probe {
        served: Arc<AtomicUsize>,
        counters: Arc<DeviceCounters>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _active: ActiveQueues) -> Result<(), String> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, index: usize) {
            assert_eq!(index, 0, "queue 1 makes the device fail");
            self.served.fetch_add(1, Ordering::SeqCst);
        }
        fn counters(&self) -> &Arc<DeviceCounters> {
            &self.counters
        }
    }

    fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn serves_notifications_and_survives_a_failing_device() {
        let served = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(DeviceCounters::default());
        let device: SharedDevice = Arc::new(Mutex::new(Probe { served: served.clone(), counters: counters.clone() }));
        let interrupt = Arc::new(Interrupt::new(None, counters.clone()));
        let notifiers: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let kicks: Vec<EventFd> = notifiers.iter().map(|n| n.try_clone().unwrap()).collect();
        let event_loop = DeviceEventLoop::start().unwrap();
        event_loop.add(device, notifiers, interrupt.clone()).unwrap();

        kicks[0].write(1).unwrap();
        eventually("queue 0 served", || served.load(Ordering::SeqCst) == 1);
        kicks[1].write(1).unwrap();
        eventually("the device marked broken", || interrupt.needs_reset());
        // The loop still runs after the device failed.
        kicks[0].write(1).unwrap();
        eventually("queue 0 served again", || served.load(Ordering::SeqCst) == 2);
        assert_eq!(counters.snapshot().notifications, 3);
        drop(event_loop); // joins the thread; a hang here fails the test run
    }
}
