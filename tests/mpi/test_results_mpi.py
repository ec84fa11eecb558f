"""Per-rank part files written by each rank, joined by rank 0's virtual dataset, under
real MPI (mpiexec -n 2 python -m pytest --with-mpi tests/mpi)."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hpcbatch.kernels import results


@pytest.mark.mpi(min_size=2)
def test_each_rank_writes_its_part_and_a_missing_one_reads_nan():
    import h5py
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    r, n = comm.rank, comm.size
    where = Path(comm.bcast(tempfile.mkdtemp(prefix="hpcb-vds-") if r == 0 else None))
    out = where / "res.h5"
    run_id = comm.bcast(results.new_run_id() if r == 0 else None)
    mine = np.full((r + 2, 3), float(r))  # uneven parts
    try:
        results.write_rank_part(out, r, {"v": mine}, run_id=run_id)
        shapes = comm.gather((mine.shape, mine.dtype.str))
        if r == 0:
            results.write_result(out, reduced={"n": n}, reduces={"n": "sum"},
                                 attrs={"ranks": n, "params": {"k": 1}}, timings={},
                                 rank_files={"v": shapes}, run_id=run_id,
                                 descriptions={"v": "each rank's block"}, units={"v": "m"})
        comm.Barrier()
        res = results.read_result(out)  # every rank reads the joined dataset
        got = res.per_rank("v")
        assert [g.shape for g in got] == [(k + 2, 3) for k in range(n)]
        assert all((got[k] == k).all() for k in range(n))
        comm.Barrier()
        if r == 0:
            results.rank_part_path(out, n - 1, run_id).unlink()
            with h5py.File(out, "r") as f:
                v = f["ranks/v"][()]
                assert f["ranks/v"].attrs["units"] == "m"
            last = sum(k + 2 for k in range(n - 1))
            assert np.isnan(v[last:]).all() and (v[:2] == 0).all()
            gone = results.missing_parts(out)
            assert [(m.rank, m.file) for m in gone] == [
                (n - 1, f"res.{run_id}.rank{n - 1}.h5")]
        comm.Barrier()
    finally:
        comm.Barrier()
        if r == 0:
            shutil.rmtree(where, ignore_errors=True)
