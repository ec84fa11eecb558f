from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcbatch.kernels.results import read_result
from hpcbatch.launch.mpi import mpiexec_command


def run_harness(kernel: str, ranks: int, out: Path, params: dict | None = None,
                timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "hpcbatch.kernels", kernel, "--output", str(out)]
    for k, v in (params or {}).items():
        argv += ["--param", f"{k}={v}"]
    cmd, env = mpiexec_command(ranks, argv, oversubscribe=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def harness(tmp_path):
    """Run a kernel under real mpiexec and read its result file back."""
    def call(kernel: str, ranks: int, **params):
        out = tmp_path / f"{Path(kernel).stem}-{ranks}.h5"
        run_harness(kernel, ranks, out, params)
        return read_result(out)
    return call


@pytest.fixture
def harness_to():
    """Run a kernel under real mpiexec into the given result file."""
    def call(kernel: str, ranks: int, out: Path, params: dict | None = None) -> Path:
        run_harness(kernel, ranks, out, params)
        return out
    return call


@pytest.fixture
def harness_proc():
    """run_harness itself: the finished mpiexec (check=False lets a failure through)."""
    return run_harness
