"""`hpcbatch run KERNEL` (the main job) and `hpcbatch results show FILE`."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fmt(value) -> str:
    import numpy as np  # here: every other command starts without it
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        return f"{v:.10g}" if isinstance(v, float) else str(v)
    if arr.size <= 8:
        return np.array2string(arr, precision=6, separator=", ")
    return f"{arr.dtype}{list(arr.shape)}"


SERIES_MAX = 64  # 1-D outputs of one length up to this are shown side by side


def _series(reduced: dict) -> dict[int, list[str]]:
    """Names of the 1-D outputs too long to show inline, by length, where at least two
    share a length (a sweep: sizes and their latencies, say)."""
    import numpy as np
    by_len: dict[int, list[str]] = {}
    for name, value in reduced.items():
        arr = np.asarray(value)
        if arr.ndim == 1 and 8 < arr.size <= SERIES_MAX:
            by_len.setdefault(arr.size, []).append(name)
    return {n: names for n, names in by_len.items() if len(names) > 1}


def _units(path, known: dict[str, str] | None = None) -> dict[str, str]:
    """The units attribute of each result dataset (none when the file cannot be read);
    ``known``: the units run_kernel already read (the file is not opened again)."""
    if known is not None:
        return known
    from hpcbatch.kernels.results import read_result
    try:
        return read_result(path).units
    except (OSError, ValueError, KeyError):
        return {}


def print_result(res) -> None:
    import numpy as np
    series = _series(res.reduced)
    units = _units(res.path, getattr(res, "units", None))
    t = Table(title=f"{res.kernel}: reduced results")
    t.add_column("name")
    t.add_column("value", overflow="fold")
    t.add_column("units")
    for name, value in res.reduced.items():
        shown_below = any(name in names for names in series.values())
        t.add_row(name, _fmt(value) + ("  (below)" if shown_below else ""),
                  units.get(name, ""))
    out.print(t)
    for names in series.values():
        st = Table(title=f"{res.kernel}: {', '.join(names)}")
        for name in names:
            st.add_column(f"{name} ({units[name]})" if units.get(name) else name,
                          justify="right")
        for row in zip(*(np.asarray(res.reduced[n]) for n in names)):
            st.add_row(*(f"{v:.4g}" if isinstance(v, np.floating) else str(v) for v in row))
        out.print(st)
    if res.timings:
        out.print("timings: " + ", ".join(f"{k} {v:.3f} s" for k, v in res.timings.items()))
    out.print(f"result file: {res.path}", soft_wrap=True, markup=False)


@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("kernel")
@click.option("--ranks", "-n", type=click.IntRange(min=1), help="MPI ranks (default 1, or "
              "nodes x ranks-per-node).")
@click.option("--param", "-p", "params", multiple=True, metavar="K=V",
              help="A kernel parameter; repeat for several. 'hpcbatch run KERNEL --list-params'"
              " shows them.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="HDF5 result file (default ./KERNEL-<time>.h5).")
@click.option("--oversubscribe", is_flag=True, help="Allow more ranks than task slots.")
@click.option("--pool", default="local", show_default=True)
@click.option("--nodes", type=click.IntRange(min=1), help="Run across this many nodes of the "
              "pool (a multi-instance task).")
@click.option("--ranks-per-node", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True))
@click.option("--retries", type=click.IntRange(min=-1), default=0, show_default=True,
              help="Run again after a failed attempt, a lost node included (-1: no limit).")
@click.option("--compress", is_flag=True, help="gzip large datasets in the result file.")
@click.option("--list-params", is_flag=True, help="Show the kernel's parameters and exit.")
@click.option("--progress/--no-progress", default=None)
def run(kernel, ranks, params, output, oversubscribe, pool, nodes, ranks_per_node, timeout_s,
        retries, compress, list_params, progress) -> None:
    """Run an MPI KERNEL with its final reduce; results go to an HDF5 file.

    \b
      hpcbatch run pi --ranks 4 -o pi.h5
      hpcbatch run heat --ranks 2 -p nx=256 -p steps=500
      hpcbatch run ./my_kernel.py --ranks 2
    """
    from hpcbatch.cli import check_seconds
    from hpcbatch.client import Batch
    from hpcbatch.kernelrun import KernelRunError, resolve_kernel

    check_seconds("--timeout", timeout_s)

    k, _ = resolve_kernel(kernel, list(params))  # exit 2 here, before any MPI
    if list_params:
        t = Table(title=f"{k.name} parameters")
        for col in ("name", "type", "default", "help"):
            t.add_column(col)
        for name, p in k.params.items():
            t.add_row(name, p.type.__name__, repr(p.default), p.help)
        out.print(t)
        return
    if progress is None:
        progress = sys.stderr.isatty()
    with Batch() as batch:
        try:
            res = batch.run_kernel(kernel, ranks=ranks, params=list(params), output=output,
                                   pool=pool, nodes=nodes, ranks_per_node=ranks_per_node,
                                   oversubscribe=oversubscribe, progress=progress,
                                   timeout_s=timeout_s, compress=compress, retries=retries,
                                   on_waiting=None if progress else _say_waiting)
        except KernelRunError as exc:
            if exc.stderr:
                sys.stderr.write(exc.stderr if exc.stderr.endswith("\n") else exc.stderr + "\n")
            raise
    print_result(res)


@click.group("results")
def results() -> None:
    """Result files (HDF5) written by kernels."""


@results.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def results_show(path: str) -> None:
    """Print a result file's provenance, timings and datasets (description, units), and
    the per-rank part files that are missing (their rows read as NaN)."""
    from hpcbatch.kernels.results import describe
    try:
        text = describe(path)
    except OSError as exc:
        raise click.ClickException(f"{path} is not a readable HDF5 result file ({exc})") from None
    out.print(text, markup=False, soft_wrap=True)


@results.command("list")
def results_list() -> None:
    """The kernel runs of this home (or the running service): what ran (a kernel, or a
    Python function by its qualified name), its state, ranks, nodes and reduced values."""
    import datetime as dt

    from hpcbatch.cli import _service
    with _service() as service:
        runs = service.list_runs()
    t = Table(title=f"kernel runs ({len(runs)})")
    for col in ("run", "kernel / function", "state", "ranks", "nodes", "pool", "started",
                "reduced"):
        t.add_column(col, overflow="fold")
    for r in runs:
        what = f"fn {r.kernel}" if r.function else r.kernel
        started = dt.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M:%S") \
            if r.created_at else ""
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in list(r.reduced.items())[:4])
        t.add_row(r.id, what, r.state, str(r.ranks), str(r.nodes or 1), r.pool_id, started,
                  values if r.state != "failed" else (r.error or "")[:120])
    out.print(t)


def _say_waiting(text: str) -> None:
    """What the run waits for, one line on stderr each time it changes (no silent wait)."""
    if text:
        sys.stderr.write(f"hpcbatch run: {text}\n")
        sys.stderr.flush()
