"""Issue 12's Slurm acceptance, end to end on the real Slurm test cluster, under a real
`hpcbatch serve`: a slurm pool at 0 nodes with an autoscale formula grows to 3 nodes
when 60 tasks are pending, runs each once, runs `hpcbatch run pi --nodes 3
--ranks-per-node 1` with its ranks on 3 distinct Slurm nodes (the MPI beside this
python: scripts/test.sh runs this file in .venv (Open MPI) and .venv-mpich (MPICH)),
shrinks back to 0 once idle, and then `squeue` shows none of its allocations."""

from __future__ import annotations

import subprocess
import sys

import h5py
import pytest
from helpers import poll, run_cli

from hpcbatch.launch import mpi
from hpcbatch.providers import slurm as SP

pytest.importorskip("fastapi")
from test_server import Served  # noqa: E402 - the server fixture's class

FLAVOUR = mpi.detect_flavour(mpi.default_mpiexec())
LIBRARY = {"openmpi": "Open MPI", "mpich": "MPICH"}.get(FLAVOUR)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(LIBRARY is None, reason=f"the MPI beside {sys.executable} is "
                       f"{FLAVOUR}; the Slurm MPI tests run with Open MPI or MPICH"),
]

# a node per 20 pending slots (one slot a node here), at most 3; a wide task that needs
# 3 nodes asks for 3; none when nothing is pending or running
FORMULA = """
$slots = $PendingTaskSlots.GetSample(1);
$TargetNodes = $slots > 0 ? min(3, max($slots >= 3 ? 3 : 1, ceil($slots / 20))) : 0;
$NodeDeallocationOption = taskcompletion;
"""


def live(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split()[1] in SP.LIVE]


@pytest.fixture
def served(slurm_cluster, tmp_path):
    s = Served(tmp_path / "hpc home", tmp_path / "logs")
    try:
        yield s
    finally:
        s.stop()


def test_a_formula_grows_a_slurm_pool_from_0_to_3_runs_tasks_and_mpi_then_gives_all_back(
        served, tmp_path):
    home, c = served.home, served.client
    name = SP.job_name(home, "slurm3")
    r = run_cli(home, "pool", "create", "slurm3", "--slurm", "--nodes-per-allocation", "3")
    assert r.returncode == 0, r.stderr
    r = run_cli(home, "pool", "autoscale", "enable", "slurm3", "--formula", FORMULA,
                "--interval", "1s")
    assert r.returncode == 0, r.stderr
    assert c.get("/v1/pools/slurm3").json()["target_nodes"] == 0 and live(name) == []

    marks = tmp_path / "marks"
    marks.mkdir()
    assert run_cli(home, "job", "create", "j", "--pool", "slurm3").returncode == 0
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(
        f'echo "$SLURMD_NODENAME" >> "{marks}/t{i:02d}"; sleep 0.1\n' for i in range(60)))
    r = run_cli(home, "submit", "--pool", "slurm3", "--job", "j", "--each-line", str(tasks),
                "--no-wait")
    assert r.returncode == 0, r.stdout + r.stderr
    poll(lambda: c.get("/v1/pools/slurm3").json()["target_nodes"] == 3, timeout_s=30,
         what="the formula's resize to 3")
    r = run_cli(home, "job", "wait", "j", timeout_s=180)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = {p.name: p.read_text().split() for p in marks.iterdir()}
    assert sorted(runs) == [f"t{i:02d}" for i in range(60)]
    assert all(len(v) == 1 for v in runs.values()), runs  # each exactly once
    assert {n for v in runs.values() for n in v} <= {"sn1", "sn2", "sn3"}
    counts = c.get("/v1/jobs/j/taskcounts").json()
    assert counts["succeeded"] == 60, counts

    out = tmp_path / "pi.h5"
    r = run_cli(home, "run", "pi", "--pool", "slurm3", "--nodes", "3", "--ranks-per-node",
                "1", "-o", str(out), timeout_s=240)
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        assert abs(float(f["result/pi"][()]) - 3.14159) < 0.01
    assert LIBRARY in str(attrs["mpi_library"])
    assert sorted(map(str, attrs["slurm_nodes"])) == ["sn1", "sn2", "sn3"]

    # idle: back to 0, every allocation given back
    poll(lambda: c.get("/v1/pools/slurm3").json()["target_nodes"] == 0, timeout_s=30,
         what="the formula's resize to 0")
    poll(lambda: c.get("/v1/pools/slurm3/nodes").json()["items"] == [], timeout_s=60,
         what="the pool's nodes gone")
    poll(lambda: live(name) == [], timeout_s=30, what="no allocation of the pool in squeue")
    events = c.get("/v1/pools/slurm3").json()["autoscale_events"]
    moves = [(e["result"]["from"], e["result"]["to"]) for e in events  # newest first
             if e["kind"] == "resize" and not e["error"]]
    assert (0, 3) in moves and moves[0] == (3, 0), moves
