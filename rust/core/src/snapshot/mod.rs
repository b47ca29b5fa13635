//! Saving and restoring a VM's state: the [`Persist`] trait every stateful device implements
//! beside its own code, and the error a restore reports.
//!
//! A device's state is plain data (`serde`), so that the state tree of a whole VM can be kept in
//! memory for an in-place reset or a fork, and written to a versioned, self-describing file.
//! Restoring always happens into a device that already exists, built from the same configuration
//! as the one saved (in another process, the configuration is rebuilt first): what cannot be
//! serialized (guest memory, eventfds, files) comes from that device, not from the state.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Why a saved state cannot be put back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct StateError(pub String);

impl StateError {
    /// An error with `message`, which says what is wrong with the state.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A part of a VM that saves and restores its own state.
///
/// Devices are shared between vCPU threads and take `&self`; both calls happen while the VM is
/// paused or stopped, so no guest access races with them.
pub trait Persist {
    /// The state as plain data.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync + 'static;

    /// Captures the state.
    fn save(&self) -> Self::State;

    /// Puts the state back; on error the device is left as it was, or reset.
    fn restore(&self, state: &Self::State) -> Result<(), StateError>;
}

mod file;

pub use file::FORMAT_VERSION;

use crate::devices;
use crate::vstate::exit::AddressSpace;
use crate::vstate::memory::{ImageError, MemoryImage};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;
use crate::MachineConfig;

/// Why a snapshot cannot be taken, saved, read or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Memory could not be captured, written, mapped or restored.
    #[error(transparent)]
    Memory(#[from] ImageError),
    /// A snapshot's file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the host said.
        source: std::io::Error,
    },
    /// A file is not a kvmkit snapshot at all.
    #[error("{path} is not a kvmkit snapshot state file")]
    NotASnapshot {
        /// The file.
        path: String,
    },
    /// A state file of a format version this kvmkit does not read.
    #[error("{path} is a snapshot of format version {found}; this kvmkit reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// A state file that is cut short or whose content does not match its checksum.
    #[error("snapshot state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot is of a VM of another shape than the one it is restored into.
    #[error("{0}")]
    Mismatch(String),
    /// A device refused its saved state.
    #[error("{0}")]
    DeviceState(String),
}

/// Where a device sits and the state it saved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedDevice {
    /// Ports or MMIO.
    pub space: AddressSpace,
    /// First address of its range.
    pub base: u64,
    /// Size of its range.
    pub len: u64,
    /// What it saved.
    pub state: DeviceState,
}

/// The state of a whole VM except its memory: plain data, written to a snapshot's state file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// The configuration the VM was built from (a restore needs one of the same shape).
    pub config: MachineConfig,
    /// The VM's KVM state: interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Each vCPU's state, by index.
    pub vcpus: Vec<VcpuState>,
    /// Every device that keeps state, by place.
    pub devices: Vec<SavedDevice>,
}

/// A VM frozen at one point: its state and its memory. Cheap to keep in memory and to restore
/// many times (see [`MemoryImage`]), and written to files with [`save`](Self::save).
#[derive(Debug, Clone)]
pub struct MachineSnapshot {
    /// Everything but memory.
    pub state: MachineState,
    /// Memory.
    pub memory: MemoryImage,
}

/// Declares [`DeviceState`] with one variant per kind of device that keeps state, and ties each
/// device's own state type to its variant.
macro_rules! device_states {
    ($($(#[$doc:meta])* $variant:ident($state:ty) = $kind:literal,)*) => {
        /// The saved state of one device, tagged with its kind.
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "kind", content = "state")]
        pub enum DeviceState {
            $($(#[$doc])* #[serde(rename = $kind)] $variant($state),)*
        }

        impl DeviceState {
            /// The kind of device, as the state file names it.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $kind,)*
                }
            }
        }

        $(
            impl DeviceStateOf for $state {
                fn wrap(self) -> DeviceState {
                    DeviceState::$variant(self)
                }

                fn unwrap(state: &DeviceState) -> Option<&Self> {
                    match state {
                        DeviceState::$variant(state) => Some(state),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*
    };
}

device_states! {
    /// COM1.
    Serial(devices::SerialPortState) = "serial",
    /// The i8042 controller.
    I8042(devices::I8042State) = "i8042",
    /// The CMOS RTC and NVRAM.
    Cmos(devices::CmosState) = "cmos",
    /// The ACPI sleep control register.
    AcpiSleep(devices::AcpiSleepControlState) = "acpi_sleep",
    /// The boot timer.
    BootTimer(devices::BootTimerState) = "boot_timer",
    /// A scratchpad.
    Scratchpad(devices::ScratchpadState) = "scratchpad",
    /// A virtio device with its MMIO transport.
    Virtio(devices::virtio::TransportState) = "virtio_mmio",
}

/// A device's own state type, as one variant of [`DeviceState`].
pub trait DeviceStateOf: Sized {
    /// The variant holding this state.
    fn wrap(self) -> DeviceState;
    /// This state, if `state` is its variant.
    fn unwrap(state: &DeviceState) -> Option<&Self>;
}

/// [`BusDevice::save_state`](crate::BusDevice::save_state) of a device that implements [`Persist`].
pub fn save_device<D: Persist>(device: &D) -> Option<DeviceState>
where
    D::State: DeviceStateOf,
{
    Some(device.save().wrap())
}

/// [`BusDevice::restore_state`](crate::BusDevice::restore_state) of a device that implements
/// [`Persist`]: refuses the state of another kind of device.
pub fn restore_device<D: Persist>(device: &D, state: &DeviceState) -> Result<(), StateError>
where
    D::State: DeviceStateOf,
{
    match D::State::unwrap(state) {
        Some(own) => device.restore(own),
        None => Err(StateError::new(format!("a saved {} does not fit this device", state.kind()))),
    }
}

/// The two [`BusDevice`](crate::BusDevice) methods of a device that implements [`Persist`].
#[macro_export]
macro_rules! persist_on_bus {
    () => {
        fn save_state(&self) -> Option<$crate::snapshot::DeviceState> {
            $crate::snapshot::save_device(self)
        }

        fn restore_state(&self, state: &$crate::snapshot::DeviceState) -> Result<(), $crate::snapshot::StateError> {
            $crate::snapshot::restore_device(self, state)
        }
    };
}
