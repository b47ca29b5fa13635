//! A VM assembled from a [`MachineConfig`]: memory, vCPUs and I/O buses, and the lifecycle of
//! its runs (start, wait, stop).
//!
//! Each vCPU has a thread of its own, started with its first run and kept until the machine goes.
//! The thread owns its vCPU during a run and hands it back at the end, so register access and
//! changes to the I/O map need the VM stopped, while memory and `stop` are available at any time.

mod call;
mod hooks;
mod raw;
mod snapshot;

pub use call::{CallOutcome, CallResults, CALL_ARGS_MAX};
pub use hooks::RestoreHook;
pub use raw::RawSetup;
pub use snapshot::RestoreTimes;

use std::panic::{catch_unwind, AssertUnwindSafe};

use kvm_bindings::{kvm_regs, kvm_sregs};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{self, VIRTIO_MMIO_SIZE};
use crate::arch::x86_64::mode::CpuMode;
use crate::arch::x86_64::pagewalk::{self, PagingRegs};
use crate::bus::{BusDevice, BusRange};
use crate::config::MachineConfig;
use crate::devices::virtio::{
    DeviceCounters, DeviceEventLoop, Interrupt, MmioTransport, SharedDevice, QUEUE_NOTIFY_OFFSET,
};
use crate::error::{Error, Result};
use crate::io::{IoSpaces, IoStats};
use crate::irq::IrqLine;
use crate::vstate::debug::{DebugKind, GuestDebug, HwKind, HwSlot, HW_SLOTS};
use crate::vstate::exit::{AddressSpace, Exit, ExitReason};
use crate::vstate::kvm::Kvm;
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::regs::{self, RegisterFile};
use crate::vstate::runner::{install_kick_handler, run_vcpu, Alarm, Kicker, RunAgain, RunControl};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{new_eventfd, Vm};

/// Wraps the body of every vCPU thread: it must call the closure it is given exactly once. Lets an
/// embedder set up per-thread context that outlives single exits (a language runtime's thread
/// state, for instance).
pub type VcpuThreadHook = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

/// A VM ready to run.
pub struct Machine {
    // Fields drop in order: vCPUs (in `state`) before the VM that created them.
    state: Mutex<State>,
    vm: Vm,
    vcpu_count: usize,
    irqchip: bool,
    /// What the machine was built from, kept for snapshots.
    config: MachineConfig,
    /// Becomes readable when a run ends, for event loops to wait on (see
    /// [`run_end_fd`](Self::run_end_fd)).
    run_end: Arc<EventFd>,
}

struct State {
    /// The vCPUs, by index, while no run holds them.
    vcpus: Vec<Vcpu>,
    io: IoSpaces,
    run: Option<ActiveRun>,
    last_exit: Option<Exit>,
    thread_hook: Option<VcpuThreadHook>,
    /// Each vCPU's thread, by index, started with its first run and kept for the next ones.
    workers: Vec<Worker>,
    /// Called when the first run starts (then dropped).
    on_first_start: Vec<Box<dyn FnOnce() + Send>>,
    /// virtio devices, in the order they were added.
    virtio: Vec<VirtioSlot>,
    /// Serves the virtio devices; started with the first one.
    device_loop: Option<DeviceEventLoop>,
    /// Set while the VM is paused.
    pause: Option<snapshot::Pause>,
    /// Whether a run started since KVM's dirty log was last read.
    ran_since_dirty_log: bool,
    /// Run after each restore.
    restore_hooks: hooks::RestoreHooks,
    /// The breakpoints and watchpoints every vCPU runs with.
    debug: GuestDebug,
    /// For each vCPU that stopped at an instruction breakpoint, the breakpoint's address: resuming
    /// from there steps over it first, or it would hit again at once.
    at_breakpoint: Vec<Option<u64>>,
}

/// Where a virtio device sits and how it is doing.
#[derive(Clone)]
pub struct VirtioSlot {
    /// The virtio device type.
    pub device_type: u32,
    /// First address of its MMIO registers.
    pub base: u64,
    /// Size of its MMIO window.
    pub size: u64,
    /// Its interrupt.
    pub gsi: u32,
    /// Its counters.
    pub counters: Arc<DeviceCounters>,
}

/// Where the vCPUs of a run are handed back as they finish, with why each stopped.
type Handback = Arc<Mutex<Vec<(Vcpu, ExitReason)>>>;

struct ActiveRun {
    control: Arc<RunControl>,
    /// Where the vCPUs that run are handed back, each before its thread counts it finished.
    finished: Handback,
    /// How many vCPUs are to come through `finished`.
    pending: usize,
    /// vCPUs given back without running (their thread could not be started).
    returned: Vec<(Vcpu, ExitReason)>,
}

/// A vCPU's own thread, which runs it in every run. Kept across runs because KVM makes a run on a
/// thread other than the previous run's wait for an RCU grace period, and a new thread costs its
/// start-up as well: both would dominate short runs.
struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

/// One run of one vCPU, for its worker.
struct Job {
    vcpu: Vcpu,
    io: IoSpaces,
    control: Arc<RunControl>,
    finished: Handback,
    /// Signalled by the vCPU that finishes the run last; `None` for a run on the caller's thread,
    /// which nobody else waits for.
    run_end: Option<Arc<EventFd>>,
    /// How many times to run the vCPU while each run ends with a single step (1 otherwise).
    steps: u64,
}

impl Job {
    /// Runs the vCPU until it exits for good (`steps` times while each run ends with a single
    /// step), asking `interrupted` whenever it is kicked out of the guest (or, given `None`, ends
    /// its part of the run without running it), then hands it back.
    fn serve(self, interrupted: Option<&mut dyn FnMut() -> Option<ExitReason>>) {
        let mut left = self.steps;
        self.serve_with(interrupted, &mut |_, exit| {
            left = left.saturating_sub(1);
            left > 0 && matches!(exit, ExitReason::Debug(event) if event.kind == DebugKind::Step)
        });
    }

    /// [`serve`](Self::serve), running the vCPU on while `again` says so.
    fn serve_with(self, interrupted: Option<&mut dyn FnMut() -> Option<ExitReason>>, again: RunAgain<'_>) {
        let Job { mut vcpu, io, control, finished, run_end, steps: _ } = self;
        let exit = match interrupted {
            Some(interrupted) => run_guarded(&mut vcpu, &io, &control, interrupted, again),
            None => ExitReason::VmmError("the vCPU thread hook did not run the vCPU".into()),
        };
        control.end_run_if(vcpu.index(), &exit);
        drop(io);
        // Handed back before being counted, so whoever sees the run finished finds it.
        finished.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((vcpu, exit));
        control.finish();
        // The last vCPU to finish sees the run over (two at once may both signal).
        if let Some(run_end) = run_end.filter(|_| control.wait(Some(Duration::ZERO))) {
            let _ = run_end.write(1);
        }
    }
}

/// Which vCPUs a run runs.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Every vCPU, each on its own thread.
    All,
    /// Only vCPU `index`, the others staying where they are, instruction by instruction when
    /// `step` says so: on the calling thread when `on_caller`, else on its own.
    One { index: usize, step: Option<Stepping>, on_caller: bool },
}

/// A run of single steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stepping {
    /// Whether KVM keeps interrupts out during each step, when it can.
    pub mask_interrupts: bool,
    /// How many instructions to run; the run ends earlier on an exit other than a step's.
    pub count: u64,
}

/// How often a waiting or running caller checks its deadline and interrupt callback.
const POLL_PERIOD: Duration = Duration::from_millis(20);

/// How long a run told to end (by its deadline, by an interrupt) waits for its vCPUs before the
/// caller gets its answer anyway. vCPUs in the guest stop within microseconds; one still inside a
/// slow handler is left to finish it.
pub const STOP_GRACE: Duration = Duration::from_millis(100);

/// Runs the vCPU loop, turning a panic into an exit reason.
fn run_guarded(
    vcpu: &mut Vcpu,
    io: &IoSpaces,
    control: &RunControl,
    interrupted: &mut dyn FnMut() -> Option<ExitReason>,
    again: RunAgain<'_>,
) -> ExitReason {
    let index = vcpu.index();
    catch_unwind(AssertUnwindSafe(|| run_vcpu(vcpu, io, control, interrupted, again)))
        .unwrap_or_else(|panic| ExitReason::VmmError(format!("vCPU {index} panicked: {}", panic_message(&panic))))
}

impl Machine {
    /// Builds the VM the configuration describes.
    pub fn new(config: &MachineConfig) -> Result<Self> {
        Self::build(config, None)
    }

    /// Builds the VM, over `memory` if given (which must have the configuration's layout).
    fn build(config: &MachineConfig, memory: Option<memory::GuestMemory>) -> Result<Self> {
        let kvm = Kvm::shared()?;
        let max = kvm.max_vcpus();
        if config.vcpus == 0 || config.vcpus as usize > max {
            return Err(Error::InvalidConfig(format!("a VM needs 1 to {max} vCPUs, not {}", config.vcpus)));
        }
        let vm = match memory {
            Some(memory) => Vm::with_memory(&kvm, config, memory)?,
            None => Vm::new(&kvm, config)?,
        };
        let vcpus = (0..config.vcpus)
            .map(|index| {
                Vcpu::new(vm.fd(), index, config.vcpus, config.irqchip, kvm.supported_cpuid(), &config.cpuid_edits)
            })
            .collect::<Result<Vec<_>>>()?;
        let state = State {
            vcpus,
            io: IoSpaces::new(config.unhandled_io).with_memory(vm.memory().clone()),
            run: None,
            last_exit: None,
            thread_hook: None,
            workers: Vec::new(),
            on_first_start: Vec::new(),
            virtio: Vec::new(),
            device_loop: None,
            pause: None,
            ran_since_dirty_log: false,
            restore_hooks: hooks::RestoreHooks::default(),
            debug: GuestDebug::default(),
            at_breakpoint: Vec::new(),
        };
        let vcpu_count = config.vcpus as usize;
        let run_end = Arc::new(new_eventfd()?);
        Ok(Self { state: Mutex::new(state), vm, vcpu_count, irqchip: config.irqchip, config: config.clone(), run_end })
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

    /// The guest-physical address vCPU `index`'s page tables map the virtual address `vaddr` to,
    /// or None; fails while the VM runs.
    pub fn translate(&self, index: usize, vaddr: u64) -> Result<Option<u64>> {
        let regs = PagingRegs::from(&self.with_vcpu(index, Vcpu::sregs)?);
        Ok(self.translate_with(&regs, vaddr))
    }

    fn translate_with(&self, regs: &PagingRegs, vaddr: u64) -> Option<u64> {
        pagewalk::translate(regs, vaddr, &mut |addr, buf| memory::read(self.memory(), addr, buf).is_ok())
    }

    /// The guest-physical pieces of `len` bytes at virtual address `vaddr`, one per page.
    fn virtual_pieces(&self, index: usize, vaddr: u64, len: usize) -> Result<Vec<(u64, usize)>> {
        let regs = PagingRegs::from(&self.with_vcpu(index, Vcpu::sregs)?);
        let mut pieces = Vec::new();
        let (mut at, mut left) = (vaddr, len);
        while left > 0 {
            let size = (pagewalk::page_rest(at) as usize).min(left);
            let phys = self.translate_with(&regs, at).ok_or_else(|| {
                Error::InvalidConfig(format!("virtual address {at:#x} is not mapped on vCPU {index}"))
            })?;
            pieces.push((phys, size));
            at = at.wrapping_add(size as u64);
            left -= size;
        }
        Ok(pieces)
    }

    /// Copies guest memory at virtual address `vaddr`, as vCPU `index` maps it, into `buf`.
    pub fn read_virtual(&self, index: usize, vaddr: u64, buf: &mut [u8]) -> Result<()> {
        let mut offset = 0;
        for (phys, size) in self.virtual_pieces(index, vaddr, buf.len())? {
            self.read_memory(phys, &mut buf[offset..offset + size])?;
            offset += size;
        }
        Ok(())
    }

    /// Copies `data` to virtual address `vaddr` as vCPU `index` maps it; every page is translated
    /// (and checked) before anything is written.
    pub fn write_virtual(&self, index: usize, vaddr: u64, data: &[u8]) -> Result<()> {
        let pieces = self.virtual_pieces(index, vaddr, data.len())?;
        for &(phys, size) in &pieces {
            memory::check_range(self.memory(), phys, size)?;
        }
        let mut offset = 0;
        for (phys, size) in pieces {
            self.write_memory(phys, &data[offset..offset + size])?;
            offset += size;
        }
        Ok(())
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Whether KVM emulates the interrupt controllers.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// An interrupt line into the in-kernel irqchip for `gsi`.
    pub fn irq_line(&self, gsi: u32) -> Result<IrqLine> {
        self.vm.irq_line(gsi)
    }

    /// Runs `f` when the first run starts (a boot timer starts counting there, for instance).
    pub fn on_first_start(&self, f: Box<dyn FnOnce() + Send>) {
        self.lock().on_first_start.push(f);
    }

    /// Runs `f` after each restore of a snapshot into this VM, once the VM's and the devices' state
    /// are back: for what must differ on every restore, such as the VM generation id.
    pub fn on_restore(&self, f: RestoreHook) {
        self.lock().restore_hooks.add(f);
    }

    /// Runs the restore hooks, in the order they were added. Call it with the state unlocked, once
    /// everything else is restored (the irqchip too, so that the interrupts the hooks raise stay
    /// raised).
    pub(crate) fn run_restore_hooks(&self) {
        let hooks = self.lock().restore_hooks.clone();
        hooks.run();
    }

    /// Runs `f` on vCPU `index`; fails while the VM runs.
    pub fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&Vcpu) -> Result<R>) -> Result<R> {
        let state = self.stopped_state()?;
        let count = state.vcpus.len();
        f(state.vcpus.get(index).ok_or(Error::NoSuchVcpu { index, count })?)
    }

    /// General-purpose registers, RIP and RFLAGS of vCPU `index`: while the VM is stopped, or,
    /// while it runs, from the handler of an access of that vCPU, on the thread that runs it.
    pub fn regs(&self, index: usize) -> Result<kvm_regs> {
        self.with_registers(index, false, RegisterFile::regs)
    }

    /// Sets the general registers of vCPU `index`, as for [`regs`](Self::regs). During an access,
    /// KVM completes the access after taking them: an `in` still writes its register, and a new
    /// RIP cancels the rest of the instruction.
    pub fn set_regs(&self, index: usize, regs: &kvm_regs) -> Result<()> {
        self.with_registers(index, true, |file| file.set_regs(regs))
    }

    /// Segment, control and descriptor-table registers of vCPU `index`, as for [`regs`](Self::regs).
    pub fn sregs(&self, index: usize) -> Result<kvm_sregs> {
        self.with_registers(index, false, RegisterFile::sregs)
    }

    /// Sets the special registers of vCPU `index`, as for [`regs`](Self::regs).
    pub fn set_sregs(&self, index: usize, sregs: &kvm_sregs) -> Result<()> {
        self.with_registers(index, true, |file| file.set_sregs(sregs))
    }

    /// The vCPU the calling thread runs for this machine, if any: in a handler, the vCPU whose
    /// access it serves.
    pub fn serving_vcpu(&self) -> Option<usize> {
        let in_run = self.lock().run.as_ref().is_some_and(|run| run.control.is_current_thread());
        in_run.then(regs::serving_vcpu).flatten().map(|index| index as usize)
    }

    /// Runs `f` on the registers of vCPU `index`: while the VM is stopped, or, while it runs, from
    /// the handler of an access of that vCPU, on the thread that runs it (as Unicorn's hooks can).
    /// `writes` says whether `f` may change them.
    fn with_registers<R>(&self, index: usize, writes: bool, f: impl FnOnce(&RegisterFile) -> Result<R>) -> Result<R> {
        let in_handler = self.lock().run.as_ref().is_some_and(|run| run.control.is_current_thread());
        if !in_handler {
            return self.with_vcpu(index, |vcpu| {
                if writes {
                    vcpu.note_registers_written();
                }
                f(&vcpu.register_file())
            });
        }
        match regs::serving(index as u32) {
            Some(file) => f(&file),
            None if index >= self.vcpu_count => Err(Error::NoSuchVcpu { index, count: self.vcpu_count }),
            None => Err(Error::NotServing { index, serving: regs::serving_vcpu().unwrap_or_default() }),
        }
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
        let range = BusRange::new(base, len).ok_or_else(|| {
            Error::InvalidConfig(format!("{space} range {base:#x}+{len:#x} is empty or wraps around"))
        })?;
        // The guest's accesses to RAM never leave it, so a device there would never be reached.
        let mut ram = memory::regions(self.memory()).into_iter().filter_map(|(addr, size)| BusRange::new(addr, size));
        if let Some(ram) = ram.find(|ram| space == AddressSpace::Mmio && ram.overlaps(&range)) {
            return Err(Error::InvalidConfig(format!(
                "MMIO range {range} overlaps guest RAM at {ram}, where the guest's accesses never reach a device"
            )));
        }
        Ok(self.stopped_state()?.io.insert(space, range, device)?)
    }

    /// Puts a virtio device on the MMIO bus in the next free slot, with its queue notifications
    /// caught by ioeventfds and its interrupt (when the VM has an irqchip) raised by an irqfd, and
    /// has the device event loop serve it. The device stays for the VM's life.
    pub fn add_virtio_device(&self, device: SharedDevice) -> Result<VirtioSlot> {
        let mut state = self.stopped_state()?;
        let index = state.virtio.len();
        let (base, gsi) = layout::virtio_mmio_slot(index)
            .ok_or_else(|| Error::InvalidConfig(format!("a VM has room for {index} virtio devices, no more")))?;
        let (device_type, queue_count, counters) = {
            let device = device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            (device.device_type(), device.queue_max_sizes().len(), device.counters().clone())
        };
        let notifiers = (0..queue_count).map(|_| new_eventfd()).collect::<Result<Vec<_>>>()?;
        let line = if self.irqchip { Some(self.vm.irq_line(gsi)?.0) } else { None };
        let interrupt = Arc::new(Interrupt::new(line, counters.clone()));
        let transport_notifiers = notifiers.iter().map(try_clone).collect::<Result<Vec<_>>>()?;
        let transport =
            MmioTransport::new(device.clone(), self.memory().clone(), interrupt.clone(), transport_notifiers);
        let range = BusRange::new(base, VIRTIO_MMIO_SIZE).expect("virtio slots are non-empty ranges");
        state.io.insert(AddressSpace::Mmio, range, Arc::new(transport))?;
        // Registered only once the window is known to be free, so a failed add leaves nothing behind.
        if let Err(e) = self.vm.register_queue_notifiers(base + QUEUE_NOTIFY_OFFSET, &notifiers) {
            let _ = state.io.remove(AddressSpace::Mmio, base);
            return Err(e);
        }
        if state.device_loop.is_none() {
            state.device_loop = Some(DeviceEventLoop::start().map_err(Error::DeviceSetup)?);
        }
        let device_loop = state.device_loop.as_ref().expect("started above");
        device_loop.add(device, notifiers, interrupt).map_err(Error::DeviceSetup)?;
        let slot = VirtioSlot { device_type, base, size: VIRTIO_MMIO_SIZE, gsi, counters };
        state.virtio.push(slot.clone());
        Ok(slot)
    }

    /// The virtio devices added so far.
    pub fn virtio_devices(&self) -> Vec<VirtioSlot> {
        self.lock().virtio.clone()
    }

    /// Unmaps the range of `space` that starts at `base`; fails while the VM runs.
    pub fn remove_device(&self, space: AddressSpace, base: u64) -> Result<Arc<dyn BusDevice>> {
        Ok(self.stopped_state()?.io.remove(space, base)?)
    }

    /// Calls `f` with the I/O statistics.
    pub fn io_stats<R>(&self, f: impl FnOnce(&IoStats) -> R) -> R {
        f(self.lock().io.stats())
    }

    /// A non-blocking eventfd that becomes readable when a run ends, for an event loop to wait on
    /// instead of blocking in [`wait`](Self::wait): after it fires, read it to clear it and call
    /// `wait(Some(Duration::ZERO))`. It may fire more than once for one run.
    pub fn run_end_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.run_end.as_raw_fd()
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

    /// Sets the hook every vCPU thread runs inside, for the threads not started yet (a vCPU's
    /// thread starts with its first run).
    pub fn set_thread_hook(&self, hook: VcpuThreadHook) -> Result<()> {
        self.stopped_state()?.thread_hook = Some(hook);
        Ok(())
    }

    /// Starts every vCPU on its own thread and returns; [`wait`](Self::wait) collects the end.
    pub fn start(&self) -> Result<()> {
        if self.step_over_breakpoints()?.is_some() {
            // The run ended in the step; `wait` finds its exit.
            return Ok(());
        }
        self.launch(Scope::All).map(drop)
    }

    /// Runs exactly one instruction on vCPU `index` while the others stay stopped, and returns
    /// the exit (normally [`ExitReason::Debug`] of kind step). With `mask_interrupts`, KVM
    /// delivers no interrupt during the step, when it can. Instruction breakpoints are left out of
    /// the step, so stepping from one moves on; watchpoints stay. A step that does not end (a HLT
    /// waiting for an interrupt) ends with [`ExitReason::Stopped`] once `interrupted` says so, as
    /// a run does.
    ///
    /// The step runs on the vCPU's own thread, so that, as for a run, the caller gets its answer
    /// within [`STOP_GRACE`] even while a slow device call is under way; [`run_here`](Self::run_here)
    /// steps faster, on the calling thread.
    pub fn step(&self, index: usize, mask_interrupts: bool, interrupted: &mut dyn FnMut() -> bool) -> Result<Exit> {
        if index >= self.vcpu_count {
            return Err(Error::NoSuchVcpu { index, count: self.vcpu_count });
        }
        let step = Some(Stepping { mask_interrupts, count: 1 });
        let (control, _) = self.launch(Scope::One { index, step, on_caller: false })?;
        self.collect(&control, None, interrupted)
    }

    /// Runs only vCPU `index`, on the calling thread, while the others stay stopped, until it
    /// exits for good, or instruction by instruction as `step` says. The run ends with
    /// [`ExitReason::Timeout`] at `deadline`, and with [`ExitReason::Stopped`] when `interrupted`
    /// says so; it is asked whenever the vCPU is kicked out of the guest: by
    /// [`stop`](Self::stop), by the deadline, or by a signal to the calling thread (Ctrl-C's, on a
    /// main thread). Unlike [`run`](Self::run), it returns only when the vCPU is out of any device
    /// call.
    ///
    /// No thread is woken, so a short run costs little more than its `KVM_RUN`s; the price is the
    /// one KVM asks when a vCPU runs on another thread than the time before (an RCU grace period),
    /// paid when runs alternate between here and the vCPU's own thread.
    pub fn run_here(
        &self,
        index: usize,
        step: Option<Stepping>,
        deadline: Option<Instant>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Exit> {
        self.run_here_with(index, step, deadline, interrupted, None)
    }

    /// [`run_here`](Self::run_here), where `again`, when given, decides after each exit whether
    /// the vCPU goes on within the same run (instead of `step`'s count).
    pub(crate) fn run_here_with(
        &self,
        index: usize,
        step: Option<Stepping>,
        deadline: Option<Instant>,
        interrupted: &mut dyn FnMut() -> bool,
        again: Option<RunAgain<'_>>,
    ) -> Result<Exit> {
        if index >= self.vcpu_count {
            return Err(Error::NoSuchVcpu { index, count: self.vcpu_count });
        }
        let alarm = deadline.map(Alarm::at).transpose().map_err(Error::Thread)?;
        let (control, job) = self.launch(Scope::One { index, step, on_caller: true })?;
        let mut ask = || {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                Some(ExitReason::Timeout)
            } else {
                interrupted().then_some(ExitReason::Stopped)
            }
        };
        match (job, again) {
            (Some(job), Some(again)) => job.serve_with(Some(&mut ask), again),
            (Some(job), None) => job.serve(Some(&mut ask)),
            (None, _) => {}
        }
        drop(alarm);
        self.collect(&control, None, &mut || false)
    }

    /// Steps every vCPU that stopped at an instruction breakpoint (and still sits there, with the
    /// breakpoint still set) past it. Returns the exit when such a step ends the run: a watchpoint
    /// hit, a failure.
    fn step_over_breakpoints(&self) -> Result<Option<Exit>> {
        let pending: Vec<usize> = {
            let mut state = self.stopped_state()?;
            let marks = std::mem::take(&mut state.at_breakpoint);
            let breakpoints: Vec<u64> =
                state.debug.slots.iter().flatten().filter(|s| s.kind() == HwKind::Execute).map(|s| s.addr()).collect();
            marks
                .iter()
                .enumerate()
                .filter_map(|(index, pc)| {
                    let pc = (*pc).filter(|pc| breakpoints.contains(pc))?;
                    let vcpu = state.vcpus.get(index)?;
                    let sregs = vcpu.sregs().ok()?;
                    // Debug addresses are linear; a 64-bit code segment has no base.
                    let base = if sregs.cs.l != 0 { 0 } else { sregs.cs.base };
                    let rip = vcpu.regs().ok()?.rip.wrapping_add(base);
                    (rip == pc).then_some(index)
                })
                .collect()
        };
        for index in pending {
            let exit = self.step(index, true, &mut || false)?;
            let stepped = matches!(exit.reason, ExitReason::Debug(event) if event.kind == DebugKind::Step);
            if !stepped && exit.reason != ExitReason::Hlt {
                return Ok(Some(exit));
            }
        }
        Ok(None)
    }

    /// Puts a hardware breakpoint or watchpoint in the first free debug register, for every vCPU
    /// from the next run on, and returns the register's number; fails while the VM runs or when
    /// all four are taken.
    pub fn add_hw_slot(&self, slot: HwSlot) -> Result<usize> {
        let mut state = self.stopped_state()?;
        let free = state.debug.slots.iter().position(Option::is_none).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "x86 has {HW_SLOTS} debug registers for hardware breakpoints and watchpoints, all in use"
            ))
        })?;
        state.debug.slots[free] = Some(slot);
        Ok(free)
    }

    /// Frees debug register `index`; fails while the VM runs.
    pub fn remove_hw_slot(&self, index: usize) -> Result<()> {
        let mut state = self.stopped_state()?;
        let slot =
            state.debug.slots.get_mut(index).ok_or_else(|| {
                Error::InvalidConfig(format!("there are {HW_SLOTS} debug registers, not {}", index + 1))
            })?;
        *slot = None;
        Ok(())
    }

    /// The hardware breakpoints and watchpoints, by debug register.
    pub fn hw_slots(&self) -> [Option<HwSlot>; HW_SLOTS] {
        self.lock().debug.slots
    }

    /// Turns on or off `int3` exiting to the VMM (software breakpoints); fails while the VM runs.
    pub fn set_software_breakpoints(&self, on: bool) -> Result<()> {
        self.stopped_state()?.debug.software_breakpoints = on;
        Ok(())
    }

    /// Whether `int3` exits to the VMM (see [`set_software_breakpoints`](Self::set_software_breakpoints)).
    pub fn software_breakpoints(&self) -> bool {
        self.lock().debug.software_breakpoints
    }

    /// Runs the VM until the run ends, every vCPU on its own thread while the caller waits. The run
    /// ends with [`ExitReason::Timeout`] after `timeout`, and with [`ExitReason::Stopped`] as soon
    /// as `interrupted` (asked every few milliseconds) returns true. Either way the caller gets its
    /// answer within [`STOP_GRACE`]: a vCPU still busy in a device call then (a slow handler)
    /// finishes the call on its thread and stops, the run stays in progress until it has, and the
    /// exit returned lists no per-vCPU reasons.
    pub fn run(&self, timeout: Option<Duration>, interrupted: &mut dyn FnMut() -> bool) -> Result<Exit> {
        // A timeout too long to be a time of day never passes.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if let Some(exit) = self.step_over_breakpoints()? {
            return Ok(exit);
        }
        let (control, _) = self.launch(Scope::All)?;
        self.collect(&control, deadline, interrupted)
    }

    /// Waits for the run `control` controls as [`run`](Self::run) does, and returns its exit.
    fn collect(
        &self,
        control: &RunControl,
        deadline: Option<Instant>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Exit> {
        let mut give_up = None;
        loop {
            let slice = deadline.map_or(POLL_PERIOD, |d| d.saturating_duration_since(Instant::now()).min(POLL_PERIOD));
            if control.wait(Some(slice)) {
                break;
            }
            if let Some(give_up) = give_up {
                if Instant::now() >= give_up {
                    let (vcpu, reason) = control.cause().unwrap_or((None, ExitReason::Stopped));
                    return Ok(Exit { reason, vcpu, vcpu_reasons: Vec::new(), rip: None, hint: None });
                }
                continue;
            }
            let reason = if deadline.is_some_and(|d| Instant::now() >= d) {
                Some(ExitReason::Timeout)
            } else {
                interrupted().then_some(ExitReason::Stopped)
            };
            if let Some(reason) = reason {
                control.request_stop(None, reason);
                give_up = Some(Instant::now() + STOP_GRACE);
            }
        }
        let mut state = self.lock();
        Self::reap(&mut state);
        state.last_exit.clone().ok_or(Error::NotStarted)
    }

    /// Starts a new run of the vCPUs of `scope`: all on their threads (starting those that are not
    /// yet), or one, whose job is handed back for the caller to serve.
    fn launch(&self, scope: Scope) -> Result<(Arc<RunControl>, Option<Job>)> {
        let mut state = self.stopped_state()?;
        install_kick_handler().map_err(Error::Thread)?;
        self.unpause(&mut state)?;
        let base = state.debug;
        for (index, vcpu) in state.vcpus.iter_mut().enumerate() {
            let debug = match scope {
                Scope::One { index: stepping, step: Some(step), .. } if stepping == index => {
                    GuestDebug { single_step: true, block_irq: step.mask_interrupts, ..base.without_breakpoints() }
                }
                _ => base,
            };
            vcpu.set_guest_debug(&debug)?;
        }
        state.ran_since_dirty_log = true;
        for first_start in std::mem::take(&mut state.on_first_start) {
            first_start();
        }
        let mut vcpus = std::mem::take(&mut state.vcpus);
        let control = Arc::new(RunControl::new(vcpus.iter_mut().map(Kicker::new).collect()));
        let finished = Handback::default();
        let mut run =
            ActiveRun { control: control.clone(), finished: finished.clone(), pending: 0, returned: Vec::new() };
        let mut vcpus = vcpus.into_iter();
        let mut here = None;
        while let Some(vcpu) = vcpus.next() {
            let job = |vcpu, run_end, steps| Job {
                vcpu,
                io: state.io.clone(),
                control: control.clone(),
                finished: finished.clone(),
                run_end,
                steps,
            };
            let job = match scope {
                Scope::All => job(vcpu, Some(self.run_end.clone()), 1),
                Scope::One { index, .. } if index != vcpu.index() as usize => {
                    // Not this run's vCPU: it stays where it is.
                    control.finish();
                    run.returned.push((vcpu, ExitReason::Stopped));
                    continue;
                }
                Scope::One { step, on_caller, .. } => {
                    let steps = step.map_or(1, |step| step.count.max(1));
                    if on_caller {
                        here = Some(job(vcpu, None, steps));
                        run.pending += 1;
                        continue;
                    }
                    job(vcpu, Some(self.run_end.clone()), steps)
                }
            };
            match Self::hand_over(&mut state, job) {
                Ok(()) => run.pending += 1,
                Err((vcpu, e)) => {
                    // Stop what started, take every vCPU back, and report.
                    for vcpu in std::iter::once(vcpu).chain(vcpus) {
                        control.finish();
                        run.returned.push((vcpu, ExitReason::Stopped));
                    }
                    control.request_stop(None, ExitReason::VmmError(format!("cannot start a vCPU thread: {e}")));
                    control.wait(None);
                    state.run = Some(run);
                    Self::join(&mut state);
                    return Err(Error::Thread(e));
                }
            }
        }
        state.run = Some(run);
        Ok((control, here))
    }

    /// Gives `job` to its vCPU's thread, starting the thread on the vCPU's first run; hands the
    /// vCPU back when that fails.
    fn hand_over(state: &mut State, job: Job) -> std::result::Result<(), (Vcpu, std::io::Error)> {
        let index = job.vcpu.index() as usize;
        // A step may run a later vCPU before the earlier ones ever ran.
        while index >= state.workers.len() {
            match Worker::start(state.workers.len(), state.thread_hook.clone()) {
                Ok(worker) => state.workers.push(worker),
                Err(e) => return Err((job.vcpu, e)),
            }
        }
        state.workers[index]
            .jobs
            .send(job)
            .map_err(|mpsc::SendError(job)| (job.vcpu, std::io::Error::other("the vCPU thread has exited")))
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
        if control.is_current_thread() {
            return Err(Error::WaitInRun);
        }
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
        let (vcpus, exit) = run.join();
        state.vcpus = vcpus;
        let slots = state.debug.slots;
        state.at_breakpoint = exit
            .vcpu_reasons
            .iter()
            .map(|reason| match reason {
                ExitReason::Debug(event) => match event.kind {
                    DebugKind::Hardware(n) => {
                        slots[usize::from(n)].filter(|slot| slot.kind() == HwKind::Execute).map(|_| event.pc)
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect();
        state.last_exit = Some(exit);
    }
}

impl ActiveRun {
    /// Takes the vCPUs back once every one of them has finished the run (see
    /// [`RunControl::wait`]): the vCPUs and how the run ended.
    fn join(self) -> (Vec<Vcpu>, Exit) {
        let mut handed = std::mem::take(&mut *self.finished.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        if handed.len() < self.pending {
            // Unreachable: the thread body catches panics and always hands the vCPU back.
            log::error!("{} vCPU(s) were lost with their thread", self.pending - handed.len());
        }
        let mut finished = self.returned;
        finished.append(&mut handed);
        finished.sort_by_key(|(vcpu, _)| vcpu.index());
        let (vcpus, vcpu_reasons): (Vec<_>, Vec<_>) = finished.into_iter().unzip();
        let (vcpu, reason) = self.control.cause().unwrap_or((None, ExitReason::Hlt));
        let ender = vcpu.and_then(|index| vcpus.get(index as usize));
        let (rip, hint) = ender.map_or((None, None), |ender| crate::vstate::fault::run_end_notes(ender, &reason));
        (vcpus, Exit { reason, vcpu, vcpu_reasons, rip, hint })
    }
}

impl Worker {
    /// Starts the thread of vCPU `index`, inside `hook` if given; it serves jobs until the sender
    /// goes.
    fn start(index: usize, hook: Option<VcpuThreadHook>) -> std::io::Result<Self> {
        let (jobs, receive) = mpsc::channel::<Job>();
        let thread = thread::Builder::new().name(format!("kvmkit-vcpu{index}")).spawn(move || {
            let mut body = || receive.iter().for_each(|job| job.serve(Some(&mut || None)));
            match &hook {
                Some(hook) => hook(&mut body),
                None => body(),
            }
            // A hook that did not call the body leaves jobs that must still end their runs.
            receive.try_iter().for_each(|job| job.serve(None));
        })?;
        Ok(Self { jobs, thread })
    }
}

/// What is left of a machine's runs when it goes: the run in progress and the vCPU threads.
struct Teardown {
    run: Option<ActiveRun>,
    workers: Vec<Worker>,
    /// Kept mapped until the vCPUs are gone, since they can still reach it.
    memory: Arc<GuestMemory>,
}

impl Teardown {
    /// Waits for the run (which was asked to stop) and ends the vCPU threads.
    fn finish(self) {
        if let Some(run) = self.run {
            run.control.wait(None);
            drop(run.join());
        }
        for Worker { jobs, thread } in self.workers {
            drop(jobs);
            if let Err(panic) = thread.join() {
                log::error!("a vCPU thread panicked: {}", panic_message(&panic));
            }
        }
        drop(self.memory);
    }

    /// Whether the calling thread is one of the vCPU threads (a handler dropping its VM), which
    /// cannot wait for itself.
    fn on_vcpu_thread(&self) -> bool {
        let current = thread::current().id();
        self.workers.iter().any(|worker| worker.thread.thread().id() == current)
    }

    /// [`finish`](Self::finish) on a thread of its own.
    fn finish_elsewhere(self) {
        let (handover, receive) = mpsc::channel::<Self>();
        let reaper = thread::Builder::new().name("kvmkit-reaper".into()).spawn(move || {
            if let Ok(teardown) = receive.recv() {
                teardown.finish();
            }
        });
        let (left, why) = match reaper {
            Ok(_) => match handover.send(self) {
                Ok(()) => return,
                Err(mpsc::SendError(left)) => (left, "it exited early".to_owned()),
            },
            Err(e) => (self, e.to_string()),
        };
        // Freeing the vCPUs or memory under threads that still run them would be unsound.
        std::mem::forget(left);
        log::error!("cannot start a thread to free a VM dropped by its own handler, leaking it: {why}");
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop(ExitReason::Stopped);
        let mut state = self.lock();
        let teardown = Teardown {
            run: state.run.take(),
            workers: std::mem::take(&mut state.workers),
            memory: self.memory().clone(),
        };
        drop(state);
        if teardown.on_vcpu_thread() {
            teardown.finish_elsewhere();
        } else {
            teardown.finish();
        }
    }
}

fn try_clone(event: &EventFd) -> Result<EventFd> {
    event.try_clone().map_err(Error::DeviceSetup)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
