//! The core's built-in devices, for mapping from Python.

use std::sync::Arc;

use kvmkit_core::devices::{self, CountedDevice};
use kvmkit_core::BusDevice;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::Unsigned;
use crate::error::{config_error, IntoPyResult};

/// A Rust device that can be mapped on a bus; counts its accesses.
#[pyclass(frozen, subclass, module = "kvmkit._core")]
pub struct Device(Arc<dyn CountedDevice>);

#[pymethods]
impl Device {
    #[getter]
    fn reads(&self) -> u64 {
        self.0.counters().reads()
    }

    #[getter]
    fn writes(&self) -> u64 {
        self.0.counters().writes()
    }
}

/// Reads as zero, drops writes.
#[pyclass(frozen, extends = Device, module = "kvmkit._core")]
pub struct NullDevice;

#[pymethods]
impl NullDevice {
    #[new]
    fn new() -> PyClassInitializer<Self> {
        PyClassInitializer::from(Device(Arc::new(devices::NullDevice::default()))).add_subclass(Self)
    }
}

/// Byte registers that read back what was written: 1 byte to 16 MiB of them.
#[pyclass(frozen, extends = Device, module = "kvmkit._core")]
pub struct Scratchpad(Arc<devices::Scratchpad>);

#[pymethods]
impl Scratchpad {
    #[new]
    fn new(size: Unsigned<usize>) -> PyResult<PyClassInitializer<Self>> {
        let pad = Arc::new(devices::Scratchpad::new(size.0).py()?);
        Ok(PyClassInitializer::from(Device(pad.clone())).add_subclass(Self(pad)))
    }

    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.contents())
    }

    fn fill(&self, offset: Unsigned<usize>, data: Vec<u8>) -> PyResult<()> {
        self.0.fill(offset.0, &data).map_err(|e| config_error(e.to_string()))
    }
}

/// The bus device behind a Python device object.
pub fn bus_device(device: &Bound<'_, PyAny>) -> PyResult<Arc<dyn BusDevice>> {
    match device.cast::<Device>() {
        Ok(device) => Ok(device.get().0.clone()),
        Err(_) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "expected a device from kvmkit.devices, got {}",
            device.get_type().name()?
        ))),
    }
}
