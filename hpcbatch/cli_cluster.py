"""`hpcbatch cluster up/down/status`: a test cluster of real sshd nodes on this machine.

The main CLI adds the group with ``main_group.add_command(cluster)``; it also runs
on its own (``python -m hpcbatch.cli_cluster up -n 3``).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table


def _lazy(name: str):
    """hpcbatch.launch.cluster's ``name``, imported when called: every other CLI command
    (hpcbatch run among them) starts without it."""
    def call(*args, **kw):
        from hpcbatch.launch import cluster
        return getattr(cluster, name)(*args, **kw)
    call.__name__ = name
    return call


cluster_down, cluster_status, cluster_up, kill_node, set_link, start_node = map(
    _lazy, ("cluster_down", "cluster_status", "cluster_up", "kill_node", "set_link",
            "start_node"))

_DIR_HELP = "Cluster folder: keys, configs, pool.json, logs [default: $HPCBATCH_HOME/cluster]."


def default_dir() -> Path:
    """``$HPCBATCH_HOME/cluster``; HPCBATCH_HOME defaults to ~/.hpcbatch."""
    home = os.environ.get("HPCBATCH_HOME") or "~/.hpcbatch"
    return Path(home).expanduser() / "cluster"


def _dir(directory: str | None) -> Path:
    return Path(directory).expanduser() if directory else default_dir()


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _call(fn, *args, **kw):
    from hpcbatch.launch.cluster import ClusterError
    try:
        return fn(*args, **kw)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


def _state(nd) -> str:
    state = "up" if nd.alive else "down"
    return state + (", link cut" if nd.link_up is False else "")


def _table(info, title: str | None = None) -> Table:
    t = Table(title=title)
    cols = ["node", "address", *(["namespace"] if info.netns else []), "user", "sshd pid",
            "state"]
    for col in cols:
        t.add_column(col)
    for nd in info.nodes:
        t.add_row(nd.name, f"{nd.hostname}:{nd.port}", *([nd.netns] if info.netns else []),
                  nd.user, str(nd.pid), _state(nd))
    return t


@click.group("cluster")
def cluster() -> None:
    """A throw-away SSH cluster on this machine (one real OpenSSH sshd per node, on
    127.0.0.1 ports, or with --netns each in a network namespace of its own), for
    trying SSH pools and multi-node MPI, and for the tests."""


@cluster.command("up")
@click.option("-n", "--nodes", type=click.IntRange(1, 256), default=3, show_default=True,
              help="How many nodes (sshd processes) to start.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
@click.option("--user", help="Login user on the nodes [default: you].")
@click.option("--netns", is_flag=True, help="Root only: each node in a network namespace "
              "of its own (own 10.77.K.x address on a bridge, own hostname, sshd on port "
              "22), as Open MPI needs; without it nodes are 127.0.0.1 ports (MPICH works).")
@click.option("--slurm", is_flag=True, help="Root only: a Slurm cluster instead (one "
              "slurmctld, one slurmd per network namespace, nodes sn1..snN); prints the "
              "SLURM_CONF to export.")
def up(nodes: int, directory: str | None, user: str | None, netns: bool, slurm: bool) -> None:
    """Start N sshd nodes and write pool.json, ssh_config and known_hosts (--slurm: a
    Slurm cluster of N nodes and its slurm.conf)."""
    d = _dir(directory)
    if slurm:
        from hpcbatch.cli_slurmcluster import slurm_up
        return slurm_up(nodes, d)
    info = _call(cluster_up, nodes, d, user=user, netns=netns)
    out = _console()
    where = f"network namespaces, bridge {info.bridge}" if info.netns else "127.0.0.1"
    out.print(_table(info, title=f"{nodes} sshd node(s) in {info.directory} ({where})"))
    spec = info.pool_json
    out.print(f"make a pool of them:  hpcbatch pool create mypool --spec {spec}", markup=False)
    out.print(f"log in to one:        ssh -F {info.ssh_config} {info.nodes[0].name}",
              markup=False)
    out.print(f"stop them:            hpcbatch cluster down --dir {info.directory}",
              markup=False)


@cluster.command("down")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
def down(directory: str | None) -> None:
    """Stop the cluster's sshd processes (and their sessions), and delete its network
    namespaces, veths and bridge (--netns); files are kept."""
    d = _dir(directory)
    from hpcbatch.cli_slurmcluster import is_slurm_dir, slurm_down
    if is_slurm_dir(d):
        return slurm_down(d)
    stopped = _call(cluster_down, d)
    bridge = _call(cluster_status, d).bridge
    _console().print(f"stopped {len(stopped)} sshd node(s): "
                     f"{', '.join(stopped) or 'none was running'}"
                     + (f"; removed its namespaces, veths and bridge {bridge}" if bridge
                        else ""), markup=False)


@cluster.command("kill")
@click.argument("node")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
def kill(node: str, directory: str | None) -> None:
    """Kill one node's sshd and everything under it (and, --netns, everything in its
    namespace): a node lost, for fault tests. 'cluster start NODE' brings it back."""
    was_up = _call(kill_node, _dir(directory), node)
    _console().print(f"{node}: {'killed' if was_up else 'was not running'}", markup=False)


@cluster.command("start")
@click.argument("node")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
def start(node: str, directory: str | None) -> None:
    """Start a killed node's sshd again (same host key, address and port)."""
    nd = _call(start_node, _dir(directory), node)
    _console().print(f"{node}: sshd running again (pid {nd.pid})", markup=False)


@cluster.command("link")
@click.argument("node")
@click.argument("state", type=click.Choice(["down", "up"]))
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
def link(node: str, state: str, directory: str | None) -> None:
    """Cut (down) or restore (up) a --netns node's network link, for fault tests: its
    processes live on, unreachable."""
    _call(set_link, _dir(directory), node, state == "up")
    _console().print(f"link of {node}: {state}", markup=False)


@cluster.command("status")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help=_DIR_HELP)
def status(directory: str | None) -> None:
    """Show each node's address (and namespace), sshd PID, and whether it is up (and its
    link, for --netns nodes)."""
    from hpcbatch.cli_slurmcluster import is_slurm_dir, slurm_status
    if is_slurm_dir(_dir(directory)):
        return slurm_status(_dir(directory))
    info = _call(cluster_status, _dir(directory))
    out = _console()
    out.print(_table(info))
    alive = sum(bool(nd.alive) for nd in info.nodes)
    out.print(f"{alive} of {len(info.nodes)} node(s) running; pool spec: {info.pool_json}",
              markup=False)


if __name__ == "__main__":
    cluster(prog_name="hpcbatch cluster")
