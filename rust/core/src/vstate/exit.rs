use std::fmt;

use kvm_ioctls::VcpuExit;
use vmm_sys_util::errno;

use crate::arch::x86_64::exceptions::GuestFault;
use crate::bus::DeviceError;
use crate::vstate::debug::DebugEvent;
use crate::vstate::memory::GuestMemory;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Port I/O or memory-mapped I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSpace {
    /// x86 I/O ports (`in`/`out`).
    Pio,
    /// Guest physical addresses with no RAM behind them.
    Mmio,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pio => "port",
            Self::Mmio => "MMIO address",
        })
    }
}

/// `KVM_EXIT_INTERNAL_ERROR` details; for emulation failures, the instruction KVM gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*` code (1 is an emulation failure).
    pub suberror: u32,
    /// The raw `internal.data` words.
    pub data: Vec<u64>,
    /// The bytes KVM fetched at the instruction it gave up on (that instruction first), when it
    /// reported them.
    pub instruction: Vec<u8>,
}

impl InternalError {
    /// Decodes the instruction bytes of an emulation failure: `data[0]` holds flags, then a byte
    /// of length and up to 15 instruction bytes follow in `data[1..3]`.
    pub fn new(suberror: u32, data: Vec<u64>) -> Self {
        let has_bytes = suberror == KVM_INTERNAL_ERROR_EMULATION
            && data.len() >= 3
            && data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0;
        let instruction = if has_bytes {
            let bytes: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(bytes[0]).min(15);
            bytes[1..=len].to_vec()
        } else {
            Vec::new()
        };
        Self { suberror, data, instruction }
    }
}

/// Why a vCPU, or a whole run, stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The vCPU executed HLT with no in-kernel irqchip to wait for an interrupt.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The guest reported a crash.
    Crash,
    /// KVM could not go on, e.g. it failed to emulate an instruction.
    InternalError(InternalError),
    /// The hardware refused to enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The host CPU it happened on.
        cpu: u32,
    },
    /// An access reached no device and the policy is to stop.
    UnhandledIo {
        /// Ports or MMIO.
        space: AddressSpace,
        /// The address accessed.
        addr: u64,
        /// Bytes accessed.
        size: usize,
        /// Whether it was a write.
        write: bool,
    },
    /// A device (a Python handler, for instance) failed.
    DeviceError {
        /// Ports or MMIO.
        space: AddressSpace,
        /// The address accessed.
        addr: u64,
        /// What the device said.
        message: String,
    },
    /// A single step finished or a breakpoint or watchpoint was hit.
    Debug(DebugEvent),
    /// A guest exception reached kvmkit's exception table; the vCPU is back at the instruction
    /// it happened at.
    GuestFault(GuestFault),
    /// `stop()` was called, or another vCPU ended the run.
    Stopped,
    /// The run's time limit passed.
    Timeout,
    /// The VM was paused; resuming it continues the guest where it stopped.
    Paused,
    /// Something outside the guest failed: `KVM_RUN` returned an error, KVM reported an exit
    /// kvmkit has no use for, or the vCPU thread panicked.
    VmmError(String),
}

impl ExitReason {
    /// Whether this vCPU's exit ends the run for every vCPU. A halted vCPU waits for the others;
    /// a stopped one was ended by someone else.
    pub fn ends_run(&self) -> bool {
        !matches!(self, Self::Hlt | Self::Stopped)
    }

    /// A short lowercase name, stable for bindings.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hlt => "hlt",
            Self::Shutdown => "shutdown",
            Self::Reset => "reset",
            Self::PowerOff => "poweroff",
            Self::Crash => "crash",
            Self::InternalError(_) => "internal_error",
            Self::FailEntry { .. } => "fail_entry",
            Self::UnhandledIo { .. } => "unhandled_io",
            Self::DeviceError { .. } => "handler_error",
            Self::Debug(_) => "debug",
            Self::GuestFault(_) => "guest_fault",
            Self::Stopped => "stopped",
            Self::Timeout => "timeout",
            Self::Paused => "paused",
            Self::VmmError(_) => "vmm_error",
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InternalError(e) => {
                write!(f, "KVM internal error {} (instruction {:02x?})", e.suberror, e.instruction)
            }
            Self::FailEntry { reason, cpu } => write!(f, "entry failed with reason {reason:#x} on host CPU {cpu}"),
            Self::UnhandledIo { space, addr, size, write } => {
                let access = if *write { "write to" } else { "read from" };
                write!(f, "unhandled {size}-byte {access} {space} {addr:#x}")
            }
            Self::DeviceError { space, addr, message } => write!(f, "device at {space} {addr:#x} failed: {message}"),
            Self::VmmError(message) => f.write_str(message),
            Self::Debug(event) => write!(f, "debug event ({}) at {:#x}", event.kind_name(), event.pc),
            Self::GuestFault(fault) => fault.fmt(f),
            other => f.write_str(other.name()),
        }
    }
}

/// How a run ended: the reason, the vCPU that caused it, and how each vCPU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Why the run ended: the first run-ending vCPU exit, a stop or a timeout, or `Hlt` when
    /// every vCPU halted.
    pub reason: ExitReason,
    /// The vCPU whose exit ended the run, if one did.
    pub vcpu: Option<u32>,
    /// Each vCPU's own exit, by index.
    pub vcpu_reasons: Vec<ExitReason>,
    /// RIP of the vCPU that ended the run, read when the run ended.
    pub rip: Option<u64>,
    /// A hint at what went wrong, for the common mistakes (a vCPU that was never set up, code
    /// run outside guest memory).
    pub hint: Option<String>,
}

impl Exit {
    /// The reason in words, with the hint if there is one.
    pub fn message(&self) -> String {
        match &self.hint {
            Some(hint) => format!("{}; {hint}", self.reason),
            None => self.reason.to_string(),
        }
    }
}

/// Why an access was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// Nothing is mapped there and the policy is to stop.
    Unhandled,
    /// The device failed.
    Device(DeviceError),
    /// kvmkit's exception stubs reported a guest exception (a write to
    /// [`FAULT_PORT`](crate::arch::x86_64::exceptions::FAULT_PORT) that no device took); the run
    /// loop reads it from the vCPU.
    FaultReport,
}

/// Serves the port I/O and MMIO exits of a vCPU.
pub trait IoHandler {
    /// A port read of `data.len()` bytes; `data` must be filled.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), IoError>;
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), IoError>;
    /// An MMIO read of `data.len()` bytes; `data` must be filled.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), IoError>;
    /// An MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError>;
    /// Guest memory, for reading what kvmkit's exception stubs leave on the guest's stack.
    fn guest_memory(&self) -> Option<&GuestMemory> {
        None
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// `KVM_RUN` was interrupted (a kick or a signal): check for a stop, then re-enter.
    Interrupted,
    /// Fetch the internal-error details from the vCPU, then stop.
    InternalError,
    /// This vCPU is done.
    Stop(ExitReason),
}

/// Handles one `KVM_RUN` result: I/O is served through `io`, the rest is classified.
///
/// `pio_size` is the size of one element of a port I/O exit. A string instruction (`rep insb`,
/// `outsw`, ...) moves several elements in one exit; each is served as a separate access of that
/// size to the same port, in order, as the CPU would do them, and the first that fails stops the
/// vCPU.
pub fn handle_exit(exit: Result<VcpuExit<'_>, errno::Error>, pio_size: usize, io: &dyn IoHandler) -> ExitAction {
    let served = |result: Result<(), IoError>, space, addr, size, write| match result {
        Ok(()) => ExitAction::Continue,
        Err(IoError::Unhandled) => ExitAction::Stop(ExitReason::UnhandledIo { space, addr, size, write }),
        Err(IoError::Device(DeviceError::Failed(message))) => {
            ExitAction::Stop(ExitReason::DeviceError { space, addr, message })
        }
        Err(IoError::Device(DeviceError::Reset)) => ExitAction::Stop(ExitReason::Reset),
        Err(IoError::Device(DeviceError::PowerOff)) => ExitAction::Stop(ExitReason::PowerOff),
        Err(IoError::FaultReport) => ExitAction::Stop(ExitReason::GuestFault(GuestFault::default())),
    };
    // KVM reports sizes of 1, 2 and 4 bytes; anything else is served as one access.
    let element = |len: usize| if pio_size > 0 && len % pio_size == 0 { pio_size } else { len.max(1) };
    let exit = match exit {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return ExitAction::Interrupted,
        Err(e) => return ExitAction::Stop(ExitReason::VmmError(format!("KVM_RUN failed: {e}"))),
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            let size = element(data.len());
            let result = data.chunks_mut(size).try_for_each(|chunk| io.pio_read(port, chunk));
            served(result, AddressSpace::Pio, u64::from(port), size, false)
        }
        VcpuExit::IoOut(port, data) => {
            let size = element(data.len());
            let result = data.chunks(size).try_for_each(|chunk| io.pio_write(port, chunk));
            served(result, AddressSpace::Pio, u64::from(port), size, true)
        }
        VcpuExit::MmioRead(addr, data) => {
            let size = data.len();
            served(io.mmio_read(addr, data), AddressSpace::Mmio, addr, size, false)
        }
        VcpuExit::MmioWrite(addr, data) => {
            served(io.mmio_write(addr, data), AddressSpace::Mmio, addr, data.len(), true)
        }
        VcpuExit::Intr => ExitAction::Interrupted,
        VcpuExit::Hlt => ExitAction::Stop(ExitReason::Hlt),
        VcpuExit::Shutdown => ExitAction::Stop(ExitReason::Shutdown),
        VcpuExit::Debug(arch) => {
            ExitAction::Stop(ExitReason::Debug(DebugEvent::classify(arch.exception, arch.pc, arch.dr6)))
        }
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(ExitReason::FailEntry { reason, cpu }),
        VcpuExit::SystemEvent(kind, _) => ExitAction::Stop(match kind {
            KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
            KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash,
            other => ExitReason::VmmError(format!("unknown KVM system event {other}")),
        }),
        other => ExitAction::Stop(ExitReason::VmmError(format!("unexpected vCPU exit {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records accesses; port 0x60 and MMIO 0x1000 fail, port 0x64 resets, port 0x3c0 powers
    /// off, port 0xdead is unmapped.
    #[derive(Default)]
    struct Recorder(RefCell<Vec<(AddressSpace, u64, Vec<u8>)>>);

    impl Recorder {
        fn check(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), IoError> {
            self.0.borrow_mut().push((space, addr, data.to_vec()));
            match addr {
                0x60 | 0x1000 => Err(IoError::Device(DeviceError::Failed("broken".into()))),
                0x64 => Err(IoError::Device(DeviceError::Reset)),
                0x3c0 => Err(IoError::Device(DeviceError::PowerOff)),
                0xdead => Err(IoError::Unhandled),
                _ => Ok(()),
            }
        }
    }

    impl IoHandler for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8]) -> Result<(), IoError> {
            data.fill(0x42);
            self.check(AddressSpace::Pio, port.into(), data)
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> Result<(), IoError> {
            self.check(AddressSpace::Pio, port.into(), data)
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), IoError> {
            data.fill(0x43);
            self.check(AddressSpace::Mmio, addr, data)
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError> {
            self.check(AddressSpace::Mmio, addr, data)
        }
    }

    #[test]
    fn io_exits_reach_the_handler_and_fill_reads() {
        let io = Recorder::default();
        let mut read = [0u8; 2];
        assert_eq!(handle_exit(Ok(VcpuExit::IoOut(0x3f8, &[7])), 1, &io), ExitAction::Continue);
        assert_eq!(handle_exit(Ok(VcpuExit::IoIn(0x3f9, &mut read)), 2, &io), ExitAction::Continue);
        assert_eq!(read, [0x42; 2]);
        let mut read = [0u8; 8];
        assert_eq!(handle_exit(Ok(VcpuExit::MmioRead(0xd000_0000, &mut read)), 0, &io), ExitAction::Continue);
        assert_eq!(read, [0x43; 8]);
        assert_eq!(handle_exit(Ok(VcpuExit::MmioWrite(0xd000_0008, &[1, 2, 3, 4])), 0, &io), ExitAction::Continue);
        assert_eq!(
            *io.0.borrow(),
            [
                (AddressSpace::Pio, 0x3f8, vec![7]),
                (AddressSpace::Pio, 0x3f9, vec![0x42; 2]),
                (AddressSpace::Mmio, 0xd000_0000, vec![0x43; 8]),
                (AddressSpace::Mmio, 0xd000_0008, vec![1, 2, 3, 4]),
            ]
        );
    }

    #[test]
    fn string_io_is_served_one_element_at_a_time() {
        let io = Recorder::default();
        let mut read = [0u8; 40];
        assert_eq!(handle_exit(Ok(VcpuExit::IoIn(0x3f8, &mut read)), 1, &io), ExitAction::Continue);
        assert_eq!(read, [0x42; 40]);
        assert_eq!(handle_exit(Ok(VcpuExit::IoOut(0x3f9, &[1, 2, 3, 4, 5, 6])), 2, &io), ExitAction::Continue);
        let accesses = io.0.borrow();
        assert_eq!(accesses.len(), 43);
        assert!(accesses[..40].iter().all(|a| *a == (AddressSpace::Pio, 0x3f8, vec![0x42])));
        assert_eq!(accesses[40..], [1, 3, 5].map(|b| (AddressSpace::Pio, 0x3f9, vec![b, b + 1])));
    }

    #[test]
    fn failed_and_unhandled_io_stop_the_vcpu_with_where_it_happened() {
        let io = Recorder::default();
        assert_eq!(
            handle_exit(Ok(VcpuExit::IoOut(0x60, &[0xfe])), 1, &io),
            ExitAction::Stop(ExitReason::DeviceError {
                space: AddressSpace::Pio,
                addr: 0x60,
                message: "broken".into()
            })
        );
        assert_eq!(
            handle_exit(Ok(VcpuExit::MmioRead(0x1000, &mut [0; 4])), 0, &io),
            ExitAction::Stop(ExitReason::DeviceError {
                space: AddressSpace::Mmio,
                addr: 0x1000,
                message: "broken".into()
            })
        );
        assert_eq!(
            handle_exit(Ok(VcpuExit::IoIn(0xdead, &mut [0; 4])), 4, &io),
            ExitAction::Stop(ExitReason::UnhandledIo { space: AddressSpace::Pio, addr: 0xdead, size: 4, write: false })
        );
        assert_eq!(handle_exit(Ok(VcpuExit::IoOut(0x64, &[0xfe])), 1, &io), ExitAction::Stop(ExitReason::Reset));
        assert_eq!(handle_exit(Ok(VcpuExit::IoOut(0x3c0, &[0x34])), 1, &io), ExitAction::Stop(ExitReason::PowerOff));
    }

    #[test]
    fn lifecycle_exits_are_classified() {
        let io = Recorder::default();
        let stop = |exit| match handle_exit(Ok(exit), 0, &io) {
            ExitAction::Stop(reason) => reason,
            other => panic!("expected a stop, got {other:?}"),
        };
        assert_eq!(stop(VcpuExit::Hlt), ExitReason::Hlt);
        assert_eq!(stop(VcpuExit::Shutdown), ExitReason::Shutdown);
        assert_eq!(stop(VcpuExit::SystemEvent(2, &[])), ExitReason::Reset);
        assert_eq!(stop(VcpuExit::SystemEvent(1, &[])), ExitReason::PowerOff);
        assert_eq!(stop(VcpuExit::SystemEvent(3, &[])), ExitReason::Crash);
        assert_eq!(stop(VcpuExit::FailEntry(0x21, 1)), ExitReason::FailEntry { reason: 0x21, cpu: 1 });
        assert!(matches!(stop(VcpuExit::Nmi), ExitReason::VmmError(m) if m.contains("Nmi")));
        assert_eq!(handle_exit(Ok(VcpuExit::InternalError), 0, &io), ExitAction::InternalError);
        assert!(io.0.borrow().is_empty());
    }

    #[test]
    fn debug_exits_stop_the_vcpu_with_the_event() {
        use crate::vstate::debug::DebugKind;
        use kvm_bindings::kvm_debug_exit_arch;
        let io = Recorder::default();
        let debug = |exception, pc, dr6| match handle_exit(
            Ok(VcpuExit::Debug(kvm_debug_exit_arch { exception, pad: 0, pc, dr6, dr7: 0x400 })),
            0,
            &io,
        ) {
            ExitAction::Stop(ExitReason::Debug(event)) => event,
            other => panic!("expected a debug stop, got {other:?}"),
        };
        assert_eq!(debug(1, 0x1002, 0xffff_4ff0), DebugEvent { kind: DebugKind::Step, pc: 0x1002, dr6: 0xffff_4ff0 });
        assert_eq!(debug(1, 0x1010, 0xffff_0ff1).kind, DebugKind::Hardware(0));
        assert_eq!(debug(1, 0x1010, 0xffff_0ff8).kind, DebugKind::Hardware(3));
        assert_eq!(debug(3, 0x1020, 0).kind, DebugKind::Software);
        assert!(ExitReason::Debug(debug(1, 0, 0)).ends_run());
        assert_eq!(ExitReason::Debug(debug(1, 0, 0)).name(), "debug");
    }

    #[test]
    fn run_errors_interrupt_or_stop() {
        let io = Recorder::default();
        assert_eq!(handle_exit(Err(errno::Error::new(libc::EINTR)), 0, &io), ExitAction::Interrupted);
        assert_eq!(handle_exit(Err(errno::Error::new(libc::EAGAIN)), 0, &io), ExitAction::Interrupted);
        assert!(matches!(
            handle_exit(Err(errno::Error::new(libc::EFAULT)), 0, &io),
            ExitAction::Stop(ExitReason::VmmError(m)) if m.starts_with("KVM_RUN failed")
        ));
    }

    #[test]
    fn run_ending_reasons() {
        assert!(!ExitReason::Hlt.ends_run());
        assert!(!ExitReason::Stopped.ends_run());
        assert!(ExitReason::Shutdown.ends_run());
        assert!(ExitReason::Timeout.ends_run());
    }

    #[test]
    fn emulation_failures_carry_the_instruction() {
        // `lock cmpxchg16b [rdi]`: f0 48 0f c7 0f, as KVM packs it (length byte first).
        let packed = u64::from_le_bytes([5, 0xf0, 0x48, 0x0f, 0xc7, 0x0f, 0x90, 0x90]);
        let error = InternalError::new(1, vec![1, packed, 0x9090_9090_9090_9090, 0]);
        assert_eq!(error.instruction, [0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        assert!(InternalError::new(1, vec![0, packed, 0]).instruction.is_empty());
        assert!(InternalError::new(3, vec![1, packed, 0]).instruction.is_empty());
        assert!(ExitReason::InternalError(error).to_string().contains("f0, 48, 0f, c7, 0f"));
    }
}
