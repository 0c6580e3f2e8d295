//! DLPack both ways, with no array library: an object with `__dlpack__` (NumPy, PyTorch, CuPy,
//! JAX) read as a tensor descriptor, and `Array`, which any of them takes with `from_dlpack`.
//!
//! The structs mirror dlpack.h (v0.8 / 1.0's unversioned `DLManagedTensor`, capsule name
//! "dltensor"); the consumer of a capsule renames it "used_dltensor" and calls its deleter.

use std::cell::RefCell;
use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex};

use moe_a2a::{DType, Tensor};
use moe_a2a_capi::status::Failure;
use moe_a2a_capi::types::{MOE_MAX_DIMS, MoeTensor, dtype_code};
use moe_a2a_capi::world::{Output, Place};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";
const DLTENSOR_VERSIONED: &CStr = c"dltensor_versioned";
const USED_DLTENSOR_VERSIONED: &CStr = c"used_dltensor_versioned";
/// DLPack 1.x's flag of a tensor its consumer must not write.
const DLPACK_FLAG_READ_ONLY: u64 = 1;
/// DLPack's device type of host memory.
const KDL_CPU: i32 = 1;
/// DLPack's device type of CUDA memory.
const KDL_CUDA: i32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
#[derive(Debug)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

#[repr(C)]
#[derive(Debug)]
struct DlPackVersion {
    major: u32,
    minor: u32,
}

/// DLPack 1.x's managed tensor (capsule "dltensor_versioned"), which can say "read-only".
#[repr(C)]
#[derive(Debug)]
struct DlManagedTensorVersioned {
    version: DlPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DlTensor,
}

/// DLPack's (type code, bits) of each dtype: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4.
const DTYPES: [(DType, u8, u8); 5] = [
    (DType::Bf16, 4, 16),
    (DType::F16, 2, 16),
    (DType::F32, 2, 32),
    (DType::I32, 0, 32),
    (DType::U8, 1, 8),
];

fn failure(e: Failure) -> PyErr {
    crate::error_of(e.status, e.message)
}

/// DLPack 1.3's table of a producer's C functions, found on an array's type as
/// `__dlpack_c_exchange_api__` (PyTorch's tensors have one): of them this library calls the
/// non-owning DLTensor of an object and the producer's current stream of a device, which read
/// an array with no Python call and no capsule.
#[repr(C)]
struct DlPackExchangeApi {
    version: DlPackVersion,
    prev_api: *const c_void,
    managed_tensor_allocator: *const c_void,
    managed_tensor_from_py_object_no_sync: *const c_void,
    managed_tensor_to_py_object_no_sync: *const c_void,
    dltensor_from_py_object_no_sync: Option<unsafe extern "C" fn(*mut c_void, *mut DlTensor) -> i32>,
    current_work_stream: Option<unsafe extern "C" fn(i32, i32, *mut *mut c_void) -> i32>,
}

/// Array types whose exchange table was looked up, with its address (0: none). A type without
/// one answers a lookup by raising and clearing an AttributeError (about 0.6 us for NumPy's
/// arrays), so each type is asked once. Holding the type keeps its address from naming another
/// type.
static EXCHANGE_TABLES: Mutex<Vec<(Py<PyType>, usize)>> = Mutex::new(Vec::new());
/// The most array types remembered; others are asked every time.
const EXCHANGE_TABLES_KEPT: usize = 64;

/// The exchange table of `obj`'s type, where it has one of DLPack 1.x (a capsule, or an integer
/// address as DLPack 1.2 put it).
fn exchange_api(obj: &Bound<'_, PyAny>) -> PyResult<Option<&'static DlPackExchangeApi>> {
    let ty = obj.get_type();
    let known = {
        let tables = EXCHANGE_TABLES.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .iter()
            .find(|(t, _)| t.as_ptr() == ty.as_ptr())
            .map(|&(_, address)| address)
    };
    let address = match known {
        Some(address) => address,
        None => {
            let address = exchange_api_address(&ty)?;
            let mut tables = EXCHANGE_TABLES.lock().unwrap_or_else(|p| p.into_inner());
            if tables.len() < EXCHANGE_TABLES_KEPT {
                tables.push((ty.unbind(), address));
            }
            address
        }
    };
    if address == 0 {
        return Ok(None);
    }
    // SAFETY: the producer's table is a static of its module, alive while its type is (the
    // contract of `__dlpack_c_exchange_api__`), and the cache above holds the type.
    let api = unsafe { &*(address as *const DlPackExchangeApi) };
    Ok((api.version.major == 1).then_some(api))
}

/// The address of type `ty`'s exchange table, 0 for none.
fn exchange_api_address(ty: &Bound<'_, PyType>) -> PyResult<usize> {
    let py = ty.py();
    let Some(found) = ty.getattr_opt(pyo3::intern!(py, "__dlpack_c_exchange_api__"))? else {
        return Ok(0);
    };
    let address = if let Ok(capsule) = found.cast::<pyo3::types::PyCapsule>() {
        // SAFETY: `capsule` is a live capsule; its pointer is read under its own name.
        unsafe {
            let name = pyo3::ffi::PyCapsule_GetName(capsule.as_ptr());
            pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), name) as usize
        }
    } else {
        found.extract::<usize>().unwrap_or(0)
    };
    if address == 0 {
        // A capsule that would not give its pointer set an error: read arrays the usual way.
        drop(PyErr::take(py));
    }
    Ok(address)
}

/// The arrays of one call at a rank's place. The rank's stream is ordered after each producer
/// stream once per call, not once per array: the arrays a call is given were all made before it
/// started, so one ordering after a producer's stream covers every array it made (an event
/// recorded and waited for costs microseconds of host time per array otherwise).
#[derive(Debug)]
pub struct CallArrays<'p> {
    place: &'p Place,
    /// The producer streams the rank's stream was ordered after in this call.
    ordered_after: RefCell<Vec<usize>>,
}

impl<'p> CallArrays<'p> {
    /// A call's arrays at `place`.
    pub fn new(place: &'p Place) -> CallArrays<'p> {
        CallArrays {
            place,
            ordered_after: RefCell::new(Vec::new()),
        }
    }

    /// Orders the rank's stream after the work on `stream` so far, unless this call did.
    ///
    /// # Safety
    /// `stream` is a live stream of the rank's GPU (or one of CUDA's special handles).
    unsafe fn order_after(&self, stream: usize) -> PyResult<()> {
        let mut ordered = self.ordered_after.borrow_mut();
        if ordered.contains(&stream) {
            return Ok(());
        }
        // SAFETY: this function's contract.
        unsafe { self.place.order_after(stream) }.map_err(failure)?;
        ordered.push(stream);
        Ok(())
    }
}

/// The descriptor of `obj` read through its type's DLPack exchange table, where it has one:
/// host memory, or device memory after ordering the rank's stream after the producer's current
/// stream (without the host waiting; nothing where they are one stream or this call did so
/// already). `None` where the exchange table cannot serve this call. The memory stays valid
/// while `obj` lives.
fn exchange_descriptor(obj: &Bound<'_, PyAny>, arg: &str, call: &CallArrays<'_>) -> PyResult<Option<MoeTensor>> {
    let Some(api) = exchange_api(obj)? else {
        return Ok(None);
    };
    let Some(to_dltensor) = api.dltensor_from_py_object_no_sync else {
        return Ok(None);
    };
    let mut t = DlTensor {
        data: std::ptr::null_mut(),
        device: DlDevice {
            device_type: 0,
            device_id: 0,
        },
        ndim: 0,
        dtype: DlDataType {
            code: 0,
            bits: 0,
            lanes: 0,
        },
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    // SAFETY: the producer's function of this type, called with the GIL held on an object of
    // that type and a DLTensor to fill; it fills it or returns -1 with a Python error set.
    if unsafe { to_dltensor(obj.as_ptr().cast(), &mut t) } != 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    if t.device.device_type == KDL_CUDA {
        let Some(current_stream) = api.current_work_stream else {
            return Ok(None);
        };
        let mut stream: *mut c_void = std::ptr::null_mut();
        // SAFETY: the producer's function, asked for its current stream of the array's device.
        if unsafe { current_stream(KDL_CUDA, t.device.device_id, &mut stream) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        // The producer's pending writes are on its current stream: the rank's stream waits
        // for them (nothing to do where the two are one stream).
        // SAFETY: a live stream of the array's device, which the producer just named.
        unsafe { call.order_after(stream as usize) }?;
    }
    // SAFETY: the DLTensor describes `obj`'s memory and shape, valid while `obj` lives.
    unsafe { descriptor(&t, arg) }.map(Some)
}

/// The keyword arguments of a `__dlpack__` call: the consumer's `stream` where it has one, and
/// `max_version=(1, 0)` where `versioned`. Host arrays' (no stream, versioned) are made once:
/// building a dictionary for every array was a measurable part of a call from Python.
fn dlpack_kwargs(py: Python<'_>, stream: Option<usize>, versioned: bool) -> PyResult<Bound<'_, PyDict>> {
    static HOST_VERSIONED: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    let build = || -> PyResult<Bound<'_, PyDict>> {
        let kwargs = PyDict::new(py);
        if let Some(stream) = stream {
            kwargs.set_item("stream", stream)?;
        }
        if versioned {
            kwargs.set_item("max_version", (1, 0))?;
        }
        Ok(kwargs)
    };
    if stream.is_none() && versioned {
        return Ok(HOST_VERSIONED
            .get_or_try_init(py, || build().map(Bound::unbind))?
            .bind(py)
            .clone());
    }
    build()
}

/// Runs `with` on the descriptor of the array `obj` (anything with `__dlpack__`), argument
/// `arg`: read through its type's DLPack exchange table where that serves (no Python call), or
/// through a capsule from `__dlpack__`, released after `with`. The memory stays valid while
/// `obj` lives.
fn consume<R>(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    call: &CallArrays<'_>,
    with: impl FnOnce(&MoeTensor, bool) -> PyResult<R>,
) -> PyResult<R> {
    // An exchange table gives no read-only flag: it serves arrays that are writable.
    if let Some(d) = exchange_descriptor(obj, arg, call)? {
        return with(&d, false);
    }
    let place = call.place;
    let py = obj.py();
    if !obj.hasattr(pyo3::intern!(py, "__dlpack__"))? {
        return Err(crate::InvalidArgumentError::new_err(format!(
            "`{arg}` is a {}, not an array: pass a NumPy, PyTorch, CuPy or JAX array (anything with __dlpack__)",
            obj.get_type().name()?
        )));
    }
    // A GPU array's producer orders its pending work before the rank's stream (DLPack's
    // `stream`), so reading it on that stream needs no host wait.
    let dlpack_device = pyo3::intern!(py, "__dlpack_device__");
    let on_gpu = obj.hasattr(dlpack_device)? && obj.call_method0(dlpack_device)?.extract::<(i32, i32)>()?.0 == KDL_CUDA;
    let stream = (on_gpu && place.stream() != 0).then(|| place.stream());
    let dlpack = pyo3::intern!(py, "__dlpack__");
    // DLPack 1.x first: producers export read-only arrays only that way.
    let capsule = match obj.call_method(dlpack, (), Some(&dlpack_kwargs(py, stream, true)?)) {
        Ok(capsule) => capsule,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
            obj.call_method(dlpack, (), Some(&dlpack_kwargs(py, stream, false)?))?
        }
        Err(e) => return Err(e),
    };
    // SAFETY: `capsule` is a live object; IsValid checks its type and name without raising.
    let versioned = unsafe { pyo3::ffi::PyCapsule_IsValid(capsule.as_ptr(), DLTENSOR_VERSIONED.as_ptr()) } == 1;
    // SAFETY: as above.
    let legacy = unsafe { pyo3::ffi::PyCapsule_IsValid(capsule.as_ptr(), DLTENSOR.as_ptr()) } == 1;
    if !versioned && !legacy {
        return Err(crate::InvalidArgumentError::new_err(format!(
            "`{arg}.__dlpack__()` did not return an unconsumed DLPack capsule"
        )));
    }
    // SAFETY: the capsule holds a live managed tensor of the kind its name says until its
    // deleter runs, which this block calls last, once, after renaming the capsule so that its
    // destructor does not.
    unsafe {
        if versioned {
            let managed = pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR_VERSIONED.as_ptr())
                as *mut DlManagedTensorVersioned;
            if (*managed).version.major != 1 {
                return Err(crate::InvalidArgumentError::new_err(format!(
                    "`{arg}` is a DLPack {}.{} tensor; this library reads DLPack 1.x",
                    (*managed).version.major,
                    (*managed).version.minor
                )));
            }
            let read_only = (*managed).flags & DLPACK_FLAG_READ_ONLY != 0;
            let result = descriptor(&(*managed).dl_tensor, arg).and_then(|d| with(&d, read_only));
            pyo3::ffi::PyCapsule_SetName(capsule.as_ptr(), USED_DLTENSOR_VERSIONED.as_ptr());
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
            result
        } else {
            let managed = pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr()) as *mut DlManagedTensor;
            let result = descriptor(&(*managed).dl_tensor, arg).and_then(|d| with(&d, false));
            pyo3::ffi::PyCapsule_SetName(capsule.as_ptr(), USED_DLTENSOR.as_ptr());
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
            result
        }
    }
}

/// The array `obj` as argument `arg` of `call`: a copy of host memory, or the producer's
/// memory on the rank's GPU, read in place (valid while `obj` lives).
pub fn tensor(call: &CallArrays<'_>, obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Tensor> {
    // SAFETY: the descriptor describes the producer's memory, alive while `obj` is; the call
    // that reads it keeps `obj` until its work is enqueued on the rank's stream, after which
    // the producer's allocator orders reuse after that stream (DLPack's contract).
    consume(obj, arg, call, |d, _| {
        unsafe { call.place.input(d, arg) }.map_err(failure)
    })
}

/// An array a result is written into, in place.
#[derive(Debug)]
pub struct Target<'py> {
    output: Output,
    arg: String,
    /// Keeps the producer's memory alive.
    _array: Bound<'py, PyAny>,
}

impl<'py> Target<'py> {
    /// The array `obj`, checked as argument `arg`: writable, on the host or the rank's GPU.
    pub fn of(call: &CallArrays<'_>, obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Target<'py>> {
        consume(obj, arg, call, |d, read_only| {
            if read_only {
                return Err(crate::InvalidArgumentError::new_err(format!(
                    "`{arg}` is read-only; pass a writable array for the result"
                )));
            }
            // SAFETY: the descriptor describes the memory of `obj`, which `Target` keeps alive.
            let output = unsafe { call.place.output(d, arg) }.map_err(failure)?;
            Ok(Target {
                output,
                arg: arg.to_string(),
                _array: obj.clone(),
            })
        })
    }

    /// Where the result goes.
    pub fn tensor(&mut self) -> &mut Tensor {
        &mut self.output.tensor
    }

    /// Copies a host result into the array (a device one was written in place).
    pub fn finish(self) -> PyResult<()> {
        // SAFETY: the descriptor describes the memory of `_array`, alive until this returns.
        unsafe { self.output.finish(&self.arg) }.map_err(failure)
    }
}

/// The library's descriptor of a DLPack tensor.
///
/// # Safety
/// `t` is a live DLTensor: `shape` (and `strides`, when not NULL) hold `ndim` values.
unsafe fn descriptor(t: &DlTensor, arg: &str) -> PyResult<MoeTensor> {
    let dtype = DTYPES
        .iter()
        .find(|(_, code, bits)| *code == t.dtype.code && *bits == t.dtype.bits && t.dtype.lanes == 1)
        .map(|(d, _, _)| *d)
        .ok_or_else(|| {
            crate::InvalidArgumentError::new_err(format!(
                "`{arg}` has DLPack dtype (code {}, {} bits, {} lanes); accepted: bfloat16, float16, float32, int32, uint8",
                t.dtype.code, t.dtype.bits, t.dtype.lanes
            ))
        })?;
    if !(1..=MOE_MAX_DIMS as i32).contains(&t.ndim) {
        return Err(crate::InvalidArgumentError::new_err(format!(
            "`{arg}` has {} dimensions; 1 to {MOE_MAX_DIMS} are accepted",
            t.ndim
        )));
    }
    let mut d = MoeTensor::ABSENT;
    // SAFETY: `shape` holds `ndim` values (this function's contract).
    let shape = unsafe { std::slice::from_raw_parts(t.shape, t.ndim as usize) };
    d.shape[..shape.len()].copy_from_slice(shape);
    d.ndim = t.ndim;
    d.dtype = dtype_code(dtype);
    d.data = (t.data as usize).wrapping_add(t.byte_offset as usize) as *mut c_void;
    d.strides = t.strides;
    d.device_type = t.device.device_type;
    d.device_id = t.device.device_id;
    Ok(d)
}

/// An array the library returns, read through DLPack (`numpy.from_dlpack(a)`,
/// `torch.from_dlpack(a)`): a delivery's tensor, exported without a copy. Every export shares
/// the same memory, as views of one NumPy array do: host bytes the array owns (writes through
/// one export are seen by the others), or the library's device memory (valid until the layer's
/// next prepare), ordered before the consumer's stream.
#[pyclass(module = "moe_a2a._native", frozen)]
#[derive(Debug)]
pub struct Array {
    dtype: DType,
    shape: Vec<usize>,
    memory: Memory,
    place: Place,
}

/// The memory behind an [`Array`] and every capsule exported from it.
#[derive(Clone, Debug)]
enum Memory {
    Host(Arc<SharedHostBytes>),
    /// A device tensor (cloning it shares its memory).
    Device(Tensor),
}

/// Host bytes that DLPack consumers read and write through raw pointers, freed when the array
/// and every capsule made from it are gone. Rust never forms a reference to them after
/// construction, so writes by consumers alias nothing Rust relies on.
#[derive(Debug)]
struct SharedHostBytes {
    start: *mut u8,
    len: usize,
    capacity: usize,
}

// SAFETY: the bytes are a heap allocation this value owns; Rust code only passes their address
// on (and frees them in Drop, once nothing else holds the Arc), so threads may share it.
unsafe impl Send for SharedHostBytes {}
// SAFETY: as for Send: no Rust code reads or writes the bytes through a shared reference.
unsafe impl Sync for SharedHostBytes {}

impl SharedHostBytes {
    fn new(bytes: Vec<u8>) -> SharedHostBytes {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        SharedHostBytes {
            start: bytes.as_mut_ptr(),
            len: bytes.len(),
            capacity: bytes.capacity(),
        }
    }

    /// A copy of the bytes, for an export that asks for one (`copy=True`).
    fn duplicate(&self) -> SharedHostBytes {
        let mut copy = Vec::with_capacity(self.len);
        // SAFETY: `start` holds `len` initialized bytes until Drop; consumers writing them at
        // the same time is the race any shared NumPy buffer has, and bytes have no invalid
        // values.
        unsafe {
            std::ptr::copy_nonoverlapping(self.start, copy.as_mut_ptr(), self.len);
            copy.set_len(self.len);
        }
        SharedHostBytes::new(copy)
    }
}

impl Drop for SharedHostBytes {
    fn drop(&mut self) {
        // SAFETY: the parts of the Vec `new` took apart, put back together once.
        drop(unsafe { Vec::from_raw_parts(self.start, self.len, self.capacity) });
    }
}

/// DLPack 1.x's flag of a tensor that is a copy of the producer's.
const DLPACK_FLAG_IS_COPIED: u64 = 2;

/// A managed tensor of either DLPack ABI, as an export hands it out: the legacy
/// `DLManagedTensor` (capsule "dltensor") or 1.x's `DLManagedTensorVersioned`.
trait Managed: Sized {
    /// The capsule's name while unconsumed.
    const NAME: &'static CStr;
    fn new(dl_tensor: DlTensor, deleter: unsafe extern "C" fn(*mut Self), flags: u64) -> Self;
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)>;
}

impl Managed for DlManagedTensor {
    const NAME: &'static CStr = DLTENSOR;
    fn new(dl_tensor: DlTensor, deleter: unsafe extern "C" fn(*mut Self), _flags: u64) -> Self {
        DlManagedTensor {
            dl_tensor,
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(deleter),
        }
    }
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
}

impl Managed for DlManagedTensorVersioned {
    const NAME: &'static CStr = DLTENSOR_VERSIONED;
    fn new(dl_tensor: DlTensor, deleter: unsafe extern "C" fn(*mut Self), flags: u64) -> Self {
        DlManagedTensorVersioned {
            version: DlPackVersion { major: 1, minor: 0 },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(deleter),
            flags,
            dl_tensor,
        }
    }
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
}

/// What a capsule's managed tensor owns: the memory it points into (shared with the array) and
/// its shape. `managed` comes first, so the deleter finds the whole from its pointer.
#[repr(C)]
struct Owned<M> {
    managed: M,
    _memory: Memory,
    _shape: Vec<i64>,
}

unsafe extern "C" fn delete_owned<M: Managed>(managed: *mut M) {
    // SAFETY: `managed` is the first field of the Box<Owned<M>> `export_capsule` leaked, and
    // DLPack calls the deleter once.
    drop(unsafe { Box::from_raw(managed as *mut Owned<M>) });
}

unsafe extern "C" fn capsule_destructor<M: Managed>(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by Python with the capsule; a capsule still under its unconsumed name was
    // never consumed, so its tensor is still ours to delete.
    unsafe {
        let managed = pyo3::ffi::PyCapsule_GetPointer(capsule, M::NAME.as_ptr()) as *mut M;
        if managed.is_null() {
            // Consumed (renamed): the consumer deletes it.
            pyo3::ffi::PyErr_Clear();
            return;
        }
        if let Some(deleter) = (*managed).deleter() {
            deleter(managed);
        }
    }
}

/// A capsule of `dl_tensor`, owning `memory` and `shape` (which `dl_tensor` points into) until
/// its consumer, or the capsule's destructor when none consumes it, calls the deleter.
fn export_capsule<M: Managed>(
    py: Python<'_>,
    dl_tensor: DlTensor,
    flags: u64,
    memory: Memory,
    shape: Vec<i64>,
) -> PyResult<Py<PyAny>> {
    let owned = Box::new(Owned {
        managed: M::new(dl_tensor, delete_owned::<M>, flags),
        _memory: memory,
        _shape: shape,
    });
    let managed = Box::into_raw(owned) as *mut M;
    // SAFETY: `managed` lives until its deleter runs (by the consumer, or by the capsule's
    // destructor when never consumed).
    let capsule = unsafe { pyo3::ffi::PyCapsule_New(managed.cast(), M::NAME.as_ptr(), Some(capsule_destructor::<M>)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nothing else deletes it.
        unsafe { delete_owned(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference PyCapsule_New returned.
    Ok(unsafe { Py::from_owned_ptr(py, capsule) })
}

impl Array {
    /// `tensor` of a rank at `place`; host bytes are moved in, not copied.
    pub fn new(tensor: Tensor, place: Place) -> Array {
        let dtype = tensor.dtype();
        let shape = tensor.shape().to_vec();
        let memory = match tensor.into_host_bytes() {
            Ok(bytes) => Memory::Host(Arc::new(SharedHostBytes::new(bytes))),
            Err(device) => Memory::Device(device),
        };
        Array {
            dtype,
            shape,
            memory,
            place,
        }
    }

    fn device(&self) -> (i32, i32) {
        match &self.memory {
            Memory::Host(_) => (KDL_CPU, 0),
            Memory::Device(t) => (KDL_CUDA, t.device_region().map_or(0, |r| r.ordinal() as i32)),
        }
    }

    /// The memory an export points into, and its address: the array's own, or a copy of its
    /// host bytes when the consumer asks for one.
    fn export(&self, stream: Option<i64>, copy: Option<bool>) -> PyResult<(Memory, *mut c_void)> {
        match &self.memory {
            Memory::Host(bytes) => {
                let bytes = if copy == Some(true) {
                    Arc::new(bytes.duplicate())
                } else {
                    bytes.clone()
                };
                let data = bytes.start.cast();
                Ok((Memory::Host(bytes), data))
            }
            Memory::Device(tensor) => {
                if copy == Some(true) {
                    return Err(pyo3::exceptions::PyBufferError::new_err(
                        "copy=True: a device array is exported without a copy; copy it on the consumer's side (e.g. torch.from_dlpack(a).clone())",
                    ));
                }
                // CUDA's legacy default stream is handle 1, which DLPack's None stands for.
                match stream.unwrap_or(1) {
                    -1 => {}
                    s if s > 0 => {
                        // SAFETY: DLPack's consumer passes a live stream of the array's device.
                        unsafe { self.place.order_before(s as usize) }.map_err(failure)?;
                    }
                    s => {
                        return Err(crate::InvalidArgumentError::new_err(format!(
                            "stream = {s}: pass a CUDA stream handle, None (the legacy default stream) or -1"
                        )));
                    }
                }
                let address = tensor.device_region().map_or(0, |r| r.address());
                Ok((Memory::Device(tensor.clone()), address as usize as *mut c_void))
            }
        }
    }
}

#[pymethods]
impl Array {
    /// A DLPack capsule of this array's memory, shared with every other export of it:
    /// host bytes, or device memory after ordering the consumer's `stream` (None: the legacy
    /// default stream; -1: no ordering) after the rank's work. `copy=True` exports a copy of
    /// host bytes (a device array is never copied). A `max_version` of 1.x gets DLPack 1.x's
    /// versioned capsule, anything else the legacy one.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<i64>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<Py<PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = dl_device;
        let (device_type, device_id) = self.device();
        let (memory, data) = self.export(stream, copy)?;
        let mut shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        let (_, code, bits) = DTYPES
            .iter()
            .find(|(d, _, _)| *d == self.dtype)
            .copied()
            .expect("every dtype has its DLPack code");
        let dl_tensor = DlTensor {
            data,
            device: DlDevice { device_type, device_id },
            ndim: shape.len() as i32,
            dtype: DlDataType { code, bits, lanes: 1 },
            shape: shape.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        };
        // A consumer of DLPack 1.x gets a writable tensor (flags 0); one that knows only the
        // legacy capsule may mark it read-only (NumPy does).
        match max_version {
            Some((major, _)) if major >= 1 => {
                let flags = if copy == Some(true) { DLPACK_FLAG_IS_COPIED } else { 0 };
                export_capsule::<DlManagedTensorVersioned>(py, dl_tensor, flags, memory, shape)
            }
            _ => export_capsule::<DlManagedTensor>(py, dl_tensor, 0, memory, shape),
        }
    }

    /// `(kDLCPU, 0)` for host memory, `(kDLCUDA, ordinal)` for a GPU's.
    fn __dlpack_device__(&self) -> (i32, i32) {
        self.device()
    }

    /// The shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// The dtype's name ("bfloat16", "float16", "float32", "int32", "uint8").
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    fn __repr__(&self) -> String {
        format!(
            "moe_a2a.Array(shape={:?}, dtype={}, device={:?})",
            self.shape,
            self.dtype(),
            self.device()
        )
    }
}

/// A dtype's name, as NumPy and PyTorch spell it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::Bf16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::I32 => "int32",
        DType::U8 => "uint8",
    }
}
