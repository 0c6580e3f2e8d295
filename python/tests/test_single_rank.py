"""What one rank sees without peers: DLPack both ways, and refusals naming the argument."""

import numpy as np
import pytest

import moe_a2a


@pytest.fixture(scope="module")
def world():
    port = moe_a2a.World.free_local_port()
    return moe_a2a.World.connect("127.0.0.1", port, 0, 1, timeout_s=5.0)


def spec(**changes):
    base = dict(
        num_experts=4,
        top_k=2,
        hidden=32,
        max_tokens_per_rank=4,
        input_dtype="float16",
        quant="fp16",
        ep=False,
    )
    base.update(changes)
    return moe_a2a.LayerSpec(**base)


def call_inputs():
    x = np.ones((4, 32), dtype=np.float16)
    ids = np.array([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=np.int32)
    w = np.full((4, 2), 0.5, dtype=np.float32)
    return x, ids, w


def test_arrays_come_back_through_dlpack_as_numpy_reads_them(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    a1q, a1q_scale, meta, rids, rw = pf.prepare(x, w, ids)
    assert a1q_scale is None and meta is None
    assert a1q.dtype == "uint8" and a1q.shape == [4, 64]
    np.testing.assert_array_equal(np.from_dlpack(a1q).view(np.float16), x)
    np.testing.assert_array_equal(np.from_dlpack(rids), ids)
    np.testing.assert_array_equal(np.from_dlpack(rw), w)
    np.testing.assert_array_equal(np.from_dlpack(rids), np.from_dlpack(rids))
    out = np.zeros_like(x)
    pf.finalize(out, np.from_dlpack(a1q).view(np.float16))
    np.testing.assert_array_equal(out, x)


def test_host_arrays_are_exported_without_a_copy_and_outlive_their_array(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    _, _, _, rids, _ = pf.prepare(x, w, ids)
    first, second = np.from_dlpack(rids), np.from_dlpack(rids)
    assert np.shares_memory(first, second)
    first[0, 0] = 3
    assert second[0, 0] == 3
    copied = np.from_dlpack(rids, copy=True)
    assert not np.shares_memory(copied, first)
    np.testing.assert_array_equal(copied, first)
    # DLPack 1.x consumers get a versioned capsule; others the legacy one.
    assert '"dltensor_versioned"' in repr(rids.__dlpack__(max_version=(1, 0)))
    assert '"dltensor"' in repr(rids.__dlpack__())
    del rids, pf
    # The exports keep the memory alive after the Array and its layer are gone.
    np.testing.assert_array_equal(second[1:], ids[1:])
    assert second[0, 0] == 3


def test_a_non_contiguous_array_is_refused_naming_it(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    with pytest.raises(moe_a2a.InvalidArgumentError, match="`a1` has strides"):
        pf.prepare(np.ones((32, 4), dtype=np.float16).T, w, ids)
    with pytest.raises(moe_a2a.InvalidArgumentError, match="`topk_ids` is a list"):
        pf.prepare(x, w, [[0, 1]] * 4)
    with pytest.raises(moe_a2a.InvalidArgumentError, match="topk_ids"):
        pf.prepare(x, w, ids.astype(np.int64))
    # Refusals leave the layer usable.
    pf.prepare(x, w, ids)


def test_out_of_order_calls_and_unsupported_arguments_are_refused(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    with pytest.raises(moe_a2a.InvalidArgumentError, match="moe_layer_prepare first"):
        pf.finalize(np.zeros_like(x), x)
    with pytest.raises(moe_a2a.InvalidArgumentError, match="expert_map"):
        pf.prepare(x, w, ids, expert_map=np.arange(4, dtype=np.int32))
    with pytest.raises(moe_a2a.InvalidArgumentError, match="num_experts = 8"):
        pf.prepare(x, w, ids, num_experts=8)
    with pytest.raises(moe_a2a.InvalidArgumentError, match="quant = 'int4'"):
        moe_a2a.PrepareFinalize(world, "allgather-rs", spec(quant="int4"))
    with pytest.raises(moe_a2a.UnsupportedError, match="unknown backend `nope`"):
        moe_a2a.PrepareFinalize(world, "nope", spec())


def test_an_experts_callable_that_raises_fails_the_call_and_the_next_runs(world):
    calls = []

    def experts(a1q, a1q_scale, meta, topk_ids, topk_weights):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("kernel launch failed")
        return np.from_dlpack(a1q).view(np.float16).copy()

    layer = moe_a2a.MoeLayer(world, "allgather-rs", spec(), experts)
    x, ids, w = call_inputs()
    out = np.zeros_like(x)
    with pytest.raises(moe_a2a.InvalidArgumentError, match="kernel launch failed"):
        layer.forward(x, ids, w, out)
    layer.forward(x, ids, w, out)
    np.testing.assert_array_equal(out, x)


def test_a_read_only_output_is_refused_and_the_call_abandoned(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    a1q, *_ = pf.prepare(x, w, ids)
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(moe_a2a.InvalidArgumentError, match="`output` is read-only"):
        pf.finalize(out, np.from_dlpack(a1q).view(np.float16))
    # The refused finalize ended the call: the next one runs.
    a1q, *_ = pf.prepare(x, w, ids)
    out = np.zeros_like(x)
    pf.finalize(out, np.from_dlpack(a1q).view(np.float16))
    np.testing.assert_array_equal(out, x)


def test_the_linked_backends_and_their_capabilities_are_listed():
    assert moe_a2a.backends() == ["allgather-rs", "nvlink-one-sided", "nvlink-two-sided"]
    matrix = moe_a2a.capability_matrix()
    for name in moe_a2a.backends():
        assert f"| {name} |" in matrix, matrix


def test_a_layer_whose_out_is_its_tokens_gives_what_a_separate_out_gets(world):
    # A layer run in place over its tokens (vLLM's inplace fused MoE): the tokens are read
    # whole before anything is written into them.
    def experts(a1q, a1q_scale, meta, topk_ids, topk_weights):
        return np.from_dlpack(a1q).view(np.float16) * np.float16(2)

    layer = moe_a2a.MoeLayer(world, "allgather-rs", spec(), experts)
    _, ids, w = call_inputs()
    x = (np.arange(4 * 32, dtype=np.float32).reshape(4, 32) / 64).astype(np.float16)
    expected = x * np.float16(2)
    separate = np.zeros_like(x)
    layer.forward(x, ids, w, separate)
    np.testing.assert_array_equal(separate, expected)
    layer.forward(x, ids, w, x)
    np.testing.assert_array_equal(x, expected)


def test_a_finalize_whose_output_is_the_experts_output_gives_what_a_separate_output_gets(world):
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec())
    x, ids, w = call_inputs()
    a1q, *_ = pf.prepare(x, w, ids)
    y = np.from_dlpack(a1q).view(np.float16) * np.float16(3)
    separate = np.zeros_like(x)
    pf.finalize(separate, y)
    a1q, *_ = pf.prepare(x, w, ids)
    pf.finalize(y, y)
    np.testing.assert_array_equal(y, separate)
    np.testing.assert_array_equal(separate, x * np.float16(3))
