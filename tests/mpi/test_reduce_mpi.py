"""reduce_outputs under real MPI (run with: mpiexec -n 2 python -m pytest --with-mpi tests/mpi)."""

import numpy as np
import pytest

from hpcbatch.kernels.api import Output, reduce_outputs


@pytest.mark.mpi(min_size=2)
def test_every_builtin_reduce():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    r, n = comm.rank, comm.size
    outputs = {op: Output(op) for op in ("sum", "min", "max", "mean")}
    outputs["cat"] = Output("concat")
    local = {"sum": np.array([r, 1.0]), "min": r + 5, "max": np.array([[r]]), "mean": 2.0 * r,
             "cat": np.arange(r + 1, dtype=np.int32)}
    got = reduce_outputs(comm, outputs, local)
    if r != 0:
        assert got is None
        return
    assert got["sum"].tolist() == [n * (n - 1) / 2, n]
    assert got["min"] == 5 and got["max"].tolist() == [[n - 1]]
    assert got["mean"] == pytest.approx(n - 1)
    assert got["cat"].tolist() == [i for k in range(n) for i in range(k + 1)]
    assert got["cat"].dtype == np.int32


@pytest.mark.mpi(min_size=2)
def test_custom_reduce_applies_in_rank_order():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    got = reduce_outputs(comm, {"s": Output(lambda a, b: a * 10 + b)}, {"s": comm.rank + 1})
    if comm.rank == 0:
        expect = 0
        for k in range(comm.size):
            expect = expect * 10 + k + 1 if k else 1
        assert int(got["s"]) == expect
