use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kvm_ioctls::VcpuExit;
use vmm_sys_util::errno;
use vmm_sys_util::signal::{unblock_signal, SIGRTMIN};

use crate::vstate::exit::{handle_exit, ExitAction, ExitReason, IoHandler};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::{fault, regs};

/// The signal that gets a thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// `immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// Whether this thread has unblocked the kick signal (nothing kvmkit runs blocks it again).
    static KICK_UNBLOCKED: Cell<bool> = const { Cell::new(false) };
    /// The run whose vCPU this thread runs (only compared, never dereferenced), or null.
    static CURRENT_RUN: Cell<*const RunControl> = const { Cell::new(std::ptr::null()) };
}

/// Sets `immediate_exit` of the thread's vCPU, so that a signal arriving while the thread is
/// between two `KVM_RUN`s still makes the next one return at once.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let immediate_exit = IMMEDIATE_EXIT.with(Cell::get);
    if !immediate_exit.is_null() {
        // SAFETY: the pointer is set only while this thread runs its vCPU, whose `kvm_run`
        // mapping outlives that; an atomic store is async-signal-safe.
        unsafe { AtomicU8::from_ptr(immediate_exit) }.store(1, Ordering::SeqCst);
    }
}

/// Installs the kick signal's handler, once per process. `SA_RESTART` keeps a late kick from
/// failing some other system call of the thread with `EINTR`; `KVM_RUN` is never restarted.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero sigaction is valid; the fields that matter are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: the mask is a valid sigset_t owned by `action`; the handler is async-signal-safe
        // and the previous action is not asked for.
        let status = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if status == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL))
        }
    });
    installed.map_err(std::io::Error::from_raw_os_error)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these locks stays consistent between statements, so a panic elsewhere
    // does not make it unusable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Gets one vCPU out of `KVM_RUN`: set `immediate_exit` (so an entry that has not happened yet
/// returns at once), then signal the thread running it (so a guest already running exits).
pub struct Kicker {
    immediate_exit: *mut u8,
    thread: Mutex<Option<libc::pthread_t>>,
}

// SAFETY: `immediate_exit` points into the vCPU's `kvm_run` mapping, which lives as long as the
// vCPU; the owner of a Kicker keeps the vCPU alive as long as the Kicker. All access through the
// pointer is atomic.
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
        // the byte from Rust goes through an atomic.
        unsafe { AtomicU8::from_ptr(self.immediate_exit) }
    }

    /// Makes the vCPU leave `KVM_RUN` soon.
    pub fn kick(&self) {
        self.immediate_exit().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if let Some(thread) = *lock(&self.thread) {
            // SAFETY: the id is that of a live thread: it is registered by the thread itself and
            // removed (under this lock) before that thread stops running the vCPU.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Registers the calling thread as the one running the vCPU, until the guard drops.
    fn bind_current_thread(&self) -> std::io::Result<BoundThread<'_>> {
        // Once per thread: a system call per run would weigh on short runs.
        if !KICK_UNBLOCKED.with(Cell::get) {
            unblock_signal(kick_signal()).map_err(|e| std::io::Error::other(e.to_string()))?;
            KICK_UNBLOCKED.with(|cell| cell.set(true));
        }
        IMMEDIATE_EXIT.with(|cell| cell.set(self.immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        *lock(&self.thread) = Some(unsafe { libc::pthread_self() });
        Ok(BoundThread(self))
    }

    /// Called after an interrupted `KVM_RUN`, before looking for a reason to stop.
    fn rearm(&self) {
        self.immediate_exit().store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

/// A one-shot timer that kicks the calling thread out of `KVM_RUN` at a deadline, for runs on a
/// thread that has nobody else to kick it.
pub struct Alarm(libc::timer_t);

impl Alarm {
    /// Sends the kick signal to the calling thread at `deadline` (at once if it has passed).
    pub fn at(deadline: std::time::Instant) -> std::io::Result<Self> {
        install_kick_handler()?;
        // SAFETY: an all-zero sigevent is valid; the fields that matter are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the kernel fills `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let alarm = Self(timer);
        // A zero time would disarm the timer instead of firing it.
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
            },
        };
        // SAFETY: the timer was just created and `spec` is valid for the call.
        if unsafe { libc::timer_settime(alarm.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(alarm)
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // SAFETY: the timer is this value's, created in `at` and deleted only here.
        unsafe { libc::timer_delete(self.0) };
    }
}

struct BoundThread<'a>(&'a Kicker);

/// Runs a closure when dropped, on every way out of a scope.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

impl Drop for BoundThread<'_> {
    fn drop(&mut self) {
        *lock(&self.0.thread) = None;
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// vCPUs of a run still running, and threads waiting for them.
struct RunCount {
    running: usize,
    waiting: usize,
}

/// What the vCPU threads of one run share: the stop flag, the reason the run ended, and a count
/// of vCPUs still running.
pub struct RunControl {
    stop: AtomicBool,
    cause: Mutex<Option<(Option<u32>, ExitReason)>>,
    running: Mutex<RunCount>,
    finished: Condvar,
    kickers: Vec<Kicker>,
}

impl RunControl {
    /// Control for a run of the vCPUs behind `kickers` (indexed by vCPU).
    pub fn new(kickers: Vec<Kicker>) -> Self {
        Self {
            stop: AtomicBool::new(false),
            cause: Mutex::new(None),
            running: Mutex::new(RunCount { running: kickers.len(), waiting: 0 }),
            finished: Condvar::new(),
            kickers,
        }
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

    /// Ends the run for all if vCPU `index`'s exit `reason` is one that does.
    pub fn end_run_if(&self, index: u32, reason: &ExitReason) {
        if reason.ends_run() {
            self.request_stop(Some(index), reason.clone());
        }
    }

    /// Records that one vCPU is done.
    pub fn finish(&self) {
        let mut count = lock(&self.running);
        count.running -= 1;
        // Waking costs a system call even with nobody waiting, as when the caller ran the vCPU.
        if count.running == 0 && count.waiting > 0 {
            self.finished.notify_all();
        }
    }

    /// Waits until every vCPU has finished or `timeout` passes; true when all finished.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut count = lock(&self.running);
        if count.running == 0 || timeout == Some(Duration::ZERO) {
            return count.running == 0;
        }
        count.waiting += 1;
        let busy = |count: &mut RunCount| count.running > 0;
        let mut count = match timeout {
            None => self.finished.wait_while(count, busy).unwrap_or_else(|p| p.into_inner()),
            Some(timeout) => {
                self.finished.wait_timeout_while(count, timeout, busy).unwrap_or_else(|p| p.into_inner()).0
            }
        };
        count.waiting -= 1;
        count.running == 0
    }

    /// Whether the calling thread runs one of this run's vCPUs (a handler called from it, say).
    pub fn is_current_thread(&self) -> bool {
        std::ptr::eq(CURRENT_RUN.with(Cell::get), self)
    }

    /// The recorded cause of the run's end, if any.
    pub fn cause(&self) -> Option<(Option<u32>, ExitReason)> {
        lock(&self.cause).clone()
    }
}

/// Asked when a vCPU exits for good whether it goes on in the same run instead (the next single
/// step, the next call of a batch); it may change the vCPU's registers first.
pub type RunAgain<'a> = &'a mut dyn FnMut(&mut Vcpu, &ExitReason) -> bool;

/// Runs `vcpu` on the calling thread until it exits for good and `again` does not take it on,
/// serving its I/O through `io`, and returns why it stopped. `interrupted` is asked after every
/// interrupted `KVM_RUN` whether the whole run should end (a deadline, a pending signal); its
/// answer becomes the run's reason.
pub fn run_vcpu(
    vcpu: &mut Vcpu,
    io: &dyn IoHandler,
    control: &RunControl,
    interrupted: &mut dyn FnMut() -> Option<ExitReason>,
    again: RunAgain<'_>,
) -> ExitReason {
    let kicker = &control.kickers[vcpu.index() as usize];
    let _bound = match kicker.bind_current_thread() {
        Ok(bound) => bound,
        Err(e) => return ExitReason::VmmError(format!("cannot receive vCPU kicks on this thread: {e}")),
    };
    CURRENT_RUN.with(|cell| cell.set(control));
    let _unmark = OnDrop(|| CURRENT_RUN.with(|cell| cell.set(std::ptr::null())));
    // Handlers reach the registers of the vCPU whose access they serve.
    let _serving = regs::serve_exit(vcpu.index(), vcpu.register_file());
    // Whether the last exit was an access that was served: KVM completes it (an `in` writes RAX,
    // RIP moves past the instruction) only on the next KVM_RUN, which must happen before the
    // run ends, or the registers read afterwards (a snapshot) would be from mid-instruction.
    let mut served_access = false;
    loop {
        if control.stop_requested() {
            return finish(vcpu, kicker, io, served_access, ExitReason::Stopped);
        }
        let (exit, pio_size) = vcpu.run();
        served_access = is_access(&exit);
        match handle_exit(exit, pio_size, io) {
            ExitAction::Continue => {}
            ExitAction::Interrupted => {
                kicker.rearm();
                if let Some(reason) = interrupted() {
                    control.request_stop(None, reason);
                }
            }
            ExitAction::InternalError => return ExitReason::InternalError(vcpu.internal_error()),
            ExitAction::Stop(reason @ (ExitReason::DeviceError { .. } | ExitReason::UnhandledIo { .. })) => {
                return retract_access(vcpu, kicker, reason);
            }
            ExitAction::Stop(ExitReason::GuestFault(_)) => match fault::report_or_stray(vcpu) {
                report @ ExitReason::GuestFault(_) => {
                    let reason = finish(vcpu, kicker, io, served_access, report);
                    return fault::settle(vcpu, io.guest_memory(), reason);
                }
                stray => return retract_access(vcpu, kicker, stray),
            },
            // The next KVM_RUN completes an access served last, so going on needs nothing more.
            ExitAction::Stop(reason) if again(vcpu, &reason) => {}
            // A device that reset or powered the machine off has still served the access.
            ExitAction::Stop(reason) => return finish(vcpu, kicker, io, served_access, reason),
        }
    }
}

fn is_access(exit: &Result<VcpuExit<'_>, errno::Error>) -> bool {
    matches!(exit, Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)))
}

/// Ends the vCPU's run with `reason`, first completing the access it last exited for when that
/// was served.
fn finish(vcpu: &mut Vcpu, kicker: &Kicker, io: &dyn IoHandler, served_access: bool, reason: ExitReason) -> ExitReason {
    if !served_access {
        return reason;
    }
    // Finishing a step of a string instruction may need the next elements (KVM exits for them
    // before it returns EINTR); they are served like any other.
    loop {
        let action = enter_without_guest(vcpu, kicker, |exit, pio_size| match exit {
            // Done; a single step's trap comes with the completed instruction.
            Err(e) if e.errno() == libc::EINTR => None,
            Ok(VcpuExit::Debug(_)) => None,
            exit if is_access(&exit) => Some(handle_exit(exit, pio_size, io)),
            Err(e) => Some(ExitAction::Stop(ExitReason::VmmError(format!("{reason}, and KVM_RUN failed: {e}")))),
            Ok(other) => Some(ExitAction::Stop(ExitReason::VmmError(format!(
                "{reason}, and KVM did not finish the vCPU's access ({other:?})"
            )))),
        });
        match action {
            None => return reason,
            Some(ExitAction::Continue) => {}
            Some(ExitAction::Stop(failed @ (ExitReason::DeviceError { .. } | ExitReason::UnhandledIo { .. }))) => {
                return retract_access(vcpu, kicker, failed);
            }
            Some(ExitAction::Stop(other)) => return other,
            Some(ExitAction::Interrupted | ExitAction::InternalError) => {
                unreachable!("only accesses are handled here")
            }
        }
    }
}

/// Enters `KVM_RUN` with `immediate_exit` set, so that KVM finishes the access the vCPU last
/// exited for and returns EINTR without running guest code, and hands the result to `f`.
fn enter_without_guest<R>(
    vcpu: &mut Vcpu,
    kicker: &Kicker,
    f: impl FnOnce(Result<VcpuExit<'_>, errno::Error>, usize) -> R,
) -> R {
    kicker.immediate_exit().store(1, Ordering::SeqCst);
    let (exit, pio_size) = vcpu.run();
    let result = f(exit, pio_size);
    kicker.rearm();
    result
}

/// Undoes the I/O access the vCPU exited for and that was not served, so that the guest makes it
/// again when the run resumes (and its handler sees it again), and ends the run with `reason`.
/// Left alone, KVM would finish the access on the next entry with whatever the exit's data holds:
/// the guest would read stale bytes and a failed write would be lost. So the access is finished
/// now, without entering the guest, and the registers from before the instruction are put back.
fn retract_access(vcpu: &mut Vcpu, kicker: &Kicker, reason: ExitReason) -> ExitReason {
    let retracted = (|| {
        let before = vcpu.regs()?;
        // A string instruction's step may exit for its next elements first; they are left
        // unserved, as the whole instruction is retried.
        while enter_without_guest(vcpu, kicker, |exit, _| match exit {
            Err(e) if e.errno() == libc::EINTR => Ok(false),
            Ok(VcpuExit::Debug(_)) => Ok(false),
            exit if is_access(&exit) => Ok(true),
            Err(e) => Err(e),
            Ok(_) => Err(errno::Error::new(libc::EIO)),
        })
        .map_err(crate::Error::kvm("KVM_RUN"))?
        {}
        vcpu.set_regs(&before)
    })();
    match retracted {
        Ok(()) => reason,
        Err(e) => ExitReason::VmmError(format!("{reason}, and the access cannot be undone: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::test_util::{kvm, Guest, CODE_ADDR, MMIO_INPUT, PORT_INPUT};

    /// `in` from the input port, a load from the input MMIO address, a checkpoint, HLT.
    #[rustfmt::skip]
    const READS: &[u8] = &[
        0x66, 0xba, 0x83, 0x00,       // 0x0: mov dx, 0x83
        0xed,                         // 0x4: in eax, dx
        0xbe, 0x00, 0x00, 0x00, 0xd0, // 0x5: mov esi, 0xd000_0000
        0x8b, 0x1e,                   // 0xa: mov ebx, [rsi]
        0xe6, 0x80,                   // 0xc: out 0x80, al
        0xf4,                         // 0xe: hlt
    ];

    #[test]
    fn reads_stopped_right_after_being_served_are_complete() {
        let Some(kvm) = kvm() else { return };
        let mut guest = Guest::new(&kvm, false, READS);
        // Each read's handler asks the run to end, so it ends right after serving the exit.
        assert_eq!(guest.run().0, ExitReason::Stopped);
        let regs = guest.vcpu.regs().unwrap();
        assert_eq!((regs.rax as u32, regs.rip), (PORT_INPUT, CODE_ADDR + 0x5), "the `in` is complete");
        assert_eq!(guest.run().0, ExitReason::Stopped);
        let regs = guest.vcpu.regs().unwrap();
        assert_eq!((regs.rbx as u32, regs.rip), (MMIO_INPUT, CODE_ADDR + 0xc), "the load is complete");
        // The next run goes on from there, with nothing left pending.
        assert_eq!(guest.run().0, ExitReason::Stopped);
        assert_eq!(guest.vcpu.regs().unwrap().rip, CODE_ADDR + 0xe);
        assert_eq!(guest.run().0, ExitReason::Hlt);
    }

    #[test]
    fn single_steps_and_breakpoints_end_the_vcpu_with_a_debug_exit() {
        use crate::vstate::debug::{DebugEvent, DebugKind, GuestDebug, HwSlot};
        let Some(kvm) = kvm() else { return };
        let mut guest = Guest::new(&kvm, false, READS);
        let step = GuestDebug { single_step: true, block_irq: true, ..Default::default() };
        guest.vcpu.set_guest_debug(&step).unwrap();
        let debug = |reason| match reason {
            ExitReason::Debug(DebugEvent { kind, pc, .. }) => (kind, pc),
            other => panic!("expected a debug exit, got {other:?}"),
        };
        assert_eq!(debug(guest.run().0), (DebugKind::Step, CODE_ADDR + 0x4));
        assert_eq!(guest.vcpu.regs().unwrap().rip, CODE_ADDR + 0x4);
        // A breakpoint on the checkpoint: the run stops before it, with the two reads done.
        let mut breakpoint = GuestDebug::default();
        breakpoint.slots[2] = Some(HwSlot::breakpoint(CODE_ADDR + 0xc));
        guest.vcpu.set_guest_debug(&breakpoint).unwrap();
        assert_eq!(guest.run().0, ExitReason::Stopped, "the `in` asks for a stop");
        assert_eq!(guest.run().0, ExitReason::Stopped, "so does the MMIO read");
        assert_eq!(debug(guest.run().0), (DebugKind::Hardware(2), CODE_ADDR + 0xc));
        guest.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
        assert_eq!(guest.run().0, ExitReason::Stopped, "the checkpoint, now");
        assert_eq!(guest.run().0, ExitReason::Hlt);
    }
}
