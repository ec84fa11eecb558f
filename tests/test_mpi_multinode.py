"""MPI across real sshd nodes: `hpcbatch run KERNEL --pool P --nodes 3`, for the MPI
beside this python (Open MPI in .venv, MPICH in .venv-mpich; scripts/test.sh runs
this file in both environments).

Open MPI 5's PRRTE daemons never wire up over a loopback interface, so Open MPI runs
on a ``--netns`` test cluster (each node a network namespace with its own address
and hostname; needs root). MPICH runs on loopback nodes (no root needed) and, where
root can make namespaces, on a netns cluster too.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest
from conftest_ssh import sshd_cluster
from helpers import run_cli, unavailable

from hpcbatch.launch import cluster as ct
from hpcbatch.launch import mpi
from hpcbatch.timings import Timings

FLAVOUR = mpi.detect_flavour(mpi.default_mpiexec())
LIBRARY = {"openmpi": "Open MPI", "mpich": "MPICH"}.get(FLAVOUR)
MODES = {"openmpi": ["netns"], "mpich": ["loopback", "netns"]}.get(FLAVOUR, [])
pytestmark = [
    pytest.mark.ssh,
    pytest.mark.slow,
    pytest.mark.skipif(not MODES, reason=f"the MPI beside {sys.executable} is {FLAVOUR}; "
                       "multi-node tests run with Open MPI or MPICH"),
]


# each rank reports the node its own environment names (set by that node's sshd), its
# UTS hostname, and the server end of the SSH session it descends from
WHERE = textwrap.dedent('''
    import ipaddress
    import os
    import socket
    import numpy as np
    from hpcbatch.kernels.api import Output
    PARAMS = {}
    OUTPUTS = {"node": Output("concat"), "own_hostname": Output("concat"),
               "sshd": Output("concat")}

    def run(comm):
        node = os.environ["HPCBATCH_NODE"]
        conn = os.environ.get("SSH_CONNECTION", "0.0.0.0 0 0.0.0.0 0").split()
        sshd = [*ipaddress.IPv4Address(conn[2]).packed, int(conn[3])]
        return {"node": np.array([int(node.removeprefix("node"))]),
                "own_hostname": np.array([socket.gethostname() == node]),
                "sshd": np.array([sshd])}
''')


@pytest.fixture(scope="module", params=MODES)
def cluster(request, tmp_path_factory):
    """3 sshd nodes and a pool spec for them whose python is this one; afterwards,
    nothing of the cluster is left (no sshd, no namespace, veth or bridge)."""
    netns = request.param == "netns"
    reason = unavailable(ct.check_netns) if netns else None
    if reason:
        pytest.skip(f"{LIBRARY} across sshd nodes here needs a --netns cluster: {reason}")
    d = tmp_path_factory.mktemp(f"mpi-{request.param}")
    with sshd_cluster(3, d, netns=netns) as info:  # checks that nothing of it is left
        spec = json.loads(info.pool_json.read_text())
        spec["python"] = sys.executable
        spec["node_root"] = str(d / "nodes")  # not ~/.hpcbatch-node; Open MPI needs no spaces
        (d / "pool-mpi.json").write_text(json.dumps(spec))
        yield info


def _pool(home: Path, info: ct.ClusterInfo) -> None:
    r = run_cli(home, "pool", "create", "mpi3", "--spec", str(info.directory / "pool-mpi.json"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_pi_across_three_nodes(cluster, home, tmp_path):
    _pool(home, cluster)
    out = tmp_path / "pi.h5"
    t0 = time.monotonic()
    r = run_cli(home, "run", "pi", "--pool", "mpi3", "--nodes", "3", "--ranks-per-node", "1",
                "-p", "samples=300000", "-o", str(out))
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"{LIBRARY} 3-node pi ({'netns' if cluster.netns else 'loopback'}): {took:.2f} s")
    with h5py.File(out, "r") as f:
        assert list(f.attrs["node_ids"]) == ["node1", "node2", "node3"]  # native, no JSON
        if cluster.netns:  # each node is a host of its own: its own hostname too
            assert list(f.attrs["hostnames"]) == ["node1", "node2", "node3"]
        assert f.attrs["ranks"] == 3 and LIBRARY in f.attrs["mpi_library"]
        assert abs(f["result/pi"][()] - 3.14159) < 0.02


def test_each_rank_started_through_ssh_on_its_node(cluster, home, tmp_path):
    kfile = tmp_path / "where.py"
    kfile.write_text(WHERE)
    _pool(home, cluster)
    out = tmp_path / "where.h5"
    r = run_cli(home, "run", str(kfile), "--pool", "mpi3", "--nodes", "3", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(out, "r") as f:
        assert f["result/node"][()].tolist() == [1, 2, 3]
        # each rank's SSH session was served by its own node's sshd (address and port)
        assert [(socket.inet_ntoa(bytes(row[:4])), int(row[4]))
                for row in f["result/sshd"][()].tolist()] == [
                    (nd.hostname, nd.port) for nd in cluster.nodes]
        if cluster.netns:
            assert f["result/own_hostname"][()].tolist() == [True, True, True]


# ---- Python functions across the nodes (batch.run_kernel(fn, nodes=3, outputs=...)) ----
# (with the production timings, as the CLI tests above run: FAST_TIMINGS' 2 s node
# timeout loses loopback SSH agents on a loaded 2-core machine)

def test_a_function_across_three_nodes(cluster, home, make_batch, tmp_path):
    import os

    import numpy as np
    _pool(home, cluster)
    weights = np.array([0.5, 1.5, 2.0])  # a closure: it travels pickled to every node

    def where(comm, scale):
        node = int(os.environ["HPCBATCH_NODE"].removeprefix("node"))
        return {"node": node, "energy": weights[comm.rank] * scale, "ranks": comm.size}
    batch = make_batch(timings=Timings())  # as the CLI runs: SSH nodes on a busy box
    out = tmp_path / "where-fn.h5"
    res = batch.run_kernel(where, pool="mpi3", nodes=3, params={"scale": 2.0},
                           outputs={"node": "gather", "energy": "sum", "ranks": "max"},
                           output=out)
    assert res["node"].tolist() == [1, 2, 3]  # one rank on each node, in rank order
    assert res["energy"] == 8.0 and res["ranks"] == 3
    with h5py.File(out, "r") as f:
        assert f.attrs["function"].endswith("where") and f.attrs["nodes"] == 3
        assert list(f.attrs["node_ids"]) == ["node1", "node2", "node3"]


def test_a_function_raising_on_a_remote_node_fails_with_its_traceback(cluster, home,
                                                                       make_batch):
    from helpers import poll, processes_with

    from hpcbatch.kernelrun import KernelRunError
    _pool(home, cluster)

    def fragile(comm):
        if comm.rank == 2:
            raise RuntimeError("node3 has no data")
        comm.Barrier()  # ranks 0 and 1 wait: the abort must end them on their nodes
        return {"x": 1}
    batch = make_batch(timings=Timings())  # as the CLI runs: SSH nodes on a busy box
    t0 = time.monotonic()
    with pytest.raises(KernelRunError) as info:
        batch.run_kernel(fragile, pool="mpi3", nodes=3, outputs={"x": "sum"}, timeout_s=120)
    took = time.monotonic() - t0
    err = info.value
    assert err.rank == 2 and "RuntimeError: node3 has no data" in err.traceback, str(err)
    assert 'raise RuntimeError("node3 has no data")' in err.traceback
    assert "[rank 2] RuntimeError: node3 has no data" in str(err)
    stopped = "aborted and mpiexec had not ended" in err.stderr  # PRRTE hung: stopped
    print(f"{LIBRARY} 3-node function abort: {took:.2f} s"
          + (" (mpiexec hung after the abort and was stopped)" if stopped else ""))
    assert took < 90, f"{took:.1f} s: a rank was left waiting"
    # nothing of the run is left on any node (their processes are on this machine)
    poll(lambda: processes_with({"HPCBATCH_JOB_ID": err.task.job_id}) == [], timeout_s=15,
         what="no process of the failed run left")
