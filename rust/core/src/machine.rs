//! A VM assembled from a [`MachineConfig`]: memory, vCPUs and I/O buses, and the lifecycle of
//! its runs (start, wait, stop).
//!
//! Each run starts one thread per vCPU. A thread owns its vCPU while it runs and hands it back
//! when joined, so register access and changes to the I/O map need the VM stopped, while memory
//! and `stop` are available at any time.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use std::os::unix::thread::JoinHandleExt;

use crate::arch::x86_64::mode::CpuMode;
use crate::bus::{BusDevice, BusRange};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::io::{IoSpaces, IoStats};
use crate::vstate::exit::{AddressSpace, Exit, ExitReason};
use crate::vstate::kvm::Kvm;
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::runner::{install_kick_handler, run_vcpu, Kicker, RunControl};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// A VM ready to run.
pub struct Machine {
    // Fields drop in order: vCPUs (in `state`) before the VM that created them.
    state: Mutex<State>,
    vm: Vm,
    vcpu_count: usize,
}

struct State {
    /// The vCPUs, by index, while no run holds them.
    vcpus: Vec<Vcpu>,
    io: IoSpaces,
    run: Option<ActiveRun>,
    last_exit: Option<Exit>,
}

struct ActiveRun {
    control: Arc<RunControl>,
    threads: Vec<JoinHandle<(Vcpu, ExitReason)>>,
}

impl Machine {
    /// Builds the VM the configuration describes.
    pub fn new(config: &MachineConfig) -> Result<Self> {
        let kvm = Kvm::shared()?;
        let max = kvm.max_vcpus();
        if config.vcpus == 0 || config.vcpus as usize > max {
            return Err(Error::InvalidConfig(format!("a VM needs 1 to {max} vCPUs, not {}", config.vcpus)));
        }
        let vm = Vm::new(&kvm, config)?;
        let vcpus = (0..config.vcpus)
            .map(|index| Vcpu::new(vm.fd(), index, config.vcpus, kvm.supported_cpuid(), &config.cpuid_edits))
            .collect::<Result<Vec<_>>>()?;
        let state = State { vcpus, io: IoSpaces::new(config.unhandled_io), run: None, last_exit: None };
        Ok(Self { state: Mutex::new(state), vm, vcpu_count: config.vcpus as usize })
    }

    /// Guest memory; usable while the VM runs.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.vm.memory()
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        Ok(memory::read(self.memory(), addr, buf)?)
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<()> {
        Ok(memory::write(self.memory(), addr, data)?)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Runs `f` on vCPU `index`; fails while the VM runs.
    pub fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&Vcpu) -> Result<R>) -> Result<R> {
        let state = self.stopped_state()?;
        let count = state.vcpus.len();
        f(state.vcpus.get(index).ok_or(Error::NoSuchVcpu { index, count })?)
    }

    /// Puts vCPU `index` in `mode` at `entry` (writing the GDT and page tables the mode needs
    /// into guest memory), with the stack pointer at `stack` if given.
    pub fn enter_mode(&self, index: usize, mode: CpuMode, entry: u64, stack: Option<u64>) -> Result<()> {
        self.with_vcpu(index, |vcpu| {
            let (mut sregs, mut regs) = (vcpu.sregs()?, vcpu.regs()?);
            mode.enter(entry, stack, &mut sregs, &mut regs)?;
            for (addr, bytes) in mode.tables() {
                memory::write(self.memory(), addr, &bytes).map_err(|_| {
                    Error::InvalidConfig(format!(
                        "{mode} mode needs guest memory at {addr:#x}..{:#x} for its descriptor and page tables",
                        addr + bytes.len() as u64
                    ))
                })?;
            }
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs)
        })
    }

    /// Maps `device` at `[base, base + len)` in `space`; fails while the VM runs.
    pub fn add_device(&self, space: AddressSpace, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<()> {
        let range = BusRange::new(base, len)
            .ok_or_else(|| Error::InvalidConfig(format!("{space} range {base:#x}+{len:#x} is empty or wraps around")))?;
        Ok(self.stopped_state()?.io.insert(space, range, device)?)
    }

    /// Unmaps the range of `space` that starts at `base`; fails while the VM runs.
    pub fn remove_device(&self, space: AddressSpace, base: u64) -> Result<Arc<dyn BusDevice>> {
        Ok(self.stopped_state()?.io.remove(space, base)?)
    }

    /// Calls `f` with the I/O statistics.
    pub fn io_stats<R>(&self, f: impl FnOnce(&IoStats) -> R) -> R {
        f(self.lock().io.stats())
    }

    /// Whether a run is in progress.
    pub fn is_running(&self) -> bool {
        self.stopped_state().is_err()
    }

    /// How the last finished run ended.
    pub fn last_exit(&self) -> Option<Exit> {
        let mut state = self.lock();
        Self::reap(&mut state);
        state.last_exit.clone()
    }

    /// Starts every vCPU on its own thread.
    pub fn start(&self) -> Result<()> {
        let mut state = self.stopped_state()?;
        install_kick_handler().map_err(Error::Thread)?;
        let mut vcpus = std::mem::take(&mut state.vcpus);
        let control = Arc::new(RunControl::new(vcpus.iter_mut().map(Kicker::new).collect()));
        let mut threads = Vec::with_capacity(vcpus.len());
        let mut unstarted = vcpus.into_iter();
        for vcpu in unstarted.by_ref() {
            match Self::spawn(vcpu, &state.io, &control) {
                Ok(thread) => threads.push(thread),
                Err((vcpu, e)) => {
                    // Stop what started, take every vCPU back, and report.
                    let vcpus: Vec<_> = std::iter::once(vcpu).chain(unstarted).collect();
                    for vcpu in &vcpus {
                        control.finish(vcpu.index(), &ExitReason::Stopped);
                    }
                    control.request_stop(None, ExitReason::VmmError(format!("cannot start a vCPU thread: {e}")));
                    state.vcpus = vcpus;
                    state.run = Some(ActiveRun { control, threads });
                    Self::join(&mut state);
                    return Err(Error::Thread(e));
                }
            }
        }
        state.run = Some(ActiveRun { control, threads });
        Ok(())
    }

    fn spawn(
        vcpu: Vcpu,
        io: &IoSpaces,
        control: &Arc<RunControl>,
    ) -> std::result::Result<JoinHandle<(Vcpu, ExitReason)>, (Vcpu, std::io::Error)> {
        let index = vcpu.index();
        let (io, control_for_thread) = (io.clone(), control.clone());
        // The vCPU is handed over only once the thread exists, so a failed spawn keeps it here.
        let (handover, receive) = mpsc::channel::<Vcpu>();
        let thread = thread::Builder::new().name(format!("kvmkit-vcpu{index}")).spawn(move || {
            let control = control_for_thread;
            let Ok(mut vcpu) = receive.recv() else { unreachable!("the spawner sends the vCPU before dropping the channel") };
            let reason = catch_unwind(AssertUnwindSafe(|| run_vcpu(&mut vcpu, &io, &control)))
                .unwrap_or_else(|panic| ExitReason::VmmError(format!("vCPU {index} thread panicked: {}", panic_message(&panic))));
            control.finish(index, &reason);
            (vcpu, reason)
        });
        match thread {
            Ok(thread) => {
                control.kicker(index as usize).attach(thread.as_pthread_t());
                handover.send(vcpu).map_err(|mpsc::SendError(vcpu)| (vcpu, std::io::Error::other("vCPU thread exited early")))?;
                Ok(thread)
            }
            Err(e) => Err((vcpu, e)),
        }
    }

    /// Waits for the run to end, at most `timeout`. `Ok(None)` means it is still running. With no
    /// run in progress, returns how the last one ended.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<Exit>> {
        let control = {
            let state = self.lock();
            match &state.run {
                Some(run) => run.control.clone(),
                None => return state.last_exit.clone().map(Some).ok_or(Error::NotStarted),
            }
        };
        if !control.wait(timeout) {
            return Ok(None);
        }
        let mut state = self.lock();
        Self::reap(&mut state);
        Ok(state.last_exit.clone())
    }

    /// Ends the run in progress, if any, with `reason` (unless it is already ending for another
    /// reason). Returns at once; `wait` collects the result. Returns whether a run was in progress.
    pub fn stop(&self, reason: ExitReason) -> bool {
        let state = self.lock();
        match &state.run {
            Some(run) => {
                run.control.request_stop(None, reason);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State is only changed by whole assignments, so a poisoned lock still guards a usable value.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, provided no run is in progress (a finished run is collected first).
    fn stopped_state(&self) -> Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        Self::reap(&mut state);
        if state.run.is_some() {
            return Err(Error::Running);
        }
        Ok(state)
    }

    /// Joins the run if all its threads have finished.
    fn reap(state: &mut State) {
        if state.run.as_ref().is_some_and(|run| run.control.wait(Some(Duration::ZERO))) {
            Self::join(state);
        }
    }

    /// Joins the run's threads (which must have finished or be about to), takes the vCPUs back and
    /// records how the run ended.
    fn join(state: &mut State) {
        let Some(run) = state.run.take() else { return };
        let mut reasons: Vec<(u32, ExitReason)> = Vec::new();
        for thread in run.threads {
            let index = state.vcpus.len();
            run.control.kicker(index).detach();
            match thread.join() {
                Ok((vcpu, reason)) => {
                    reasons.push((vcpu.index(), reason));
                    state.vcpus.push(vcpu);
                }
                Err(panic) => reasons.push((index as u32, ExitReason::VmmError(format!("vCPU {index} lost: {}", panic_message(&panic))))),
            }
        }
        state.vcpus.sort_by_key(Vcpu::index);
        reasons.sort_by_key(|(index, _)| *index);
        let vcpu_reasons: Vec<ExitReason> = reasons.into_iter().map(|(_, reason)| reason).collect();
        let (vcpu, reason) = run.control.cause().unwrap_or((None, ExitReason::Hlt));
        state.last_exit = Some(Exit { reason, vcpu, vcpu_reasons });
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop(ExitReason::Stopped);
        let mut state = self.lock();
        if let Some(run) = &state.run {
            run.control.wait(None);
        }
        Self::join(&mut state);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
