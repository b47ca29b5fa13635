//! `kvmkit._core`: the Python face of `kvmkit-core`. Wrappers only; the behaviour lives in the
//! core crate, and the Python package `kvmkit` builds its API on these classes.

mod convert;
mod devices;
mod error;
mod gdb;
mod handler;
mod initramfs;
mod logging;
mod memory_view;
mod snapshot;
mod virtio;
mod vm;

use pyo3::prelude::*;

/// Parses a size such as "64M" into bytes.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    use error::IntoPyResult;
    kvmkit_core::size::parse_size(text).map_err(kvmkit_core::Error::from).py()
}

/// The RAM regions of a guest with `size` bytes: below the MMIO gap, then from 4 GiB on.
#[pyfunction]
fn ram_regions(size: convert::Unsigned<u64>) -> Vec<(u64, u64)> {
    let size = size.0;
    kvmkit_core::arch::x86_64::layout::ram_regions(size)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(ram_regions, m)?)?;
    m.add("DEFAULT_STACK", kvmkit_core::arch::x86_64::layout::DEFAULT_STACK)?;
    m.add("DEFAULT_STACK_SIZE", kvmkit_core::arch::x86_64::layout::DEFAULT_STACK_SIZE)?;
    m.add("EXCEPTION_PORT", kvmkit_core::arch::x86_64::exceptions::FAULT_PORT)?;
    m.add_class::<vm::Vm>()?;
    m.add_class::<gdb::GdbServer>()?;
    m.add_class::<devices::Device>()?;
    m.add_class::<devices::NullDevice>()?;
    m.add_class::<devices::Scratchpad>()?;
    m.add("GuestMemoryView", memory_view::view_type(m.py())?)?;
    m.add_class::<snapshot::Snapshot>()?;
    m.add_class::<snapshot::VcpuContext>()?;
    m.add_class::<initramfs::Initramfs>()?;
    m.add_class::<virtio::VirtioBackend>()?;
    m.add_class::<virtio::VirtioHandle>()?;
    m.add_function(wrap_pyfunction!(virtio::virtio_rng, m)?)?;
    m.add_function(wrap_pyfunction!(virtio::virtio_block, m)?)?;
    m.add_function(wrap_pyfunction!(virtio::virtio_net, m)?)?;
    m.add_function(wrap_pyfunction!(virtio::virtio_vsock, m)?)?;
    Ok(())
}
