"""`hpcbatch cluster up --slurm` / `down` / `status` for a Slurm test cluster
(:mod:`hpcbatch.launch.slurmcluster`); ``cli_cluster`` calls these."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from hpcbatch.launch import slurmcluster as SC
from hpcbatch.launch.cluster import ClusterError

is_slurm_dir = SC.is_slurm_dir


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


def _table(cl: SC.SlurmCluster) -> Table:
    t = Table(title=f"Slurm cluster {cl.name} in {cl.directory} (bridge {cl.bridge})")
    for col in ("node", "address", "namespace", "slurmd pid", "daemon", "slurm state"):
        t.add_column(col)
    for nd in cl.nodes:
        t.add_row(nd.name, nd.addr, nd.netns, str(nd.pid), "up" if nd.alive else "down",
                  nd.state or "-")
    return t


def slurm_up(nodes: int, d: Path) -> None:
    cl = _call(SC.slurm_up, nodes, d)
    out = Console(highlight=False, soft_wrap=True)
    out.print(_table(cl))
    out.print(f"slurmctld pid {cl.ctld_pid} on {cl.controller_addr}:{cl.ctld_port}"
              + (f"; munged pid {cl.munged_pid} (started by a test cluster, shared by them)"
                 if cl.munged_pid else ""), markup=False)
    out.print(f"use it:     export SLURM_CONF={cl.conf}", markup=False)
    out.print("a pool:     hpcbatch pool create slurm3 --slurm --nodes-per-allocation 3",
              markup=False)
    out.print(f"stop it:    hpcbatch cluster down --dir {cl.directory}", markup=False)


def slurm_down(d: Path) -> None:
    stopped = _call(SC.slurm_down, d)
    Console(highlight=False, soft_wrap=True).print(
        f"stopped {', '.join(stopped) or 'nothing (none was running)'}; removed its "
        "namespaces, veths, bridge and files", markup=False)


def slurm_status(d: Path) -> None:
    cl = _call(SC.slurm_status, d)
    out = Console(highlight=False, soft_wrap=True)
    out.print(_table(cl))
    up = sum(bool(nd.alive) for nd in cl.nodes)
    out.print(f"slurmctld {'up' if cl.ctld_alive else 'down'}; {up} of {len(cl.nodes)} "
              f"slurmd running; SLURM_CONF={cl.conf}", markup=False)
