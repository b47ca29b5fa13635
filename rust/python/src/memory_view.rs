//! Zero-copy access to guest memory through Python's buffer protocol.
//!
//! The extension is built for the stable ABI of Python 3.9 (abi3). Its limited API lists the buffer
//! protocol only from 3.11, so PyO3 cannot export a buffer from a class there. CPython itself has
//! accepted the buffer slots in type specs since 3.9 (`PyType_FromSpec`), and `Py_buffer` has had
//! the same layout since 3.3; so the view's type is made here by hand, with a `bf_getbuffer` slot
//! that fills the buffer itself (no function outside the 3.9 stable ABI is called).

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use kvmkit_core::vstate::memory::GuestMemory;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// CPython's `Py_buffer` (Include/pybuffer.h), unchanged since Python 3.3.
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

// The request flags a view looks at (Include/pybuffer.h).
const PYBUF_FORMAT: c_int = 0x0004;
const PYBUF_ND: c_int = 0x0008;
const PYBUF_STRIDES: c_int = 0x0010 | PYBUF_ND;

/// A window on guest memory inside one region. It keeps the memory mapped while it (or a
/// memoryview made from it) exists, even after the VM is closed.
struct Window {
    _memory: Arc<GuestMemory>,
    host: usize,
    len: usize,
    /// While it lives, snapshots count the view's pages as written (Python writes them directly).
    _loan: Arc<()>,
}

/// The Python object: a `GuestMemoryView` instance.
#[repr(C)]
struct ViewObject {
    ob_base: ffi::PyObject,
    /// Owned (from `Box::into_raw`); set right after allocation, before Python can see the object.
    window: *mut Window,
}

const NAME: &std::ffi::CStr = c"kvmkit._core.GuestMemoryView";
const DOC: &std::ffi::CStr = c"A window on guest memory inside one region, exported as a writable buffer of bytes.";

static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The `GuestMemoryView` type, made on first use.
pub fn view_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    TYPE.get_or_try_init(py, || {
        let mut slots = [
            ffi::PyType_Slot { slot: ffi::Py_bf_getbuffer, pfunc: get_buffer as *mut c_void },
            ffi::PyType_Slot { slot: ffi::Py_mp_length, pfunc: length as *mut c_void },
            ffi::PyType_Slot { slot: ffi::Py_tp_dealloc, pfunc: dealloc as *mut c_void },
            ffi::PyType_Slot { slot: ffi::Py_tp_new, pfunc: refuse_new as *mut c_void },
            ffi::PyType_Slot { slot: ffi::Py_tp_doc, pfunc: DOC.as_ptr() as *mut c_void },
            ffi::PyType_Slot { slot: 0, pfunc: std::ptr::null_mut() },
        ];
        let mut spec = ffi::PyType_Spec {
            name: NAME.as_ptr(),
            basicsize: std::mem::size_of::<ViewObject>() as c_int,
            itemsize: 0,
            flags: ffi::Py_TPFLAGS_DEFAULT as std::ffi::c_uint,
            slots: slots.as_mut_ptr(),
        };
        // SAFETY: the spec is complete and its slots end with the zero sentinel; CPython copies the
        // slots and keeps only `name` (a static string) and the doc (copied). The functions have the
        // signatures of their slots.
        let ty = unsafe { ffi::PyType_FromSpec(&mut spec) };
        // SAFETY: `ty` is a new reference to a type object, or null with an exception set.
        let ty = unsafe { Bound::from_owned_ptr_or_err(py, ty) }?;
        Ok(ty.cast_into::<PyType>()?.unbind())
    })
    .map(|ty| ty.bind(py))
}

/// A new `GuestMemoryView` of `len` bytes at host address `host`, inside `memory`, lent under
/// `loan`.
pub fn new_view<'py>(
    py: Python<'py>,
    memory: Arc<GuestMemory>,
    host: *mut u8,
    len: usize,
    loan: Arc<()>,
) -> PyResult<Bound<'py, PyAny>> {
    let ty = view_type(py)?;
    // SAFETY: the type is a heap type whose instances are `ViewObject`s; the generic allocation
    // zeroes the object, sets its type (and takes a reference to it) and its reference count.
    let object = unsafe { ffi::PyType_GenericAlloc(ty.as_type_ptr(), 0) };
    // SAFETY: a new reference, or null with an exception set.
    let object = unsafe { Bound::from_owned_ptr_or_err(py, object) }?;
    let window = Box::new(Window { _memory: memory, host: host as usize, len, _loan: loan });
    // SAFETY: the object was just allocated as a `ViewObject` and nothing else refers to it yet.
    unsafe { (*object.as_ptr().cast::<ViewObject>()).window = Box::into_raw(window) };
    Ok(object)
}

/// The window of a `GuestMemoryView`.
///
/// # Safety
///
/// `object` is a live `GuestMemoryView` made by [`new_view`].
unsafe fn window<'a>(object: *mut ffi::PyObject) -> Option<&'a Window> {
    // SAFETY: the caller guarantees a `ViewObject`; its window is null or owned by it.
    unsafe { (*object.cast::<ViewObject>()).window.as_ref() }
}

unsafe extern "C" fn get_buffer(object: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int {
    // SAFETY: CPython calls this slot only on instances of the type, which only `new_view` makes
    // (`tp_new` refuses), holding a reference for the call.
    let Some(window) = (unsafe { window(object) }) else {
        // SAFETY: the exception type and the message are valid; the GIL is held in a slot.
        unsafe { ffi::PyErr_SetString(ffi::PyExc_BufferError, c"not a view of guest memory".as_ptr()) };
        return -1;
    };
    if view.is_null() {
        // SAFETY: as above.
        unsafe { ffi::PyErr_SetString(ffi::PyExc_BufferError, c"no buffer to fill".as_ptr()) };
        return -1;
    }
    // SAFETY: `view` points to a `Py_buffer` for the exporter to fill (as `PyBuffer_FillInfo`
    // does). `host..host + len` lies in one region of guest memory, which the window keeps mapped
    // for as long as this object lives, and the buffer holds a reference to this object (`obj`,
    // released by `PyBuffer_Release`). The memory is shared with the guest, so it is writable and
    // may change. `shape` and `strides` point into the buffer itself, as CPython's own do.
    unsafe {
        ffi::Py_INCREF(object);
        let view = &mut *view;
        view.buf = window.host as *mut c_void;
        view.obj = object;
        view.len = window.len as ffi::Py_ssize_t;
        view.itemsize = 1;
        view.readonly = 0;
        view.ndim = 1;
        view.format = if flags & PYBUF_FORMAT != 0 { c"B".as_ptr().cast_mut() } else { std::ptr::null_mut() };
        view.shape = if flags & PYBUF_ND != 0 { &mut view.len } else { std::ptr::null_mut() };
        view.strides = if flags & PYBUF_STRIDES == PYBUF_STRIDES { &mut view.itemsize } else { std::ptr::null_mut() };
        view.suboffsets = std::ptr::null_mut();
        view.internal = std::ptr::null_mut();
    }
    0
}

unsafe extern "C" fn length(object: *mut ffi::PyObject) -> ffi::Py_ssize_t {
    // SAFETY: CPython calls this slot only on instances of the type (see `get_buffer`).
    unsafe { window(object) }.map_or(0, |window| window.len as ffi::Py_ssize_t)
}

unsafe extern "C" fn dealloc(object: *mut ffi::PyObject) {
    // SAFETY: CPython calls this once, when the last reference to the instance is gone; the window
    // is owned by the object, and the object was allocated by the type's allocator, whose matching
    // `tp_free` releases it. A heap type's instances hold a reference to it, dropped last.
    unsafe {
        let window = (*object.cast::<ViewObject>()).window;
        if !window.is_null() {
            drop(Box::from_raw(window));
        }
        let ty = ffi::Py_TYPE(object);
        let free = std::mem::transmute::<*mut c_void, Option<ffi::freefunc>>(ffi::PyType_GetSlot(ty, ffi::Py_tp_free));
        if let Some(free) = free {
            free(object.cast());
        }
        ffi::Py_DECREF(ty.cast());
    }
}

unsafe extern "C" fn refuse_new(
    _ty: *mut ffi::PyTypeObject,
    _args: *mut ffi::PyObject,
    _kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let message = c"GuestMemoryView cannot be made directly; use Vm.mem_view";
    // SAFETY: the exception type and the message are valid; the GIL is held in a slot.
    unsafe { ffi::PyErr_SetString(ffi::PyExc_TypeError, message.as_ptr()) };
    std::ptr::null_mut()
}
