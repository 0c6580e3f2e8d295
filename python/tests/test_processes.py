"""The package across processes: two ranks, each a Python process, joined over TCP on
127.0.0.1 from the launchers' environment, on every built-in backend."""

from pathlib import Path

import pytest

from ranks import run_ranks

BACKENDS = ["nvlink-one-sided", "nvlink-two-sided", "allgather-rs"]
WORKER = Path(__file__).with_name("rank_worker.py")


def run_worker(scenario: str, backend: str) -> list:
    return run_ranks([WORKER, scenario, backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_two_rank_layer_matches_numpy_through_prepare_finalize_and_the_runner(backend):
    for rank, out in enumerate(run_worker("layer", backend)):
        assert out.count(": ok") == 3, f"rank {rank}:\n{out}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_array_on_one_rank_fails_its_peer_and_the_next_call_runs(backend):
    out0, out1 = run_worker("refused", backend)
    assert "peer failure named" in out0 and "the next call" in out0, out0
    assert "refused its own input" in out1 and "the next call" in out1, out1


@pytest.mark.parametrize("backend", ["nvlink-one-sided", "nvlink-two-sided"])
def test_the_registrys_refusal_reaches_python_with_its_message(backend):
    for out in run_worker("unsupported", backend):
        assert "refused top_k 64" in out, out


def test_the_batched_experts_format_matches_numpy():
    for rank, out in enumerate(run_worker("batched", "nvlink-one-sided")):
        assert "batched experts via nvlink-one-sided" in out and ": ok" in out, f"rank {rank}:\n{out}"


def test_an_aborted_world_raises_at_the_waiting_peer_with_the_reason():
    out0, out1 = run_worker("aborted", "nvlink-two-sided")
    assert "aborted the world" in out0, out0
    assert "raised after" in out1, out1


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_placed_by_a_map_reach_their_owners(backend):
    for rank, out in enumerate(run_worker("placed", backend)):
        assert "experts placed by a map" in out and ": ok" in out, f"rank {rank}:\n{out}"
