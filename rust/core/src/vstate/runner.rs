use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use crate::vstate::exit::{handle_exit, ExitAction, ExitReason, IoHandler};
use crate::vstate::vcpu::Vcpu;

/// The signal that interrupts `KVM_RUN`. Its handler does nothing: delivery alone makes the
/// ioctl return `EINTR`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler, once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), ignore_kick).map_err(|e| e.errno()));
    installed.map_err(std::io::Error::from_raw_os_error)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these locks stays consistent between statements, so a panic elsewhere
    // does not make it unusable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Gets one vCPU thread out of `KVM_RUN`: set `immediate_exit` (so an entry that has not happened
/// yet returns at once), then signal the thread (so a guest already running exits).
pub struct Kicker {
    immediate_exit: *mut u8,
    thread: Mutex<Option<libc::pthread_t>>,
}

// SAFETY: `immediate_exit` points into the vCPU's `kvm_run` mapping, which lives as long as the
// vCPU; the owner of a Kicker keeps the vCPU alive and joins its thread before dropping either.
// All access through the pointer is atomic.
unsafe impl Send for Kicker {}
// SAFETY: as for Send; the thread id is behind a mutex.
unsafe impl Sync for Kicker {}

impl Kicker {
    /// A kicker for `vcpu`, which must outlive it. Clears any `immediate_exit` left from an
    /// earlier run.
    pub fn new(vcpu: &mut Vcpu) -> Self {
        let immediate_exit = &mut vcpu.fd_mut().get_kvm_run().immediate_exit as *mut u8;
        let kicker = Self { immediate_exit, thread: Mutex::new(None) };
        kicker.immediate_exit().store(0, Ordering::SeqCst);
        kicker
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the pointer is valid and aligned (see `unsafe impl Send`), and every access to
        // the byte from Rust goes through this atomic.
        unsafe { AtomicU8::from_ptr(self.immediate_exit) }
    }

    /// Records the thread to signal.
    pub fn attach(&self, thread: libc::pthread_t) {
        *lock(&self.thread) = Some(thread);
    }

    /// Forgets the thread; called before it is joined, after which its id is invalid.
    pub fn detach(&self) {
        *lock(&self.thread) = None;
    }

    /// Makes the vCPU leave `KVM_RUN` soon.
    pub fn kick(&self) {
        self.immediate_exit().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if let Some(thread) = *lock(&self.thread) {
            // SAFETY: the id belongs to a thread that has not been joined yet (detach runs under
            // the same lock before join), so it is valid; the signal's handler does nothing.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Called by the vCPU thread after an interrupted `KVM_RUN`, before it checks for a stop.
    fn rearm(&self) {
        self.immediate_exit().store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

/// What the vCPU threads of one run share: the stop flag, the reason the run ended, and a count
/// of threads still running.
pub struct RunControl {
    stop: AtomicBool,
    cause: Mutex<Option<(Option<u32>, ExitReason)>>,
    running: Mutex<usize>,
    finished: Condvar,
    kickers: Vec<Kicker>,
}

impl RunControl {
    /// Control for a run of the vCPUs behind `kickers` (indexed by vCPU).
    pub fn new(kickers: Vec<Kicker>) -> Self {
        Self {
            stop: AtomicBool::new(false),
            cause: Mutex::new(None),
            running: Mutex::new(kickers.len()),
            finished: Condvar::new(),
            kickers,
        }
    }

    /// The kicker of vCPU `index`.
    pub fn kicker(&self, index: usize) -> &Kicker {
        &self.kickers[index]
    }

    /// Ends the run for every vCPU. The first cause recorded is the run's reason.
    pub fn request_stop(&self, vcpu: Option<u32>, reason: ExitReason) {
        lock(&self.cause).get_or_insert((vcpu, reason));
        self.stop.store(true, Ordering::SeqCst);
        for (index, kicker) in self.kickers.iter().enumerate() {
            if vcpu != Some(index as u32) {
                kicker.kick();
            }
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records that vCPU `index` ended with `reason`.
    pub fn finish(&self, index: u32, reason: &ExitReason) {
        if reason.ends_run() {
            self.request_stop(Some(index), reason.clone());
        }
        let mut running = lock(&self.running);
        *running -= 1;
        if *running == 0 {
            self.finished.notify_all();
        }
    }

    /// Waits until every vCPU thread has finished or `timeout` passes; true when all finished.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> bool {
        let running = lock(&self.running);
        let done = |running: &mut usize| *running > 0;
        match timeout {
            None => *self.finished.wait_while(running, done).unwrap_or_else(|p| p.into_inner()) == 0,
            Some(timeout) => {
                let (running, _) = self.finished.wait_timeout_while(running, timeout, done).unwrap_or_else(|p| p.into_inner());
                *running == 0
            }
        }
    }

    /// The recorded cause of the run's end, if any.
    pub fn cause(&self) -> Option<(Option<u32>, ExitReason)> {
        lock(&self.cause).clone()
    }
}

/// Runs `vcpu` until it exits for good: serves its I/O through `io` and returns why it stopped.
/// Call it on the vCPU's own thread.
pub fn run_vcpu(vcpu: &mut Vcpu, io: &dyn IoHandler, control: &RunControl) -> ExitReason {
    // Threads inherit the creator's signal mask; the kick must get through.
    if let Err(e) = unblock_signal(kick_signal()) {
        return ExitReason::VmmError(format!("cannot unblock the vCPU kick signal: {e}"));
    }
    let kicker = control.kicker(vcpu.index() as usize);
    loop {
        if control.stop_requested() {
            return ExitReason::Stopped;
        }
        match handle_exit(vcpu.fd_mut().run(), io) {
            ExitAction::Continue => {}
            ExitAction::Interrupted => kicker.rearm(),
            ExitAction::InternalError => return ExitReason::InternalError(vcpu.internal_error()),
            ExitAction::Stop(reason) => return reason,
        }
    }
}
