//! Python callables as a bus device. The vCPU thread takes the GIL only for these exits.

use std::sync::{Arc, Mutex};

use kvmkit_core::{BusDevice, DeviceError};
use pyo3::exceptions::{PyBaseException, PyTypeError, PyValueError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyInt};
use pyo3::PyTraverseError;

/// The first exception a handler of a VM raised, kept for the thread that waits on the VM. Kept
/// as the exception object, which the VM shows the garbage collector: its traceback often leads
/// back to the VM.
#[derive(Clone, Default)]
pub struct ErrorSlot(Arc<Mutex<Option<Py<PyBaseException>>>>);

impl ErrorSlot {
    fn keep(&self, py: Python<'_>, error: PyErr) {
        let value = error.into_value(py);
        let mut slot = self.lock();
        let unused = if slot.is_none() { slot.replace(value) } else { Some(value) };
        drop(slot);
        drop(unused); // outside the lock: freeing an exception can run Python code
    }

    /// Takes the kept exception, if any.
    pub fn take(&self, py: Python<'_>) -> Option<PyErr> {
        let value = self.lock().take()?;
        Some(PyErr::from_value(value.into_bound(py).into_any()))
    }

    /// Visits the kept exception; never blocks (a slot in use is skipped).
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self.0.try_lock() {
            Ok(slot) => visit.call(&*slot),
            Err(_) => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Py<PyBaseException>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `read(addr, size) -> int | bytes` and `write(addr, data: bytes)`; a missing one acts like an
/// empty bus (reads all ones, writes dropped).
pub struct PyHandler {
    pub read: Option<Py<PyAny>>,
    pub write: Option<Py<PyAny>>,
    pub errors: ErrorSlot,
}

impl PyHandler {
    fn fail(&self, error: PyErr) -> DeviceError {
        let message = Python::attach(|py| {
            let message = match error.value(py).str() {
                Ok(text) => {
                    format!("{}: {}", error.get_type(py).name().map(|n| n.to_string()).unwrap_or_default(), text)
                }
                Err(_) => "a Python handler raised".to_owned(),
            };
            self.errors.keep(py, error);
            message
        });
        DeviceError::Failed(message)
    }
}

impl BusDevice for PyHandler {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let Some(read) = &self.read else {
            data.fill(0xff);
            return Ok(());
        };
        let addr = base + offset;
        Python::attach(|py| {
            let value = read.call1(py, (addr, data.len()))?;
            fill(value.bind(py), addr, data)
        })
        .map_err(|e| self.fail(e))
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let Some(write) = &self.write else { return Ok(()) };
        Python::attach(|py| write.call1(py, (base + offset, PyBytes::new(py, data))).map(drop))
            .map_err(|e| self.fail(e))
    }
}

/// Puts a read handler's result into `data`: an int that fits the access (negative ones in two's
/// complement), or exactly `data.len()` bytes.
fn fill(value: &Bound<'_, PyAny>, addr: u64, data: &mut [u8]) -> PyResult<()> {
    let size = data.len();
    if let Ok(int) = value.cast::<PyInt>() {
        let raw: i128 = int.extract().map_err(|_| out_of_range(value, addr, size))?;
        // Bits the value needs as an unsigned number, or as a signed one with its sign bit.
        let needed = if raw < 0 { 129 - (!raw).leading_zeros() } else { 128 - raw.leading_zeros() };
        if u64::from(needed) > 8 * size as u64 {
            return Err(out_of_range(value, addr, size));
        }
        let (bytes, extension) = (raw.to_le_bytes(), if raw < 0 { 0xff } else { 0 });
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(extension);
        }
        return Ok(());
    }
    let bytes: Vec<u8> = if value.is_instance_of::<PyBytes>() || value.is_instance_of::<PyByteArray>() {
        value.extract()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "read handler for {addr:#x} returned {}, expected int or bytes",
            value.get_type().name()?
        )));
    };
    if bytes.len() != size {
        return Err(PyValueError::new_err(format!(
            "read handler for {addr:#x} returned {} bytes for a {size}-byte access",
            bytes.len()
        )));
    }
    data.copy_from_slice(&bytes);
    Ok(())
}

fn out_of_range(value: &Bound<'_, PyAny>, addr: u64, size: usize) -> PyErr {
    PyValueError::new_err(format!(
        "read handler for {addr:#x} returned {value}, which does not fit a {size}-byte access"
    ))
}
