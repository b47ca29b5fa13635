//! The initramfs writer of the core, for building guest root filesystems from Python.

use kvmkit_core::boot::initramfs::{self, InitramfsError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::convert::Unsigned;
use crate::error::config_error;

/// A newc cpio archive being built; `finish()` returns its bytes and ends the builder.
#[pyclass(module = "kvmkit._core")]
pub struct Initramfs(Option<initramfs::Initramfs>);

#[pymethods]
impl Initramfs {
    #[new]
    fn new() -> Self {
        Self(Some(initramfs::Initramfs::new()))
    }

    // The text signatures show Python the plain defaults, not the wrapper they are given in.
    #[pyo3(signature = (path, mode=Unsigned(0o755)), text_signature = "($self, path, mode=0o755)")]
    fn add_dir(&mut self, path: &str, mode: Unsigned<u32>) -> PyResult<()> {
        self.builder()?.add_dir(path, mode.0).map_err(to_py)
    }

    #[pyo3(signature = (path, data, mode=Unsigned(0o644)), text_signature = "($self, path, data, mode=0o644)")]
    fn add_file(&mut self, path: &str, data: PyBackedBytes, mode: Unsigned<u32>) -> PyResult<()> {
        self.builder()?.add_file(path, &data, mode.0).map_err(to_py)
    }

    fn add_symlink(&mut self, path: &str, target: &str) -> PyResult<()> {
        self.builder()?.add_symlink(path, target).map_err(to_py)
    }

    #[pyo3(signature = (path, major, minor, mode=Unsigned(0o600)), text_signature = "($self, path, major, minor, mode=0o600)")]
    fn add_char_device(
        &mut self,
        path: &str,
        major: Unsigned<u32>,
        minor: Unsigned<u32>,
        mode: Unsigned<u32>,
    ) -> PyResult<()> {
        self.builder()?.add_char_device(path, major.0, minor.0, mode.0).map_err(to_py)
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let archive = self.0.take().ok_or_else(finished)?;
        Ok(PyBytes::new(py, &archive.finish()))
    }
}

impl Initramfs {
    /// The builder, unless `finish()` already consumed it.
    fn builder(&mut self) -> PyResult<&mut initramfs::Initramfs> {
        self.0.as_mut().ok_or_else(finished)
    }
}

/// The error for a call on a finished archive; each archive is written once.
fn finished() -> PyErr {
    config_error("this Initramfs was already finished; create a new one for another archive")
}

/// Every initramfs error is a bad argument: a path, mode or target.
fn to_py(error: InitramfsError) -> PyErr {
    config_error(error.to_string())
}
