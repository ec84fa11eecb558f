"""`hpcbatch cluster up/down/status`: a test cluster of real sshd nodes on this machine."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from hpcbatch.launch.cluster import ClusterError, cluster_down, cluster_status, cluster_up

out = Console(highlight=False)


def _dir(directory: str | None) -> str:
    if directory:
        return directory
    from hpcbatch.coordinator import default_home
    return str(default_home() / "cluster")


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("cluster")
def cluster() -> None:
    """A throw-away SSH cluster on this machine (one real sshd per node), for trying
    SSH pools and multi-node MPI, and for the tests."""


@cluster.command("up")
@click.option("-n", "--nodes", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Where keys, configs and pool.json go (default $HPCBATCH_HOME/cluster).")
def up(nodes: int, directory: str | None) -> None:
    d = _dir(directory)
    state = _call(cluster_up, nodes, d)
    t = Table(title=f"{nodes} sshd node(s) in {d}")
    for col in ("node", "address", "sshd pid"):
        t.add_column(col)
    for nd in state["nodes"]:
        t.add_row(nd["name"], f"127.0.0.1:{nd['port']}", str(nd["pid"]))
    out.print(t)
    out.print(f"make a pool of them:  hpcbatch pool create mypool --spec {d}/pool.json",
              soft_wrap=True, markup=False)
    out.print(f"log in to one:        ssh -F {d}/ssh_config node1", soft_wrap=True, markup=False)
    out.print(f"stop them:            hpcbatch cluster down --dir {d}", soft_wrap=True,
              markup=False)


@cluster.command("down")
@click.option("--dir", "directory", type=click.Path(file_okay=False))
def down(directory: str | None) -> None:
    stopped = _call(cluster_down, _dir(directory))
    out.print(f"stopped {len(stopped)} sshd node(s): {', '.join(stopped) or 'none running'}")


@cluster.command("status")
@click.option("--dir", "directory", type=click.Path(file_okay=False))
def status(directory: str | None) -> None:
    state = _call(cluster_status, _dir(directory))
    t = Table()
    for col in ("node", "address", "sshd pid", "state"):
        t.add_column(col)
    for nd in state["nodes"]:
        t.add_row(nd["name"], f"127.0.0.1:{nd['port']}", str(nd["pid"]),
                  "up" if nd["alive"] else "down")
    out.print(t)
