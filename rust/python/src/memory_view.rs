//! Zero-copy access to guest memory through Python's buffer protocol.

use std::ffi::c_int;
use std::sync::Arc;

use kvmkit_core::vstate::memory::GuestMemory;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// A window on guest memory inside one region. It keeps the memory mapped while it (or a
/// memoryview made from it) exists, even after the VM is closed.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct GuestMemoryView {
    _memory: Arc<GuestMemory>,
    host: usize,
    len: usize,
    /// While it lives, snapshots count the view's pages as written (Python writes them directly).
    _loan: Arc<()>,
}

impl GuestMemoryView {
    /// A view of `len` bytes at host address `host`, inside `memory`, lent under `loan`.
    pub fn new(memory: Arc<GuestMemory>, host: *mut u8, len: usize, loan: Arc<()>) -> Self {
        Self { _memory: memory, host: host as usize, len, _loan: loan }
    }
}

#[pymethods]
impl GuestMemoryView {
    fn __len__(&self) -> usize {
        self.len
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: `host..host + len` lies in one region of guest memory, which `_memory` keeps
        // mapped for as long as this object lives, and the buffer holds a reference to this object
        // (`obj`). The memory is shared with the guest, so it is writable and may change.
        let status = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.host as *mut std::ffi::c_void,
                this.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if status == 0 {
            Ok(())
        } else {
            Err(PyErr::take(slf.py()).unwrap_or_else(|| PyBufferError::new_err("cannot export guest memory")))
        }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
