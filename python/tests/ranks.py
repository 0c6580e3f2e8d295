"""Starting a world's ranks as Python processes for the tests: each with the environment
torchrun sets, joined over TCP on 127.0.0.1. No pytest needed, so GPU hosts run it bare."""

import os
import subprocess
import sys

import moe_a2a


def run_ranks(args: list, ranks: int = 2, timeout_s: float = 90.0) -> list:
    """Runs ``python3 *args`` as ``ranks`` processes of one world and returns their outputs,
    raising AssertionError naming the rank when one fails or outlives ``timeout_s``."""
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
                [sys.executable, *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"{args}: rank {rank} timed out:\n{out}")
        assert p.returncode == 0, f"{args}: rank {rank} failed:\n{out}"
        outputs.append(out)
    return outputs
