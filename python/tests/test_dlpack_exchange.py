"""Arrays whose type offers DLPack 1.3's C exchange table (`__dlpack_c_exchange_api__`, as
PyTorch's tensors do) are read through it, with no `__dlpack__` call. The producer here is a
ctypes table over NumPy arrays, so the consumer's side runs without PyTorch."""

import ctypes

import numpy as np
import pytest

import moe_a2a


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


TO_DLTENSOR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(DLTensor))
CURRENT_STREAM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p))


class ExchangeApi(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("prev_api", ctypes.c_void_p),
        ("managed_tensor_allocator", ctypes.c_void_p),
        ("managed_tensor_from_py_object_no_sync", ctypes.c_void_p),
        ("managed_tensor_to_py_object_no_sync", ctypes.c_void_p),
        ("dltensor_from_py_object_no_sync", TO_DLTENSOR),
        ("current_work_stream", CURRENT_STREAM),
    ]


CODES = {np.dtype(np.float16): (2, 16), np.dtype(np.float32): (2, 32), np.dtype(np.int32): (0, 32)}


@TO_DLTENSOR
def to_dltensor(obj_address, out):
    obj = ctypes.cast(obj_address, ctypes.py_object).value
    type(obj).reads += 1
    a = obj.array
    obj.shape = (ctypes.c_int64 * a.ndim)(*a.shape)
    code, bits = CODES[a.dtype]
    t = out.contents
    t.data = a.ctypes.data
    t.device = DLDevice(1, 0)
    t.ndim = a.ndim
    t.dtype = DLDataType(code, bits, 1)
    t.shape = ctypes.cast(obj.shape, ctypes.POINTER(ctypes.c_int64))
    t.strides = None
    t.byte_offset = 0
    return 0


@CURRENT_STREAM
def current_stream(device_type, device_id, out):
    out[0] = None
    return 0


API = ExchangeApi(1, 3, None, None, None, None, to_dltensor, current_stream)


class ExchangeArray:
    """A NumPy array behind the exchange table only: its `__dlpack__` fails the test."""

    __dlpack_c_exchange_api__ = ctypes.addressof(API)
    reads = 0

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    def __dlpack__(self, **kwargs):
        raise AssertionError("read through __dlpack__, not the exchange table")

    def __dlpack_device__(self):
        return (1, 0)


@pytest.fixture
def pf():
    """A one-rank allgather-rs layer: 4 tokens of 32 fp16 values, top-2 of 4 experts."""
    world = moe_a2a.World.connect("127.0.0.1", moe_a2a.World.free_local_port(), 0, 1, timeout_s=5.0)
    spec = moe_a2a.LayerSpec(
        num_experts=4, top_k=2, hidden=32, max_tokens_per_rank=4, input_dtype="float16", quant="fp16", ep=False
    )
    return moe_a2a.PrepareFinalize(world, "allgather-rs", spec)


def test_arrays_with_an_exchange_table_are_read_and_written_through_it(pf):
    x = (np.arange(4 * 32).reshape(4, 32) % 7).astype(np.float16)
    ids = np.array([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=np.int32)
    w = np.full((4, 2), 0.5, dtype=np.float32)
    before = ExchangeArray.reads
    a1q, _, _, rids, rw = pf.prepare(ExchangeArray(x), ExchangeArray(w), ExchangeArray(ids))
    np.testing.assert_array_equal(np.from_dlpack(a1q).view(np.float16), x)
    np.testing.assert_array_equal(np.from_dlpack(rids), ids)
    out = ExchangeArray(np.zeros_like(x))
    pf.finalize(out, ExchangeArray(np.from_dlpack(a1q).view(np.float16)))
    # The diagonal sum of weights 0.5 + 0.5 over each token's two experts: the input back.
    np.testing.assert_array_equal(out.array, x)
    assert ExchangeArray.reads - before == 5


def test_a_bad_array_read_through_the_exchange_table_is_refused_and_the_layer_stays_usable(pf):
    x = np.ones((4, 32), dtype=np.float16)
    ids = np.array([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=np.int32)
    w = np.full((4, 2), 0.5, dtype=np.float32)
    with pytest.raises(moe_a2a.InvalidArgumentError, match=r"got F16 \[4, 31\]"):
        pf.prepare(ExchangeArray(np.ones((4, 31), dtype=np.float16)), ExchangeArray(w), ExchangeArray(ids))
    a1q = pf.prepare(ExchangeArray(x), ExchangeArray(w), ExchangeArray(ids))[0]
    np.testing.assert_array_equal(np.from_dlpack(a1q).view(np.float16), x)
