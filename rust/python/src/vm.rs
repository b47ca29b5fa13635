//! `_core.Vm`: a [`Machine`] with Python handlers, waiting that lets Ctrl-C through, and state as
//! dicts. Methods that may wait or join vCPU threads release the GIL, since those threads may need
//! it to call handlers.

use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use kvmkit_core::arch::x86_64::cpuid::{CpuidEdit, CpuidRegister};
use kvmkit_core::arch::x86_64::mode::CpuMode;
use kvmkit_core::arch::x86_64::registers::Register;
use kvmkit_core::boot::{Image, LinuxBoot};
use kvmkit_core::devices::console::ConsoleOutput;
use kvmkit_core::devices::{BootTimer, SerialPort, VmGenId};
use kvmkit_core::irq::IrqLine;
use kvmkit_core::linux::{self, LinuxPlatform};
use kvmkit_core::machine::{CallOutcome, RestoreTimes, Stepping, STOP_GRACE};
use kvmkit_core::vstate::debug::{HwKind, HwSlot};
use kvmkit_core::vstate::exit::{AddressSpace, Exit, ExitReason};
use kvmkit_core::vstate::memory;
use kvmkit_core::vstate::vcpu::Vcpu;
use kvmkit_core::{Machine, MachineConfig, MemoryRegionConfig, UnhandledIo};
use pyo3::exceptions::PyTypeError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::PyTraverseError;

use crate::convert::{self, BytesLike, Unsigned};
use crate::devices::bus_device;
use crate::error::{config_error, IntoPyResult, VmStateError};
use crate::handler::{ErrorSlot, PyHandler};
use crate::memory_view;
use crate::snapshot::{Snapshot, VcpuContext};
use crate::virtio::{VirtioBackend, VirtioHandle};

/// How often a waiting caller checks for signals such as Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// A CPUID entry as Python sees it: (function, index, flags, eax, ebx, ecx, edx).
type CpuidTuple = (u32, u32, u32, u32, u32, u32, u32);

/// A CPUID edit as Python gives it: (leaf, subleaf or None, register, clear, set).
type CpuidEditTuple = (Unsigned<u32>, Option<Unsigned<u32>>, String, Unsigned<u32>, Unsigned<u32>);

#[pyclass(frozen, module = "kvmkit._core")]
pub struct Vm {
    machine: Mutex<Option<Arc<Machine>>>,
    handler_errors: ErrorSlot,
    linux: Mutex<Option<Linux>>,
    /// The handlers on the buses, by where they are mapped, so that the garbage collector sees
    /// their callables: those often refer back to the VM (one that stops it, say), a cycle that
    /// runs through the machine where Python cannot otherwise follow it. Only touched with the
    /// interpreter attached and never held across a release of it.
    handlers: Mutex<Vec<(AddressSpace, u64, Arc<PyHandler>)>>,
    /// What the last restore took.
    last_restore: Mutex<Option<RestoreTimes>>,
}

fn space(name: &str) -> PyResult<AddressSpace> {
    match name {
        "pio" => Ok(AddressSpace::Pio),
        "mmio" => Ok(AddressSpace::Mmio),
        other => Err(config_error(format!("unknown address space {other:?} (expected \"pio\" or \"mmio\")"))),
    }
}

/// What a VM keeps of its Linux platform: the console's output and the boot time stay readable
/// after `close()`; the console's input and the generation id, which hold interrupt eventfds (the
/// id guest memory too), go with it.
struct Linux {
    console: Arc<ConsoleOutput>,
    boot_timer: Arc<BootTimer>,
    input: Option<Arc<SerialPort<IrqLine>>>,
    vmgenid: Option<Arc<VmGenId>>,
}

impl From<LinuxPlatform> for Linux {
    fn from(platform: LinuxPlatform) -> Self {
        Self {
            console: platform.console,
            boot_timer: platform.boot_timer,
            input: Some(platform.serial),
            vmgenid: Some(platform.vmgenid),
        }
    }
}

impl Vm {
    fn machine(&self) -> PyResult<Arc<Machine>> {
        self.lock().clone().ok_or_else(|| VmStateError::new_err("the VM is closed"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Machine>>> {
        self.machine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn handlers(&self) -> std::sync::MutexGuard<'_, Vec<(AddressSpace, u64, Arc<PyHandler>)>> {
        self.handlers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Calls `f` with the Linux platform, if a kernel was loaded.
    fn linux<R>(&self, f: impl FnOnce(&mut Linux) -> R) -> PyResult<R> {
        let mut linux = self.linux.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        linux.as_mut().map(f).ok_or_else(|| VmStateError::new_err("no Linux kernel was loaded into this VM"))
    }

    fn with_vcpu<R>(&self, index: usize, f: impl FnOnce(&Vcpu) -> kvmkit_core::Result<R>) -> PyResult<R> {
        self.machine()?.with_vcpu(index, f).py()
    }

    /// Reads a piece of vCPU state, changes the fields named in `changes`, and writes it back.
    /// The dict is read while no lock of the VM is held, since reading it may run Python code.
    fn update<T>(
        &self,
        changes: &Bound<'_, PyDict>,
        get: impl FnOnce(&Machine) -> kvmkit_core::Result<T>,
        change: impl FnOnce(&mut T, &Bound<'_, PyDict>) -> PyResult<()>,
        set: impl FnOnce(&Machine, &T) -> kvmkit_core::Result<()>,
    ) -> PyResult<()> {
        let machine = self.machine()?;
        let mut value = get(&machine).py()?;
        change(&mut value, changes)?;
        set(&machine, &value).py()
    }

    /// Runs `go` (a run or a step) without the GIL, letting Ctrl-C through (see
    /// [`without_gil`](Self::without_gil)). Returns the exit, or the exception of the signal or of
    /// a handler.
    fn drive(
        &self,
        py: Python<'_>,
        go: impl Send + FnOnce(&Machine, &mut dyn FnMut() -> bool) -> kvmkit_core::Result<Exit>,
    ) -> PyResult<Py<PyAny>> {
        let exit = self.without_gil(py, None, |machine, _, interrupted| go(machine, interrupted))?;
        self.report(py, &exit)
    }

    /// Runs `go` (runs, steps or calls) without the GIL, with the deadline `timeout` gives, letting
    /// Ctrl-C through: `go` asks its `interrupted` callback whenever the vCPUs are kicked out of
    /// the guest or every few milliseconds, which checks for signals; a signal's exception wins.
    fn without_gil<R: Send>(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        go: impl Send + FnOnce(&Machine, Option<Instant>, &mut dyn FnMut() -> bool) -> kvmkit_core::Result<R>,
    ) -> PyResult<R> {
        let deadline = timeout.map(seconds).transpose()?.and_then(|t| Instant::now().checked_add(t));
        self.handler_errors.take(py);
        let machine = self.machine()?;
        let mut signal = None;
        let mut interrupted = || {
            signal = Python::attach(|py| py.check_signals().err());
            signal.is_some()
        };
        // The handle goes inside the detached closure, which saves a second release of the GIL:
        // the VM holds another, so this one is never the last while the calls run.
        let outcome = py.detach(move || go(&machine, deadline, &mut interrupted));
        if let Some(signal) = signal {
            self.handler_errors.take(py);
            return Err(signal);
        }
        outcome.py()
    }

    /// The exit as a dict, or the exception a handler raised during the run.
    fn report(&self, py: Python<'_>, exit: &Exit) -> PyResult<Py<PyAny>> {
        if let Some(error) = self.handler_errors.take(py) {
            return Err(error);
        }
        Ok(convert::exit_to_dict(py, exit)?.into_any().unbind())
    }
}

/// The body of each vCPU thread runs attached to the interpreter but with the GIL released, so the
/// thread keeps one Python thread state for its whole life and a handler call only takes the GIL,
/// instead of creating and destroying a thread state per exit.
fn attach_for_life(body: &mut dyn FnMut()) {
    struct OnThisThread<'a>(&'a mut dyn FnMut());
    // SAFETY: `detach` runs the closure synchronously on this same thread; the Send bound guards
    // against moving Python references across threads, and `body` holds none.
    unsafe impl Send for OnThisThread<'_> {}
    impl OnThisThread<'_> {
        fn run(self) {
            (self.0)()
        }
    }
    let body = OnThisThread(body);
    Python::attach(|py| py.detach(move || body.run()));
}

/// A kernel or initrd given as bytes (copied) or as a path (opened, read later into guest memory).
fn image(value: &Bound<'_, PyAny>) -> PyResult<Image> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().to_vec().into());
    }
    let path: std::path::PathBuf = value.extract()?;
    Image::open(&path).map_err(kvmkit_core::Error::from).py()
}

/// A register name, resolved.
fn register(name: &str) -> PyResult<Register> {
    name.parse().map_err(|e: kvmkit_core::arch::x86_64::registers::UnknownRegister| config_error(e.to_string()))
}

/// An int for a 64-bit register: from -2**63 up to 2**64 - 1, negative ones in two's complement.
/// (Two plain conversions: a 128-bit one goes through Python calls under the stable ABI.)
fn register_value(what: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    let fits = value.extract::<u64>().or_else(|_| value.extract::<i64>().map(|v| v as u64));
    fits.map_err(|_| config_error(format!("{what} must be an int that fits 64 bits, not {value}")))
}

/// The register values of a call's arguments.
fn register_values(args: &[Bound<'_, PyAny>]) -> PyResult<Vec<u64>> {
    args.iter().map(|arg| register_value("an argument", arg)).collect()
}

/// A timeout in seconds; one longer than a `Duration` holds (infinity included) is the longest.
fn seconds(timeout: f64) -> PyResult<Duration> {
    match Duration::try_from_secs_f64(timeout) {
        Ok(duration) => Ok(duration),
        Err(_) if timeout > 0.0 => Ok(Duration::MAX),
        Err(_) => Err(config_error(format!("timeout must be a non-negative number of seconds, not {timeout}"))),
    }
}

/// Drops a machine handle without the GIL: the last handle joins vCPU threads, which may be
/// waiting for the GIL to call a handler. While the interpreter shuts down (a VM freed with the
/// last modules) the last handle is leaked instead: the vCPU threads could no longer take the GIL
/// to end, and the process ends them anyway.
fn release(py: Python<'_>, machine: Option<Arc<Machine>>) {
    if machine.as_ref().is_some_and(|m| Arc::strong_count(m) == 1) && finalizing(py) {
        std::mem::forget(machine);
        return;
    }
    py.detach(move || drop(machine));
}

fn finalizing(py: Python<'_>) -> bool {
    let answer = py.import("sys").and_then(|sys| sys.call_method0("is_finalizing")?.is_truthy());
    answer.unwrap_or(true)
}

impl Vm {
    fn wrap(machine: Machine) -> PyResult<Self> {
        machine.set_thread_hook(Arc::new(attach_for_life)).py()?;
        Ok(Self {
            machine: Mutex::new(Some(Arc::new(machine))),
            handler_errors: ErrorSlot::default(),
            linux: Mutex::new(None),
            handlers: Mutex::new(Vec::new()),
            last_restore: Mutex::new(None),
        })
    }
}

#[pymethods]
impl Vm {
    #[new]
    #[pyo3(signature = (memory, vcpus, irqchip, pit, unhandled_io, cpuid_edits))]
    fn new(
        py: Python<'_>,
        memory: Vec<(Unsigned<u64>, Unsigned<u64>)>,
        vcpus: Unsigned<u32>,
        irqchip: bool,
        pit: bool,
        unhandled_io: &str,
        cpuid_edits: Vec<CpuidEditTuple>,
    ) -> PyResult<Self> {
        let vcpus = vcpus.0;
        let unhandled_io = match unhandled_io {
            "ignore" => UnhandledIo::Ignore,
            "stop" => UnhandledIo::Stop,
            other => {
                return Err(config_error(format!(
                    "unknown unhandled_io policy {other:?} (expected \"ignore\" or \"stop\")"
                )))
            }
        };
        let cpuid_edits = cpuid_edits
            .into_iter()
            .map(|(Unsigned(leaf), subleaf, register, Unsigned(clear), Unsigned(set))| {
                let subleaf = subleaf.map(|Unsigned(subleaf)| subleaf);
                let register: CpuidRegister = register
                    .parse()
                    .map_err(|e: kvmkit_core::arch::x86_64::cpuid::UnknownRegister| config_error(e.to_string()))?;
                Ok(CpuidEdit { leaf, subleaf, register, clear, set })
            })
            .collect::<PyResult<_>>()?;
        let config = MachineConfig {
            memory: memory
                .into_iter()
                .map(|(Unsigned(guest_addr), Unsigned(size))| MemoryRegionConfig { guest_addr, size })
                .collect(),
            vcpus,
            irqchip,
            pit,
            unhandled_io,
            cpuid_edits,
        };
        let machine = py.detach(|| Machine::new(&config)).py()?;
        Self::wrap(machine)
    }

    /// A VM of the snapshot's configuration whose memory is the snapshot's, shared copy-on-write;
    /// its devices are to be added, then `restore(snapshot)` puts back the rest.
    #[staticmethod]
    fn from_snapshot(py: Python<'_>, snapshot: &Snapshot) -> PyResult<Self> {
        let snapshot = snapshot.get().clone();
        let machine = py.detach(|| Machine::from_image(&snapshot.state.config, &snapshot.memory)).py()?;
        Self::wrap(machine)
    }

    /// Maps the Linux platform's devices (console, i8042, CMOS, ACPI, boot timer) without loading
    /// a kernel: a VM restored from a Linux VM's snapshot needs them for its state.
    fn attach_linux(&self) -> PyResult<()> {
        let machine = self.machine()?;
        let platform = linux::attach_platform(&machine).py()?;
        *self.linux.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(platform.into());
        Ok(())
    }

    /// Stops the run with every instruction complete, and freezes devices and the guest's clock.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let machine = self.machine()?;
        py.detach(|| machine.pause()).py()
    }

    /// Continues a paused VM in the background.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        self.start(py)
    }

    /// An eventfd (owned by the VM) that becomes readable when a run ends.
    #[getter]
    fn run_end_fd(&self) -> PyResult<i32> {
        Ok(self.machine()?.run_end_fd())
    }

    #[getter]
    fn paused(&self) -> PyResult<bool> {
        Ok(self.machine()?.is_paused())
    }

    /// The whole state of the stopped or paused VM.
    fn snapshot(&self, py: Python<'_>) -> PyResult<Snapshot> {
        let machine = self.machine()?;
        Ok(Snapshot::new(py.detach(|| machine.snapshot()).py()?))
    }

    /// Puts the stopped or paused VM back to `snapshot`.
    fn restore(&self, py: Python<'_>, snapshot: &Snapshot) -> PyResult<()> {
        let (machine, snapshot) = (self.machine()?, snapshot.get().clone());
        let times = py.detach(|| machine.restore(&snapshot)).py()?;
        *self.last_restore.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(times);
        Ok(())
    }

    /// How long each part of the last restore took (µs), and the pages it copied back; built
    /// when asked, so that a restore pays nothing for it.
    #[getter]
    fn last_restore<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(times) = *self.last_restore.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        dict.set_item("memory_us", micros(times.memory))?;
        dict.set_item("vm_us", micros(times.vm))?;
        dict.set_item("vcpus_us", micros(times.vcpus))?;
        dict.set_item("devices_us", micros(times.devices))?;
        dict.set_item("pages_copied", times.memory_stats.pages_copied)?;
        Ok(Some(dict))
    }

    /// Stops the VM if it runs and frees its file descriptors and memory (memory views keep their
    /// memory until they go).
    fn close(&self, py: Python<'_>) {
        let machine = self.lock().take();
        // A run in progress (perhaps the one calling this from a handler) holds the machine too.
        if let Some(machine) = &machine {
            machine.stop(ExitReason::Stopped);
        }
        release(py, machine);
        // The console's input and the generation id hold interrupt eventfds, which go now, not when
        // the collector gets to this object.
        let (input, vmgenid) = self.linux(|linux| (linux.input.take(), linux.vmgenid.take())).unwrap_or_default();
        let handlers = std::mem::take(&mut *self.handlers());
        drop((input, vmgenid, handlers, self.handler_errors.take(py)));
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The collector must not block; a list being changed right now is skipped, which only
        // keeps a cycle alive until the next collection.
        self.handler_errors.traverse(&visit)?;
        let Ok(handlers) = self.handlers.try_lock() else { return Ok(()) };
        for (_, _, handler) in handlers.iter() {
            visit.call(&handler.read)?;
            visit.call(&handler.write)?;
        }
        Ok(())
    }

    /// Breaks a cycle through the handlers or a kept exception by closing the VM, which frees
    /// both.
    fn __clear__(slf: &Bound<'_, Self>) {
        slf.get().close(slf.py());
    }

    #[getter]
    fn closed(&self) -> bool {
        self.lock().is_none()
    }

    #[getter]
    fn vcpu_count(&self) -> PyResult<usize> {
        Ok(self.machine()?.vcpu_count())
    }

    #[getter]
    fn memory_regions(&self) -> PyResult<Vec<(u64, u64)>> {
        Ok(memory::regions(self.machine()?.memory()))
    }

    fn mem_read<'py>(
        &self,
        py: Python<'py>,
        addr: Unsigned<u64>,
        size: Unsigned<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (addr, size) = (addr.0, size.0);
        let machine = self.machine()?;
        // The size is the caller's to choose: an impossible one must fail before it is allocated.
        memory::check_range(machine.memory(), addr, size).map_err(kvmkit_core::Error::from).py()?;
        PyBytes::new_with(py, size, |buf| machine.read_memory(addr, buf).py())
    }

    fn mem_write(&self, addr: Unsigned<u64>, data: BytesLike<'_>) -> PyResult<()> {
        let (addr, bytes) = (addr.0, data.as_bytes());
        memory::check_range(self.machine()?.memory(), addr, bytes.len()).map_err(kvmkit_core::Error::from).py()?;
        self.machine()?.write_memory(addr, bytes).py()
    }

    fn mem_view<'py>(
        &self,
        py: Python<'py>,
        addr: Unsigned<u64>,
        size: Unsigned<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (addr, size) = (addr.0, size.0);
        let machine = self.machine()?;
        let (host, loan) = machine.memory().lend(addr, size).map_err(kvmkit_core::Error::from).py()?;
        memory_view::new_view(py, machine.memory().clone(), host, size, loan)
    }

    fn get_regs<'py>(&self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        convert::regs_to_dict(py, &self.machine()?.regs(vcpu).py()?)
    }

    fn set_regs(&self, vcpu: usize, regs: &Bound<'_, PyDict>) -> PyResult<()> {
        self.update(regs, |m| m.regs(vcpu), convert::update_regs, |m, r| m.set_regs(vcpu, r))
    }

    fn get_sregs<'py>(&self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        convert::sregs_to_dict(py, &self.machine()?.sregs(vcpu).py()?)
    }

    fn set_sregs(&self, vcpu: usize, sregs: &Bound<'_, PyDict>) -> PyResult<()> {
        self.update(sregs, |m| m.sregs(vcpu), convert::update_sregs, |m, s| m.set_sregs(vcpu, s))
    }

    fn get_fpu<'py>(&self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        convert::fpu_to_dict(py, &self.with_vcpu(vcpu, Vcpu::fpu)?)
    }

    fn set_fpu(&self, vcpu: usize, fpu: &Bound<'_, PyDict>) -> PyResult<()> {
        let (get, set) =
            (|m: &Machine| m.with_vcpu(vcpu, Vcpu::fpu), |m: &Machine, f: &_| m.with_vcpu(vcpu, |v| v.set_fpu(f)));
        self.update(fpu, get, convert::update_fpu, set)
    }

    /// One register by name (any case): reads only the register set it is in.
    fn reg_read(&self, vcpu: usize, name: &str) -> PyResult<u64> {
        let register = register(name)?;
        let machine = self.machine()?;
        if register.is_special() {
            Ok(register.read(&Default::default(), &machine.sregs(vcpu).py()?))
        } else {
            Ok(register.read(&machine.regs(vcpu).py()?, &Default::default()))
        }
    }

    /// Sets one register by name, cut to its width (negative values in two's complement).
    fn reg_write(&self, vcpu: usize, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let register = register(name)?;
        let value = register_value(&format!("a value for {name}"), value)?;
        let machine = self.machine()?;
        if register.is_special() {
            let mut sregs = machine.sregs(vcpu).py()?;
            register.write(&mut Default::default(), &mut sregs, value);
            machine.set_sregs(vcpu, &sregs).py()
        } else {
            let mut regs = machine.regs(vcpu).py()?;
            register.write(&mut regs, &mut Default::default(), value);
            machine.set_regs(vcpu, &regs).py()
        }
    }

    /// The vCPU whose access the calling handler serves, if it is one of this VM's.
    #[getter]
    fn current_vcpu(&self) -> PyResult<Option<usize>> {
        Ok(self.machine()?.serving_vcpu())
    }

    /// Everything vCPU `vcpu` needs to continue from where it is.
    fn save_context(&self, py: Python<'_>, vcpu: usize) -> PyResult<VcpuContext> {
        let machine = self.machine()?;
        let state = py.detach(|| machine.with_vcpu(vcpu, |v| v.save_state())).py()?;
        Ok(VcpuContext::new(vcpu, state))
    }

    /// Puts back a context `save_context` took, of this vCPU or the same vCPU of a VM of the same shape.
    fn restore_context(&self, py: Python<'_>, vcpu: usize, context: &VcpuContext) -> PyResult<()> {
        let machine = self.machine()?;
        let state = context.state();
        py.detach(|| machine.with_vcpu(vcpu, |v| v.restore_state(state))).py()
    }

    fn get_msrs(&self, vcpu: usize, indices: Vec<Unsigned<u32>>) -> PyResult<Vec<(u32, u64)>> {
        let indices: Vec<_> = indices.into_iter().map(|Unsigned(index)| index).collect();
        self.with_vcpu(vcpu, |v| v.msrs(&indices))
    }

    fn set_msrs(&self, vcpu: usize, values: Vec<(Unsigned<u32>, Unsigned<u64>)>) -> PyResult<()> {
        let values: Vec<_> = values.into_iter().map(|(Unsigned(index), Unsigned(value))| (index, value)).collect();
        self.with_vcpu(vcpu, |v| v.set_msrs(&values))
    }

    fn get_cpuid(&self, vcpu: usize) -> PyResult<Vec<CpuidTuple>> {
        let entries = self.with_vcpu(vcpu, Vcpu::cpuid)?;
        Ok(entries.iter().map(|e| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)).collect())
    }

    fn set_cpuid(&self, vcpu: usize, entries: Vec<CpuidTuple>) -> PyResult<()> {
        let entries: Vec<_> = entries
            .into_iter()
            .map(|(function, index, flags, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
                function,
                index,
                flags,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            })
            .collect();
        self.with_vcpu(vcpu, |v| v.set_cpuid(&entries))
    }

    /// The extended control registers (XCR0, ...) as `(index, value)` pairs.
    fn get_xcrs(&self, vcpu: usize) -> PyResult<Vec<(u32, u64)>> {
        let xcrs = self.with_vcpu(vcpu, Vcpu::xcrs)?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..count].iter().map(|x| (x.xcr, x.value)).collect())
    }

    #[pyo3(signature = (vcpu, mode, entry, stack=None, exceptions=true))]
    fn enter_mode(
        &self,
        vcpu: usize,
        mode: &str,
        entry: Unsigned<u64>,
        stack: Option<Unsigned<u64>>,
        exceptions: bool,
    ) -> PyResult<()> {
        let entry = entry.0;
        let stack = stack.map(|Unsigned(stack)| stack);
        let mode: CpuMode = mode.parse().map_err(kvmkit_core::Error::from).py()?;
        let setup = kvmkit_core::machine::RawSetup { mode, entry, stack, exceptions };
        self.machine()?.setup_raw(vcpu, &setup).py()
    }

    #[pyo3(signature = (space, base, size, read=None, write=None))]
    fn add_handler(
        &self,
        py: Python<'_>,
        space: &str,
        base: Unsigned<u64>,
        size: Unsigned<u64>,
        read: Option<Py<PyAny>>,
        write: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let (base, size) = (base.0, size.0);
        for (role, handler) in [("read", &read), ("write", &write)] {
            if let Some(handler) = handler.as_ref().map(|h| h.bind(py)).filter(|h| !h.is_callable()) {
                return Err(PyTypeError::new_err(format!(
                    "the {role} handler must be callable or None, not {}",
                    handler.get_type().name()?
                )));
            }
        }
        let space = self::space(space)?;
        let handler = Arc::new(PyHandler { read, write, errors: self.handler_errors.clone() });
        self.machine()?.add_device(space, base, size, handler.clone()).py()?;
        self.handlers().push((space, base, handler));
        Ok(())
    }

    fn add_device(
        &self,
        space: &str,
        base: Unsigned<u64>,
        size: Unsigned<u64>,
        device: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (base, size) = (base.0, size.0);
        self.machine()?.add_device(self::space(space)?, base, size, bus_device(device)?).py()
    }

    fn remove(&self, space: &str, base: Unsigned<u64>) -> PyResult<()> {
        let base = base.0;
        let space = self::space(space)?;
        let removed = self.machine()?.remove_device(space, base).py()?;
        // Dropped after the lock is released: freeing a callable can run Python code.
        let forgotten: Vec<_> = {
            let mut handlers = self.handlers();
            let (forgotten, kept) =
                std::mem::take(&mut *handlers).into_iter().partition(|(s, b, _)| (*s, *b) == (space, base));
            *handlers = kept;
            forgotten
        };
        drop((removed, forgotten));
        Ok(())
    }

    /// Attaches a virtio device in the next free MMIO slot.
    fn add_virtio(&self, backend: &VirtioBackend) -> PyResult<VirtioHandle> {
        let machine = self.machine()?;
        let (kind, device, details) = backend.take()?;
        Ok(VirtioHandle::new(kind, machine.add_virtio_device(device).py()?, details))
    }

    /// Loads a Linux kernel with its platform devices; the console then collects COM1's output.
    /// The kernel and initrd are bytes or paths; files are read straight into guest memory.
    #[pyo3(signature = (kernel, initrd, cmdline))]
    fn boot_linux(
        &self,
        py: Python<'_>,
        kernel: &Bound<'_, PyAny>,
        initrd: Option<&Bound<'_, PyAny>>,
        cmdline: String,
    ) -> PyResult<()> {
        let machine = self.machine()?;
        let kernel = image(kernel)?;
        let initrd = initrd.map(image).transpose()?;
        let boot = LinuxBoot { kernel, initrd, cmdline };
        let platform = py.detach(|| linux::boot_linux(&machine, &boot)).py()?;
        *self.linux.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(platform.into());
        Ok(())
    }

    /// Gives the guest a new VM generation id and notifies it, as each restore does.
    fn _change_generation_id(&self) -> PyResult<()> {
        let vmgenid = self.linux(|linux| linux.vmgenid.clone())?;
        let vmgenid = vmgenid.ok_or_else(|| VmStateError::new_err("the VM is closed"))?;
        vmgenid.change().map_err(kvmkit_core::Error::from).py()
    }

    /// Console output from `offset` on, waiting up to `timeout` seconds for some: `(start, bytes)`.
    fn console_read<'py>(&self, py: Python<'py>, offset: u64, timeout: f64) -> PyResult<(u64, Bound<'py, PyBytes>)> {
        let (console, wait) = (self.linux(|linux| linux.console.clone())?, seconds(timeout)?);
        let (start, bytes) = py.detach(|| console.read_from(offset, wait));
        Ok((start, PyBytes::new(py, &bytes)))
    }

    /// An eventfd that becomes readable at the console's next output (arming it for that).
    fn console_arm(&self) -> PyResult<i32> {
        let console = self.linux(|linux| linux.console.clone())?;
        Ok(console.arm_notifier()?)
    }

    /// Sends bytes to the guest's console input.
    fn console_write(&self, data: Vec<u8>) -> PyResult<()> {
        let input = self.linux(|linux| linux.input.clone())?;
        input.ok_or_else(|| VmStateError::new_err("the VM is closed"))?.send_input(&data);
        Ok(())
    }

    /// Appends all further console output to the file at `path` (created if missing).
    fn console_log(&self, path: std::path::PathBuf) -> PyResult<()> {
        let console = self.linux(|linux| linux.console.clone())?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        console.add_copy(Box::new(file));
        Ok(())
    }

    /// Writes all further console output to the descriptor `fd`, which this takes over, even when
    /// it fails (the caller passes a duplicate). Sharing the caller's open file keeps one file offset for both writers,
    /// where opening the same file again would have each overwrite the other's output.
    fn console_log_fd(&self, fd: i32) -> PyResult<()> {
        // SAFETY: the caller hands over a descriptor of its own that nothing else uses or closes.
        let file = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        self.linux(|linux| linux.console.add_copy(Box::new(file)))
    }

    /// Seconds from the first start to the guest's boot-timer write, if it has happened.
    #[getter]
    fn boot_time(&self) -> PyResult<Option<f64>> {
        self.linux(|linux| linux.boot_timer.boot_time().map(|t| t.as_secs_f64()))
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.handler_errors.take(py);
        let machine = self.machine()?;
        // A failed start waits for the vCPUs it began, which may need the GIL to call a handler.
        let started = py.detach(|| machine.start());
        release(py, Some(machine));
        started.py()
    }

    /// Runs the VM to the end of the run. After `timeout` seconds the run ends as a timeout; Ctrl-C
    /// stops it and raises. Either returns promptly even while a handler is busy (see Machine::run).
    #[pyo3(signature = (timeout=None))]
    fn run(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let timeout = timeout.map(seconds).transpose()?;
        self.drive(py, |machine, interrupted| machine.run(timeout, interrupted))
    }

    /// Waits for the run to end; `None` if `timeout` passed first. Ctrl-C stops the VM and raises.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        // A timeout too long to be a time of day never passes.
        let deadline = timeout.map(seconds).transpose()?.and_then(|t| Instant::now().checked_add(t));
        let machine = self.machine()?;
        let result = loop {
            let slice = deadline.map_or(SIGNAL_POLL, |d| d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL));
            match py.detach(|| machine.wait(Some(slice))) {
                Err(e) => break Err(crate::error::to_py(e)),
                Ok(Some(exit)) => break self.report(py, &exit).map(Some),
                Ok(None) => {}
            }
            if let Err(interrupt) = py.check_signals() {
                machine.stop(ExitReason::Stopped);
                // A vCPU busy in a slow handler is left to finish it (see Machine::run).
                let _ = py.detach(|| machine.wait(Some(STOP_GRACE)));
                self.handler_errors.take(py);
                break Err(interrupt);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(None);
            }
        };
        release(py, Some(machine));
        result
    }

    fn translate(&self, vcpu: usize, vaddr: Unsigned<u64>) -> PyResult<Option<u64>> {
        self.machine()?.translate(vcpu, vaddr.0).py()
    }

    fn mem_read_virtual<'py>(
        &self,
        py: Python<'py>,
        vcpu: usize,
        vaddr: Unsigned<u64>,
        size: Unsigned<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let machine = self.machine()?;
        // The size is the caller's to choose: more than the guest has cannot be read.
        let total: u64 = memory::regions(machine.memory()).iter().map(|(_, size)| size).sum();
        if size.0 as u64 > total {
            return Err(config_error(format!("cannot read {} bytes from a guest with {total}", size.0)));
        }
        PyBytes::new_with(py, size.0, |buf| machine.read_virtual(vcpu, vaddr.0, buf).py())
    }

    fn mem_write_virtual(&self, vcpu: usize, vaddr: Unsigned<u64>, data: BytesLike<'_>) -> PyResult<()> {
        self.machine()?.write_virtual(vcpu, vaddr.0, data.as_bytes()).py()
    }

    /// Runs one instruction on vCPU `vcpu`, the others staying stopped.
    /// Ctrl-C stops a step that does not end and raises, as for `run`.
    /// With `count`, runs that many instructions, ending early on any exit other than a step's,
    /// or as a timeout after `timeout` seconds.
    #[pyo3(signature = (vcpu, mask_interrupts, count=1, timeout=None))]
    fn step(
        &self,
        py: Python<'_>,
        vcpu: usize,
        mask_interrupts: bool,
        count: u64,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let deadline = timeout.map(seconds).transpose()?.and_then(|t| Instant::now().checked_add(t));
        let stepping = Stepping { mask_interrupts, count };
        self.drive(py, |machine, interrupted| match (count, deadline) {
            // One step, on the vCPU's thread: Ctrl-C answers at once even during a slow handler.
            (1, None) => machine.step(vcpu, mask_interrupts, interrupted),
            _ => machine.run_here(vcpu, Some(stepping), deadline, interrupted),
        })
    }

    /// Calls the 64-bit function at `entry` on vCPU `vcpu` (see `Machine::call`): RAX when it
    /// returned, else the exit that ended the run, as a dict.
    #[pyo3(signature = (vcpu, entry, args, stack=None, timeout=None))]
    fn call(
        &self,
        py: Python<'_>,
        vcpu: usize,
        entry: Unsigned<u64>,
        args: Vec<Bound<'_, PyAny>>,
        stack: Option<Unsigned<u64>>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let args = register_values(&args)?;
        let outcome = self.without_gil(py, timeout, move |machine, deadline, interrupted| {
            machine.call(vcpu, entry.0, &args, stack.map(|s| s.0), deadline, interrupted)
        })?;
        match outcome {
            CallOutcome::Returned(rax) => Ok(rax.into_pyobject(py)?.into_any().unbind()),
            CallOutcome::Ended(exit) => self.report(py, &exit),
        }
    }

    /// `call` once per argument list (any iterable of iterables of integers), all in one run:
    /// the RAX of each call that returned, and the exit of the first that did not, as a dict
    /// (None when all returned). `timeout` is for the whole batch.
    #[pyo3(signature = (vcpu, entry, arg_lists, stack=None, timeout=None))]
    fn call_many(
        &self,
        py: Python<'_>,
        vcpu: usize,
        entry: Unsigned<u64>,
        arg_lists: &Bound<'_, PyAny>,
        stack: Option<Unsigned<u64>>,
        timeout: Option<f64>,
    ) -> PyResult<(Vec<u64>, Option<Py<PyAny>>)> {
        let arg_lists = arg_lists
            .try_iter()?
            .map(|args| args?.try_iter()?.map(|arg| register_value("an argument", &arg?)).collect())
            .collect::<PyResult<Vec<Vec<u64>>>>()?;
        let stack = stack.map(|Unsigned(stack)| stack);
        let results = self.without_gil(py, timeout, move |machine, deadline, interrupted| {
            machine.call_many(vcpu, entry.0, &arg_lists, stack, deadline, interrupted)
        })?;
        let ended = results.ended.map(|exit| self.report(py, &exit)).transpose()?;
        Ok((results.returned, ended))
    }

    /// Takes a debug register for a breakpoint (`kind` "execute") or a watchpoint ("write",
    /// "readwrite") and returns its number.
    fn add_hw_slot(&self, kind: &str, addr: Unsigned<u64>, len: u8) -> PyResult<usize> {
        let slot = match kind {
            "execute" => HwSlot::breakpoint(addr.0),
            "write" => HwSlot::watchpoint(addr.0, len, HwKind::Write).py()?,
            "readwrite" => HwSlot::watchpoint(addr.0, len, HwKind::ReadWrite).py()?,
            other => return Err(config_error(format!("unknown watchpoint access {other:?}"))),
        };
        self.machine()?.add_hw_slot(slot).py()
    }

    /// Turns on or off `int3` exiting to the VMM.
    fn set_software_breakpoints(&self, on: bool) -> PyResult<()> {
        self.machine()?.set_software_breakpoints(on).py()
    }

    /// Frees debug register `slot`.
    fn remove_hw_slot(&self, slot: usize) -> PyResult<()> {
        self.machine()?.remove_hw_slot(slot).py()
    }

    /// Serves gdb on `address` (see `kvmkit_core::gdb`); with `wait`, returns once a client has
    /// attached; with `reverse`, sessions record for reverse execution.
    #[pyo3(signature = (address, wait=false, breakpoints="auto", reverse=false))]
    fn serve_gdb(
        &self,
        py: Python<'_>,
        address: &str,
        wait: bool,
        breakpoints: &str,
        reverse: bool,
    ) -> PyResult<crate::gdb::GdbServer> {
        crate::gdb::serve(py, self.machine()?, address, wait, breakpoints, reverse)
    }

    /// Asks the run to end; `timeout=True` records it as a timeout. Returns whether it was running.
    #[pyo3(signature = (timeout=false))]
    fn stop(&self, timeout: bool) -> PyResult<bool> {
        Ok(self.machine()?.stop(if timeout { ExitReason::Timeout } else { ExitReason::Stopped }))
    }

    #[getter]
    fn running(&self) -> bool {
        self.lock().as_ref().is_some_and(|m| m.is_running())
    }

    #[getter]
    fn last_exit<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.machine()?.last_exit().map(|exit| convert::exit_to_dict(py, &exit)).transpose()
    }

    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        use std::sync::atomic::Ordering::Relaxed;
        let dict = PyDict::new(py);
        self.machine()?.io_stats(|stats| -> PyResult<()> {
            dict.set_item("io_exits", stats.pio_exits.load(Relaxed))?;
            dict.set_item("mmio_exits", stats.mmio_exits.load(Relaxed))?;
            dict.set_item("unhandled_io", stats.unhandled_pio.load(Relaxed))?;
            dict.set_item("unhandled_mmio", stats.unhandled_mmio.load(Relaxed))
        })?;
        Ok(dict)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let machine = self.lock().take();
        Python::attach(|py| release(py, machine));
    }
}
