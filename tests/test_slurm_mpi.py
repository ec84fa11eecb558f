"""MPI on a Slurm pool, on the real Slurm test cluster: `hpcbatch run pi --pool slurm3
--nodes 3 --ranks-per-node 1` starts its ranks with Slurm inside the pool's allocation
(MPICH: srun --mpi=pmi2; Open MPI: mpiexec, whose PRRTE starts its daemons with srun),
one on each of 3 distinct Slurm nodes, and the result's provenance names the nodes and
the job. For the MPI beside this python: scripts/test.sh runs this file in .venv (Open
MPI) and .venv-mpich (MPICH)."""

from __future__ import annotations

import subprocess
import sys

import h5py
import pytest
from helpers import poll, run_cli

from hpcbatch.launch import mpi
from hpcbatch.providers import slurm as SP

FLAVOUR = mpi.detect_flavour(mpi.default_mpiexec())
LIBRARY = {"openmpi": "Open MPI", "mpich": "MPICH"}.get(FLAVOUR)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(LIBRARY is None, reason=f"the MPI beside {sys.executable} is "
                       f"{FLAVOUR}; the Slurm MPI tests run with Open MPI or MPICH"),
]


def test_pi_runs_on_3_distinct_slurm_nodes_inside_one_allocation(slurm_cluster, cli, home,
                                                                 tmp_path):
    r = cli("pool", "create", "slurm3", "--slurm", "--nodes-per-allocation", "3",
            "--nodes", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "pi.h5"
    r = cli("run", "pi", "--pool", "slurm3", "--nodes", "3", "--ranks-per-node", "1",
            "-o", str(out), timeout_s=180)
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        assert abs(float(f["result/pi"][()]) - 3.14159) < 0.01
    assert LIBRARY in str(attrs["mpi_library"])
    assert sorted(map(str, attrs["slurm_nodes"])) == ["sn1", "sn2", "sn3"]
    assert sorted(map(str, attrs["node_ids"])) == ["sn1", "sn2", "sn3"]
    job = str(attrs["slurm_job_id"])
    assert job.isdigit()
    shown = run_cli(home, "results", "show", str(out))
    assert f"slurm     job {job} on sn" in shown.stdout, shown.stdout
    # that job was the pool's one allocation of 3 nodes; the coordinator gave it back
    name = SP.job_name(home, "slurm3")
    poll(lambda: not [line for line in subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True
    ).stdout.splitlines() if "RUNNING" in line or "PENDING" in line], timeout_s=20,
        what="the pool's allocation given back when hpcbatch run stopped")


def test_a_task_across_allocations_is_refused_in_one_line(slurm_cluster, cli, tmp_path):
    r = cli("pool", "create", "split", "--slurm", "--nodes", "2")  # one node each
    assert r.returncode == 0, r.stderr
    r = cli("run", "pi", "--pool", "split", "--nodes", "2", "--ranks-per-node", "1",
            "-o", str(tmp_path / "x.h5"), timeout_s=120)
    assert r.returncode != 0
    assert "--nodes-per-allocation 2" in r.stdout + r.stderr, r.stdout + r.stderr


def test_an_allocation_ended_under_a_multi_instance_task_fails_the_attempt_and_it_retries(
        slurm_cluster, batch, tmp_path):
    """Slurm ends the allocation the task's ranks run in: the attempt fails (a lost node),
    the task is retried in the replacement allocation and succeeds there."""
    batch.pools.create("mi3", "slurm", nodes_per_allocation=3, target_nodes=3)
    name = SP.job_name(batch.home, "mi3")
    d = tmp_path / "marks"
    d.mkdir()
    prog = tmp_path / "prog.py"
    # (no MPI_Init: ranks Slurm kills would leave MPI's /dev/shm segments behind)
    prog.write_text(
        "import os, time\n"
        "rank = next(os.environ[k] for k in ('OMPI_COMM_WORLD_RANK', 'PMI_RANK', "
        "'SLURM_PROCID') if k in os.environ)\n"
        f"tag = f\"{d}/{{os.environ['HPCBATCH_TASK_ATTEMPT']}}.{{rank}}."
        "{os.environ['SLURMD_NODENAME']}\"\n"
        "open(tag + '.start', 'w').close()\n"
        "while os.environ['HPCBATCH_TASK_ATTEMPT'] == '0':\n    time.sleep(0.05)\n"
        "open(tag + '.done', 'w').close()\n")
    job = batch.jobs.create("j", pool="mi3")
    job.add_task("mi", f"hpcbatch-mpiexec --ranks-per-node 1 -- python {prog}",
                 multi_instance={"instances": 3}, max_task_retry_count=1)
    poll(lambda: len(list(d.glob("0.*.start"))) == 3, timeout_s=60,
         what="3 ranks of the first attempt running")
    (first,) = [j for j, s in _live(name).items()]
    subprocess.run(["scancel", first], check=True)
    job.wait(timeout_s=120)
    t = job.task("mi")
    assert t.succeeded and t.retry_count == 1, [(a.outcome, a.failure_kind,
                                                 a.failure_detail) for a in t.attempts()]
    assert [a.outcome for a in t.attempts()] == ["retry", "success"]
    assert sorted(p.name.split(".")[2] for p in d.glob("1.*.done")) == ["sn1", "sn2", "sn3"]
    assert not list(d.glob("0.*.done"))  # the first attempt's ranks never went on
    assert first not in _live(name) and len(_live(name)) == 1  # the replacement


def _live(name: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i|%T"], capture_output=True,
                         text=True).stdout
    return {j: s for j, s in (line.split("|") for line in out.split())
            if s in ("RUNNING", "PENDING", "CONFIGURING")}
