//! Errors of the core. Each variant says what went wrong in words a user can act on.

use thiserror::Error;

use crate::arch::x86_64::mode::ModeError;
use crate::boot::BootError;
use crate::bus::BusError;
use crate::devices::VmGenIdError;
use crate::size::SizeError;
use crate::snapshot::SnapshotError;
use crate::vstate::memory::MemoryError;

/// The result type of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong outside the guest.
#[derive(Debug, Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, the kvm module loaded, and /dev/kvm readable and writable by this user?)")]
    KvmUnavailable(#[source] std::io::Error),
    /// The kernel speaks another KVM API version.
    #[error("/dev/kvm reports API version {0}, but kvmkit needs version 12")]
    KvmApiVersion(i32),
    /// The kernel lacks a KVM capability this VM needs.
    #[error("KVM lacks the capability {0}, which kvmkit needs for this VM")]
    MissingCapability(&'static str),
    /// A KVM call failed.
    #[error("{operation} failed: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        operation: &'static str,
        /// The error the kernel returned.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("{0}")]
    InvalidConfig(String),
    /// A size string could not be parsed.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A CPU mode or entry point is unusable.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// Guest memory could not be set up or accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A device range could not be mapped or unmapped.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// There is no vCPU with this index.
    #[error("there is no vCPU {index} (the VM has {count})")]
    NoSuchVcpu {
        /// The index asked for.
        index: usize,
        /// How many vCPUs there are.
        count: usize,
    },
    /// The operation needs the VM stopped.
    #[error("the VM is running; stop it or wait for it first")]
    Running,
    /// A handler asked for the registers of another vCPU than the one whose access it serves.
    #[error(
        "while the VM runs, a handler reaches only the registers of the vCPU whose access it serves \
         (vCPU {serving}), not vCPU {index}'s"
    )]
    NotServing {
        /// The vCPU asked for.
        index: usize,
        /// The vCPU the handler serves.
        serving: u32,
    },
    /// `wait` was called on a VM that was never started.
    #[error("the VM has not been started")]
    NotStarted,
    /// `wait` was called from one of the run's own vCPU threads (a handler), which would wait for
    /// itself.
    #[error("a handler cannot wait for the run it serves (its vCPU would wait for itself); call stop() instead")]
    WaitInRun,
    /// A kernel, initrd or command line cannot be booted.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A snapshot cannot be taken, saved, read or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The host could not provide what a virtio device needs (an eventfd, its event-loop thread).
    #[error("cannot set up a virtio device: {0}")]
    DeviceSetup(#[source] std::io::Error),
    /// The VM generation id could not be written or announced.
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
}

impl Error {
    /// A failed KVM call.
    pub fn kvm(operation: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Self {
        move |source| Self::Kvm { operation, source }
    }
}
