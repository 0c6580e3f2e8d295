"""What calling the library from Python costs on the host: `PrepareFinalize.prepare` +
`finalize` made from Python against the same calls driven from Rust on the same arrays
(`_rust_seconds_per_call`), alternating in one run, two ranks as processes. Prints a Markdown
table of the medians (us of host time per call).

    python3 python/benches/host_cost.py [--gpu [--side-stream] | --one-rank [--full-layer]] [CALLS_PER_ROUND [ROUNDS]]

By default NumPy arrays on the host platform, every built-in backend. With `--gpu`, PyTorch
tensors on the GPUs of this host (ranks sharing one where there is one) on PyTorch's current
stream, the peer-memory backends (NCCL refuses two ranks on one GPU): the calls enqueue work
and return, so the times are the host's cost of enqueuing a call; each round ends waiting for
the stream, outside the timing. PyTorch's current stream is its default stream (handle 0, for
which the library makes a stream of its own, so every array crosses with DLPack's stream
ordering), or with `--side-stream` a stream the ranks make current, which the library runs
on (no ordering: arrays cross through DLPack's C exchange table). With `--one-rank`, one rank
in this process (allgather-rs, the backend of a single rank) with NumPy arrays: the binding's
own cost with no peer in the call, the least noisy reading on a small host; on a layer of 4
tokens of 32 values, or with `--full-layer` the two-rank mode's.
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

import moe_a2a

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ranks import run_ranks  # noqa: E402

EXPERTS, TOP_K, HIDDEN, TOKENS = 16, 4, 1024, 32
BACKENDS = ["allgather-rs", "nvlink-one-sided", "nvlink-two-sided"]
PEER_BACKENDS = ["nvlink-one-sided", "nvlink-two-sided"]


def rank_main(backend: str, calls: int, rounds: int, gpu: bool, side_stream: bool) -> None:
    if gpu:
        import os

        import torch

        device = int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count()
        torch.cuda.set_device(device)
        if side_stream:
            torch.cuda.set_stream(torch.cuda.Stream())
        world = moe_a2a.World.from_env(device=device, stream=torch.cuda.current_stream().cuda_stream)
        on = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
        zeros = lambda shape: torch.zeros(shape, dtype=torch.float16, device="cuda")  # noqa: E731
    else:
        world = moe_a2a.World.from_env()
        on = lambda a: a  # noqa: E731
        zeros = lambda shape: np.zeros(shape, dtype=np.float16)  # noqa: E731
    spec = moe_a2a.LayerSpec(
        num_experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, max_tokens_per_rank=TOKENS,
        input_dtype="float16", quant="fp16",
    )
    py_us, rust_us = measure(world, backend, spec, calls, rounds, on, zeros)
    print(f"RESULT {world.rank} {backend} {py_us:.1f} {rust_us:.1f}", flush=True)


def measure(world, backend: str, spec, calls: int, rounds: int, on, zeros) -> tuple:
    """Median us per prepare + finalize of `backend` on `world` made from Python and driven
    from Rust, alternating `rounds` rounds of `calls` calls."""
    pf = moe_a2a.PrepareFinalize(world, backend, spec)
    rng = np.random.default_rng(world.rank)
    tokens, hidden, experts, top_k = spec.max_tokens_per_rank, spec.hidden, spec.num_experts, spec.top_k
    x = on((rng.integers(-8, 9, size=(tokens, hidden)) / 8).astype(np.float16))
    ids = on(np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int32))
    w = on(rng.uniform(0.1, 1.0, size=(tokens, top_k)).astype(np.float32))
    out = zeros((tokens, hidden))
    a1q = pf.prepare(x, w, ids)[0]
    y = zeros((a1q.shape[0], hidden))
    pf.finalize(out, y)
    pf.wait()
    from_python, from_rust = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            pf.prepare(x, w, ids)
            pf.finalize(out, y)
        from_python.append((time.perf_counter() - start) / calls)
        pf.wait()
        from_rust.append(pf._native._rust_seconds_per_call(x, w, ids, y, out, calls))
        pf.wait()
    return statistics.median(from_python) * 1e6, statistics.median(from_rust) * 1e6


def print_header(title: str) -> None:
    print(title)
    print()
    print("| backend | from Python | from Rust | Python's cost |")
    print("|---|---|---|---|")


def print_row(backend: str, py_us: float, rust_us: float) -> None:
    print(f"| {backend} | {py_us:.1f} | {rust_us:.1f} | {py_us - rust_us:+.1f} |", flush=True)


def main(args: list) -> None:
    gpu = "--gpu" in args
    side_stream = "--side-stream" in args
    one_rank = "--one-rank" in args
    # With --one-rank: the two-rank mode's layer instead of the smallest.
    full_layer = "--full-layer" in args
    numbers = [a for a in args if a not in ("--gpu", "--side-stream", "--one-rank", "--full-layer")]
    default_calls, default_rounds = (2000, 15) if one_rank else (200, 7)
    calls = int(numbers[0]) if numbers else default_calls
    rounds = int(numbers[1]) if len(numbers) > 1 else default_rounds
    if one_rank:
        # By default a layer small enough that the call's own work does not hide the binding's.
        experts, top_k, hidden, tokens = (EXPERTS, TOP_K, HIDDEN, TOKENS) if full_layer else (4, 2, 32, 4)
        world = moe_a2a.World.connect("127.0.0.1", moe_a2a.World.free_local_port(), 0, 1, timeout_s=20.0)
        spec = moe_a2a.LayerSpec(
            num_experts=experts, top_k=top_k, hidden=hidden, max_tokens_per_rank=tokens,
            input_dtype="float16", quant="fp16", ep=False,
        )
        zeros = lambda shape: np.zeros(shape, dtype=np.float16)  # noqa: E731
        py_us, rust_us = measure(world, "allgather-rs", spec, calls, rounds, lambda a: a, zeros)
        print_header(f"{tokens} tokens of {hidden} fp16 values, top-{top_k} of {experts} experts, one rank in this "
                     f"process, NumPy arrays on the host platform; median of {rounds} rounds of {calls} calls; "
                     f"host us per call")
        print_row("allgather-rs", py_us, rust_us)
        return
    where = "NumPy arrays on the host platform"
    if gpu:
        where = "PyTorch tensors on the GPU, on " + ("a side stream" if side_stream else "PyTorch's default stream")
    print_header(f"{TOKENS} tokens of {HIDDEN} fp16 values per rank, top-{TOP_K} of {EXPERTS} experts, 2 ranks as "
                 f"processes, {where}; median of {rounds} rounds of {calls} calls, slower rank; host us per call")
    for backend in PEER_BACKENDS if gpu else BACKENDS:
        args = [Path(__file__).resolve(), "--rank", backend, calls, rounds, int(gpu), int(side_stream)]
        outs = run_ranks(args, timeout_s=600)
        rows = [line.split() for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(rows) == 2, f"{backend}: {outs}"
        print_row(backend, max(float(r[3]) for r in rows), max(float(r[4]) for r in rows))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1")
    else:
        main(sys.argv[1:])
