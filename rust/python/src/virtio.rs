//! virtio devices from Python: a back end is built on its own (opening files, taps, sockets, so
//! that errors surface where the user names them), then attached to a VM with `Vm.add_virtio`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvmkit_core::devices::virtio::{self, SharedDevice};
use kvmkit_core::machine::VirtioSlot;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{DeviceError, VmStateError};

/// A virtio device model, not attached to a VM yet.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct VirtioBackend {
    kind: &'static str,
    device: Mutex<Option<SharedDevice>>,
}

impl VirtioBackend {
    fn new(kind: &'static str, device: SharedDevice) -> Self {
        Self { kind, device: Mutex::new(Some(device)) }
    }

    /// Takes the model out to attach it; a model attaches to one VM only.
    pub fn take(&self) -> PyResult<(&'static str, SharedDevice)> {
        let mut device = self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let device = device.take().ok_or_else(|| VmStateError::new_err("this device is already attached to a VM"))?;
        Ok((self.kind, device))
    }
}

#[pymethods]
impl VirtioBackend {
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }
}

/// An entropy device fed by the host's getrandom.
#[pyfunction]
pub fn virtio_rng() -> VirtioBackend {
    VirtioBackend::new("rng", Arc::new(Mutex::new(virtio::Rng::new())))
}

/// A block device on a raw image file.
#[pyfunction]
#[pyo3(signature = (path, read_only=false, id=None))]
pub fn virtio_block(path: PathBuf, read_only: bool, id: Option<&str>) -> PyResult<VirtioBackend> {
    let block = match id {
        Some(id) => virtio::Block::with_id(&path, read_only, id),
        None => virtio::Block::new(&path, read_only),
    };
    Ok(VirtioBackend::new("block", Arc::new(Mutex::new(block.map_err(device_error)?))))
}

fn device_error(error: impl std::fmt::Display) -> PyErr {
    DeviceError::new_err(error.to_string())
}

/// A virtio device attached to a VM: where it sits and its counters.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct VirtioHandle {
    kind: &'static str,
    slot: VirtioSlot,
}

impl VirtioHandle {
    /// The handle of a device attached in `slot`.
    pub fn new(kind: &'static str, slot: VirtioSlot) -> Self {
        Self { kind, slot }
    }
}

#[pymethods]
impl VirtioHandle {
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    #[getter]
    fn address(&self) -> u64 {
        self.slot.base
    }

    #[getter]
    fn size(&self) -> u64 {
        self.slot.size
    }

    #[getter]
    fn irq(&self) -> u32 {
        self.slot.gsi
    }

    /// The device's counters now.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let now = self.slot.counters.snapshot();
        let stats = PyDict::new(py);
        stats.set_item("requests", now.requests)?;
        stats.set_item("bytes_to_guest", now.bytes_to_guest)?;
        stats.set_item("bytes_from_guest", now.bytes_from_guest)?;
        stats.set_item("errors", now.errors)?;
        stats.set_item("interrupts", now.interrupts)?;
        stats.set_item("notifications", now.notifications)?;
        Ok(stats)
    }
}
