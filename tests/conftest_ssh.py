"""Fixtures with real OpenSSH sshd nodes (a pytest plugin module).

Loaded by tests/conftest.py (``pytest_plugins = ["conftest_ssh"]``). Fixtures:

* ``ssh_cluster``   (session) three sshd nodes (node1..node3) from
                    ``hpcbatch.launch.cluster`` in a tmp folder, shared by every module;
                    torn down at the end, checking that no sshd of ours survives. Tests
                    must not stop these nodes: one that kills or restarts nodes makes its
                    own with ``make_cluster``.
* ``make_cluster``  make_cluster(n, name="c", **kw): a cluster of the test's own under
                    its tmp_path (kw as ``cluster_up``: user, base_name, netns), taken
                    down after the test, checking nothing of it is left
* ``ssh_targets``   the session cluster's nodes as SSHTargets (from its pool.json)
* ``ssh_connect``   connect(target) whose clients are closed after the test

``sshd_cluster(n, directory, **kw)`` is the same as a context manager, for fixtures of
other scopes (tests/test_mpi_multinode.py). Every test using one of these fixtures gets
the ``ssh`` marker (tests/conftest.py) and is skipped, with the reason, where sshd is
missing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import unavailable

from hpcbatch.launch import cluster as cluster_tool
from hpcbatch.ssh import SSHTarget, connect, targets_from_spec


def _skip_without_sshd() -> None:
    reason = unavailable(cluster_tool.check_sshd)
    if reason:
        pytest.skip(f"{reason} (scripts/test.sh installs them)")


def take_down(directory: str | os.PathLike) -> None:
    """cluster_down(directory) if a cluster was made there, then check that none of its
    sshd processes, sessions or network objects survived."""
    d = Path(directory)
    if (d / cluster_tool.STATE_FILE).exists():
        info = cluster_tool.cluster_status(d)
        cluster_tool.cluster_down(d)
        survivors = [nd.name for nd in info.nodes if cluster_tool.pid_alive(nd.pid)]
        assert not survivors, f"sshd of {survivors} survived cluster_down"
        left = cluster_tool.network_leftovers(info)
        assert not left, f"{left} of the cluster in {d} survived cluster_down"
    left = cluster_tool.sshd_pids_under(d)
    assert not left, f"sshd processes {left} under {d} survived cluster_down"


@contextlib.contextmanager
def sshd_cluster(n: int, directory: str | os.PathLike,
                 **kw) -> Iterator[cluster_tool.ClusterInfo]:
    """cluster_up(n, directory, **kw), always taken down (and checked) afterwards."""
    _skip_without_sshd()
    try:
        yield cluster_tool.cluster_up(n, directory, **kw)
    finally:
        take_down(directory)


@pytest.fixture(scope="session")
def ssh_cluster(tmp_path_factory) -> Iterator[cluster_tool.ClusterInfo]:
    """Three sshd nodes (node1..node3) on 127.0.0.1, shared by the whole session."""
    _skip_without_sshd()
    d = tmp_path_factory.mktemp("ssh cluster")  # a space in the path, on purpose
    with sshd_cluster(3, d) as info:
        yield info


@pytest.fixture
def make_cluster(tmp_path):
    """make_cluster(n, name="c", **kw) -> ClusterInfo in tmp_path/name, the test's own."""
    _skip_without_sshd()
    made: list[Path] = []

    def make(n: int, name: str = "c", **kw) -> cluster_tool.ClusterInfo:
        d = tmp_path / name
        made.append(d)
        return cluster_tool.cluster_up(n, d, **kw)

    yield make
    errors = []
    for d in made:
        try:
            take_down(d)
        except (AssertionError, cluster_tool.ClusterError) as exc:
            errors.append(str(exc))
    assert not errors, "; ".join(errors)


@pytest.fixture
def ssh_targets(ssh_cluster) -> list[SSHTarget]:
    return targets_from_spec(json.loads(ssh_cluster.pool_json.read_text()))


@pytest.fixture
def ssh_connect():
    """connect(target, **kw) whose clients are closed when the test ends."""
    clients = []

    def _connect(target: SSHTarget, **kw):
        client = connect(target, **kw)
        clients.append(client)
        return client

    yield _connect
    for c in clients:
        c.close()
