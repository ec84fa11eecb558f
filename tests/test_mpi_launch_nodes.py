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
import re
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


# ---------------------------------------------------------------- the SSH test cluster

def _no_process_of(job: str, task: str, timeout_s: float = 15.0) -> list[int]:
    """Poll until no process carries the task's ids (what the agents reap); the pids left."""
    needles = (f"HPCBATCH_JOB_ID={job}\0".encode(), f"HPCBATCH_TASK_ID={task}\0".encode())
    end = time.monotonic() + timeout_s
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    data = f.read() + b"\0"
            except OSError:
                continue
            if all(n in data for n in needles):
                left.append(int(pid))
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="module", params=MODES)
def cluster(request, tmp_path_factory):
    """3 sshd nodes and a pool spec whose python is this one (the nodes' login PATH
    has nothing of hpcbatch); afterwards nothing of the cluster is left."""
    netns = request.param == "netns"
    reason = unavailable(ct.check_netns) if netns else None
    if reason:
        pytest.skip(f"{LIBRARY} across sshd nodes here needs a --netns cluster: {reason}")
    d = tmp_path_factory.mktemp(f"launch-{request.param}")
    with sshd_cluster(3, d, netns=netns) as info:
        spec = json.loads(info.pool_json.read_text())
        spec["python"] = sys.executable
        spec["node_root"] = str(d / "nodes")  # Open MPI: no spaces in the ssh_config path
        (d / "pool-mpi.json").write_text(json.dumps(spec))
        yield info


def _ssh_pool(batch, info, name="mpi3") -> None:
    batch.pools.create(name, "ssh", spec=str(info.directory / "pool-mpi.json"))


def _roots(info, home, pool="mpi3") -> list[str]:
    from hpcbatch.providers.base import home_id
    return [f"{info.directory / 'nodes'}/{home_id(home)}/{pool}/{nd.name}" for nd in info.nodes]


@pytest.mark.ssh
@pytest.mark.slow
@needs_mpi
@pytest.mark.parametrize("bench", ["helloworld", "ringtest"])
def test_submit_nodes_3_mpi4py_bench(cluster, home, bench):
    """`hpcbatch submit --pool P --nodes 3 -- hpcbatch-mpiexec -- python -m mpi4py.bench
    helloworld`: three ranks on three nodes, nothing spelled out."""
    from helpers import run_cli
    r = run_cli(home, "pool", "create", "mpi3", "--spec",
                str(cluster.directory / "pool-mpi.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    t0 = time.monotonic()
    r = run_cli(home, "submit", "--pool", "mpi3", "--nodes", "3", "--job", "hello", "--",
                "hpcbatch-mpiexec", "--", "python", "-m", "mpi4py.bench", bench,
                timeout_s=240)
    took = time.monotonic() - t0
    import hpcbatch
    with hpcbatch.Batch(home) as b:
        (t,) = list(b.jobs.get("hello").tasks())
        task = b.jobs.get("hello").task(t.id)
        out, err = task.stdout(), task.stderr()
    assert r.returncode == 0, r.stdout + r.stderr + out + err
    mode = "netns" if cluster.netns else "loopback"
    print(f"{LIBRARY} submit --nodes 3 mpi4py.bench {bench} ({mode}): {took:.2f} s")
    if bench == "helloworld":
        lines = sorted(ln for ln in out.splitlines() if ln.startswith("Hello, World!"))
        assert len(lines) == 3, out
        for i, ln in enumerate(lines):
            assert ln.startswith(f"Hello, World! I am process {i} of 3 on "), out
        if cluster.netns:  # each node its own host(name)
            assert [ln.rsplit(" ", 1)[1] for ln in lines] == ["node1.", "node2.", "node3."]
    else:
        assert "time" in out.lower() or out.strip(), out


@pytest.mark.ssh
@pytest.mark.slow
@needs_mpi
def test_each_rank_sees_its_own_node(cluster, make_batch, home, tmp_path):
    batch = make_batch()
    _ssh_pool(batch, cluster)
    job = batch.jobs.create("mpi", pool="mpi3")
    _where_task(job, tmp_path, 3)
    t0 = time.monotonic()
    job.wait(timeout_s=180)
    t = job.task("where")
    assert t.succeeded, (t.failure, t.stderr())
    _check_ranks(_rows(t.stdout()), ["node1", "node2", "node3"], _roots(cluster, home),
                 "mpi", "where", own_node=True)
    print(f"{LIBRARY} SSH 3-node where ({'netns' if cluster.netns else 'loopback'}): "
          f"{time.monotonic() - t0:.2f} s")


@pytest.mark.ssh
@pytest.mark.slow
@needs_mpi
def test_ranks_that_never_start_fail_at_the_launch_deadline(cluster, make_batch, home,
                                                            tmp_path):
    """node3's sshd stops answering new connections (its agent's session stays): its
    ranks never start, and the attempt fails at the launch deadline naming node3."""
    batch = make_batch()
    _ssh_pool(batch, cluster)
    job = batch.jobs.create("hang", pool="mpi3")
    deadline_s = 3
    stopped = cluster.nodes[2].pid
    # the agents are up first (their SSH sessions are the sshd's children, not stopped)
    job.add_task("warm", "true", multi_instance={"instances": 3})
    job.wait(timeout_s=120)
    os.kill(stopped, signal.SIGSTOP)
    try:
        job2 = batch.jobs.create("hang2", pool="mpi3")
        _where_task(job2, tmp_path, 3, HPCBATCH_LAUNCH_TIMEOUT_S=str(deadline_s))
        t0 = time.monotonic()
        job2.wait(timeout_s=120)
        took = time.monotonic() - t0
    finally:
        os.kill(stopped, signal.SIGCONT)
    t = job2.task("where")
    assert not t.succeeded
    lines = t.stderr().splitlines()
    # one line of ours, last, that names node3: its ranks (MPICH), or its silent sshd (Open
    # MPI starts no rank until every daemon is up); before it at most the MPI's own
    # "[host:pid] ..." diagnostics (PRRTE may warn of a setpgid race as it spawns ssh)
    err = lines[-1] + "\n"
    assert err.startswith("hpcbatch-mpiexec: error: "), lines
    assert all(re.match(r"\[[\w.-]+:\d+\] ", ln) for ln in lines[:-1]), lines
    assert f"did not start within the launch deadline of {deadline_s} s" in err, err
    assert "the ranks on node3 did not start" in err or \
        err.startswith("hpcbatch-mpiexec: error: node3 did not answer (its sshd at "), err
    assert "node1 did not answer" not in err and "node2 did not answer" not in err, err
    assert took < deadline_s + 15, took
    assert _no_process_of("hang2", "where") == []
    print(f"{LIBRARY} launch deadline ({'netns' if cluster.netns else 'loopback'}): "
          f"failed after {took:.2f} s")


@pytest.mark.ssh
@pytest.mark.slow
@pytest.mark.skipif(FLAVOUR != "openmpi", reason="Open MPI's refusal of loopback nodes")
def test_open_mpi_on_loopback_nodes_is_refused_in_one_line(make_batch, home, tmp_path):
    d = tmp_path / "loop"
    with sshd_cluster(3, d) as info:
        spec = json.loads(info.pool_json.read_text())
        spec["python"] = sys.executable
        spec["node_root"] = str(d / "nodes")
        (d / "pool-mpi.json").write_text(json.dumps(spec))
        batch = make_batch()
        _ssh_pool(batch, info, "loop3")
        job = batch.jobs.create("loop", pool="loop3")
        job.add_task("t", "hpcbatch-mpiexec -- python -m mpi4py.bench helloworld",
                     multi_instance={"instances": 3})
        t0 = time.monotonic()
        job.wait(timeout_s=120)
        t = job.task("t")
        took = time.monotonic() - t0
        assert not t.succeeded
        err = t.stderr()
        assert err.startswith("hpcbatch-mpiexec: error: Open MPI cannot start ranks across "
                              "node1, node2, node3: they all resolve to loopback addresses "
                              "(127.0.0.1)") and err.count("\n") == 1, err
        print(f"Open MPI on loopback nodes refused after {took:.2f} s (agents' start included)")
        batch.close()


SIM = textwrap.dedent('''
    import os
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    seen = comm.gather((comm.rank, os.environ["HPCBATCH_NODE_ID"], os.getcwd()))
    if comm.rank == 0:
        for rank, node, cwd in seen:
            print(f"rank {rank} on {node} in {cwd}")
''')


def _readme_block(lang: str, needle: str) -> str:
    """The README's ```lang block holding needle, as written."""
    import re
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if needle in b]
    assert len(blocks) == 1, f"README.md: one ```{lang} block with {needle!r}, not {blocks}"
    return blocks[0]


@pytest.mark.ssh
@pytest.mark.slow
@needs_mpi
def test_the_readmes_python_multi_instance_example_runs_as_written(cluster, home, tmp_path):
    """README.md's setup.sh and Python snippet, extracted (so the test fails when the
    README drifts), run in a fresh python on the 3-node cluster made a pool by the CLI."""
    from helpers import run_cli
    r = run_cli(home, "pool", "create", "mpi3", "--spec",
                str(cluster.directory / "pool-mpi.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "work"
    work.mkdir()
    (work / "setup.sh").write_text(_readme_block("sh", "setup.sh"))
    (work / "setup.sh").chmod(0o755)
    (work / "sim.py").write_text(SIM)
    snippet = _readme_block("python", 'multi_instance={"instances"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCBATCH_")}
    env["HPCBATCH_HOME"] = str(home)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, text=True,
                       capture_output=True, timeout=240)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    roots = _roots(cluster, home)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("rank ")]
    assert lines == [f"rank {i} on node{i + 1} in {roots[i]}/jobs/sims/sim/wd"
                     for i in range(3)], p.stdout + p.stderr
    print(f"{LIBRARY} README multi-instance example "
          f"({'netns' if cluster.netns else 'loopback'}): {took:.2f} s")
