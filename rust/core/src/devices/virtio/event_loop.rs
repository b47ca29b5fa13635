//! The thread that serves virtio queues and device back ends: one per VM, built on
//! `event-manager`. It wakes on queue ioeventfds and back-end descriptors, so device work runs
//! neither on a vCPU thread nor under any language runtime's lock.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint};
use vmm_sys_util::eventfd::EventFd;

use super::{backend_data, Interrupt, VirtioDevice, BACKEND_DATA_BASE};

/// A device model shared by its transport (on vCPU threads) and the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The event loop thread of one VM's devices; stopped and joined on drop.
///
/// It can be parked ([`park`](Self::park), [`parked`](Self::parked)): the thread then serves
/// nothing (no queue notification, no back-end event) until [`unpark`](Self::unpark), so that
/// no device writes guest memory or raises an interrupt while a VM's state is saved or
/// restored. What arrives meanwhile is served once it runs again: eventfds keep their counts,
/// and back-end descriptors stay ready.
pub struct DeviceEventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

/// What the loop's owner asks of its thread, and what the thread is doing; the thread looks
/// between batches of events.
#[derive(Default)]
struct Control {
    flags: Mutex<Flags>,
    changed: Condvar,
}

#[derive(Default)]
struct Flags {
    /// The thread is to end.
    stop: bool,
    /// The thread is to wait between events until this is cleared.
    park: bool,
    /// The thread is waiting, parked.
    parked: bool,
    /// The thread has ended (stopped, or the loop failed).
    ended: bool,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, flags: MutexGuard<'a, Flags>) -> MutexGuard<'a, Flags> {
        self.changed.wait(flags).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the thread between batches of events: waits while the loop is parked. False
    /// once the thread is to stop.
    fn hold(&self) -> bool {
        let mut flags = self.lock();
        while flags.park && !flags.stop {
            if !flags.parked {
                flags.parked = true;
                self.changed.notify_all();
            }
            flags = self.wait(flags);
        }
        flags.parked = false;
        !flags.stop
    }

    fn set(&self, change: impl FnOnce(&mut Flags)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Marks the thread ended when it returns or unwinds, so that nobody waits for it to park.
struct Ended(Arc<Control>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.set(|flags| flags.ended = true);
    }
}

impl DeviceEventLoop {
    /// Starts the thread, with nothing to watch yet.
    pub fn start() -> io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(io::Error::other)?;
        let endpoint = manager.remote_endpoint();
        let control = Arc::new(Control::default());
        let ended = Ended(control.clone());
        let thread = thread::Builder::new().name("kvmkit-devices".into()).spawn(move || {
            while ended.0.hold() {
                if let Err(e) = manager.run() {
                    log::error!("virtio event loop failed, devices stop: {e}");
                    break;
                }
            }
        })?;
        Ok(Self { endpoint, control, thread: Some(thread) })
    }

    /// Serves `device`: its queue `notifiers` (by queue index) and its back-end descriptors.
    /// While the loop is parked this waits until it is unparked.
    pub fn add(&self, device: SharedDevice, notifiers: Vec<EventFd>, interrupt: Arc<Interrupt>) -> io::Result<()> {
        let worker: Subscriber = Box::new(DeviceWorker { device, notifiers, interrupt });
        self.endpoint
            .call_blocking(move |ops| Ok::<_, event_manager::Error>(ops.add_subscriber(worker)))
            .map(drop)
            .map_err(io::Error::other)
    }

    /// Parks the loop: returns once its thread has finished the device calls under way and
    /// waits, serving nothing until [`unpark`](Self::unpark). Parking a parked loop does
    /// nothing. Not to be called from a device, on the loop's own thread, which it would block.
    pub fn park(&self) -> io::Result<()> {
        self.park_once().map(drop)
    }

    /// Parks the loop, as [`park`](Self::park) does, until the guard is dropped. A guard taken
    /// while the loop was already parked leaves it parked when dropped.
    pub fn parked(&self) -> io::Result<Parked<'_>> {
        let unpark = self.park_once()?;
        Ok(Parked { event_loop: self, unpark })
    }

    /// Lets a parked loop serve again, including what arrived while it was parked. Unparking a
    /// loop that is not parked does nothing.
    pub fn unpark(&self) {
        self.control.set(|flags| flags.park = false);
    }

    /// Whether the loop is parked (or being parked).
    pub fn is_parked(&self) -> bool {
        self.control.lock().park
    }

    /// Parks the loop; true if this call parked it, false if it already was.
    fn park_once(&self) -> io::Result<bool> {
        let mut flags = self.control.lock();
        let newly = !flags.park;
        if newly {
            // The thread looks at the flags between batches of events; this makes a batch end.
            self.endpoint.kick().map_err(io::Error::other)?;
            flags.park = true;
        }
        while !flags.parked && !flags.ended {
            flags = self.control.wait(flags);
        }
        Ok(newly)
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        // A parked thread wakes for this; a running one once it is kicked.
        self.control.set(|flags| flags.stop = true);
        if let Err(e) = self.endpoint.kick() {
            log::error!("cannot wake the virtio event loop to stop it: {e}");
            return; // leave the thread rather than block forever joining it
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Keeps a [`DeviceEventLoop`] parked while it lives; see [`DeviceEventLoop::parked`].
#[must_use = "the loop is unparked when the guard is dropped"]
pub struct Parked<'a> {
    event_loop: &'a DeviceEventLoop,
    /// Whether this guard parked the loop (and so unparks it).
    unpark: bool,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if self.unpark {
            self.event_loop.unpark();
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
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::{Duration, Instant};

    use virtio_queue::Queue;

    use super::*;
    use crate::devices::virtio::testing::{MockDriver, DATA_START};
    use crate::devices::virtio::{ActiveQueues, DeviceCounters, ModelState, Rng};

    /// Counts the notifications and back-end events it serves, each taking `delay`; panics on
    /// queue 1.
    struct Probe {
        served: Arc<AtomicUsize>,
        backend_served: Arc<AtomicUsize>,
        busy: Arc<AtomicBool>,
        delay: Duration,
        backend: EventFd,
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
            self.busy.store(true, Ordering::SeqCst);
            thread::sleep(self.delay);
            self.served.fetch_add(1, Ordering::SeqCst);
            self.busy.store(false, Ordering::SeqCst);
        }
        fn backend_events(&self) -> Vec<(RawFd, u32, EventSet)> {
            vec![(self.backend.as_raw_fd(), 0, EventSet::IN)]
        }
        fn process_backend(&mut self, _token: u32, _events: EventSet, _ops: &mut EventOps) {
            let _ = self.backend.read();
            self.backend_served.fetch_add(1, Ordering::SeqCst);
        }
        fn counters(&self) -> &Arc<DeviceCounters> {
            &self.counters
        }
        fn active_queues(&self) -> Option<&[Queue]> {
            None
        }
        fn save_state(&self) -> ModelState {
            unreachable!("the probe is never saved")
        }
        fn restore_state(&mut self, _state: &ModelState) {}
    }

    /// A probe served by a loop of its own, and what the test sees of it.
    struct ProbeBench {
        event_loop: DeviceEventLoop,
        served: Arc<AtomicUsize>,
        backend_served: Arc<AtomicUsize>,
        busy: Arc<AtomicBool>,
        kicks: Vec<EventFd>,
        backend: EventFd,
        interrupt: Arc<Interrupt>,
        counters: Arc<DeviceCounters>,
    }

    impl ProbeBench {
        fn new(delay: Duration) -> Self {
            let (served, backend_served, busy) = (Arc::default(), Arc::default(), Arc::default());
            let counters = Arc::new(DeviceCounters::default());
            let backend = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let probe = Probe {
                served: Arc::clone(&served),
                backend_served: Arc::clone(&backend_served),
                busy: Arc::clone(&busy),
                delay,
                backend: backend.try_clone().unwrap(),
                counters: counters.clone(),
            };
            let device: SharedDevice = Arc::new(Mutex::new(probe));
            let interrupt = Arc::new(Interrupt::new(None, counters.clone()));
            let notifiers: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
            let kicks = notifiers.iter().map(|n| n.try_clone().unwrap()).collect();
            let event_loop = DeviceEventLoop::start().unwrap();
            event_loop.add(device, notifiers, interrupt.clone()).unwrap();
            Self { event_loop, served, backend_served, busy, kicks, backend, interrupt, counters }
        }

        fn served(&self) -> usize {
            self.served.load(Ordering::SeqCst)
        }

        fn backend_served(&self) -> usize {
            self.backend_served.load(Ordering::SeqCst)
        }
    }

    fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Long enough for a running loop to have served an event many times over.
    const WHILE: Duration = Duration::from_millis(300);

    #[test]
    fn serves_notifications_and_survives_a_failing_device() {
        let bench = ProbeBench::new(Duration::ZERO);
        bench.kicks[0].write(1).unwrap();
        eventually("queue 0 served", || bench.served() == 1);
        bench.kicks[1].write(1).unwrap();
        eventually("the device marked broken", || bench.interrupt.needs_reset());
        // The loop still runs after the device failed.
        bench.kicks[0].write(1).unwrap();
        eventually("queue 0 served again", || bench.served() == 2);
        assert_eq!(bench.counters.snapshot().notifications, 3);
        drop(bench.event_loop); // joins the thread; a hang here fails the test run
    }

    #[test]
    fn a_parked_loop_leaves_notified_queues_until_unparked() {
        let mut driver = MockDriver::new(Rng::new());
        driver.activate(0);
        let event_loop = DeviceEventLoop::start().unwrap();
        driver.serve_on(&event_loop);
        let first = driver.add_chain(0, &[(DATA_START, 32, true)]);
        driver.kick(0);
        eventually("the first request served", || driver.used(0).len() == 1);
        eventually("its interrupt", || driver.take_interrupt());

        event_loop.park().unwrap();
        assert!(event_loop.is_parked());
        driver.write_mem(DATA_START + 0x1000, &[0; 32]);
        let second = driver.add_chain(0, &[(DATA_START + 0x1000, 32, true)]);
        driver.kick(0);
        thread::sleep(WHILE);
        assert_eq!(driver.used(0), [(first as u32, 32)], "a parked loop served a queue");
        assert!(!driver.take_interrupt(), "a parked loop raised an interrupt");
        assert_eq!(driver.read_mem(DATA_START + 0x1000, 32), [0; 32], "a parked loop wrote guest memory");
        assert_eq!(driver.device.lock().unwrap().counters().snapshot().notifications, 1);

        event_loop.unpark();
        assert!(!event_loop.is_parked());
        eventually("the second request served", || driver.used(0).len() == 2);
        assert_eq!(driver.used(0), [(first as u32, 32), (second as u32, 32)]);
        eventually("its interrupt", || driver.take_interrupt());
    }

    #[test]
    fn a_parked_loop_leaves_back_end_events_until_unparked() {
        let bench = ProbeBench::new(Duration::ZERO);
        bench.backend.write(1).unwrap();
        eventually("the back end served", || bench.backend_served() == 1);
        let parked = bench.event_loop.parked().unwrap();
        bench.backend.write(1).unwrap();
        bench.kicks[0].write(1).unwrap();
        thread::sleep(WHILE);
        assert_eq!((bench.backend_served(), bench.served()), (1, 0), "a parked loop served an event");
        drop(parked);
        eventually("the back end served again", || bench.backend_served() == 2);
        eventually("the queue served", || bench.served() == 1);
    }

    #[test]
    fn park_waits_for_the_device_call_under_way() {
        let bench = ProbeBench::new(WHILE);
        bench.kicks[0].write(1).unwrap();
        eventually("the device busy", || bench.busy.load(Ordering::SeqCst));
        let parked = bench.event_loop.parked().unwrap();
        assert!(!bench.busy.load(Ordering::SeqCst), "park returned while the device was serving");
        assert_eq!(bench.served(), 1);
        drop(parked);
        bench.kicks[0].write(1).unwrap();
        eventually("served again once unparked", || bench.served() == 2);
    }

    #[test]
    fn parking_twice_or_unparking_a_running_loop_is_harmless() {
        let bench = ProbeBench::new(Duration::ZERO);
        let event_loop = &bench.event_loop;
        event_loop.unpark();
        event_loop.park().unwrap();
        event_loop.park().unwrap();
        // A guard taken while parked leaves the loop parked.
        drop(event_loop.parked().unwrap());
        assert!(event_loop.is_parked());
        bench.kicks[0].write(1).unwrap();
        thread::sleep(WHILE);
        assert_eq!(bench.served(), 0);
        // One unpark undoes any number of parks.
        event_loop.unpark();
        event_loop.unpark();
        eventually("served once unparked", || bench.served() == 1);
        // A guard that parked the loop unparks it.
        let parked = event_loop.parked().unwrap();
        assert!(event_loop.is_parked());
        drop(parked);
        assert!(!event_loop.is_parked());
        bench.kicks[0].write(1).unwrap();
        eventually("served after the guard", || bench.served() == 2);
    }

    #[test]
    fn a_parked_loop_stops_when_dropped() {
        let bench = ProbeBench::new(Duration::ZERO);
        bench.event_loop.park().unwrap();
        bench.kicks[0].write(1).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let event_loop = bench.event_loop;
        thread::spawn(move || {
            drop(event_loop);
            done.send(()).unwrap();
        });
        finished.recv_timeout(Duration::from_secs(5)).expect("dropping a parked loop hangs");
        assert_eq!(bench.served.load(Ordering::SeqCst), 0, "a stopping loop served an event");
    }
}
