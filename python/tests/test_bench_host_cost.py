"""The package's host-cost benchmark (python/benches/host_cost.py) runs: a few calls per backend
from Python and from Rust, and its table has a row for each."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benches" / "host_cost.py"


def test_the_host_cost_benchmark_prints_a_row_per_backend():
    done = subprocess.run(
        [sys.executable, str(BENCH), "3", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    backends = [row.split("|")[1].strip() for row in rows[1:]]
    assert backends == ["allgather-rs", "nvlink-one-sided", "nvlink-two-sided"], done.stdout


@pytest.mark.parametrize("layer", [[], ["--full-layer"]], ids=["smallest", "full"])
def test_the_one_rank_host_cost_benchmark_prints_its_row(layer):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--one-rank", *layer, "3", "1"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| allgather-rs |")]
    assert len(rows) == 1, done.stdout
    assert ("32 tokens of 1024" in done.stdout) == bool(layer), done.stdout
