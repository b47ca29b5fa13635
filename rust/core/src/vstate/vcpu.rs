use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::fam::FamStruct;

use crate::arch::x86_64::cpuid::{self, CpuidEdit, VcpuPlatform};
use crate::arch::x86_64::{lapic, msr};
use crate::error::{Error, Result};
use crate::vstate::debug::GuestDebug;
use crate::vstate::exit::InternalError;
use crate::vstate::kvm::Kvm;
use crate::vstate::regs::RegisterFile;

/// Where MXCSR sits in the XSAVE area, in 32-bit words (byte 24 of the legacy region).
const XSAVE_MXCSR_WORD: usize = 6;
/// XSTATE_BV, the bitmap of components present in the area (byte 512), low word.
const XSAVE_XSTATE_BV_WORD: usize = 128;
/// The x87 and SSE components of XSTATE_BV: the legacy region holds both.
const XSTATE_X87_SSE: u32 = 0b11;
/// Size of the fixed `kvm_xsave` structure.
const KVM_XSAVE_SIZE: i32 = 4096;
/// Words in the fixed `kvm_xsave` structure.
const KVM_XSAVE_WORDS: usize = KVM_XSAVE_SIZE as usize / 4;

/// Everything a vCPU needs to continue where it was saved, in this VM or in a new one built from
/// the same configuration (in another process, say): plain data, for serde.
///
/// Saved by [`Vcpu::save_state`] and put back by [`Vcpu::restore_state`], both with the vCPU
/// out of `KVM_RUN`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER and the APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and the extended (AVX, ...) registers.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), when KVM has them (`KVM_CAP_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    /// Every MSR of KVM's list the vCPU could read, as `(index, value)`, in the order they are
    /// written back (see [`msr::restore_order`]).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers, when the VM has KVM's irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts and NMIs, the interrupt shadow and SMM state, when KVM
    /// reports them (`KVM_CAP_VCPU_EVENTS`).
    pub events: Option<kvm_vcpu_events>,
    /// Whether the vCPU runs, halts or waits for a startup IPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers, when KVM reports them (`KVM_CAP_DEBUGREGS`).
    pub debug_regs: Option<kvm_debugregs>,
    /// The CPUID the vCPU reports.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency in kHz, when KVM reports it (`KVM_CAP_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
}

/// The floating-point and vector registers of a [`VcpuState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area in KVM's (standard, uncompacted) format, as 32-bit words: the legacy
    /// FXSAVE region, the XSAVE header at byte 512, then each extended component at its
    /// architectural offset. At least 4096 bytes; more for large components (AMX).
    Xsave(Vec<u32>),
    /// x87 and SSE registers only, on a KVM without XSAVE.
    Legacy(Box<FpuRegs>),
}

/// x87 and SSE registers as `KVM_GET_FPU` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuRegs {
    /// ST0..ST7 / MM0..MM7, 16 bytes each (10 used).
    pub fpr: [[u8; 16]; 8],
    /// FPU control word.
    pub fcw: u16,
    /// FPU status word.
    pub fsw: u16,
    /// Abridged FPU tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuRegs {
    fn from(fpu: &kvm_fpu) -> Self {
        Self {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        }
    }
}

impl From<&FpuRegs> for kvm_fpu {
    fn from(regs: &FpuRegs) -> Self {
        Self {
            fpr: regs.fpr,
            fcw: regs.fcw,
            fsw: regs.fsw,
            ftwx: regs.ftwx,
            last_opcode: regs.last_opcode,
            last_ip: regs.last_ip,
            last_dp: regs.last_dp,
            xmm: regs.xmm,
            mxcsr: regs.mxcsr,
            ..Default::default()
        }
    }
}

/// Which parts of a vCPU's state this VM's KVM can save, asked once per vCPU.
#[derive(Debug, Clone, Copy)]
struct StateCaps {
    /// Bytes of the XSAVE area KVM reads and writes (`KVM_CAP_XSAVE2`, at least 4096), or
    /// `None` without XSAVE, where the x87 and SSE registers go through `KVM_GET/SET_FPU`.
    xsave_size: Option<usize>,
    xcrs: bool,
    events: bool,
    debug_regs: bool,
    tsc_khz: bool,
}

impl StateCaps {
    fn of(vm: &VmFd) -> Self {
        let xsave2 = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Self {
            xsave_size: vm.check_extension(Cap::Xsave).then_some(xsave2.max(KVM_XSAVE_SIZE as usize)),
            xcrs: vm.check_extension(Cap::Xcrs),
            events: vm.check_extension(Cap::VcpuEvents),
            debug_regs: vm.check_extension(Cap::Debugregs),
            tsc_khz: vm.check_extension(Cap::GetTscKhz),
        }
    }
}

/// What restores keep from one to the next, so that an in-place restore allocates nothing and
/// asks KVM nothing it already answered.
#[derive(Default)]
struct RestoreCache {
    /// The `KVM_SET_MSRS` buffer, reused while the number of MSRs stays the same.
    msrs: Option<Msrs>,
    /// MSR values KVM refused to write although the vCPU already held them (KVM lets a VMM read
    /// some MSRs it will not take back in some VMs: the async page fault vector without an
    /// in-kernel LAPIC, say). Writing them is skipped.
    unchanged: Vec<(u32, u64)>,
}

/// MSRs of KVM's list the vCPUs of this process could read, found by the first save (which
/// costs a failed call per unreadable MSR) and used by every later one. By the VM's shape: with
/// KVM's irqchip or without, as the local APIC's MSRs depend on it.
static READABLE_MSRS: [OnceLock<Vec<u32>>; 2] = [OnceLock::new(), OnceLock::new()];

/// One vCPU of a VM. Its registers can be read and written while it is not running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    /// Whether MXCSR can be carried through `KVM_GET/SET_XSAVE`, which `KVM_GET/SET_FPU` ignore
    /// it in: true when KVM has XSAVE and its state fits the fixed 4 KiB structure.
    mxcsr_via_xsave: bool,
    /// Whether the VM has KVM's irqchip, so that the vCPU has a LAPIC.
    irqchip: bool,
    /// Whether `KVM_RUN` was called: KVM then refuses any CPUID other than the one it has.
    ran: bool,
    /// What `KVM_SET_GUEST_DEBUG` last got, so that runs with nothing changed skip the ioctl
    /// (boxed with the rest, as vCPUs move between threads by value).
    guest_debug: Box<GuestDebug>,
    /// Whether KVM can keep interrupts out while single-stepping (`KVM_GUESTDBG_BLOCKIRQ`).
    block_irq: bool,
    /// Boxed, as vCPUs move between threads by value.
    tracking: Box<StateTracking>,
    /// Its general and special registers.
    registers: RegisterFile,
    /// Whether the registers were written since single-stepping was last asked for.
    regs_written: AtomicBool,
}

/// What a vCPU keeps to save and restore its state quickly.
struct StateTracking {
    caps: StateCaps,
    /// The CPUID last given to KVM, which restores compare against instead of asking KVM.
    cpuid: Mutex<Vec<kvm_cpuid_entry2>>,
    /// The TSC frequency in kHz last read or set, 0 when unknown.
    tsc_khz: AtomicU32,
    restore_cache: Mutex<RestoreCache>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The values behind these locks are caches, valid between any two statements.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it the host's supported CPUID, normalized for
    /// its APIC id, the topology and the platform (`irqchip`: KVM's LAPIC), then `edits`.
    pub fn new(
        vm: &VmFd,
        index: u32,
        count: u32,
        irqchip: bool,
        supported: &CpuId,
        edits: &[CpuidEdit],
    ) -> Result<Self> {
        let mut fd = vm.create_vcpu(u64::from(index)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let registers = RegisterFile::new(vm, &mut fd)?;
        let caps = StateCaps::of(vm);
        let mxcsr_via_xsave = caps.xsave_size == Some(KVM_XSAVE_SIZE as usize);
        let tsc_khz = if caps.tsc_khz { fd.get_tsc_khz().ok() } else { None };
        let platform = VcpuPlatform {
            index,
            count,
            tsc_khz: tsc_khz.filter(|&khz| khz > 0),
            tsc_deadline: irqchip && vm.check_extension(Cap::TscDeadlineTimer),
        };
        let vcpu = Self {
            index,
            fd,
            mxcsr_via_xsave,
            irqchip,
            ran: false,
            guest_debug: Box::default(),
            block_irq: guest_debug_flags(vm) & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0,
            tracking: Box::new(StateTracking {
                caps,
                cpuid: Mutex::new(Vec::new()),
                tsc_khz: AtomicU32::new(tsc_khz.unwrap_or(0)),
                restore_cache: Mutex::new(RestoreCache::default()),
            }),
            registers,
            regs_written: AtomicBool::new(false),
        };
        let mut entries = supported.as_slice().to_vec();
        cpuid::normalize(&mut entries, &platform);
        for edit in edits {
            edit.apply(&mut entries);
        }
        vcpu.set_cpuid(&entries)?;
        Ok(vcpu)
    }

    /// Its index, which is also its APIC id.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The file descriptor, for the run loop.
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Enters the guest until its next exit. For a port I/O exit, also the size of one element
    /// (a string instruction moves several in one exit); 0 for other exits.
    pub(crate) fn run(&mut self) -> (std::result::Result<VcpuExit<'_>, errno::Error>, usize) {
        let run: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        self.ran = true;
        let exit = self.fd.run();
        let pio_size = match exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => {
                // SAFETY: `run` points to the vCPU's `kvm_run` mapping, which lives as long as
                // `fd`; KVM filled the `io` member of the exit union for this exit. The exit's
                // data, which `exit` borrows, lies past the structure (at `io.data_offset`), so
                // this read does not alias it.
                usize::from(unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() })
            }
            _ => 0,
        };
        (exit, pio_size)
    }

    /// Its register file, for the handlers of its exits.
    pub(crate) fn register_file(&self) -> RegisterFile {
        self.registers
    }

    /// General-purpose registers, RIP and RFLAGS; no system call where KVM synchronizes them.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.registers.regs()
    }

    /// Sets general-purpose registers, RIP and RFLAGS; where KVM synchronizes them, it takes them
    /// at the next entry.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.note_registers_written();
        self.registers.set_regs(regs)
    }

    /// Records that the registers were written, here or through the register file: a single step
    /// asks KVM for stepping again afterwards (see [`set_guest_debug`](Self::set_guest_debug)).
    pub(crate) fn note_registers_written(&self) {
        self.regs_written.store(true, Ordering::Relaxed);
    }

    /// Segment, control and descriptor-table registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.registers.sregs()
    }

    /// Sets segment, control and descriptor-table registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.note_registers_written();
        self.registers.set_sregs(sregs)
    }

    /// x87 and SSE state, MXCSR included.
    pub fn fpu(&self) -> Result<kvm_fpu> {
        let mut fpu = self.fd.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
        if self.mxcsr_via_xsave {
            fpu.mxcsr = self.xsave()?.region[XSAVE_MXCSR_WORD];
        }
        Ok(fpu)
    }

    /// Sets x87 and SSE state, MXCSR included.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        if !self.mxcsr_via_xsave {
            return self.fd.set_fpu(fpu).map_err(Error::kvm("KVM_SET_FPU"));
        }
        let mut xsave = self.xsave()?;
        write_legacy_area(&mut xsave, fpu);
        // SAFETY: `mxcsr_via_xsave` holds only when KVM's XSAVE state fits `kvm_xsave`, so the
        // kernel reads no further than the structure passed.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))
    }

    fn xsave(&self) -> Result<kvm_xsave> {
        self.fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))
    }

    /// Reads the MSRs at `indices`, failing on the first one KVM does not know.
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<_> = indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(indices.len()))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        let entries = msrs.as_slice();
        if read < entries.len() {
            return Err(Error::InvalidConfig(format!("KVM cannot read MSR {:#x}", entries[read].index)));
        }
        Ok(entries.iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes MSRs, failing on the first one KVM refuses.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> =
            values.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| too_many_msrs(values.len()))?;
        let written = self.fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        match values.get(written) {
            Some((index, data)) => Err(Error::InvalidConfig(format!("KVM refused to set MSR {index:#x} to {data:#x}"))),
            None => Ok(()),
        }
    }

    /// The extended control registers (XCR0).
    pub fn xcrs(&self) -> Result<kvm_xcrs> {
        self.fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))
    }

    /// Sets the extended control registers (XCR0).
    pub fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<()> {
        self.fd.set_xcrs(xcrs).map_err(Error::kvm("KVM_SET_XCRS"))
    }

    /// The debug registers.
    pub fn debug_regs(&self) -> Result<kvm_debugregs> {
        self.fd.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))
    }

    /// Sets the debug registers.
    pub fn set_debug_regs(&self, debug_regs: &kvm_debugregs) -> Result<()> {
        self.fd.set_debug_regs(debug_regs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))
    }

    /// The local APIC's registers (needs the in-kernel irqchip).
    pub fn lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))
    }

    /// Sets the local APIC's registers (needs the in-kernel irqchip).
    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
    }

    /// Pending exceptions, interrupts and NMIs, the interrupt shadow and SMM state.
    pub fn vcpu_events(&self) -> Result<kvm_vcpu_events> {
        self.fd.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))
    }

    /// Sets pending events, the interrupt shadow and SMM state.
    pub fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<()> {
        self.fd.set_vcpu_events(events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    /// Whether the vCPU runs, halts or waits for a startup IPI.
    pub fn mp_state(&self) -> Result<kvm_mp_state> {
        self.fd.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))
    }

    /// Sets whether the vCPU runs, halts or waits for a startup IPI.
    pub fn set_mp_state(&self, mp_state: kvm_mp_state) -> Result<()> {
        self.fd.set_mp_state(mp_state).map_err(Error::kvm("KVM_SET_MP_STATE"))
    }

    /// Wires the local APIC's LINT0 to ExtINT and LINT1 to NMI (needs the in-kernel irqchip).
    pub fn wire_lapic_lint_pins(&self) -> Result<()> {
        let mut lapic = self.lapic()?;
        lapic::wire_lint_pins(&mut lapic.regs);
        self.set_lapic(&lapic)
    }

    /// The CPUID the vCPU reports.
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_CPUID2"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    /// Replaces the CPUID the vCPU reports (KVM accepts this only before the vCPU first runs).
    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| {
            Error::InvalidConfig(format!(
                "{} CPUID entries are more than KVM takes ({KVM_MAX_CPUID_ENTRIES})",
                entries.len()
            ))
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        *lock(&self.tracking.cpuid) = entries.to_vec();
        Ok(())
    }

    /// Sets single-step, software breakpoints and the debug registers KVM uses for the VMM's
    /// debugging (not the guest's own DR0-DR7); does nothing when they are as last set.
    pub fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        // KVM sets the trap flag of a single step only while RIP is where it was when stepping was
        // asked for: registers written since must reach KVM first, and stepping be asked again.
        let moved = debug.single_step && (self.registers.flush()? | self.regs_written.swap(false, Ordering::Relaxed));
        if !moved && *debug == *self.guest_debug {
            return Ok(());
        }
        self.fd.set_guest_debug(&debug.to_kvm(self.block_irq)).map_err(Error::kvm("KVM_SET_GUEST_DEBUG"))?;
        *self.guest_debug = *debug;
        Ok(())
    }

    /// Details of the `KVM_EXIT_INTERNAL_ERROR` the vCPU last stopped with.
    pub(crate) fn internal_error(&mut self) -> InternalError {
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        InternalError::new(internal.suberror, internal.data[..count].to_vec())
    }
}

/// The `KVM_GUESTDBG_*` flags KVM supports, 0 when it does not say.
fn guest_debug_flags(vm: &VmFd) -> u32 {
    u32::try_from(vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2))).unwrap_or(0)
}

/// Saving and restoring the whole state.
impl Vcpu {
    /// Captures everything the vCPU needs to continue elsewhere. The vCPU must be out of
    /// `KVM_RUN` with the access of its last exit complete, as a run leaves it.
    pub fn save_state(&self) -> Result<VcpuState> {
        // A register write KVM has not taken yet would be applied after the state read here.
        self.registers.flush()?;
        // First, as with an in-kernel LAPIC it takes in a pending INIT or SIPI, which changes
        // the registers and the LAPIC read below.
        let mp_state = self.mp_state()?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self.save_fpu()?;
        let xcrs = self.tracking.caps.xcrs.then(|| self.xcrs()).transpose()?;
        let debug_regs = self.tracking.caps.debug_regs.then(|| self.debug_regs()).transpose()?;
        let lapic = self.irqchip.then(|| self.lapic()).transpose()?;
        let msrs = self.save_msrs()?;
        let tsc_khz = if self.tracking.caps.tsc_khz {
            let khz = self.fd.get_tsc_khz().map_err(Error::kvm("KVM_GET_TSC_KHZ"))?;
            self.tracking.tsc_khz.store(khz, Ordering::Relaxed);
            (khz > 0).then_some(khz)
        } else {
            None
        };
        let events = self.tracking.caps.events.then(|| self.vcpu_events()).transpose()?;
        let cpuid = lock(&self.tracking.cpuid).clone();
        Ok(VcpuState { regs, sregs, fpu, xcrs, msrs, lapic, events, mp_state, debug_regs, cpuid, tsc_khz })
    }

    /// Puts back a state [`save_state`](Self::save_state) captured, on this vCPU or on the vCPU
    /// of the same index of a VM built from the same configuration. The vCPU must be out of
    /// `KVM_RUN`. Restore the VM's state ([`Vm::restore_state`](crate::vstate::vm::Vm::restore_state))
    /// first, then every vCPU's.
    ///
    /// The CPUID is set only when it differs from the vCPU's, which KVM allows only before the
    /// vCPU first runs: restoring a state with another CPUID into a vCPU that ran fails. A
    /// state from a VM of another shape (with KVM's irqchip or without) is refused before
    /// anything changes; a failure later leaves the vCPU partly restored.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        self.check_shape(state)?;
        // Before everything else: KVM checks MSRs, XCR0 and the XSAVE components against it.
        self.restore_cpuid(&state.cpuid)?;
        // Before the TSC itself (an MSR), which KVM converts with the frequency's ratio.
        if let Some(khz) = state.tsc_khz {
            self.restore_tsc_khz(khz)?;
        }
        // Before the LAPIC: the APIC base, one of the special registers, enables it. Before the
        // events: setting the registers drops a pending exception, which the events carry.
        self.set_sregs(&state.sregs)?;
        self.registers.set_regs_now(&state.regs)?;
        self.note_registers_written();
        self.restore_fpu(&state.fpu)?;
        if let Some(xcrs) = &state.xcrs {
            self.set_xcrs(xcrs)?;
        }
        if let Some(debug_regs) = &state.debug_regs {
            self.set_debug_regs(debug_regs)?;
        }
        // Before the MSRs: KVM keeps the TSC deadline only while the LAPIC timer is in
        // TSC-deadline mode.
        if let Some(lapic) = &state.lapic {
            self.set_lapic(lapic)?;
        }
        self.restore_msrs(&state.msrs)?;
        // Without an in-kernel LAPIC a vCPU is always runnable (HLT exits to the VMM), so there is
        // nothing to set.
        if self.irqchip || state.mp_state.mp_state != KVM_MP_STATE_RUNNABLE {
            self.set_mp_state(state.mp_state)?;
        }
        // Last, so that what they hold pending (an exception, an NMI, a latched INIT) is what the
        // vCPU ends up with, whatever the writes above dropped or queued.
        if let Some(events) = &state.events {
            self.set_vcpu_events(events)?;
        }
        Ok(())
    }

    /// Fails unless `state` comes from a vCPU of this one's shape, with nothing this KVM cannot
    /// put back.
    fn check_shape(&self, state: &VcpuState) -> Result<()> {
        let with = |irqchip: bool| if irqchip { "with" } else { "without" };
        if state.lapic.is_some() != self.irqchip {
            return Err(Error::InvalidConfig(format!(
                "the vCPU state is of a VM {} KVM's irqchip, and vCPU {} is of a VM {} (irqchip={})",
                with(state.lapic.is_some()),
                self.index,
                with(self.irqchip),
                self.irqchip
            )));
        }
        let unsupported = [
            (state.xcrs.is_some() && !self.tracking.caps.xcrs, "KVM_CAP_XCRS"),
            (state.events.is_some() && !self.tracking.caps.events, "KVM_CAP_VCPU_EVENTS"),
            (state.debug_regs.is_some() && !self.tracking.caps.debug_regs, "KVM_CAP_DEBUGREGS"),
            (matches!(state.fpu, FpuState::Xsave(_)) && self.tracking.caps.xsave_size.is_none(), "KVM_CAP_XSAVE"),
        ];
        match unsupported.iter().find(|(missing, _)| *missing) {
            Some((_, cap)) => Err(Error::InvalidConfig(format!(
                "the vCPU state has state this host's KVM cannot restore: it lacks {cap}"
            ))),
            None => Ok(()),
        }
    }

    /// Sets the CPUID unless the vCPU has it already.
    fn restore_cpuid(&self, cpuid: &[kvm_cpuid_entry2]) -> Result<()> {
        if lock(&self.tracking.cpuid).as_slice() == cpuid {
            return Ok(());
        }
        let current = lock(&self.tracking.cpuid).clone();
        self.set_cpuid(cpuid).map_err(|error| {
            if !self.ran {
                return error;
            }
            let differs = cpuid
                .iter()
                .find(|entry| !current.contains(entry))
                .map(|e| format!("leaf {:#x} subleaf {:#x} differs", e.function, e.index))
                .unwrap_or_else(|| format!("{} entries instead of {}", cpuid.len(), current.len()));
            Error::InvalidConfig(format!(
                "vCPU {} has run with another CPUID than the saved state's ({differs}), and KVM takes a \
                 new CPUID only before a vCPU first runs: restore into a new VM",
                self.index
            ))
        })
    }

    /// Sets the TSC frequency unless the vCPU has it already.
    fn restore_tsc_khz(&self, khz: u32) -> Result<()> {
        let current = self.tracking.tsc_khz.load(Ordering::Relaxed);
        if khz == current {
            return Ok(());
        }
        self.fd.set_tsc_khz(khz).map_err(|e| {
            Error::InvalidConfig(format!(
                "the saved vCPU's TSC ran at {khz} kHz and this host's KVM cannot run vCPU {}'s at that rate \
                 (it runs at {current} kHz): KVM_SET_TSC_KHZ failed: {e}",
                self.index
            ))
        })?;
        self.tracking.tsc_khz.store(khz, Ordering::Relaxed);
        Ok(())
    }

    fn save_fpu(&self) -> Result<FpuState> {
        match self.tracking.caps.xsave_size {
            Some(size) if size > KVM_XSAVE_SIZE as usize => {
                let extra = (size - KVM_XSAVE_SIZE as usize).div_ceil(4);
                let mut area = Xsave::new(extra)
                    .map_err(|_| Error::InvalidConfig(format!("KVM's XSAVE area of {size} bytes is too large")))?;
                // SAFETY: `area` has room for 4096 bytes plus `extra` words, at least the `size`
                // bytes KVM writes for this VM's vCPUs (`KVM_CAP_XSAVE2`).
                unsafe { self.fd.get_xsave2(&mut area) }.map_err(Error::kvm("KVM_GET_XSAVE2"))?;
                let fixed: &kvm_xsave2 = area.as_fam_struct_ref();
                let mut words = Vec::with_capacity(KVM_XSAVE_WORDS + extra);
                words.extend_from_slice(&fixed.xsave.region);
                words.extend_from_slice(fixed.as_slice());
                Ok(FpuState::Xsave(words))
            }
            Some(_) => Ok(FpuState::Xsave(self.xsave()?.region.to_vec())),
            None => Ok(FpuState::Legacy(Box::new(FpuRegs::from(&self.fpu()?)))),
        }
    }

    fn restore_fpu(&self, fpu: &FpuState) -> Result<()> {
        match (fpu, self.tracking.caps.xsave_size) {
            (FpuState::Xsave(words), Some(size)) => self.set_xsave_words(words, size),
            (FpuState::Legacy(regs), _) => self.set_fpu(&kvm_fpu::from(&**regs)),
            (FpuState::Xsave(_), None) => unreachable!("check_shape refuses XSAVE state without KVM_CAP_XSAVE"),
        }
    }

    /// Sets the XSAVE area from `words`, in place: KVM reads `size` bytes from them.
    fn set_xsave_words(&self, words: &[u32], size: usize) -> Result<()> {
        let needed = size.div_ceil(4);
        let padded;
        let words = if words.len() >= needed {
            words
        } else {
            // From a KVM with a smaller area: the components it lacks are clear in XSTATE_BV, so
            // KVM puts them in their initial state whatever follows.
            padded = [words, &vec![0; needed - words.len()]].concat();
            &padded
        };
        // SAFETY: `words` holds at least `needed` >= 1024 words, as many as `kvm_xsave` (whose
        // layout is the area's first 1024 words, then the rest) and `size` bytes, and u32 words
        // are aligned as `kvm_xsave` is.
        let area = unsafe { &*words.as_ptr().cast::<kvm_xsave>() };
        // SAFETY: KVM reads the `size` bytes `KVM_CAP_XSAVE2` reports for this VM, all inside
        // `words`.
        unsafe { self.fd.set_xsave(area) }.map_err(Error::kvm("KVM_SET_XSAVE"))
    }

    /// Reads every MSR of KVM's list the vCPU can read, in restore order.
    fn save_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let readable = &READABLE_MSRS[usize::from(self.irqchip)];
        if let Some(indices) = readable.get() {
            return self.read_msrs(indices);
        }
        let mut indices = Kvm::shared()?.msr_index_list()?.to_vec();
        msr::restore_order(&mut indices);
        let values = self.read_msrs(&indices)?;
        let _ = readable.set(values.iter().map(|&(index, _)| index).collect());
        Ok(values)
    }

    /// Reads the MSRs at `indices`, as many per call as KVM takes, leaving out those KVM
    /// cannot read.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let mut values = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let mut msrs = Msrs::new(chunk.len()).map_err(|_| too_many_msrs(chunk.len()))?;
            for (entry, &index) in msrs.as_mut_slice().iter_mut().zip(chunk) {
                entry.index = index;
            }
            let read = self.fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
            values.extend(msrs.as_slice()[..read].iter().map(|entry| (entry.index, entry.data)));
            // KVM stops at the first MSR it cannot read: leave that one out and go on after it.
            let done = if read < chunk.len() {
                log::debug!("vCPU {}: KVM cannot read MSR {:#x}, which is not saved", self.index, chunk[read]);
                read + 1
            } else {
                read
            };
            rest = &rest[done..];
        }
        Ok(values)
    }

    /// Writes back saved MSRs in order, as many per call as KVM takes, through a buffer kept for
    /// the next restore.
    fn restore_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let mut cache = lock(&self.tracking.restore_cache);
        let RestoreCache { msrs: buffer, unchanged } = &mut *cache;
        let mut rest = values;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let count = chunk.iter().filter(|value| !unchanged.contains(value)).count();
            if count == 0 {
                rest = &rest[chunk.len()..];
                continue;
            }
            let msrs = match buffer {
                Some(msrs) if msrs.as_slice().len() == count => msrs,
                _ => buffer.insert(Msrs::new(count).map_err(|_| too_many_msrs(count))?),
            };
            let wanted = chunk.iter().filter(|value| !unchanged.contains(value));
            for (entry, &(index, data)) in msrs.as_mut_slice().iter_mut().zip(wanted) {
                *entry = kvm_msr_entry { index, data, ..Default::default() };
            }
            let written = self.fd.set_msrs(msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
            if written == count {
                rest = &rest[chunk.len()..];
                continue;
            }
            // KVM stops at the first MSR it refuses. Harmless when the vCPU holds that value
            // already (then it is skipped from now on); anything else would lose state.
            let refused @ (index, data) = {
                let entry = msrs.as_slice()[written];
                (entry.index, entry.data)
            };
            match self.msrs(&[index]).ok().and_then(|read| read.first().copied()) {
                Some((_, current)) if current == data => {
                    log::debug!(
                        "vCPU {}: KVM refuses to write MSR {index:#x}, which holds its value already",
                        self.index
                    );
                    unchanged.push(refused);
                }
                current => {
                    let holds = current.map(|(_, value)| format!("{value:#x}")).unwrap_or_else(|| "unreadable".into());
                    return Err(Error::InvalidConfig(format!(
                        "KVM refused to restore MSR {index:#x} of vCPU {} to {data:#x} (it holds {holds})",
                        self.index
                    )));
                }
            }
            let at = rest.iter().position(|value| *value == refused).expect("the refused MSR comes from `rest`");
            rest = &rest[at + 1..];
        }
        Ok(())
    }
}

/// Writes `fpu` into the legacy (FXSAVE-format) region of an XSAVE area and marks the x87 and SSE
/// components present, so KVM loads them rather than their initial state.
fn write_legacy_area(xsave: &mut kvm_xsave, fpu: &kvm_fpu) {
    let mut legacy = [0u8; 416];
    for (word, chunk) in xsave.region.iter().zip(legacy.chunks_exact_mut(4)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    legacy[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    legacy[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    legacy[4] = fpu.ftwx;
    legacy[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    legacy[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    legacy[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    legacy[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (slot, value) in legacy[32..].chunks_exact_mut(16).zip(fpu.fpr.iter().chain(fpu.xmm.iter())) {
        slot.copy_from_slice(value);
    }
    for (word, chunk) in xsave.region.iter_mut().zip(legacy.chunks_exact(4)) {
        *word = u32::from_le_bytes(chunk.try_into().expect("chunks of four bytes"));
    }
    xsave.region[XSAVE_XSTATE_BV_WORD] |= XSTATE_X87_SSE;
}

fn too_many_msrs(count: usize) -> Error {
    Error::InvalidConfig(format!("{count} MSRs are more than one KVM call takes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::test_util::{avx_usable, guest_runs_avx, kvm, Guest, CODE_ADDR};
    use crate::ExitReason;

    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_TSC_DEADLINE: u32 = 0x6e0;

    /// Sets RBX, XMM1, the upper half of YMM1 (when RDI says the guest runs AVX),
    /// `KERNEL_GS_BASE` and DR0; checkpoint; reports them all to port 0x81, 32 bits at a time;
    /// changes them all; checkpoint; HLT. Its data follows at [`STATE_GUEST_DATA`].
    #[rustfmt::skip]
    const STATE_GUEST: &[u8] = &[
        0x48, 0xbb, 0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01, // 0x00: mov rbx, 0x0123456789abcdef
        0xf3, 0x0f, 0x6f, 0x0d, 0xde, 0x00, 0x00, 0x00,             // 0x0a: movdqu xmm1, [first]
        0xb9, 0x02, 0x01, 0x00, 0xc0,                               // 0x12: mov ecx, 0xc0000102
        0xb8, 0x0d, 0xf0, 0xfe, 0xca,                               // 0x17: mov eax, 0xcafef00d
        0xba, 0xed, 0x5e, 0x00, 0x00,                               // 0x1c: mov edx, 0x5eed
        0x0f, 0x30,                                                 // 0x21: wrmsr
        0x48, 0xc7, 0xc0, 0x00, 0x40, 0x00, 0x00,                   // 0x23: mov rax, 0x4000
        0x0f, 0x23, 0xc0,                                           // 0x2a: mov dr0, rax
        0x48, 0x85, 0xff,                                           // 0x2d: test rdi, rdi
        0x74, 0x0e,                                                 // 0x30: jz 0x40
        0xf3, 0x0f, 0x6f, 0x15, 0xd6, 0x00, 0x00, 0x00,             // 0x32: movdqu xmm2, [high]
        0xc4, 0xe3, 0x75, 0x18, 0xca, 0x01,                         // 0x3a: vinsertf128 ymm1, ymm1, xmm2, 1
        0xe6, 0x80,                                                 // 0x40: out 0x80, al (checkpoint)
        0x66, 0xba, 0x81, 0x00,                                     // 0x42: mov dx, 0x81
        0xf3, 0x0f, 0x7f, 0x0d, 0xd2, 0x00, 0x00, 0x00,             // 0x46: movdqu [scratch], xmm1
        0x8b, 0x05, 0xcc, 0x00, 0x00, 0x00,                         // 0x4e: mov eax, [scratch]
        0xef,                                                       // 0x54: out dx, eax
        0x8b, 0x05, 0xc9, 0x00, 0x00, 0x00,                         // 0x55: mov eax, [scratch + 4]
        0xef,                                                       // 0x5b: out dx, eax
        0x8b, 0x05, 0xc6, 0x00, 0x00, 0x00,                         // 0x5c: mov eax, [scratch + 8]
        0xef,                                                       // 0x62: out dx, eax
        0x8b, 0x05, 0xc3, 0x00, 0x00, 0x00,                         // 0x63: mov eax, [scratch + 12]
        0xef,                                                       // 0x69: out dx, eax
        0x89, 0xd8,                                                 // 0x6a: mov eax, ebx
        0xef,                                                       // 0x6c: out dx, eax
        0x48, 0x89, 0xd8,                                           // 0x6d: mov rax, rbx
        0x48, 0xc1, 0xe8, 0x20,                                     // 0x70: shr rax, 32
        0xef,                                                       // 0x74: out dx, eax
        0xb9, 0x02, 0x01, 0x00, 0xc0,                               // 0x75: mov ecx, 0xc0000102
        0x0f, 0x32,                                                 // 0x7a: rdmsr
        0x41, 0x89, 0xd0,                                           // 0x7c: mov r8d, edx
        0x66, 0xba, 0x81, 0x00,                                     // 0x7f: mov dx, 0x81
        0xef,                                                       // 0x83: out dx, eax
        0x44, 0x89, 0xc0,                                           // 0x84: mov eax, r8d
        0xef,                                                       // 0x87: out dx, eax
        0x0f, 0x21, 0xc0,                                           // 0x88: mov rax, dr0
        0xef,                                                       // 0x8b: out dx, eax
        0x48, 0x85, 0xff,                                           // 0x8c: test rdi, rdi
        0x74, 0x1c,                                                 // 0x8f: jz 0xad
        0xc4, 0xe3, 0x7d, 0x19, 0xcb, 0x01,                         // 0x91: vextractf128 xmm3, ymm1, 1
        0xf3, 0x0f, 0x7f, 0x1d, 0x81, 0x00, 0x00, 0x00,             // 0x97: movdqu [scratch], xmm3
        0x8b, 0x05, 0x7b, 0x00, 0x00, 0x00,                         // 0x9f: mov eax, [scratch]
        0xef,                                                       // 0xa5: out dx, eax
        0x8b, 0x05, 0x78, 0x00, 0x00, 0x00,                         // 0xa6: mov eax, [scratch + 4]
        0xef,                                                       // 0xac: out dx, eax
        0x48, 0xc7, 0xc3, 0xff, 0xff, 0xff, 0xff,                   // 0xad: mov rbx, -1
        0xf3, 0x0f, 0x6f, 0x0d, 0x44, 0x00, 0x00, 0x00,             // 0xb4: movdqu xmm1, [second]
        0xb9, 0x02, 0x01, 0x00, 0xc0,                               // 0xbc: mov ecx, 0xc0000102
        0x31, 0xc0,                                                 // 0xc1: xor eax, eax
        0x31, 0xd2,                                                 // 0xc3: xor edx, edx
        0x0f, 0x30,                                                 // 0xc5: wrmsr
        0x48, 0xc7, 0xc0, 0x00, 0x80, 0x00, 0x00,                   // 0xc7: mov rax, 0x8000
        0x0f, 0x23, 0xc0,                                           // 0xce: mov dr0, rax
        0x48, 0x85, 0xff,                                           // 0xd1: test rdi, rdi
        0x74, 0x0a,                                                 // 0xd4: jz 0xe0
        0xc5, 0xe9, 0xef, 0xd2,                                     // 0xd6: vpxor xmm2, xmm2, xmm2
        0xc4, 0xe3, 0x75, 0x18, 0xca, 0x01,                         // 0xda: vinsertf128 ymm1, ymm1, xmm2, 1
        0xe6, 0x80,                                                 // 0xe0: out 0x80, al (checkpoint)
        0xf4,                                                       // 0xe2: hlt
    ];
    /// Where the data of [`STATE_GUEST`] starts, from its first byte: `first` (XMM1 before the
    /// first checkpoint), `second` (after), `high` (the upper half of YMM1), `scratch`.
    const STATE_GUEST_DATA: usize = 0xf0;
    /// Where the guest stands after its first checkpoint.
    const AFTER_FIRST_CHECKPOINT: u64 = CODE_ADDR + 0x42;
    /// What the upper half of YMM1 holds before the first checkpoint.
    const YMM1_HIGH_VALUE: [u64; 2] = [0x5555_6666_7777_8888, 0];

    /// The guest's code and data.
    fn state_guest() -> Vec<u8> {
        let mut image = STATE_GUEST.to_vec();
        image.resize(STATE_GUEST_DATA, 0x90);
        let data: [u64; 8] =
            [0x1111_2222_3333_4444, 0x9999_aaaa_bbbb_cccc, u64::MAX, u64::MAX, 0x5555_6666_7777_8888, 0, 0, 0];
        image.extend(data.iter().flat_map(|quad| quad.to_le_bytes()));
        image
    }

    /// What the guest reports when it continues from its first checkpoint with the state it
    /// set before: XMM1, RBX, `KERNEL_GS_BASE`, DR0 and, when it runs AVX, the upper half of YMM1.
    fn expected_reports(runs_avx: bool) -> Vec<u32> {
        let mut reports = vec![
            0x3333_4444,
            0x1111_2222,
            0xbbbb_cccc,
            0x9999_aaaa,
            0x89ab_cdef,
            0x0123_4567,
            0xcafe_f00d,
            0x5eed,
            0x4000,
        ];
        if runs_avx {
            reports.extend([0x7777_8888, 0x5555_6666]);
        }
        reports
    }

    /// Writes the upper half of YMM1 from the host, for guests that cannot run AVX themselves.
    fn set_ymm1_high(vcpu: &Vcpu, value: [u64; 2]) {
        let mut xsave = vcpu.xsave().unwrap();
        let words = [value[0] as u32, (value[0] >> 32) as u32, value[1] as u32, (value[1] >> 32) as u32];
        xsave.region[YMM1_HIGH / 4..YMM1_HIGH / 4 + 4].copy_from_slice(&words);
        xsave.region[XSAVE_XSTATE_BV_WORD] |= 0b100;
        // SAFETY: this host's XSAVE area fits `kvm_xsave` (checked by the caller).
        unsafe { vcpu.fd.set_xsave(&xsave) }.unwrap();
    }

    fn msr(state: &VcpuState, index: u32) -> Option<u64> {
        state.msrs.iter().find(|(i, _)| *i == index).map(|&(_, value)| value)
    }

    /// 16 bytes of the XSAVE area at `offset`, as two quadwords.
    fn xsave_bytes(state: &VcpuState, offset: usize) -> [u64; 2] {
        let FpuState::Xsave(words) = &state.fpu else { panic!("no XSAVE area: {:?}", state.fpu) };
        let word = |at: usize| u64::from(words[at / 4]) | u64::from(words[at / 4 + 1]) << 32;
        [word(offset), word(offset + 8)]
    }

    /// XMM1 sits at byte 160 + 16 of the legacy region; the upper half of YMM1 at 576 + 16.
    const XMM1: usize = 176;
    const YMM1_HIGH: usize = 592;

    fn round_trip(irqchip: bool) {
        let Some(kvm) = kvm() else { return };
        let runs_avx = guest_runs_avx(&kvm);
        // AVX state the guest cannot make itself is put there from the host.
        let host_avx = avx_usable(&kvm) && !runs_avx && vcpu_xsave_fits(&kvm);
        let expected = expected_reports(runs_avx);
        let mut guest = Guest::new(&kvm, irqchip, &state_guest());
        if host_avx {
            set_ymm1_high(&guest.vcpu, YMM1_HIGH_VALUE);
        }
        assert_eq!(guest.run(), (ExitReason::Stopped, vec![]));
        let saved = guest.vcpu.save_state().unwrap();
        assert_eq!((saved.regs.rip, saved.regs.rbx), (AFTER_FIRST_CHECKPOINT, 0x0123_4567_89ab_cdef));
        assert_eq!(xsave_bytes(&saved, XMM1), [0x1111_2222_3333_4444, 0x9999_aaaa_bbbb_cccc]);
        if runs_avx || host_avx {
            assert_eq!(xsave_bytes(&saved, YMM1_HIGH), YMM1_HIGH_VALUE);
            assert_eq!(saved.xcrs.unwrap().xcrs[0].value, 0b111);
        }
        assert_eq!(msr(&saved, KERNEL_GS_BASE), Some(0x5eed_cafe_f00d));
        assert_eq!(saved.debug_regs.unwrap().db[0], 0x4000);
        assert_eq!(saved.lapic.is_some(), irqchip);
        assert_eq!(saved.msrs[0].0, IA32_TSC, "the TSC is saved, first");

        // The guest reports what it set, then changes all of it.
        assert_eq!(guest.run(), (ExitReason::Stopped, expected.clone()));
        if host_avx {
            set_ymm1_high(&guest.vcpu, [0, 0]);
        }
        let changed = guest.vcpu.save_state().unwrap();
        assert_eq!((changed.regs.rbx, changed.debug_regs.unwrap().db[0]), (u64::MAX, 0x8000));
        assert_eq!((msr(&changed, KERNEL_GS_BASE), xsave_bytes(&changed, XMM1)), (Some(0), [u64::MAX; 2]));
        if runs_avx || host_avx {
            assert_eq!(xsave_bytes(&changed, YMM1_HIGH), [0, 0]);
        }

        // In place: every part comes back, and the guest goes on from its first checkpoint.
        guest.vcpu.restore_state(&saved).unwrap();
        let restored = guest.vcpu.save_state().unwrap();
        assert_eq!(restored.regs, saved.regs);
        assert_eq!(restored.sregs, saved.sregs);
        assert_eq!(restored.fpu, saved.fpu);
        assert_eq!(restored.xcrs, saved.xcrs);
        assert_eq!(restored.debug_regs, saved.debug_regs);
        assert_eq!(restored.lapic, saved.lapic);
        assert_eq!((restored.events, restored.mp_state), (saved.events, saved.mp_state));
        assert_eq!((&restored.cpuid, restored.tsc_khz), (&saved.cpuid, saved.tsc_khz));
        // Every MSR but the TSC, which runs on.
        let untimed =
            |state: &VcpuState| state.msrs.iter().filter(|(i, _)| *i != IA32_TSC).copied().collect::<Vec<_>>();
        assert_eq!(untimed(&restored), untimed(&saved));
        assert_eq!(guest.run(), (ExitReason::Stopped, expected.clone()));

        // Through JSON and into a new VM of the same configuration (memory holds the same code).
        let json = serde_json::to_string(&saved).unwrap();
        let decoded: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, saved);
        let mut fresh = Guest::new(&kvm, irqchip, &state_guest());
        fresh.vcpu.restore_state(&decoded).unwrap();
        let restored = fresh.vcpu.save_state().unwrap();
        assert_eq!((restored.regs, restored.sregs, &restored.fpu), (saved.regs, saved.sregs, &saved.fpu));
        assert_eq!(fresh.run(), (ExitReason::Stopped, expected));
        if !irqchip {
            // (With KVM's LAPIC, HLT would wait in KVM for an interrupt that never comes.)
            assert_eq!(fresh.run().0, ExitReason::Hlt);
        }
    }

    /// Whether this host's XSAVE area fits the fixed `kvm_xsave`, as [`set_ymm1_high`] needs.
    fn vcpu_xsave_fits(kvm: &Kvm) -> bool {
        let vm = kvm.create_vm().unwrap();
        vm.check_extension_int(Cap::Xsave2) <= KVM_XSAVE_SIZE
    }

    #[test]
    fn state_round_trips_in_place_through_json_and_into_a_new_vm() {
        round_trip(false);
    }

    #[test]
    fn state_with_a_lapic_round_trips_in_place_through_json_and_into_a_new_vm() {
        round_trip(true);
    }

    #[test]
    fn a_new_cpuid_is_set_on_a_fresh_vcpu_and_refused_on_one_that_ran() {
        let Some(kvm) = kvm() else { return };
        let mut guest = Guest::new(&kvm, false, &state_guest());
        assert_eq!(guest.run().0, ExitReason::Stopped);
        let mut saved = guest.vcpu.save_state().unwrap();
        // KVM's paravirtual features leaf; the guest never looks at it.
        let leaf = saved.cpuid.iter_mut().find(|e| e.function == 0x4000_0001).expect("KVM's features leaf");
        leaf.eax ^= 1;
        let features = leaf.eax;
        let error = guest.vcpu.restore_state(&saved).unwrap_err().to_string();
        assert!(error.contains("has run with another CPUID") && error.contains("leaf 0x40000001"), "{error}");
        assert_ne!(guest.vcpu.cpuid().unwrap(), saved.cpuid, "the vCPU keeps its CPUID");

        let fresh = Guest::new(&kvm, false, &state_guest());
        fresh.vcpu.restore_state(&saved).unwrap();
        let cpuid = fresh.vcpu.cpuid().unwrap();
        assert_eq!(cpuid.iter().find(|e| e.function == 0x4000_0001).unwrap().eax, features);
        assert_eq!(fresh.vcpu.regs().unwrap(), saved.regs);
    }

    #[test]
    fn a_state_from_a_vm_of_another_shape_is_refused() {
        let Some(kvm) = kvm() else { return };
        let plain = Guest::new(&kvm, false, &state_guest());
        let with_irqchip = Guest::new(&kvm, true, &state_guest());
        let error = with_irqchip.vcpu.restore_state(&plain.vcpu.save_state().unwrap()).unwrap_err().to_string();
        assert!(error.contains("of a VM without KVM's irqchip") && error.contains("(irqchip=true)"), "{error}");
        let error = plain.vcpu.restore_state(&with_irqchip.vcpu.save_state().unwrap()).unwrap_err().to_string();
        assert!(error.contains("of a VM with KVM's irqchip") && error.contains("(irqchip=false)"), "{error}");
    }

    /// The LAPIC goes back before the MSRs: KVM keeps a TSC deadline only while the LAPIC timer
    /// is in TSC-deadline mode.
    #[test]
    fn the_tsc_deadline_comes_back_with_the_lapic_timer_mode() {
        const LVT_TIMER: usize = 0x320;
        const MASKED: u32 = 1 << 16;
        const TSC_DEADLINE_MODE: u32 = 0b10 << 17;
        let Some(kvm) = kvm() else { return };
        let guest = Guest::new(&kvm, true, &[0xf4]);
        let vcpu = &guest.vcpu;
        let set_timer_mode = |mode: u32| {
            let mut lapic = vcpu.lapic().unwrap();
            for (slot, byte) in
                lapic.regs[LVT_TIMER..LVT_TIMER + 4].iter_mut().zip((MASKED | mode | 0x40).to_le_bytes())
            {
                *slot = byte as std::ffi::c_char;
            }
            vcpu.set_lapic(&lapic).unwrap();
        };
        let deadline = || vcpu.msrs(&[IA32_TSC_DEADLINE]).unwrap()[0].1;
        set_timer_mode(TSC_DEADLINE_MODE);
        // Far enough ahead (minutes) not to expire, which would clear it.
        let armed = vcpu.msrs(&[IA32_TSC]).unwrap()[0].1 + (1 << 42);
        vcpu.set_msrs(&[(IA32_TSC_DEADLINE, armed)]).unwrap();
        assert_eq!(deadline(), armed);
        let saved = vcpu.save_state().unwrap();
        assert_eq!(msr(&saved, IA32_TSC_DEADLINE), Some(armed));
        set_timer_mode(0);
        assert_eq!(deadline(), 0, "leaving TSC-deadline mode drops the deadline");
        vcpu.restore_state(&saved).unwrap();
        assert_eq!(deadline(), armed);
    }

    /// Save and restore of a vCPU that ran, for the figures (`cargo test -p kvmkit-core --lib
    /// save_and_restore_timing -- --ignored --nocapture`).
    #[test]
    #[ignore = "measures; run by hand"]
    fn save_and_restore_timing() {
        let Some(kvm) = kvm() else { return };
        for irqchip in [false, true] {
            let mut guest = Guest::new(&kvm, irqchip, &state_guest());
            assert_eq!(guest.run().0, ExitReason::Stopped);
            let first = std::time::Instant::now();
            let saved = guest.vcpu.save_state().unwrap();
            let first = first.elapsed();
            const ROUNDS: u32 = 2000;
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                std::hint::black_box(guest.vcpu.save_state().unwrap());
            }
            let save = start.elapsed() / ROUNDS;
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                guest.vcpu.restore_state(&saved).unwrap();
            }
            let restore = start.elapsed() / ROUNDS;
            let fresh = Guest::new(&kvm, irqchip, &state_guest());
            let start = std::time::Instant::now();
            fresh.vcpu.restore_state(&saved).unwrap();
            let into_fresh = start.elapsed();
            assert_eq!(guest.vcpu.regs().unwrap(), saved.regs);
            println!(
                "irqchip={irqchip}: {} MSRs; first save {first:?}, save {save:?}, in-place restore {restore:?}, \
                 restore into a new vCPU {into_fresh:?}",
                saved.msrs.len()
            );
        }
    }

    #[test]
    fn legacy_area_has_the_fxsave_layout() {
        let mut xsave = kvm_xsave::default();
        xsave.region[200] = 0xdead_beef;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0x81,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[7] = [0xaa; 16];
        fpu.xmm[15] = [0xbb; 16];
        write_legacy_area(&mut xsave, &fpu);
        let bytes: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes[0..8], &[0x7f, 0x03, 0x34, 0x12, 0x81, 0, 0xff, 0x07]);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 0x1f80);
        assert_eq!(&bytes[32 + 7 * 16..32 + 8 * 16], &[0xaa; 16]);
        assert_eq!(&bytes[160 + 15 * 16..416], &[0xbb; 16]);
        assert_eq!(bytes[512] & 0b11, 0b11);
        assert_eq!(xsave.region[200], 0xdead_beef, "words past the legacy region are kept");
    }
}
