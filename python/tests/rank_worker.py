"""One rank of the Python package's process tests, started by test_processes.py with the
launchers' environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Usage:
``rank_worker.py SCENARIO BACKEND``. Prints one line per check; exits non-zero on failure."""

import sys

import numpy as np

import moe_a2a

EXPERTS, TOP_K, HIDDEN, TOKENS = 16, 4, 64, 8


def spec(world: moe_a2a.World, **changes) -> moe_a2a.LayerSpec:
    base = dict(
        num_experts=EXPERTS,
        top_k=TOP_K,
        hidden=HIDDEN,
        max_tokens_per_rank=TOKENS,
        input_dtype="float16",
        quant="fp16",
    )
    base.update(changes)
    return moe_a2a.LayerSpec(**base)


def inputs(rank: int, call: int):
    rng = np.random.default_rng(1000 * rank + call)
    x = (rng.integers(-8, 9, size=(TOKENS, HIDDEN)) / 8).astype(np.float16)
    ids = np.stack(
        [rng.permutation(EXPERTS)[:TOP_K] for _ in range(TOKENS)]
    ).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(TOKENS, TOP_K)).astype(np.float32)
    return x, ids, w


def experts(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights):
    """Expert e multiplies its token by e + 1; each row's weighted sum over this rank's experts."""
    assert a1q_scale is None and expert_tokens_meta is None
    x = np.from_dlpack(a1q).view(np.float16).astype(np.float32)
    ids = np.from_dlpack(topk_ids)
    w = np.from_dlpack(topk_weights)
    factor = np.where(ids >= 0, w * (ids + 1), 0.0).sum(axis=1, keepdims=True)
    return (x * factor).astype(np.float16)


def want(x, ids, w):
    return x.astype(np.float64) * (w * (ids + 1)).sum(axis=1, keepdims=True)


def check(label: str, rank: int, out, x, ids, w) -> None:
    expected = want(x, ids, w)
    err = np.abs(out.astype(np.float64) - expected).max() / np.abs(expected).max()
    assert err < 1e-2, f"{label}: relative error {err:.1e}"
    print(f"rank {rank}: {label}: max relative error {err:.1e}: ok", flush=True)


def layer(world: moe_a2a.World, backend: str) -> None:
    r = world.rank
    pf = moe_a2a.PrepareFinalize(world, backend, spec(world))
    assert pf.activation_format == "standard"
    assert pf.topk_indices_dtype() == "int32"
    assert pf.num_dispatchers() == world.world_size
    assert pf.max_num_tokens_per_rank() == TOKENS
    for call in range(2):
        x, ids, w = inputs(r, call)
        a1q, a1q_scale, meta, rids, rw = pf.prepare(x, w, ids, num_experts=EXPERTS)
        y = experts(a1q, a1q_scale, meta, rids, rw)
        out = np.zeros_like(x)
        pf.finalize(out, y, w, ids, False, None)
        pf.wait()
        check(f"prepare/finalize call {call} via {backend}", r, out, x, ids, w)
    runner = moe_a2a.MoeLayer(world, backend, spec(world), experts)
    x, ids, w = inputs(r, 7)
    out = np.zeros_like(x)
    runner.forward(x, ids, w, out)
    check(f"MoeLayer.forward via {backend}", r, out, x, ids, w)


def placed(world: moe_a2a.World, backend: str) -> None:
    """Experts placed by a map (expert e on rank e % world size): each rank's delivery holds
    only its own experts' ids, and the layer matches NumPy."""
    r, n = world.rank, world.world_size
    pf = moe_a2a.PrepareFinalize(
        world, backend, spec(world, expert_map=[e % n for e in range(EXPERTS)])
    )
    x, ids, w = inputs(r, 5)
    a1q, a1q_scale, meta, rids, rw = pf.prepare(x, w, ids)
    own = np.from_dlpack(rids)
    assert ((own < 0) | (own % n == r)).all(), f"rank {r} got other ranks' experts: {own}"
    out = np.zeros_like(x)
    pf.finalize(out, experts(a1q, a1q_scale, meta, rids, rw))
    check(f"experts placed by a map via {backend}", r, out, x, ids, w)


def batched(world: moe_a2a.World, backend: str) -> None:
    """The BatchedExperts format: each local expert's rows, counts and weights; expert e scales
    its rows by e + 1 and applies their weights."""
    r = world.rank
    pf = moe_a2a.PrepareFinalize(
        world, backend, spec(world, activation_format="batched_experts")
    )
    assert pf.activation_format == "batched_experts"
    local = EXPERTS // world.world_size
    x, ids, w = inputs(r, 3)
    a1q, a1q_scale, counts, rids, rw = pf.prepare(x, w, ids)
    assert a1q_scale is None and rids is None
    rows = np.from_dlpack(a1q).view(np.float16).astype(np.float32)  # [local, max_rows, hidden]
    counts, weights = np.from_dlpack(counts), np.from_dlpack(rw)  # [local], [local, max_rows]
    assert rows.shape[0] == local and counts.shape == (local,)
    y = np.zeros_like(rows)
    for e in range(local):
        n = counts[e]
        y[e, :n] = rows[e, :n] * weights[e, :n, None] * (r * local + e + 1)
    out = np.zeros_like(x)
    pf.finalize(out, y.astype(np.float16))
    check(f"batched experts via {backend}", r, out, x, ids, w)


def refused(world: moe_a2a.World, backend: str) -> None:
    """Rank 1's ids are int64: it gets the argument's error, rank 0 its peer's; then both run."""
    r = world.rank
    pf = moe_a2a.PrepareFinalize(world, backend, spec(world))
    x, ids, w = inputs(r, 0)
    try:
        pf.prepare(x, w, ids.astype(np.int64) if r == 1 else ids)
        raise AssertionError("the call with int64 ids on rank 1 succeeded")
    except moe_a2a.InvalidArgumentError as e:
        assert r == 1 and "topk_ids" in str(e), f"rank {r}: {e}"
        print(f"rank {r}: refused its own input: {e}", flush=True)
    except moe_a2a.PeerFailedError as e:
        assert r == 0 and "rank 1" in str(e), f"rank {r}: {e}"
        print(f"rank {r}: peer failure named: {e}", flush=True)
    a1q, a1q_scale, meta, rids, rw = pf.prepare(x, w, ids)
    out = np.zeros_like(x)
    pf.finalize(out, experts(a1q, a1q_scale, meta, rids, rw))
    check(f"the next call via {backend}", r, out, x, ids, w)


def aborted(world: moe_a2a.World, backend: str) -> None:
    """Rank 0 aborts the world; rank 1, waiting in its prepare, raises with the reason."""
    import time

    pf = moe_a2a.PrepareFinalize(world, backend, spec(world))
    if world.rank == 0:
        time.sleep(0.3)
        world.abort("the engine hit a fatal error")
        print("rank 0: aborted the world", flush=True)
        return
    x, ids, w = inputs(1, 0)
    started = time.monotonic()
    try:
        pf.prepare(x, w, ids)
        raise AssertionError("a prepare in an aborted world succeeded")
    except moe_a2a.PeerFailedError as e:
        took = time.monotonic() - started
        assert "rank 0 aborted the world: the engine hit a fatal error" in str(e), str(e)
        assert took < 5, f"raised after {took:.1f} s, not promptly"
        print(f"rank 1: raised after {took:.2f} s: {e}", flush=True)


def unsupported(world: moe_a2a.World, backend: str) -> None:
    try:
        moe_a2a.PrepareFinalize(world, backend, spec(world, top_k=64, num_experts=128))
        raise AssertionError(f"{backend} accepted top_k 64")
    except moe_a2a.UnsupportedError as e:
        assert "registered backends that accept it: allgather-rs" in str(e), str(e)
        print(f"rank {world.rank}: refused top_k 64: {e}".replace("\n", " "), flush=True)


def main() -> int:
    scenario, backend = sys.argv[1], sys.argv[2]
    world = moe_a2a.World.from_env()
    scenarios = {
        "layer": layer,
        "batched": batched,
        "placed": placed,
        "refused": refused,
        "unsupported": unsupported,
        "aborted": aborted,
    }
    scenarios[scenario](
        world, backend
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
