"""Run a kernel on every rank, reduce to rank 0, write the HDF5 result file.

    mpiexec -n 4 python -m hpcbatch.kernels pi --param samples=1e7 --output pi.h5

Parameters are checked before MPI starts (bad ones: one line, exit 2). If any
rank raises, its traceback goes to stderr prefixed ``[rank N]`` and the job is
aborted with MPI_Abort, so mpiexec exits non-zero at once instead of hanging.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T_START = time.time()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


def _abort(comm, rank: int, where: str) -> None:
    text = traceback.format_exc()
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in
                             [f"{where} failed:"] + text.rstrip().splitlines()))
    sys.stderr.flush()
    comm.Abort(1)


def _summary(value: Any) -> Any:
    import numpy as np
    arr = np.asarray(value)
    if arr.size <= 16:
        return arr.tolist()
    return {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def main(argv: list[str] | None = None) -> int:
    from hpcbatch.kernels import api

    ap = _Parser(prog="python -m hpcbatch.kernels",
                 description="Run an hpcbatch kernel under mpiexec and write its HDF5 result.")
    ap.add_argument("kernel", nargs="?", help="built-in name, dotted module, or .py path")
    ap.add_argument("--param", "-p", action="append", default=[], metavar="K=V")
    ap.add_argument("--output", "-o", help="result file (HDF5)")
    ap.add_argument("--compress", action="store_true", help="gzip large datasets")
    ap.add_argument("--json", action="store_true", help="print a JSON summary on rank 0")
    ap.add_argument("--list", action="store_true", help="list the built-in kernels")
    args = ap.parse_args(argv)
    if args.list:
        for name in api.list_kernels():
            k = api.load_kernel(name)
            print(f"{name:12s} {k.description.splitlines()[0] if k.description else ''}")
            print(f"{'':12s} {k.signature()}")
        return 0
    if not args.kernel:
        ap.error("give a kernel name (see --list)")
    if not args.output:
        ap.error("--output FILE.h5 is required")
    try:
        kernel = api.load_kernel(args.kernel)
        params = api.parse_params(kernel, args.param)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    output = Path(args.output).resolve()
    if not output.parent.is_dir():
        sys.stderr.write(f"error: --output: directory {output.parent} does not exist\n")
        return 2

    launch_t0 = float(os.environ.get("HPCBATCH_LAUNCH_T0") or T_START)
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    t_ready = time.time()
    try:
        local = kernel.run(comm, **params)
    except Exception:
        _abort(comm, rank, f"{kernel.name}.run")
    t_computed = time.time()
    try:
        reduced = api.reduce_outputs(comm, kernel.outputs, local)
        # the node's own name (its sshd sets HPCBATCH_NODE), else the host name; not
        # HPCBATCH_NODE_ID, which remote ranks inherit from the primary
        host = os.environ.get("HPCBATCH_NODE") or socket.gethostname()
        hosts = comm.gather(host, root=0)
        # per-rank outputs: small ones travel to rank 0, large ones stay in per-rank files
        keep = [n for n, o in kernel.outputs.items() if o.per_rank]
        per_rank, rank_files = {}, {}
        for name in keep:
            arr = np.asarray(local[name])
            big = comm.allreduce(arr.nbytes) > 8 << 20
            if big:
                from hpcbatch.kernels.results import write_rank_part
                write_rank_part(output, rank, name, arr)
                parts = comm.gather((arr.shape, arr.dtype.str), root=0)
                if rank == 0:
                    rank_files[name] = parts
            else:
                parts = comm.gather(arr, root=0)
                if rank == 0:
                    per_rank[name] = parts
    except Exception:
        _abort(comm, rank, "reduce")
    t_reduced = time.time()
    if rank == 0:
        try:
            final = kernel.finalize(reduced, params)
            import h5py
            import mpi4py

            from hpcbatch._version import __version__
            from hpcbatch.kernels.results import write_result
            timings = {"launch": t_ready - launch_t0, "compute": t_computed - t_ready,
                       "reduce": t_reduced - t_computed}
            reduces = {n: (o.reduce if isinstance(o.reduce, str) else "custom")
                       for n, o in kernel.outputs.items()}
            attrs = {"kernel": kernel.name, "params": params, "ranks": size, "hosts": hosts,
                     "mpi_library": MPI.Get_library_version().replace("\0", "")
                     .splitlines()[0].strip(),
                     "mpi4py_version": mpi4py.__version__, "numpy_version": np.__version__,
                     "h5py_version": h5py.__version__, "hpcbatch_version": __version__,
                     "start_utc": _utc(launch_t0)}
            t_write = time.time()
            timings["write"] = 0.0
            attrs["end_utc"] = _utc(t_write)
            write_result(output, reduced=final, reduces=reduces, attrs=attrs, timings=timings,
                         per_rank=per_rank, rank_files=rank_files, compress=args.compress)
            timings["write"] = time.time() - t_write
            import h5py as _h5
            with _h5.File(output, "a") as f:  # the write time is known only now
                f.attrs["timings"] = json.dumps(timings)
                f.attrs["timing_write_s"] = timings["write"]
                f.attrs["end_utc"] = _utc(time.time())
            if args.json:
                print(json.dumps({"kernel": kernel.name, "output": str(output), "ranks": size,
                                  "timings": timings,
                                  "reduced": {k: _summary(v) for k, v in final.items()}}))
                sys.stdout.flush()
        except Exception:
            _abort(comm, rank, "write")
    comm.Barrier()
    return 0
