"""`hpcbatch bench`: the benchmark suite (benchmarks/, installed as hpcbatch.benchmarks)."""

from __future__ import annotations

import click


def _suite():
    try:
        from hpcbatch.benchmarks import suite
    except ImportError:  # a checkout on sys.path that was not pip-installed
        from benchmarks import suite
    return suite


def _module_names() -> str:
    try:
        return ", ".join(_suite().module_names())
    except ImportError:
        return "the bench_*.py modules"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Small sizes: the whole suite in under 2 minutes.")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="Run these modules only (repeat, or NAME,NAME): tasks, kernels, ...")
@click.option("--pool", "pool_id", help="Also measure on this pool of your home.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Results directory (default: bench-results/<UTC time>).")
@click.option("--repeats", type=click.IntRange(min=1),
              help="Repeats of every figure (default 5; --quick 2).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1),
              help="Stop a module after this many seconds (default 3600; --quick 300).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.argument("names", nargs=-1)
def bench(quick, only, pool_id, out, repeats, timeout_s, progress, names):
    """Run the benchmark suite: hpcbatch beside its peers (xargs, GNU parallel,
    HyperQueue, Dask, Parsl, bare mpiexec, dd, numpy) on this machine.

    Writes results.json (the schema: benchmarks/results.schema.json), results.md and PNG
    plots into --out. Extra NAMES are taken as --only. See benchmarks/README.md.
    """
    import argparse
    import sys

    from rich.console import Console
    suite = _suite()
    opts = argparse.Namespace(quick=quick, only=list(only) + list(names) or None,
                              pool=pool_id, out=out, repeats=repeats, timeout_s=timeout_s,
                              progress=progress)
    suite._sigterm_as_interrupt()
    try:
        doc, where = suite.run(opts, console=Console(stderr=True))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    suite.print_table(doc)
    click.echo(suite.summary_text(doc, where))
    if doc["summary"]["modules_failed"]:
        sys.exit(1)
