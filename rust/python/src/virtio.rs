//! virtio devices from Python: a back end is built on its own (opening files, taps, sockets, so
//! that errors surface where the user names them), then attached to a VM with `Vm.add_virtio`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvmkit_core::devices::virtio::{self, SharedDevice};
use kvmkit_core::machine::VirtioSlot;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{config_error, DeviceError, ImageLockedError, VmStateError};

/// A virtio device model, not attached to a VM yet.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct VirtioBackend {
    kind: &'static str,
    device: Mutex<Option<SharedDevice>>,
    /// What the model settled on that the user did not say (a generated MAC, the tap's name).
    details: Details,
}

type Details = Vec<(&'static str, String)>;

impl VirtioBackend {
    fn new(kind: &'static str, device: SharedDevice, details: Details) -> Self {
        Self { kind, device: Mutex::new(Some(device)), details }
    }

    /// Takes the model out to attach it; a model attaches to one VM only.
    pub fn take(&self) -> PyResult<(&'static str, SharedDevice, Details)> {
        let mut device = self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let device = device.take().ok_or_else(|| VmStateError::new_err("this device is already attached to a VM"))?;
        Ok((self.kind, device, self.details.clone()))
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
    VirtioBackend::new("rng", Arc::new(Mutex::new(virtio::Rng::new())), Vec::new())
}

/// A block device on a raw image file, which it locks unless `lock` is false.
#[pyfunction]
#[pyo3(signature = (path, read_only=false, id=None, lock=true))]
pub fn virtio_block(path: PathBuf, read_only: bool, id: Option<&str>, lock: bool) -> PyResult<VirtioBackend> {
    let block = virtio::Block::open(&path, read_only, id, lock).map_err(|e| match e {
        virtio::BlockError::Locked { .. } => ImageLockedError::new_err(e.to_string()),
        e => device_error(e),
    })?;
    Ok(VirtioBackend::new("block", Arc::new(Mutex::new(block)), Vec::new()))
}

/// A network card on the tap `tap` (opened, or created when this process may), or with no back
/// end and its link down when `tap` is None, with `mac` or a generated locally administered
/// address.
#[pyfunction]
#[pyo3(signature = (tap, mac=None))]
pub fn virtio_net(tap: Option<&str>, mac: Option<&str>) -> PyResult<VirtioBackend> {
    let mac = mac.map(parse_mac).transpose()?;
    let (net, mut details) = match tap {
        Some(tap) => {
            let tap = virtio::Tap::open(tap).map_err(device_error)?;
            let name = tap.name().to_string();
            (virtio::Net::new(tap, mac), vec![("tap", name)])
        }
        None => (virtio::Net::unplugged(mac), Vec::new()),
    };
    details.push(("mac", net.mac().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")));
    Ok(VirtioBackend::new("net", Arc::new(Mutex::new(net)), details))
}

/// A vsock device for the guest context id `cid`; the host side is the Unix socket `uds_path`.
#[pyfunction]
pub fn virtio_vsock(cid: crate::convert::Unsigned<u64>, uds_path: PathBuf) -> PyResult<VirtioBackend> {
    let cid = cid.0;
    let vsock = virtio::Vsock::new(cid, &uds_path).map_err(device_error)?;
    Ok(VirtioBackend::new("vsock", Arc::new(Mutex::new(vsock)), Vec::new()))
}

fn parse_mac(text: &str) -> PyResult<[u8; 6]> {
    let bad = || config_error(format!("{text:?} is not a MAC address such as 52:54:00:12:34:56"));
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| if b.len() == 2 { u8::from_str_radix(b, 16).ok() } else { None })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(config_error(format!("{text} is a multicast address; a network card needs a unicast one")));
    }
    Ok(mac)
}

fn device_error(error: impl std::fmt::Display) -> PyErr {
    DeviceError::new_err(error.to_string())
}

/// A virtio device attached to a VM: where it sits and its counters.
#[pyclass(frozen, module = "kvmkit._core")]
pub struct VirtioHandle {
    kind: &'static str,
    slot: VirtioSlot,
    details: Details,
}

impl VirtioHandle {
    /// The handle of a device attached in `slot`.
    pub fn new(kind: &'static str, slot: VirtioSlot, details: Details) -> Self {
        Self { kind, slot, details }
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

    /// What the device settled on: a network card's `mac` and its `tap`, if it has one.
    fn details(&self) -> Vec<(&'static str, String)> {
        self.details.clone()
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
