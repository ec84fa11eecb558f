"""hpcbatch-mpiexec as users write it: the launch layer on every node, each rank's own
node environment, and no silent hangs.

* a local pool split into nodes (no SSH): one hostfile line per host, every rank its own
  node's ids and working directory (for the MPI beside this python);
* the 3-node SSH test cluster (tests/test_mpi_multinode.py's way: Open MPI on a
  ``--netns`` cluster, MPICH on loopback and netns; scripts/test.sh runs this file in
  .venv and .venv-mpich): ``hpcbatch-mpiexec -- python -m mpi4py.bench helloworld`` with
  nothing of hpcbatch on the nodes' login PATH, rank-by-rank environment, a node whose
  ranks never start failing at the launch deadline, and Open MPI on loopback nodes
  refused in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest_ssh import sshd_cluster
from helpers import unavailable

from hpcbatch.launch import cluster as ct
from hpcbatch.launch import mpi

FLAVOUR = mpi.detect_flavour(mpi.default_mpiexec())
LIBRARY = {"openmpi": "Open MPI", "mpich": "MPICH"}.get(FLAVOUR)
MODES = {"openmpi": ["netns"], "mpich": ["loopback", "netns"]}.get(FLAVOUR, [])
needs_mpi = pytest.mark.skipif(LIBRARY is None, reason=f"the MPI beside {sys.executable} is "
                               f"{FLAVOUR}; these tests run with Open MPI or MPICH")

# every rank says what it sees; rank 0 prints them all, one JSON line per rank
WHERE = textwrap.dedent('''
    import json, os
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    keys = ("HPCBATCH_NODE_ID", "HPCBATCH_INSTANCE_INDEX", "HPCBATCH_TASK_SHARED_DIR",
            "HPCBATCH_TASK_WORKING_DIR", "HPCBATCH_NODE", "HPCBATCH_JOB_ID")
    me = {k: os.environ.get(k) for k in keys}
    me.update(rank=comm.rank, size=comm.size, cwd=os.getcwd(),
              shared_file=os.path.exists("../shared/where.py"))
    seen = comm.gather(me)
    if comm.rank == 0:
        for row in seen:
            print(json.dumps(row))
''')


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _where_task(job, tmp_path: Path, n: int, **env) -> None:
    script = tmp_path / "where.py"
    script.write_text(WHERE)
    job.add_task("where", "hpcbatch-mpiexec -- python ../shared/where.py",
                 environment=env,
                 multi_instance={"instances": n, "common_resource_files": [str(script)]})


def _check_ranks(rows: list[dict], node_ids: list[str], roots: list[str], job: str,
                 task: str, own_node: bool) -> None:
    assert [r["rank"] for r in rows] == list(range(len(node_ids)))
    for i, (row, node, root) in enumerate(zip(rows, node_ids, roots)):
        tdir = f"{root}/jobs/{job}/{task}"
        assert row["HPCBATCH_NODE_ID"] == node, row
        assert row["HPCBATCH_INSTANCE_INDEX"] == str(i), row
        assert row["HPCBATCH_TASK_SHARED_DIR"] == f"{tdir}/shared", row
        assert row["HPCBATCH_TASK_WORKING_DIR"] == f"{tdir}/wd", row
        assert os.path.realpath(row["cwd"]) == os.path.realpath(f"{tdir}/wd"), row
        assert row["shared_file"], row  # its own node's shared dir, by a relative path
        assert row["HPCBATCH_JOB_ID"] == job
        if own_node:  # the node's sshd says which node the rank really runs on
            assert row["HPCBATCH_NODE"] == node, row


# ---------------------------------------------------------------- a local pool

def test_hostfile_lines_merge_per_host():
    hosts = [("localhost", 1)] * 3
    assert mpi.hostfile_for("openmpi", hosts) == "localhost slots=3\n"
    assert mpi.hostfile_for("mpich", hosts) == "localhost:3\n"
    inst = [{"host": "a", "slots": 2}, {"host": "b", "slots": 1}, {"host": "a", "slots": 1}]
    lines, ranks = mpi.rank_layout(inst, None)
    assert lines == [("a", 3), ("b", 1)]
    assert ranks == [(0, 2, 0), (2, 1, 2), (3, 1, 1)]  # instances of one host together
    assert mpi.rank_layout(inst, 1) == ([("a", 2), ("b", 1)], [(0, 1, 0), (1, 1, 2),
                                                               (2, 1, 1)])


def test_loopback_only_hosts(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("Host node1\n  HostName 127.0.0.1\n  Port 2201\n"
                   "Host node2\n  HostName 127.0.0.1\n  Port 2202\n"
                   "Host far\n  HostName 10.77.9.11\n")
    assert mpi.loopback_only(["node1", "node2"], str(cfg)) == ["127.0.0.1"]
    assert mpi.loopback_only(["node1", "far"], str(cfg)) is None
    assert mpi.loopback_only(["localhost"], None) is None  # one host: no daemons needed


def test_a_node_python_without_mpi4py_is_named(tmp_path):
    # the rank wrapper's check, run by a python that has no mpi4py (the system one)
    bare = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                 if Path(p).exists() and subprocess.run(
                     [p, "-c", "import mpi4py"], capture_output=True).returncode != 0), None)
    if bare is None:
        pytest.skip("no python without mpi4py here")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mpi; "
            "print(mpi.node_problem({'python_program': True, 'flavour': 'openmpi'}))")
    # run as a script beside env.py, as on a node
    for name in ("mpi.py",):
        (tmp_path / name).write_text(Path(mpi.__file__).read_text())
    from hpcbatch import env
    (tmp_path / "env.py").write_text(Path(env.__file__).read_text())
    r = subprocess.run([bare, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{bare} has no mpi4py (pip install mpi4py into it, or give " \
                               "the pool a python that has it)"


@needs_mpi
def test_each_rank_gets_its_own_node_on_a_local_pool(batch, home, tmp_path):
    batch.pools.create("trio", target_nodes=3)
    job = batch.jobs.create("mpi", pool="trio")
    _where_task(job, tmp_path, 3)
    t0 = time.monotonic()
    job.wait(timeout_s=120)
    t = job.task("where")
    assert t.succeeded, (t.failure, t.stderr())
    nodes = ["local-1", "local-2", "local-3"]
    _check_ranks(_rows(t.stdout()), nodes, [str(home / "nodes" / "trio" / n) for n in nodes],
                 "mpi", "where", own_node=False)
    print(f"{LIBRARY} local 3-node where: {time.monotonic() - t0:.2f} s")
