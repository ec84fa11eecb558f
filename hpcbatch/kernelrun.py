"""Run a kernel as a task: the glue between the batch core and hpcbatch.kernels.

One task runs ``mpiexec ... python -m hpcbatch.kernels NAME ... --output FILE``, or for
a Python function (``run_kernel(fn, outputs=...)``) ``... --function function.pkl``: the
function packed by ``hpcbatch.kernels.function``, uploaded to the service and given to
the task as a resource file (a common one, on every node, for a multi-node run).
On the local pool it takes one slot per rank (``oversubscribe`` lets it use
fewer); with ``nodes`` it is a multi-instance task whose primary starts the
ranks on every node through ``hpcbatch-mpiexec`` and the pool's ssh_config.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

from hpcbatch.errors import HpcBatchError, ValidationError
from hpcbatch.models import JobSpec


class KernelRunError(HpcBatchError):
    """The kernel's task failed; ``stderr`` holds what the ranks printed, ``traceback``
    (with ``rank``) the traceback of the first rank that raised, when one did."""

    exit_code = 1

    def __init__(self, message: str, stderr: str = "", task: Any = None):
        super().__init__(message)
        self.stderr = stderr
        self.task = task
        found = rank_traceback(stderr)
        self.rank, self.traceback = found if found else (None, None)


class RemoteTraceback(Exception):
    """A rank's traceback text (a KernelRunError's ``__cause__``, so it is printed)."""

    def __init__(self, rank: int, text: str):
        super().__init__(text)
        self.rank = rank
        self.text = text

    def __str__(self) -> str:
        return f"\n\nrank {self.rank}:\n{self.text}"


_RANK_LINE = re.compile(r"^\[rank (\d+)\] (.*)$")


def rank_traceback(stderr: str) -> tuple[int, str] | None:
    """The first rank's traceback in the ranks' stderr (the harness prefixes every line
    with ``[rank N]``; other ranks' lines may be interleaved): (rank, text)."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        m = _RANK_LINE.match(line)
        if m and m.group(2).startswith("Traceback (most recent call last)"):
            prefix = f"[rank {m.group(1)}] "
            start = i - 1 if i and lines[i - 1].startswith(prefix) else i
            mine = [ln[len(prefix):] for ln in lines[start:] if ln.startswith(prefix)]
            return int(m.group(1)), "\n".join(mine)
    return None


@dataclasses.dataclass
class KernelResult:
    kernel: str
    path: Path
    reduced: dict[str, Any]
    timings: dict[str, float]
    attrs: dict[str, Any]
    job_id: str
    task_id: str
    units: dict[str, str] | None = None  # of each reduced dataset, as the file says

    def __getitem__(self, name: str) -> Any:
        """A reduced output: ``res["energy"]`` is ``res.reduced["energy"]``."""
        return self.reduced[name]


def resolve_kernel(kernel: str, params: dict[str, Any] | list[str] | None):
    """Load the kernel and check its parameters before anything is submitted."""
    from hpcbatch.kernels import api
    try:
        k = api.load_kernel(kernel)
        if isinstance(params, list):
            values = api.parse_params(k, params)
        else:
            values = api.parse_params(k, [f"{key}={val}" for key, val in (params or {}).items()])
    except ValueError as exc:
        raise ValidationError("kernel", str(exc)) from None
    return k, values


def kernel_command(kernel: str | None, params: dict[str, Any], output: Path, ranks: int, *,
                   oversubscribe: bool = False, multi_node: bool = False,
                   ranks_per_node: int | None = None, compress: bool = False,
                   python: str | None = None,
                   function: str | None = None) -> tuple[str, dict[str, str]]:
    """The task's command line and the environment it needs. ``python``: the one that
    runs hpcbatch on the pool's nodes (default: this one); ``function``: the packed
    function file the ranks run instead of ``kernel``."""
    python = python or sys.executable
    what = ["--function", function] if function else [kernel]
    harness = [python, "-m", "hpcbatch.kernels", *what, "--output", str(output),
               "--json"] + (["--compress"] if compress else [])
    for key, val in params.items():
        harness += ["--param", f"{key}={val}"]
    if multi_node:
        argv = [python, "-m", "hpcbatch.launch.mpi", "--ranks-per-node",
                str(ranks_per_node or 1), "--", *harness]
        return shlex.join(argv), {}
    from hpcbatch.launch.mpi import mpiexec_command
    try:
        argv, env = mpiexec_command(ranks, harness, oversubscribe=oversubscribe)
    except FileNotFoundError as exc:  # no MPI here: say how to get one
        raise HpcBatchError(str(exc)) from None
    extra = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return shlex.join(argv), extra


_RANK_ERROR = re.compile(r"^\[rank \d+\] [\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def _cause(stderr: str) -> str:
    """The line of the ranks' stderr that says why: a rank's exception, else the last
    line with words in it (MPI's banners end in dashes)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    found = [ln for ln in lines if _RANK_ERROR.match(ln)]
    if found:
        return found[-1]
    return next((ln for ln in reversed(lines) if any(c.isalnum() for c in ln)), "")


def _import_root(k) -> str | None:
    """For a kernel given as a dotted module, the folder its top-level package is imported
    from (it may be on this process's sys.path only); None for built-ins and files."""
    from hpcbatch.kernels import api
    name, path = k.name, getattr(k.module, "__file__", None)
    if not path or name.endswith(".py") or "/" in name or name in api.list_kernels():
        return None
    depth = name.count(".") + (Path(path).name == "__init__.py")
    return str(Path(path).resolve().parents[depth])


def _check_count(field: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < minimum):
        raise ValidationError(field, f"{value!r} must be a whole number >= {minimum}")


def _failure_text(t, attempts: list, nodes: dict[str, Any]) -> str:
    """Why the kernel's last attempt failed, in words (naming a lost node and why)."""
    kind = t.failure_kind or (t.failure or "").split(":", 1)[0]
    detail = t.failure_detail
    if kind == "timeout":
        return "timed out"
    if kind == "start_failed":
        return f"failed to start ({detail or (t.failure or '').split(': ', 1)[-1]})"
    if kind == "node_lost":
        node = (attempts[-1].node_id if attempts else None) or t.node_id
        why = detail or (nodes[node].reason if node in nodes else None) or "no reason known"
        return f"lost node {node or '?'} ({why})"
    if kind == "killed":
        return f"was killed ({detail or 'terminate'})"
    if t.exit_code is None and t.signal:
        return f"was killed by signal {t.signal}"
    return f"exited with {t.exit_code}"


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a kernel run submits: its job, its one task, and where the result goes."""

    job: JobSpec
    task: dict[str, Any]
    kernel: str
    params: dict[str, Any]
    ranks: int
    nodes: int | None
    output: Path
    function: dict[str, Any] | None = None  # a function run: name, sha256, upload


def plan_run(service, kernel: str, *, ranks: int | None = None,
             params: dict[str, Any] | list[str] | None = None,
             output: str | os.PathLike | None = None, pool: str = "local",
             nodes: int | None = None, ranks_per_node: int = 1,
             oversubscribe: bool = False, timeout_s: float | None = None,
             compress: bool = False, retries: int = 0,
             default_dir: Path | None = None,
             function: tuple[Path, dict[str, Any]] | None = None) -> RunPlan:
    """Check a kernel run's shape and make its job and task (nothing is stored).
    ``default_dir``: where the result goes when no ``output`` is given (default: here);
    ``function``: (the packed function's file, its header) for a function run."""
    _check_count("ranks", ranks, 1)
    _check_count("nodes", nodes, 1)
    _check_count("ranks_per_node", ranks_per_node, 1)
    _check_count("retries", retries, -1)
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, int | float)
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ValidationError("timeout_s", f"{timeout_s!r} must be a number of seconds > 0")
    if function is not None:
        from hpcbatch.kernels.function import FILE_NAME, short_name
        fn_path, header = function
        k, values, name, short = None, {}, header["name"], short_name(header["name"])
        fn_file: str | None = FILE_NAME
        resource = {"source": str(fn_path), "file_path": FILE_NAME}
    else:
        k, values = resolve_kernel(kernel, params)
        name, fn_file = k.name, None
        short = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(name).stem if name.endswith(".py")
                       else name).strip("-")[:30] or "kernel"
    pool_view = service.get_pool(pool)
    python = pool_view.node_python or None
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    job_id = f"run-{short}-{stamp}"
    out = Path(output) if output else (default_dir or Path()) / f"{job_id}.h5"
    out = out.expanduser().resolve()
    if out.parent and not out.parent.is_dir():
        raise ValidationError("output", f"directory {out.parent} does not exist")
    task: dict[str, Any] = {"id": "kernel"}
    if nodes:
        if ranks is not None and ranks != nodes * ranks_per_node:
            raise ValidationError("ranks", f"{ranks} != nodes {nodes} x ranks_per_node "
                                  f"{ranks_per_node}; give one or the other")
        ranks = nodes * ranks_per_node
        per = min(ranks_per_node, pool_view.task_slots_per_node)
        cmd, env = kernel_command(name, values, out, ranks, multi_node=True,
                                  ranks_per_node=ranks_per_node, compress=compress,
                                  python=python, function=fn_file)
        task["multi_instance"] = {"instances": nodes, "slots_per_instance": per}
        if fn_file:  # every node's ranks read it from their task's shared directory
            task["multi_instance"]["common_resource_files"] = [resource]
    else:
        ranks = ranks or 1
        slots = pool_view.task_slots_per_node
        if ranks > slots and not oversubscribe:
            raise ValidationError(
                "ranks", f"{ranks} ranks need {ranks} task slots but pool {pool!r} has "
                f"{slots} per node; use fewer ranks, --oversubscribe, or --nodes")
        task["required_slots"] = min(ranks, slots)
        cmd, env = kernel_command(name, values, out, ranks, oversubscribe=oversubscribe,
                                  compress=compress, python=python, function=fn_file)
        if fn_file:
            task["resource_files"] = [resource]
    root = _import_root(k) if k is not None else None
    if root:  # the ranks start with their own sys.path: let them import it from here too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                            if p)
    task["command_line"] = cmd
    task["environment"] = env
    task["max_wall_clock_time_s"] = timeout_s
    job = JobSpec(job_id, pool, on_all_tasks_complete="terminate_job",
                  max_task_retry_count=retries)
    if function is not None:
        return RunPlan(job, task, name, _plain(header["params"]), ranks, nodes, out,
                       {"name": name, "sha256": header["fn_sha256"],
                        "upload": Path(fn_path).parent.name})
    return RunPlan(job, task, name, {k: _plain(v) for k, v in values.items()}, ranks,
                   nodes, out)


def _plain(v: Any) -> Any:
    """A value as JSON can hold it (numpy scalars and short arrays as numbers/lists)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


MAX_REDUCED_ITEMS = 64  # reduced arrays longer than this stay in the file only


def failure_message(service, plan_kernel: str, ranks: int, job_id: str,
                    pool: str, what: str = "kernel") -> tuple[str, str]:
    """Why a kernel run's task failed, in one line, and the ranks' stderr. ``what``:
    kernel, or function for a function run."""
    t = service.get_task(job_id, "kernel")
    try:
        stderr = service.read_task_file(job_id, "kernel", "stderr.txt").decode(
            errors="replace")
    except HpcBatchError:
        stderr = ""
    attempts = service.task_attempts(job_id, "kernel")
    why = _failure_text(t, attempts, {n.id: n for n in service.list_nodes(pool)})
    tries = f" after {len(attempts)} attempts" if len(attempts) > 1 else ""
    last = _cause(stderr)
    where = f"{t.task_dir}/stderr.txt" if t.task_dir else "no stderr"
    return (f"{what} {plan_kernel} on {ranks} ranks {why}{tries}"
            + (f": {last[:200]}" if last else "") + f" (stderr: {where})"), stderr


def reduced_summary(res) -> dict[str, Any]:
    """The reduced values a RunView carries: scalars, and arrays of at most
    MAX_REDUCED_ITEMS items as lists."""
    out: dict[str, Any] = {}
    for key, val in res.reduced.items():
        size = getattr(val, "size", 1)
        if size <= MAX_REDUCED_ITEMS:
            out[key] = _plain(val)
    return out


def upload_function(service, fn: Any, params: dict[str, Any] | None,
                    outputs: Any) -> str:
    """Pack ``fn`` (with its params and the reduces of its outputs) and upload it to the
    service; returns the upload's SHA-256, what ``start_run(function=)`` takes."""
    import hashlib

    from hpcbatch.kernels.function import FILE_NAME, pack
    data, _ = pack(fn, params, outputs)
    digest = hashlib.sha256(data).hexdigest()
    service.upload(FILE_NAME, [data], digest)
    return digest


def _import_reader():
    """Import the result reader (numpy and h5py: a few hundred ms) in a thread while the
    ranks run, so that reading the result once they are done does not wait for it."""
    import threading

    def go() -> None:
        try:
            import h5py  # noqa: F401

            import hpcbatch.kernels.results  # noqa: F401
        except Exception:  # noqa: BLE001, S110 - the read after the run reports it
            pass
    t = threading.Thread(target=go, name="hpcbatch-import-reader", daemon=True)
    t.start()
    return t


def run_kernel(batch, kernel: Any, *, ranks: int | None = None,
               params: dict[str, Any] | list[str] | None = None,
               output: str | os.PathLike | None = None, pool: str = "local",
               nodes: int | None = None, ranks_per_node: int = 1,
               oversubscribe: bool = False, progress: bool = False,
               timeout_s: float | None = None, compress: bool = False,
               retries: int = 0, on_waiting=None, outputs: Any = None) -> KernelResult:
    """Run ``kernel`` (a built-in name, a module or a .py path, or a Python function
    ``fn(comm, **params)`` with ``outputs={name: reduce}``) as one task; see
    :meth:`hpcbatch.Batch.run_kernel`. ``retries``: attempts after a failed one (a
    lost node included; -1: without limit). On a remote service the result file is
    written there and downloaded to ``output`` here. ``on_waiting``: as Job.wait's (what
    the run waits for when its nodes are held by another task)."""
    service = batch.service
    remote = not hasattr(service, "store")
    fn_kw: dict[str, Any] = {}
    fn = None
    if callable(kernel):
        fn_kw["function"] = upload_function(service, kernel, params, outputs)
        fn, kernel, params = kernel, None, None
    elif outputs is not None:
        raise ValidationError("outputs", "is for a function run (run_kernel(fn, "
                              "outputs=...)); a kernel module declares its OUTPUTS")
    if remote:  # the service makes its own plan; check the output directory here
        out = Path(output).expanduser().resolve() if output else None
        if out is not None and not out.parent.is_dir():
            raise ValidationError("output", f"directory {out.parent} does not exist")
        run = service.start_run(kernel, ranks=ranks, params=params, pool=pool, nodes=nodes,
                                ranks_per_node=ranks_per_node, oversubscribe=oversubscribe,
                                timeout_s=timeout_s, retries=retries, compress=compress,
                                **fn_kw)
        if out is None:  # named as an embedded run's: after its run id
            out = Path(f"{run.id}.h5").resolve()
    else:
        run = service.start_run(kernel, ranks=ranks, params=params, pool=pool, nodes=nodes,
                                ranks_per_node=ranks_per_node, oversubscribe=oversubscribe,
                                timeout_s=timeout_s, retries=retries, compress=compress,
                                output=output, default_dir=Path.cwd(), **fn_kw)
    job = batch.jobs.get(run.job_id)
    reader = _import_reader()
    try:
        job.wait(progress=progress, on_waiting=on_waiting)
    except KeyboardInterrupt:  # the user gave up on this run: stop its ranks, keep nothing
        job.terminate_task("kernel")
        try:
            job.wait(timeout_s=10)
        except (TimeoutError, HpcBatchError):
            pass
        raise
    finally:
        reader.join(10)
    run = service.get_run(run.id)
    if run.state != "succeeded":
        what = "function" if fn_kw else "kernel"
        message, stderr = failure_message(service, run.kernel, run.ranks, run.job_id, pool,
                                          what)
        error = KernelRunError(message, stderr, batch.jobs.get(run.job_id).task("kernel"))
        if error.traceback and fn_kw:
            from hpcbatch.kernels.function import restore_traceback
            error.traceback = restore_traceback(error.traceback, fn)
        if error.traceback:  # printed below the error, as concurrent.futures does
            raise error from RemoteTraceback(error.rank, error.traceback)
        raise error
    from hpcbatch.kernels.results import read_result
    if remote:
        tmp = out.with_name(f".{out.name}.part")
        tmp.write_bytes(service.read_run_result(run.id))
        os.replace(tmp, out)
    else:
        out = service.run_output(run.id)
    res = read_result(out)
    return KernelResult(run.kernel, out, res.reduced, res.timings, res.attrs, run.job_id,
                        "kernel", res.units)
