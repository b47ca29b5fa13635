//! Core errors become the exceptions of `kvmkit.errors`.

use kvmkit_core::bus::BusError;
use kvmkit_core::devices::VmGenIdError;
use kvmkit_core::snapshot::SnapshotError as CoreSnapshotError;
use kvmkit_core::vstate::memory::{ImageError, MemoryError};
use kvmkit_core::Error;
use pyo3::prelude::*;

pyo3::import_exception!(kvmkit.errors, KvmkitError);
pyo3::import_exception!(kvmkit.errors, KvmUnavailableError);
pyo3::import_exception!(kvmkit.errors, KvmCapabilityError);
pyo3::import_exception!(kvmkit.errors, KvmError);
pyo3::import_exception!(kvmkit.errors, ConfigError);
pyo3::import_exception!(kvmkit.errors, IoRangeConflictError);
pyo3::import_exception!(kvmkit.errors, GuestMemoryError);
pyo3::import_exception!(kvmkit.errors, VmStateError);
pyo3::import_exception!(kvmkit.errors, BootError);
pyo3::import_exception!(kvmkit.errors, DeviceError);
pyo3::import_exception!(kvmkit.errors, ImageLockedError);
pyo3::import_exception!(kvmkit.errors, SnapshotError);
pyo3::import_exception!(kvmkit.errors, SnapshotFormatError);
pyo3::import_exception!(kvmkit.errors, SnapshotVersionError);
pyo3::import_exception!(kvmkit.errors, SnapshotMismatchError);

/// The exception for a core error.
pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::KvmUnavailable(_) => KvmUnavailableError::new_err(message),
        Error::KvmApiVersion(_) | Error::MissingCapability(_) => KvmCapabilityError::new_err(message),
        Error::Kvm { source, .. } => KvmError::new_err((source.errno(), message)),
        Error::Memory(MemoryError::OutOfRange { .. }) => GuestMemoryError::new_err(message),
        Error::Bus(BusError::Overlap { .. }) => IoRangeConflictError::new_err(message),
        Error::InvalidConfig(_)
        | Error::Size(_)
        | Error::Mode(_)
        | Error::Memory(_)
        | Error::Bus(_)
        | Error::NoSuchVcpu { .. } => ConfigError::new_err(message),
        // The Linux platform's generation id needs guest memory at its fixed place.
        Error::Boot(_) | Error::VmGenId(VmGenIdError::Memory(_)) => BootError::new_err(message),
        Error::Running | Error::NotServing { .. } | Error::NotStarted | Error::WaitInRun => {
            VmStateError::new_err(message)
        }
        Error::Thread(_) | Error::DeviceSetup(_) | Error::VmGenId(_) => KvmkitError::new_err(message),
        Error::Snapshot(error) => snapshot_error(error, message),
    }
}

fn snapshot_error(error: CoreSnapshotError, message: String) -> PyErr {
    match error {
        CoreSnapshotError::Version { .. } => SnapshotVersionError::new_err(message),
        CoreSnapshotError::NotASnapshot { .. }
        | CoreSnapshotError::Corrupt { .. }
        | CoreSnapshotError::Memory(ImageError::WrongSize { .. }) => SnapshotFormatError::new_err(message),
        CoreSnapshotError::Mismatch(_)
        | CoreSnapshotError::DeviceState(_)
        | CoreSnapshotError::Memory(ImageError::Layout { .. }) => SnapshotMismatchError::new_err(message),
        CoreSnapshotError::Io { .. } | CoreSnapshotError::Memory(_) => SnapshotError::new_err(message),
    }
}

/// `.py()` turns a core result into a Python one.
pub trait IntoPyResult<T> {
    /// Maps the error with [`to_py`].
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// A configuration error raised from the bindings themselves.
pub fn config_error(message: impl Into<String>) -> PyErr {
    ConfigError::new_err(message.into())
}
