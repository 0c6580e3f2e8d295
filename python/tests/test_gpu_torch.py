"""The package on a GPU with PyTorch tensors: two ranks, each a process, on the GPUs of this
host (sharing one where there is one), their work on PyTorch's current stream; device arrays in
and out through DLPack, checked against the same layer computed by PyTorch on the CPU, bit for
bit as the library's host platform computes it.

Runs where torch sees a GPU and the package was built with the GPU platform
(`maturin build --features cuda`): ``python3 gpu_torch.py`` (no pytest needed), or through
pytest, which skips it elsewhere with the reason."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import run_ranks  # noqa: E402

EXPERTS, TOP_K, HIDDEN, TOKENS = 16, 4, 128, 8
# NCCL refuses two ranks on one GPU, so allgather-rs needs a GPU per rank.
PEER_BACKENDS = ["nvlink-one-sided", "nvlink-two-sided"]


def why_not_here():
    """Why this host cannot run the check, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch sees no GPU"
    import moe_a2a

    if not moe_a2a.World.has_gpu_platform():
        return "moe_a2a was built without the GPU platform (maturin build --features cuda)"
    return None


def rank_main(backend: str) -> None:
    import torch

    import moe_a2a

    rank = int(os.environ["RANK"])
    device = int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count()
    torch.cuda.set_device(device)
    stream = torch.cuda.current_stream().cuda_stream
    world = moe_a2a.World.from_env(device=device, stream=stream)
    spec = moe_a2a.LayerSpec(
        num_experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, max_tokens_per_rank=TOKENS
    )
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randint(-8, 9, (TOKENS, HIDDEN), generator=gen) / 8).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(TOKENS)]).int()
    w = torch.rand((TOKENS, TOP_K), generator=gen) * 0.9 + 0.1
    want = x.double() * (w.double() * (ids + 1).double()).sum(1, keepdim=True)

    # Where each delivery the experts were handed was: on the GPU for device inputs, in host
    # memory for host inputs.
    delivered_on_gpu = []

    def experts(a1q, a1q_scale, meta, topk_ids, topk_weights):
        rows = torch.from_dlpack(a1q)
        delivered_on_gpu.append(rows.is_cuda)
        xs = rows.view(torch.bfloat16).float()
        i, ws = torch.from_dlpack(topk_ids), torch.from_dlpack(topk_weights)
        # One weighted term at a time in top-k order: the same f32 operations on either device
        # (a reduction's order is the device's choice), so bits can be compared.
        scale = torch.zeros_like(ws[:, :1])
        for j in range(TOP_K):
            term = torch.where(i[:, j:j + 1] >= 0, ws[:, j:j + 1] * (i[:, j:j + 1] + 1).float(), 0.0)
            scale = scale + term
        return (xs * scale).to(torch.bfloat16)

    # The bits the library's host platform gives (the Rust path's oracle of bits): each rank a
    # token went to scales it by its experts' terms (in top-k order) into a bf16 row, and the
    # token's rows are summed in f32 in the order the ranks first appear in its top-k row, then
    # rounded to bf16.
    per_rank = EXPERTS // world.world_size
    bits = torch.empty_like(x)
    for t in range(TOKENS):
        owners = [int(e) // per_rank for e in ids[t]]
        acc = torch.zeros(HIDDEN, dtype=torch.float32)
        for owner in dict.fromkeys(owners):
            scale = torch.zeros((), dtype=torch.float32)
            for j in range(TOP_K):
                if owners[j] == owner:
                    scale = scale + w[t, j] * (ids[t, j] + 1).float()
            acc = acc + (x[t].float() * scale).to(torch.bfloat16).float()
        bits[t] = acc.to(torch.bfloat16)

    def check(label, out):
        assert out.is_cuda
        got = out.cpu()
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, f"rank {rank}: {label}: relative error {err:.1e}"
        differ = (got.view(torch.int16) != bits.view(torch.int16)).sum().item()
        assert differ == 0, f"rank {rank}: {label}: {differ} elements differ from the host platform's bits"
        print(f"rank {rank}: {label} via {backend} on GPU {device}: max relative error {err:.1e}, the host platform's bits: ok", flush=True)

    gx, gids, gw = x.cuda(), ids.cuda(), w.cuda()
    pf = moe_a2a.PrepareFinalize(world, backend, spec)
    for call in range(2):
        a1q, a1q_scale, meta, rids, rw = pf.prepare(gx, gw, gids)
        out = torch.empty_like(gx)
        pf.finalize(out, experts(a1q, a1q_scale, meta, rids, rw))
        pf.wait()
        assert delivered_on_gpu[-1], "a delivery of device inputs on the GPU"
        check(f"prepare/finalize call {call}", out)
    layer = moe_a2a.MoeLayer(world, backend, spec, experts)
    out = torch.zeros_like(gx)
    layer.forward(gx, gids, gw, out)
    layer.wait()
    assert delivered_on_gpu[-1], "the runner's delivery of device inputs on the GPU"
    check("MoeLayer.forward", out)
    # Host tensors still work on a GPU rank.
    host_out = torch.zeros_like(x)
    layer.forward(x, ids, w, host_out)
    assert not delivered_on_gpu[-1], "the runner's delivery of host inputs in host memory"
    err = ((host_out.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-2, f"rank {rank}: host tensors on a GPU rank: relative error {err:.1e}"
    assert torch.equal(host_out.view(torch.int16), bits.view(torch.int16)), (
        f"rank {rank}: host tensors on a GPU rank: bits differ from the host platform's"
    )
    print(f"rank {rank}: host tensors via {backend}: ok", flush=True)


def torch_bootstrap_main() -> None:
    """A world joined through an initialized torch.distributed group (gloo, on the CPU), then
    a host layer through it."""
    import torch
    import torch.distributed as dist

    import moe_a2a

    dist.init_process_group("gloo")
    world = moe_a2a.world_from_torch()
    assert (world.rank, world.world_size) == (dist.get_rank(), dist.get_world_size())
    spec = moe_a2a.LayerSpec(
        num_experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN, max_tokens_per_rank=TOKENS,
        input_dtype="float16", quant="fp16",
    )
    pf = moe_a2a.PrepareFinalize(world, "allgather-rs", spec)
    x = torch.ones((TOKENS, HIDDEN), dtype=torch.float16)
    ids = torch.stack([torch.arange(TOP_K) + t % 4 for t in range(TOKENS)]).int()
    w = torch.full((TOKENS, TOP_K), 0.25)
    a1q, _, _, rids, rw = pf.prepare(x, w, ids)
    xs = torch.from_dlpack(a1q).view(torch.float16).float()
    i, ws = torch.from_dlpack(rids), torch.from_dlpack(rw)
    local = torch.where(i >= 0, ws, torch.zeros_like(ws)).sum(1, keepdim=True)
    out = torch.zeros_like(x)
    pf.finalize(out, (xs * local).half())
    assert torch.equal(out, x), "each token's weights sum to 1 over the ranks' experts"
    print(f"rank {world.rank}: a world from torch.distributed: ok", flush=True)
    dist.destroy_process_group()


def run(backend: str) -> list:
    """Both ranks of `backend`'s check (or of the torch.distributed one); their outputs."""
    outs = run_ranks([Path(__file__).resolve(), "--rank", backend], timeout_s=240)
    want = 1 if backend == "torch.distributed" else 4
    for rank, out in enumerate(outs):
        assert out.count(": ok") == want, f"{backend}: rank {rank}:\n{out}"
    return outs


def test_a_world_joins_through_a_torch_distributed_group():
    import pytest

    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is not installed")
    run("torch.distributed")


def test_torch_tensors_on_the_gpu_match_the_cpu_on_every_peer_backend():
    import pytest

    reason = why_not_here()
    if reason:
        pytest.skip(reason)
    for backend in PEER_BACKENDS:
        run(backend)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank":
        if sys.argv[2] == "torch.distributed":
            torch_bootstrap_main()
        else:
            rank_main(sys.argv[2])
        sys.exit(0)
    reason = why_not_here()
    if reason:
        print(f"gpu_torch: not run: {reason}")
        sys.exit(1)
    for line in "".join(run("torch.distributed")).splitlines():
        print(line)
    for backend in PEER_BACKENDS:
        for line in "".join(run(backend)).splitlines():
            print(line)
    print("gpu_torch: every check passed")
