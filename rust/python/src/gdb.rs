//! `_core.GdbServer`: a gdb server serving a VM, from `Vm.serve_gdb`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvmkit_core::gdb::{BreakpointMode, GdbServer as CoreServer};
use kvmkit_core::Machine;
use pyo3::prelude::*;

use crate::error::{config_error, IntoPyResult};

/// How often a waiting caller checks for signals such as Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

#[pyclass(frozen, module = "kvmkit._core")]
pub struct GdbServer {
    server: Mutex<Option<CoreServer>>,
    address: (String, u16),
}

/// Starts a server for `machine` on `address`; with `wait`, returns once a client has attached.
pub fn serve(
    py: Python<'_>,
    machine: Arc<Machine>,
    address: &str,
    wait: bool,
    breakpoints: &str,
    reverse: bool,
) -> PyResult<GdbServer> {
    let mode: BreakpointMode = breakpoints.parse().py()?;
    let server = py.detach(|| CoreServer::start(machine, address, mode, reverse)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            config_error(format!("cannot serve gdb on {address:?}: {e}"))
        } else {
            PyErr::from(e)
        }
    })?;
    let local = server.local_addr();
    let server = GdbServer { server: Mutex::new(Some(server)), address: (local.ip().to_string(), local.port()) };
    if wait && !server.wait_for(py, None, true)? {
        return Err(crate::error::VmStateError::new_err("the gdb server closed before a client attached"));
    }
    Ok(server)
}

impl GdbServer {
    fn lock(&self) -> MutexGuard<'_, Option<CoreServer>> {
        self.server.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a client is attached (`attached`) or none is, at most `timeout` seconds,
    /// letting Ctrl-C through; whether it happened.
    fn wait_for(&self, py: Python<'_>, timeout: Option<f64>, attached: bool) -> PyResult<bool> {
        let timeout = match timeout {
            Some(t) if t.is_nan() || t < 0.0 => return Err(config_error(format!("timeout must be >= 0, not {t}"))),
            Some(t) => Duration::try_from_secs_f64(t).ok(),
            None => None,
        };
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let slice = deadline.map_or(SIGNAL_POLL, |d| d.saturating_duration_since(Instant::now()).min(SIGNAL_POLL));
            let done = py.detach(|| {
                let server = self.lock();
                let server = server.as_ref()?;
                Some(if attached { server.wait_attached(Some(slice)) } else { server.wait_detached(Some(slice)) })
            });
            match done {
                None => return Ok(!attached),
                Some(true) => return Ok(true),
                Some(false) => {}
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }
}

#[pymethods]
impl GdbServer {
    /// `(host, port)` the server listens on.
    #[getter]
    fn address(&self) -> (String, u16) {
        self.address.clone()
    }

    /// Whether a gdb client is attached.
    #[getter]
    fn attached(&self) -> bool {
        self.lock().as_ref().is_some_and(CoreServer::is_attached)
    }

    /// How many clients have attached so far.
    #[getter]
    fn sessions(&self) -> u64 {
        self.lock().as_ref().map_or(0, CoreServer::sessions)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.lock().is_none()
    }

    /// Waits for a client to attach; False after `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn wait_attached(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.wait_for(py, timeout, true)
    }

    /// Waits until no client is attached; False after `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn wait_detached(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.wait_for(py, timeout, false)
    }

    /// Stops serving; an attached client is cut off (its session ends as a disconnect does).
    fn close(&self, py: Python<'_>) {
        let server = self.lock().take();
        // Joining the server thread may wait for vCPUs that need the GIL for a handler.
        py.detach(move || drop(server));
    }
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        let server = self.lock().take();
        if server.is_some() {
            Python::attach(|py| py.detach(move || drop(server)));
        }
    }
}
