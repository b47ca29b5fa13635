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
