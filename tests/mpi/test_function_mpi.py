"""A packed Python function's reduces under real MPI, at whatever size mpiexec gives
(scripts/test.sh: ``mpiexec -n 2 python -m pytest --with-mpi tests/mpi``; try -n 3 too).

Rank 0 packs the function, every rank unpickles it from the bytes rank 0 broadcasts (as
the harness does from the task's file), calls it and reduces what it returned.
"""

import numpy as np
import pytest

from hpcbatch.kernels import function as kfn
from hpcbatch.kernels.api import ReduceError, reduce_outputs


def _unpacked(comm, tmp_dir, fn, params, outputs):
    """Every rank's FunctionKernel and params, as the harness gets them."""
    data = kfn.pack(fn, params, outputs)[0] if comm.rank == 0 else None
    data = comm.bcast(data, root=0)
    path = tmp_dir / f"function.{comm.rank}.pkl"
    path.write_bytes(data)
    return kfn.load(path)


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture
def rank_dir(comm, tmp_path_factory):
    return tmp_path_factory.mktemp(f"rank{comm.rank}")


@pytest.mark.mpi(min_size=2)
def test_every_function_reduce_over_the_ranks(comm, rank_dir):
    grid = np.arange(4.0)  # captured: travels inside the pickled closure

    def fn(comm, k):
        r = comm.rank
        return {"s": grid * r, "p": np.int64(r + k), "lo": r, "hi": float(r), "m": r,
                "c": np.full(r + 1, r), "g": grid + r, "b": r == 0}
    outputs = {"s": "sum", "p": "prod", "lo": "min", "hi": "max", "m": "mean", "c": "concat",
               "g": "gather", "b": "prod"}
    kernel, params = _unpacked(comm, rank_dir, fn, {"k": 2}, outputs)
    got = reduce_outputs(comm, kernel.outputs, kernel.run(comm, **params), source="fn()")
    n = comm.size
    if comm.rank:
        assert got is None
        return
    np.testing.assert_array_equal(got["s"], grid * sum(range(n)))
    assert got["p"] == np.prod([r + 2 for r in range(n)])
    assert (got["lo"], got["hi"]) == (0, n - 1)
    assert got["m"] == pytest.approx((n - 1) / 2)
    assert got["c"].tolist() == [r for r in range(n) for _ in range(r + 1)]
    assert got["g"].shape == (n, 4) and got["g"].tolist() == [(grid + r).tolist()
                                                              for r in range(n)]
    assert got["b"].dtype == np.bool_ and not got["b"]  # the product of True, False, ...


@pytest.mark.mpi(min_size=2)
def test_a_callable_reduce_travels_with_the_function(comm, rank_dir):
    kernel, params = _unpacked(comm, rank_dir, lambda comm: {"digits": comm.rank + 1}, {},
                               {"digits": lambda a, b: a * 10 + b})
    got = reduce_outputs(comm, kernel.outputs, kernel.run(comm))
    if comm.rank == 0:
        assert int(got["digits"]) == int("".join(str(r + 1) for r in range(comm.size)))


@pytest.mark.mpi(min_size=2)
def test_a_missing_key_on_the_last_rank_is_named_on_every_rank(comm, rank_dir):
    last = comm.size - 1
    kernel, _ = _unpacked(comm, rank_dir,
                          lambda comm: {"b": 1} if comm.rank == comm.size - 1 else {"a": 1},
                          {}, {"a": "sum"})
    with pytest.raises(ReduceError, match=rf"output 'a' on rank {last}: fn\(\) returned no "
                       r"value for it \(it returned: 'b'\)"):
        reduce_outputs(comm, kernel.outputs, kernel.run(comm), source="fn()")
    comm.Barrier()  # every rank raised, none is left in a collective


@pytest.mark.mpi(min_size=2)
def test_gather_needs_one_shape_on_every_rank(comm, rank_dir):
    kernel, _ = _unpacked(comm, rank_dir, lambda comm: {"g": np.zeros(comm.rank + 1)}, {},
                          {"g": "gather"})
    with pytest.raises(ReduceError, match=r"output 'g' \(gather\): every rank must return "
                       r"the same shape, got rank 0 \(1,\), rank 1 \(2,\)"):
        reduce_outputs(comm, kernel.outputs, kernel.run(comm))
