"""The package across processes: two ranks, each a Python process, joined over TCP on
127.0.0.1 from the launchers' environment, on every built-in backend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import moe_a2a

BACKENDS = ["nvlink-one-sided", "nvlink-two-sided", "allgather-rs"]
WORKER = Path(__file__).with_name("rank_worker.py")


def run_ranks(scenario: str, backend: str, ranks: int = 2, script: Path = WORKER) -> list[str]:
    """Runs `script SCENARIO BACKEND` as `ranks` processes of one world; their outputs."""
    port = moe_a2a.World.free_local_port()
    procs = []
    for rank in range(ranks):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(ranks),
            MOE_RUN_ID=str(port),
            MOE_TIMEOUT_MS="20000",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), scenario, backend],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            pytest.fail(f"{scenario} via {backend}: rank {rank} timed out:\n{out}")
        assert p.returncode == 0, f"{scenario} via {backend}: rank {rank} failed:\n{out}"
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_two_rank_layer_matches_numpy_through_prepare_finalize_and_the_runner(backend):
    for rank, out in enumerate(run_ranks("layer", backend)):
        assert out.count(": ok") == 3, f"rank {rank}:\n{out}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_array_on_one_rank_fails_its_peer_and_the_next_call_runs(backend):
    out0, out1 = run_ranks("refused", backend)
    assert "peer failure named" in out0 and "the next call" in out0, out0
    assert "refused its own input" in out1 and "the next call" in out1, out1


@pytest.mark.parametrize("backend", ["nvlink-one-sided", "nvlink-two-sided"])
def test_the_registrys_refusal_reaches_python_with_its_message(backend):
    for out in run_ranks("unsupported", backend):
        assert "refused top_k 64" in out, out
