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

/// The saved state of one device, tagged with its kind.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "state", rename_all = "snake_case")]
pub enum DeviceState {}

impl DeviceState {
    /// The kind of device, as the state file names it.
    pub fn kind(&self) -> &'static str {
        match *self {}
    }
}

/// Saves and restores a bus device through its [`Persist`] implementation, for devices whose
/// state is one [`DeviceState`] variant.
pub fn save_device<D: Persist>(device: &D, wrap: fn(D::State) -> DeviceState) -> Option<DeviceState> {
    Some(wrap(device.save()))
}

/// The counterpart of [`save_device`]: `unwrap` picks the device's own variant.
pub fn restore_device<D: Persist>(
    device: &D,
    state: &DeviceState,
    unwrap: fn(&DeviceState) -> Option<&D::State>,
) -> Result<(), StateError> {
    match unwrap(state) {
        Some(state) => device.restore(state),
        None => Err(StateError::new(format!("a saved {} does not fit this device", state.kind()))),
    }
}
