"""Run a kernel on every rank, reduce to rank 0, write the HDF5 result file.

    mpiexec -n 4 python -m hpcbatch.kernels pi --param samples=1e7 --output pi.h5 [--json]
    mpiexec -n 4 python -m hpcbatch.kernels --function function.pkl --output fn.h5
    python -m hpcbatch.kernels --list [--json]

The kernel and its parameters are checked before MPI is initialised: a bad kernel,
parameter or value prints one line ``error: ...`` on stderr (once, from rank 0 when
under mpiexec) and exits 2. ``--function FILE`` runs a packed Python function
(``hpcbatch.kernels.function``: what ``batch.run_kernel(fn, ...)`` sends) instead of a
kernel module; it is unpickled on every rank once MPI is up, so a rank that cannot
(another Python, a missing module) aborts the run like a rank that raises. If any
rank raises, its traceback goes to stderr, every line prefixed ``[rank N]``, and the
job is aborted with ``MPI_Abort(1)``, so mpiexec exits non-zero at once instead of
leaving the other ranks waiting.

Phases timed (seconds, in the result file's ``timings``): ``launch`` from the process
start (or from ``HPCBATCH_LAUNCH_T0``, an epoch time a launcher sets before starting
mpiexec) until MPI is initialised, the slowest rank; ``compute`` the kernel's run(),
the slowest rank; ``reduce`` on rank 0 (including finalize); ``write`` the result file
and per-rank parts, on rank 0.

With ``--json``, rank 0 prints one JSON object on stdout: kernel, output, ranks, run_id,
node_ids, hostnames, params, timings, and the reduced outputs (values of up to 16
elements; shape and dtype of larger ones).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T_IMPORT = time.time()
LAUNCH_T0_ENV = "HPCBATCH_LAUNCH_T0"
SMALL = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        _error(message)


def _launcher_rank() -> int | None:
    """This process's rank as the launcher says it (before MPI is initialised)."""
    for key in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return None


def _error(message: str) -> None:
    if (_launcher_rank() or 0) == 0:  # one line per run, not one per rank
        sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
        sys.stderr.flush()
    raise SystemExit(2)


def process_start_time() -> float:
    """Epoch time this process started (Linux /proc, 10 ms resolution); else when this
    module was imported."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # seconds since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        if 0 <= age < 3600:
            return min(time.time() - age, T_IMPORT)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return T_IMPORT


def host_name() -> str:
    """The node id this rank reports in ``node_ids``: HPCBATCH_NODE (a node's own name, set by
    the node), else HPCBATCH_NODE_ID when the task spans one node (in a multi-node task
    remote ranks inherit the primary's), else the host name."""
    node = os.environ.get("HPCBATCH_NODE")
    if node:
        return node
    node_id = os.environ.get("HPCBATCH_NODE_ID")
    try:
        instances = int(os.environ.get("HPCBATCH_NUM_INSTANCES") or 1)
    except ValueError:
        instances = 1
    if node_id and instances <= 1:
        return node_id
    return socket.gethostname()


def _tell_launcher(rank: int) -> None:
    """Before MPI_Abort: tell hpcbatch-mpiexec (when it started this rank), so an mpiexec
    that hangs after the abort (PRRTE across nodes can) is stopped, not waited for."""
    from hpcbatch.env import LAUNCH_ABORT
    token, _, where = os.environ.get(LAUNCH_ABORT, "").partition("@")
    host, _, port = where.rpartition(":")
    if not (token and host and port.isdigit()):
        return
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(f"{token} abort {rank}\n".encode())
    except OSError:
        pass


# the shared-memory segments MPI libraries keep in /dev/shm: MPICH's, Open MPI's sm (and
# vader) BTL's. Each unlinks its own at MPI_Finalize; a run aborted never gets there.
MPI_SHM_PREFIXES = ("mpich_shm_", "sm_segment.", "vader_segment.")


def _unlink_mpi_segments() -> None:
    """Before this rank aborts the run: unlink the MPI segments it has mapped (every rank
    of the node maps them; what is mapped stays usable, unlinked, until the ranks are
    gone), so an aborted run leaves nothing in /dev/shm. Only ours, only under
    /dev/shm, only those MPI names (the agent's own helpers, as for a task it kills)."""
    try:
        from hpcbatch.launch.agent import remove_shm_files, shm_files_of
        remove_shm_files(p for p in shm_files_of(["self"])
                         if os.path.basename(p).startswith(MPI_SHM_PREFIXES))
    except Exception:  # noqa: BLE001 - on the way to MPI_Abort: nothing may stop it
        pass


def _abort(comm, rank: int, where: str, skip: int = 0) -> None:
    """Print the exception being handled (less its ``skip`` innermost harness frames),
    every line prefixed ``[rank N]``, and abort every rank."""
    exc = sys.exc_info()[1]
    tb = exc.__traceback__ if exc is not None else None
    for _ in range(skip):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if exc is not None \
        else traceback.format_exc()
    lines = [f"{where} failed:", *text.rstrip().splitlines()]
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in lines))
    sys.stderr.flush()
    sys.stdout.flush()
    _abort_now(comm, rank)


def _abort_now(comm, rank: int) -> None:
    """Tell the launcher, leave nothing in /dev/shm, and abort every rank."""
    _tell_launcher(rank)
    _unlink_mpi_segments()
    comm.Abort(1)
    os._exit(1)  # Abort does not return; this is belt and braces


def _jsonable(value: Any) -> Any:
    import numpy as np
    arr = np.asarray(value)
    if arr.size > SMALL or arr.dtype.kind not in "biufc":
        return {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if arr.dtype.kind == "c":
        return {"real": arr.real.tolist(), "imag": arr.imag.tolist()}
    return arr.tolist()


def catalogue(as_json: bool = False) -> str:
    """The built-in kernels: name, description, parameters (``--list``)."""
    from hpcbatch.kernels import api
    entries, lines = [], []
    for name in api.list_kernels():
        try:
            k = api.load_kernel(name)
        except ValueError as exc:
            lines.append(f"{name:12s} (cannot load: {exc})")
            entries.append({"name": name, "error": str(exc)})
            continue
        first = k.description.splitlines()[0] if k.description else ""
        lines.append(f"{name:12s} {first}")
        lines.append(f"{'':12s} {k.signature()}")
        entries.append({
            "name": name, "description": k.description,
            "params": {n: {"type": p.type.__name__, "default": p.default, "help": p.help,
                           "min": p.min, "max": p.max,
                           "choices": list(p.choices) if p.choices else None}
                       for n, p in k.params.items()},
            "outputs": {n: {"reduce": o.reduce_name, "per_rank": o.per_rank,
                            "description": o.description, "units": o.units,
                            "stored": o.keep} for n, o in k.outputs.items()},
            "derived": {n: {"description": d.description, "units": d.units}
                        for n, d in k.derived.items()}})
    return json.dumps(entries, indent=2) if as_json else "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hpcbatch.kernels import api

    ap = _Parser(prog="python -m hpcbatch.kernels",
                 description="Run an hpcbatch kernel on every MPI rank, reduce to rank 0 and "
                 "write the HDF5 result file. Run it under mpiexec.")
    ap.add_argument("kernel", nargs="?", help="built-in name, dotted module, or .py path")
    ap.add_argument("--param", "-p", action="append", default=[], metavar="K=V",
                    help="a kernel parameter; repeat for several")
    ap.add_argument("--output", "-o", help="result file (HDF5)")
    ap.add_argument("--compress", action="store_true", help="gzip datasets above 1 MiB")
    ap.add_argument("--json", action="store_true", help="print a JSON summary (rank 0)")
    ap.add_argument("--list", action="store_true", help="list the built-in kernels and exit")
    ap.add_argument("--function", metavar="FILE",
                    help="a packed Python function (batch.run_kernel(fn, ...)) to run instead "
                    "of a kernel")
    args = ap.parse_args(argv)
    if args.list:
        print(catalogue(args.json))
        return 0
    if args.function:
        if args.kernel:
            ap.error("give a kernel or --function FILE, not both")
        if not args.output:
            ap.error("--output FILE.h5 is required")
        from hpcbatch.kernels import function
        fn_file = function.find(args.function)
        try:
            header, _ = function.read_header(fn_file)
        except ValueError as exc:
            _error(str(exc))
        output = _output(args.output)
        return _run(None, {}, output, args, _launch_t0(),
                    load=lambda: function.load(fn_file), name=header["name"])
    if not args.kernel:
        ap.error("give a kernel name (see --list)")
    if not args.output:
        ap.error("--output FILE.h5 is required")
    try:
        kernel = api.load_kernel(args.kernel)
        params = api.parse_params(kernel, args.param)
    except ValueError as exc:
        _error(str(exc))
    return _run(kernel, params, _output(args.output), args, _launch_t0())


def _output(text: str) -> Path:
    output = Path(text).expanduser().resolve()
    if output.is_dir():
        _error(f"--output {output} is a directory; give a file name such as result.h5")
    if not output.parent.is_dir():
        _error(f"--output: directory {output.parent} does not exist")
    return output


def _launch_t0() -> float:
    launch_t0 = process_start_time()
    if os.environ.get(LAUNCH_T0_ENV):
        try:
            launch_t0 = float(os.environ[LAUNCH_T0_ENV])
        except ValueError:
            _error(f"{LAUNCH_T0_ENV}={os.environ[LAUNCH_T0_ENV]!r} is not an epoch time "
                   "in seconds")
    return launch_t0


def _run(kernel, params: dict[str, Any], output: Path, args, launch_t0: float, *,
         load=None, name: str | None = None) -> int:
    """``load``: for a function run, unpickles (kernel, params) once MPI is up."""
    import numpy as np
    from mpi4py import MPI

    from hpcbatch.kernels import api, results

    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    recorded = params
    if load is not None:
        try:
            kernel, params = load()
        except BaseException:
            _abort(comm, rank, f"{name}: unpickling the function")
        recorded = kernel.header["params"]
    # what the errors call it: the function's own name (its module is in the provenance)
    source = f"{kernel.name.rsplit('.', 1)[-1]}()" if load is not None else "run()"
    t_ready = time.time()
    try:
        local = kernel.run(comm, **params)
    except BaseException:
        if load is not None:  # the user's frames only: not this one or FunctionKernel.run
            _abort(comm, rank, f"{kernel.name}()", skip=2)
        _abort(comm, rank, f"{kernel.name}: run()")
    t_computed = time.time()

    try:
        # the reduce is timed from when the slowest rank is done, not from rank 0's end
        comm.Barrier()
        t_all_computed = time.time()
        reduced = api.reduce_outputs(comm, kernel.outputs, local, source=source)
        me = (host_name(), socket.gethostname(), t_ready - launch_t0, t_computed - t_ready,
              os.environ.get("SLURMD_NODENAME", ""), os.environ.get("SLURM_JOB_ID", ""))
        everyone = comm.gather(me, root=0)
        final = kernel.finalize(reduced, params) if rank == 0 else None
    except api.ReduceError as exc:
        if load is None:
            _abort(comm, rank, f"{kernel.name}: reduce")
        # what the function returned does not reduce: the why, without the harness's frames
        sys.stderr.write(f"[rank {rank}] {kernel.name}: reduce failed:\n[rank {rank}] "
                         f"hpcbatch.kernels.api.ReduceError: {exc}\n")
        sys.stderr.flush()
        _abort_now(comm, rank)
    except BaseException:
        _abort(comm, rank, f"{kernel.name}: reduce")
    t_reduced = time.time()

    try:
        # per-rank outputs: small ones travel to rank 0, large ones stay in per-rank files
        keep = [n for n, o in kernel.outputs.items() if o.per_rank]
        arrays = {n: np.asarray(local[n]) for n in keep}
        nbytes = np.array([arrays[n].nbytes for n in keep], dtype=np.int64)
        totals = np.zeros_like(nbytes)
        if keep:
            comm.Allreduce(nbytes, totals, op=MPI.SUM)
        big = [n for n, t in zip(keep, totals) if t > results.PER_RANK_FILE_ABOVE]
        # part files are named after this run: another run's parts are never picked up
        run_id = comm.bcast(results.new_run_id() if rank == 0 else None, root=0)
        if big:
            results.write_rank_part(output, rank, {n: arrays[n] for n in big},
                                    compress=args.compress, run_id=run_id)
        parts = comm.gather({n: (arrays[n].shape, arrays[n].dtype.str) for n in big}, root=0)
        small = comm.gather({n: arrays[n] for n in keep if n not in big}, root=0)
    except BaseException:
        _abort(comm, rank, f"{kernel.name}: per-rank outputs")

    if rank == 0:
        try:
            import h5py
            import mpi4py

            from hpcbatch._version import __version__
            hosts = [e[0] for e in everyone]
            timings = {"launch": max(e[2] for e in everyone),
                       "compute": max(e[3] for e in everyone),
                       "reduce": t_reduced - t_all_computed}
            reduces = {n: o.reduce_name for n, o in kernel.outputs.items()
                       if n not in kernel.derived}
            about = {n: kernel.describe_output(n) for n in {*final, *keep}}
            attrs = {"kernel": kernel.name,
                     "description": kernel.description.splitlines()[0]
                     if kernel.description else kernel.name,
                     "params": recorded, "ranks": size,
                     "nodes": len(set(hosts)), "node_ids": hosts,
                     "hostnames": [e[1] for e in everyone],
                     "mpi_library": MPI.Get_library_version().replace("\0", "").strip()
                     .splitlines()[0].strip(),
                     "mpi4py_version": mpi4py.__version__, "numpy_version": np.__version__,
                     "h5py_version": h5py.__version__, "hpcbatch_version": __version__,
                     "start_utc": results.utc(launch_t0)}
            if load is not None:
                attrs.update(kernel.provenance())
            if any(e[4] for e in everyone):  # started by Slurm: its nodes and job
                attrs["slurm_nodes"] = [e[4] for e in everyone]
                attrs["slurm_job_id"] = ",".join(sorted({e[5] for e in everyone if e[5]}))
            results.write_result(
                output, reduced=final, reduces=reduces, attrs=attrs, timings=timings,
                per_rank={n: [p[n] for p in small] for n in keep if n not in big},
                rank_files={n: [p[n] for p in parts] for n in big}, compress=args.compress,
                descriptions={n: d for n, (d, _) in about.items()},
                units={n: u for n, (_, u) in about.items() if u}, run_id=run_id,
                time_write=True, write_started=t_reduced)
            if args.json:
                print(json.dumps({"kernel": kernel.name, "output": str(output), "ranks": size,
                                  "run_id": run_id, "node_ids": hosts,
                                  "hostnames": attrs["hostnames"], "params": recorded,
                                  "timings": timings,
                                  "reduced": {k: _jsonable(v) for k, v in final.items()}}))
            sys.stdout.flush()
        except BaseException:
            if big:  # no result file names them: the parts would only be litter
                for r in range(size):
                    results.rank_part_path(output, r, run_id).unlink(missing_ok=True)
            _abort(comm, rank, f"{kernel.name}: write")
    comm.Barrier()  # every per-rank part is closed before mpiexec returns
    return 0
