//! `_core.Snapshot`: a VM frozen at one point, kept in memory, saved to a directory, read back.

use std::path::PathBuf;
use std::sync::Arc;

use kvmkit_core::snapshot::MachineSnapshot;
use kvmkit_core::vstate::memory;
use kvmkit_core::vstate::vcpu::VcpuState;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::Unsigned;
use crate::error::{GuestMemoryError, IntoPyResult};

#[pyclass(frozen, module = "kvmkit._core")]
pub struct Snapshot {
    inner: Arc<MachineSnapshot>,
}

impl Snapshot {
    pub fn new(snapshot: MachineSnapshot) -> Self {
        Self { inner: Arc::new(snapshot) }
    }

    pub fn get(&self) -> &Arc<MachineSnapshot> {
        &self.inner
    }
}

#[pymethods]
impl Snapshot {
    /// Writes the snapshot into directory `path`, with `embedder` (JSON text) kept beside it.
    fn save(&self, py: Python<'_>, path: PathBuf, embedder: &str) -> PyResult<()> {
        let embedder: serde_json::Value =
            serde_json::from_str(embedder).map_err(|e| crate::error::config_error(e.to_string()))?;
        let snapshot = self.inner.clone();
        py.detach(|| snapshot.save(&path, &embedder)).map_err(kvmkit_core::Error::from).py()
    }

    /// Reads a snapshot saved in directory `path`: the snapshot and the embedder's JSON text.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<(Self, String)> {
        let (snapshot, embedder) = py.detach(|| MachineSnapshot::load(&path)).map_err(kvmkit_core::Error::from).py()?;
        Ok((Self::new(snapshot), embedder.to_string()))
    }

    /// The configuration of the VM the snapshot is of, as `Vm`'s constructor takes it.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let config = &self.inner.state.config;
        let dict = PyDict::new(py);
        let memory: Vec<(u64, u64)> = config.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
        dict.set_item("memory", memory)?;
        dict.set_item("vcpus", config.vcpus)?;
        dict.set_item("irqchip", config.irqchip)?;
        dict.set_item("pit", config.pit)?;
        let policy = serde_json::to_value(config.unhandled_io).ok().and_then(|v| v.as_str().map(str::to_owned));
        dict.set_item("unhandled_io", policy)?;
        Ok(dict)
    }

    /// Bytes of the snapshot's memory.
    fn mem_read<'py>(
        &self,
        py: Python<'py>,
        addr: Unsigned<u64>,
        size: Unsigned<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (addr, size) = (addr.0, size.0);
        let fits = self
            .inner
            .memory
            .regions()
            .iter()
            .any(|&(start, len)| addr >= start && (size as u64) <= len && addr - start <= len - size as u64);
        if !fits {
            let error = memory::MemoryError::OutOfRange { addr, len: size };
            return Err(GuestMemoryError::new_err(error.to_string()));
        }
        PyBytes::new_with(py, size, |buf| {
            self.inner.memory.read(addr, buf).map_err(|e| GuestMemoryError::new_err(e.to_string()))
        })
    }

    /// Bytes of memory the snapshot holds of its own (the rest it shares with its VM's memory
    /// file).
    #[getter]
    fn own_bytes(&self) -> usize {
        self.inner.memory.own_bytes()
    }
}

/// `_core.VcpuContext`: one vCPU's whole state (what a snapshot keeps of each vCPU), to put back
/// on the vCPU it came from or on the same vCPU of a VM of the same shape.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct VcpuContext {
    vcpu: usize,
    state: VcpuState,
}

impl VcpuContext {
    pub fn new(vcpu: usize, state: VcpuState) -> Self {
        Self { vcpu, state }
    }

    pub fn state(&self) -> &VcpuState {
        &self.state
    }
}

#[pymethods]
impl VcpuContext {
    /// The index of the vCPU it was taken from.
    #[getter]
    fn vcpu(&self) -> usize {
        self.vcpu
    }

    /// The general registers it holds, as `Vm.get_regs` gives them.
    #[getter]
    fn regs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        crate::convert::regs_to_dict(py, &self.state.regs)
    }
}
