"""Fixtures with real OpenSSH sshd nodes (a pytest plugin module).

Loaded by tests/conftest.py (``pytest_plugins = ["conftest_ssh"]``). Fixtures:

* ``ssh_cluster``  (session) three sshd nodes from ``hpcbatch.launch.cluster`` in a tmp
                   folder; torn down at the end, checking that no sshd of ours survives
* ``ssh_targets``  the cluster's nodes as SSHTargets (from its pool.json)
* ``ssh_connect``  connect(target) whose clients are closed after the test

Tests using them are skipped (with the reason) where /usr/sbin/sshd is missing.
"""

from __future__ import annotations

import json

import pytest
from helpers import unavailable

from hpcbatch.launch import cluster as cluster_tool
from hpcbatch.ssh import SSHTarget, connect, targets_from_spec


@pytest.fixture(scope="session")
def ssh_cluster(tmp_path_factory) -> cluster_tool.ClusterInfo:
    """Three sshd nodes (node1..node3) on 127.0.0.1, shared by the whole session.

    Tests must not stop these nodes; a test that kills nodes makes its own cluster."""
    reason = unavailable(cluster_tool.check_sshd)
    if reason:
        pytest.skip(f"{reason} (scripts/test.sh installs them)")
    d = tmp_path_factory.mktemp("ssh cluster")  # a space in the path, on purpose
    info = cluster_tool.cluster_up(3, d)
    try:
        yield info
    finally:
        cluster_tool.cluster_down(d)
        survivors = [nd.name for nd in info.nodes if cluster_tool.pid_alive(nd.pid)]
        assert not survivors, f"sshd of {survivors} survived cluster_down"
        left = cluster_tool.sshd_pids_under(d)
        assert not left, f"sshd processes {left} under {d} survived cluster_down"


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
