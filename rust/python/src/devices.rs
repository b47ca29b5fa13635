//! The core's built-in devices, for mapping from Python.

use std::sync::Arc;

use kvmkit_core::devices;
use kvmkit_core::BusDevice;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::error::config_error;

/// Reads as zero, drops writes, counts both.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct NullDevice(Arc<devices::NullDevice>);

#[pymethods]
impl NullDevice {
    #[new]
    fn new() -> Self {
        Self(Arc::default())
    }

    #[getter]
    fn reads(&self) -> u64 {
        self.0.counters.reads()
    }

    #[getter]
    fn writes(&self) -> u64 {
        self.0.counters.writes()
    }
}

/// Byte registers that read back what was written.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct Scratchpad(Arc<devices::Scratchpad>);

#[pymethods]
impl Scratchpad {
    #[new]
    fn new(size: usize) -> PyResult<Self> {
        if size == 0 {
            return Err(config_error("a scratchpad needs at least one byte"));
        }
        Ok(Self(Arc::new(devices::Scratchpad::new(size))))
    }

    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.contents())
    }

    fn fill(&self, offset: usize, data: Vec<u8>) -> PyResult<()> {
        self.0.fill(offset, &data).map_err(|e| config_error(e.0))
    }

    #[getter]
    fn reads(&self) -> u64 {
        self.0.counters.reads()
    }

    #[getter]
    fn writes(&self) -> u64 {
        self.0.counters.writes()
    }
}

/// The bus device behind a Python device object.
pub fn bus_device(device: &Bound<'_, PyAny>) -> PyResult<Arc<dyn BusDevice>> {
    if let Ok(null) = device.cast::<NullDevice>() {
        return Ok(null.get().0.clone());
    }
    if let Ok(pad) = device.cast::<Scratchpad>() {
        return Ok(pad.get().0.clone());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "expected a kvmkit device (NullDevice or Scratchpad), got {}",
        device.get_type().name()?
    )))
}
