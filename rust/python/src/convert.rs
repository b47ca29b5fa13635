//! Register state and exits as Python dicts: the package's dataclasses are built from these.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvmkit_core::vstate::exit::{Exit, ExitReason};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView};

use crate::error::config_error;

/// An unsigned integer argument: an int outside `T`'s range (a negative address, a size past
/// 2**64) raises `ConfigError` naming the value, where pyo3 would raise a bare `OverflowError`.
/// Other types still raise `TypeError`.
pub struct Unsigned<T>(pub T);

impl<'a, 'py, T: FromPyObject<'a, 'py>> FromPyObject<'a, 'py> for Unsigned<T> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let py = obj.py();
        obj.extract::<T>().map(Self).map_err(Into::into).map_err(|e: PyErr| {
            if e.is_instance_of::<PyOverflowError>(py) {
                config_error(format!("{} is out of range: {}", &*obj, e.value(py)))
            } else {
                e
            }
        })
    }
}

/// A bytes-like argument (bytes, bytearray, memoryview, array, a guest memory view...): its bytes,
/// as a `bytes` object. `bytes` passes as it is; other objects are read through a memoryview, which
/// the stable ABI of Python 3.9 offers where it has no buffer API of its own.
pub struct BytesLike<'py>(pub Bound<'py, PyBytes>);

impl<'py> BytesLike<'py> {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for BytesLike<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(bytes) = obj.cast::<PyBytes>() {
            return Ok(Self(bytes.to_owned()));
        }
        let view = PyMemoryView::from(&obj).map_err(|error| {
            if error.is_instance_of::<PyTypeError>(obj.py()) {
                let kind = obj.get_type().name().map_or_else(|_| "?".to_owned(), |name| name.to_string());
                PyTypeError::new_err(format!("a bytes-like object is required, not '{kind}'"))
            } else {
                error
            }
        })?;
        Ok(Self(view.call_method0("tobytes")?.cast_into::<PyBytes>()?))
    }
}

/// Generates `to_dict` / `update` functions for a struct of integer fields, each field under a
/// Python key.
macro_rules! int_fields {
    ($to:ident, $update:ident, $ty:ty, [$($field:ident as $key:literal),* $(,)?]) => {
        pub fn $to<'py>(py: Python<'py>, value: &$ty) -> PyResult<Bound<'py, PyDict>> {
            let dict = PyDict::new(py);
            $(dict.set_item($key, value.$field)?;)*
            Ok(dict)
        }

        /// Sets the fields named in `dict`; other fields keep their values. Returns the keys it did
        /// not know, for the caller to handle.
        pub fn $update(value: &mut $ty, dict: &Bound<'_, PyDict>) -> PyResult<Vec<String>> {
            let mut unknown = Vec::new();
            for (key, item) in dict.iter() {
                let key: String = key.extract()?;
                match key.as_str() {
                    $($key => value.$field = item.extract::<Unsigned<_>>()?.0,)*
                    _ => unknown.push(key),
                }
            }
            Ok(unknown)
        }
    };
}

int_fields!(regs_to_dict, update_regs_fields, kvm_regs, [
    rax as "rax", rbx as "rbx", rcx as "rcx", rdx as "rdx", rsi as "rsi", rdi as "rdi", rsp as "rsp", rbp as "rbp",
    r8 as "r8", r9 as "r9", r10 as "r10", r11 as "r11", r12 as "r12", r13 as "r13", r14 as "r14", r15 as "r15",
    rip as "rip", rflags as "rflags",
]);
int_fields!(segment_to_dict, update_segment, kvm_segment, [
    base as "base", limit as "limit", selector as "selector", type_ as "type", present as "present", dpl as "dpl",
    db as "db", s as "s", l as "l", g as "g", avl as "avl", unusable as "unusable",
]);
int_fields!(dtable_to_dict, update_dtable, kvm_dtable, [base as "base", limit as "limit"]);
int_fields!(sregs_scalars_to_dict, update_sregs_scalars, kvm_sregs, [
    cr0 as "cr0", cr2 as "cr2", cr3 as "cr3", cr4 as "cr4", cr8 as "cr8", efer as "efer", apic_base as "apic_base",
]);
int_fields!(fpu_scalars_to_dict, update_fpu_scalars, kvm_fpu, [
    fcw as "fcw", fsw as "fsw", ftwx as "ftwx", last_opcode as "last_opcode", last_ip as "last_ip",
    last_dp as "last_dp", mxcsr as "mxcsr",
]);

fn reject_unknown(unknown: Vec<String>, what: &str) -> PyResult<()> {
    match unknown.first() {
        Some(key) => Err(config_error(format!("unknown {what} field {key:?}"))),
        None => Ok(()),
    }
}

/// Sets the general registers named in `dict`.
pub fn update_regs(regs: &mut kvm_regs, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    reject_unknown(update_regs_fields(regs, dict)?, "register")
}

fn segments(sregs: &mut kvm_sregs) -> [(&'static str, &mut kvm_segment); 8] {
    [
        ("cs", &mut sregs.cs),
        ("ds", &mut sregs.ds),
        ("es", &mut sregs.es),
        ("fs", &mut sregs.fs),
        ("gs", &mut sregs.gs),
        ("ss", &mut sregs.ss),
        ("tr", &mut sregs.tr),
        ("ldt", &mut sregs.ldt),
    ]
}

/// Special registers: segments and descriptor tables as nested dicts, control registers as ints.
pub fn sregs_to_dict<'py>(py: Python<'py>, sregs: &kvm_sregs) -> PyResult<Bound<'py, PyDict>> {
    let dict = sregs_scalars_to_dict(py, sregs)?;
    let mut copy = *sregs;
    for (name, segment) in segments(&mut copy) {
        dict.set_item(name, segment_to_dict(py, segment)?)?;
    }
    dict.set_item("gdt", dtable_to_dict(py, &sregs.gdt)?)?;
    dict.set_item("idt", dtable_to_dict(py, &sregs.idt)?)?;
    Ok(dict)
}

/// Sets the special registers named in `dict` (nested dicts may be partial too).
pub fn update_sregs(sregs: &mut kvm_sregs, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for key in update_sregs_scalars(sregs, dict)? {
        let nested = dict.get_item(&key)?.map(|item| item.cast_into::<PyDict>()).transpose()?;
        let nested = nested.ok_or_else(|| config_error(format!("{key} must be a dict")))?;
        let unknown = match key.as_str() {
            "gdt" => update_dtable(&mut sregs.gdt, &nested)?,
            "idt" => update_dtable(&mut sregs.idt, &nested)?,
            name => match segments(sregs).into_iter().find(|(n, _)| *n == name) {
                Some((_, segment)) => update_segment(segment, &nested)?,
                None => return Err(config_error(format!("unknown special register {name:?}"))),
            },
        };
        reject_unknown(unknown, &key)?;
    }
    Ok(())
}

/// x87 and SSE state; `fpr` and `xmm` are lists of 16-byte values.
pub fn fpu_to_dict<'py>(py: Python<'py>, fpu: &kvm_fpu) -> PyResult<Bound<'py, PyDict>> {
    let dict = fpu_scalars_to_dict(py, fpu)?;
    let list = |rows: &[[u8; 16]]| PyList::new(py, rows.iter().map(|row| PyBytes::new(py, row)));
    dict.set_item("fpr", list(&fpu.fpr)?)?;
    dict.set_item("xmm", list(&fpu.xmm)?)?;
    Ok(dict)
}

/// Sets the x87 and SSE state named in `dict`.
pub fn update_fpu(fpu: &mut kvm_fpu, dict: &Bound<'_, PyDict>) -> PyResult<()> {
    for key in update_fpu_scalars(fpu, dict)? {
        let rows: &mut [[u8; 16]] = match key.as_str() {
            "fpr" => &mut fpu.fpr,
            "xmm" => &mut fpu.xmm,
            other => return Err(config_error(format!("unknown FPU field {other:?}"))),
        };
        let values: Vec<Vec<u8>> = dict.get_item(&key)?.map(|v| v.extract()).transpose()?.unwrap_or_default();
        if values.len() != rows.len() || values.iter().any(|v| v.len() != 16) {
            return Err(config_error(format!("{key} needs {} values of 16 bytes", rows.len())));
        }
        for (row, value) in rows.iter_mut().zip(values) {
            row.copy_from_slice(&value);
        }
    }
    Ok(())
}

/// Details that go with an exit reason.
fn reason_details<'py>(py: Python<'py>, reason: &ExitReason) -> PyResult<Bound<'py, PyDict>> {
    let details = PyDict::new(py);
    match reason {
        ExitReason::InternalError(e) => {
            details.set_item("suberror", e.suberror)?;
            details.set_item("data", e.data.clone())?;
            details.set_item("instruction", PyBytes::new(py, &e.instruction))?;
        }
        ExitReason::FailEntry { reason, cpu } => {
            details.set_item("hardware_entry_failure_reason", reason)?;
            details.set_item("cpu", cpu)?;
        }
        ExitReason::UnhandledIo { space, addr, size, write } => {
            details.set_item("space", space_name(*space))?;
            details.set_item("address", addr)?;
            details.set_item("size", size)?;
            details.set_item("write", write)?;
        }
        ExitReason::DeviceError { space, addr, message } => {
            details.set_item("space", space_name(*space))?;
            details.set_item("address", addr)?;
            details.set_item("message", message)?;
        }
        ExitReason::VmmError(message) => details.set_item("message", message)?,
        ExitReason::GuestFault(fault) => {
            let (mnemonic, _) = kvmkit_core::arch::x86_64::exceptions::vector_name(fault.vector);
            details.set_item("vector", fault.vector)?;
            details.set_item("name", mnemonic)?;
            details.set_item("error_code", fault.error_code)?;
            details.set_item("rip", fault.rip)?;
            details.set_item("cr2", fault.cr2)?;
        }
        ExitReason::Debug(event) => {
            details.set_item("kind", event.kind_name())?;
            details.set_item("rip", event.pc)?;
            details.set_item("dr6", event.dr6)?;
            if let kvmkit_core::vstate::debug::DebugKind::Hardware(slot) = event.kind {
                details.set_item("slot", slot)?;
            }
        }
        _ => {}
    }
    Ok(details)
}

fn space_name(space: kvmkit_core::vstate::exit::AddressSpace) -> &'static str {
    match space {
        kvmkit_core::vstate::exit::AddressSpace::Pio => "pio",
        kvmkit_core::vstate::exit::AddressSpace::Mmio => "mmio",
    }
}

/// An exit as `{"reason", "vcpu", "vcpu_reasons", "details", "rip", "message"}`.
pub fn exit_to_dict<'py>(py: Python<'py>, exit: &Exit) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("reason", exit.reason.name())?;
    dict.set_item("vcpu", exit.vcpu)?;
    dict.set_item("vcpu_reasons", exit.vcpu_reasons.iter().map(ExitReason::name).collect::<Vec<_>>())?;
    dict.set_item("details", reason_details(py, &exit.reason)?)?;
    dict.set_item("rip", exit.rip)?;
    dict.set_item("message", exit.message())?;
    Ok(dict)
}
