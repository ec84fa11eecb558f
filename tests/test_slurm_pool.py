"""Slurm pools on a real Slurm cluster (tests/conftest_slurm.py): allocations held by
sbatch pilot jobs, agents started in them with srun, given back with scancel; what an
allocation Slurm ends does to its tasks; the pilot template; bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import gate, poll

from hpcbatch.errors import Conflict, ValidationError
from hpcbatch.providers import slurm as SP

DATA = Path(__file__).parent / "data"


def squeue(name: str | None = None) -> dict[str, tuple[str, str]]:
    """job id -> (state, nodes) of the cluster's jobs (of one name)."""
    argv = ["squeue", "-h", "-o", "%i|%T|%N|%j"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        jid, state, nodes, jname = line.split("|")
        if name is None or jname == name:
            jobs[jid] = (state, nodes)
    return jobs


def live_jobs(name: str) -> dict[str, tuple[str, str]]:
    return {j: v for j, v in squeue(name).items() if v[0] in SP.LIVE}


def marks(d: Path) -> dict[str, int]:
    """task id -> how many runs of it finished (its done.<task>.<attempt> marks)."""
    counts: dict[str, int] = {}
    for p in d.iterdir():
        if p.name.startswith("done."):
            task = p.name.split(".")[1]
            counts[task] = counts.get(task, 0) + 1
    return counts


def marking(d: Path, sleep_s: float = 0.0, gate_file: Path | None = None) -> str:
    pause = f"sleep {sleep_s}; " if sleep_s else ""
    if gate_file is not None:
        pause = f"{gate(gate_file)}; "
    return (f"touch {d}/start.$HPCBATCH_TASK_ID.$HPCBATCH_TASK_ATTEMPT.$SLURMD_NODENAME; "
            f"{pause}touch {d}/done.$HPCBATCH_TASK_ID.$HPCBATCH_TASK_ATTEMPT")


def idle_nodes(batch, pool: str) -> int:
    return sum(n.state == "idle" for n in batch.pools.nodes(pool))


# ---- without a cluster ------------------------------------------------------------

def test_the_pilot_job_comes_from_a_template_pinned_by_golden_files():
    cfg = SP.SlurmConfig.from_dict({"partition": "debug", "account": "proj1",
                                    "nodes_per_allocation": 3, "walltime": "1:00:00",
                                    "sbatch_args": ["--qos=high", "--exclusive"]})
    argv = SP.sbatch_argv(cfg, "hpcbatch-0123abcd-slurm3", 2, "/home/u/pilot-%j.out")
    assert "\n".join(argv) + "\n" == (DATA / "slurm_sbatch_argv.txt").read_text()
    script = SP.pilot_script("slurm3", "0123abcd", "/opt/venv/bin/python")
    assert script == (DATA / "slurm_pilot.sh").read_text()
    assert SP.srun_argv("42", "sn2") == [
        "srun", "--jobid=42", "--nodelist=sn2", "--nodes=1", "--ntasks=1", "--overlap",
        "--unbuffered", "--quiet", "--kill-on-bad-exit=0"]


@pytest.mark.parametrize("raw, field", [
    ({"nodes_per_allocation": 0}, "--nodes-per-allocation"),
    ({"walltime": "an hour"}, "--walltime"),
    ({"partition": "a b"}, "--partition"),
    ({"sbatch_args": ["--job-name=x"]}, "--sbatch-arg"),
    ({"sbatch_args": ["qos"]}, "--sbatch-arg"),
])
def test_bad_slurm_options_are_refused_naming_the_option(raw, field):
    with pytest.raises(ValidationError, match=field):
        SP.SlurmConfig.from_dict(raw)


def test_a_slurm_pool_without_slurms_commands_names_the_package(cli, monkeypatch, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ValidationError, match="apt-get install slurm-client"):
        SP.SlurmProvider.make_spec("s")
    monkeypatch.undo()
    # the CLI, with a PATH of only python: one line, exit 2, nothing stored
    env = {**os.environ, "HPCBATCH_HOME": str(tmp_path / "h"), "PATH": str(empty)}
    r = subprocess.run([sys.executable, "-m", "hpcbatch.cli", "pool", "create", "s",
                        "--slurm"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "slurm-client" in r.stderr
    assert "Traceback" not in r.stderr


# ---- on the cluster -----------------------------------------------------------------

def test_bad_partition_and_a_refused_request_change_nothing(slurm_cluster, batch):
    with pytest.raises(ValidationError, match="no partition 'nope'.*debug"):
        batch.pools.create("s", "slurm", partition="nope")
    with pytest.raises(Conflict, match="sbatch refused.*(node configuration|not available)"):
        batch.pools.create("s", "slurm", nodes_per_allocation=7)
    assert [p.id for p in batch.pools.list()] == ["local"]
    assert live_jobs(SP.job_name(batch.home, "s")) == {}


def test_bad_partition_from_the_cli_is_one_line(slurm_cluster, cli):
    r = cli("pool", "create", "s", "--slurm", "--partition", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--partition" in r.stderr and "debug" in r.stderr


@pytest.mark.slow
def test_a_pool_resized_0_to_3_runs_60_tasks_once_each_then_gives_every_node_back(
        slurm_cluster, batch, tmp_path):
    svc = batch.service
    pool = batch.pools.create("s3", "slurm", task_slots_per_node=2)
    name = SP.job_name(batch.home, "s3")
    assert pool.target_nodes == 0 and live_jobs(name) == {}
    d = tmp_path / "marks"
    d.mkdir()
    job = batch.jobs.create("j", pool="s3")
    job.add_tasks({"id": f"t{i}", "command_line": marking(d, 0.05)} for i in range(60))
    svc.resize_pool("s3", 3)
    job.wait(timeout_s=90)
    assert marks(d) == {f"t{i}": 1 for i in range(60)}
    nodes = {p.name.rsplit(".", 1)[1] for p in d.iterdir() if p.name.startswith("start.")}
    assert nodes == {"sn1", "sn2", "sn3"}
    held = live_jobs(name)
    assert len(held) == 3 and sorted(v[1] for v in held.values()) == ["sn1", "sn2", "sn3"]
    assert all(t.succeeded for t in job.tasks())
    hosts = sorted(n.hostname for n in batch.pools.nodes("s3"))
    assert hosts == ["sn1", "sn2", "sn3"]  # each slot's Slurm node, as 'pool show' lists
    svc.resize_pool("s3", 0, deallocation="retained_data")  # task directories kept
    poll(lambda: not batch.pools.nodes("s3"), timeout_s=30, what="the pool's nodes gone")
    poll(lambda: live_jobs(name) == {}, timeout_s=20, what=f"no allocation of {name} left")
    roots = batch.home / "nodes" / "s3"
    assert len(list(roots.glob("slurm-*/jobs/j"))) == 3
    assert batch.jobs.delete("j") == []  # the task directories of slots gone too
    assert list(roots.glob("slurm-*/jobs/j")) == []


@pytest.mark.slow
def test_an_allocation_cancelled_from_outside_requeues_its_tasks_and_is_replaced(
        slurm_cluster, batch, tmp_path):
    svc = batch.service
    batch.pools.create("s3", "slurm", task_slots_per_node=2, target_nodes=3)
    name = SP.job_name(batch.home, "s3")
    poll(lambda: idle_nodes(batch, "s3") == 3, timeout_s=30, what="3 nodes idle")
    first = set(live_jobs(name))
    d = tmp_path / "marks"
    d.mkdir()
    job = batch.jobs.create("j", pool="s3")
    go = tmp_path / "go"  # every task holds until the test opens this
    job.add_tasks({"id": f"t{i}", "command_line": marking(d, gate_file=go)}
                  for i in range(12))
    poll(lambda: len([p for p in d.iterdir() if p.name.startswith("start.")]) == 6,
         timeout_s=30, what="6 tasks running, 2 on each node")
    victim_job, (_, victim_node) = sorted(live_jobs(name).items())[0]
    on_victim = {p.name.split(".")[1] for p in d.iterdir()
                 if p.name.startswith("start.") and p.name.endswith("." + victim_node)}
    assert len(on_victim) == 2
    subprocess.run(["scancel", victim_job], check=True)  # an admin, from outside
    poll(lambda: all(job.task(t).requeue_count == 1 for t in on_victim), timeout_s=30,
         what=f"{sorted(on_victim)} requeued")
    go.touch()
    job.wait(timeout_s=90)
    twice = {t: [(a.attempt, a.outcome, a.node_id, a.failure_kind, a.failure_detail)
                 for a in job.task(t).attempts()] for t, n in marks(d).items() if n != 1}
    assert marks(d) == {f"t{i}": 1 for i in range(12)}, (twice, sorted(
        p.name for p in d.iterdir()))  # none lost, none run twice
    for tid in on_victim:
        t = job.task(tid)
        outcomes = [a.outcome for a in t.attempts()]
        assert t.succeeded and outcomes[-1] == "success" and "requeue" in outcomes[:-1], \
            (tid, outcomes)
        assert [a.failure_kind for a in t.attempts()][0] == "node_lost"
    # the slot asked for a replacement allocation
    poll(lambda: len(live_jobs(name)) == 3 and set(live_jobs(name)) - first,
         timeout_s=30, what="a replacement allocation")
    assert victim_job not in live_jobs(name)
    poll(lambda: idle_nodes(batch, "s3") == 3, timeout_s=30, what="3 nodes idle again")
    svc.resize_pool("s3", 0)
    poll(lambda: live_jobs(name) == {}, timeout_s=30, what="all given back")


@pytest.mark.slow
def test_pool_delete_and_stop_cancel_everything_and_a_new_coordinator_reaps_orphans(
        slurm_cluster, make_batch, tmp_path):
    batch = make_batch()
    batch.pools.create("s", "slurm", target_nodes=2)
    name = SP.job_name(batch.home, "s")
    poll(lambda: idle_nodes(batch, "s") == 2, timeout_s=30, what="2 nodes idle")
    batch.close()  # hpcbatch stops: its allocations go
    poll(lambda: live_jobs(name) == {}, timeout_s=20, what="allocations cancelled at stop")
    # an allocation with the pool's name that no coordinator holds (one that crashed)
    orphan = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--wrap",
                             "sleep 300"], capture_output=True, text=True, check=True)
    orphan_id = orphan.stdout.strip()
    poll(lambda: orphan_id in live_jobs(name), timeout_s=10, what="the orphan queued")
    batch = make_batch()
    batch.service.resize_pool("s", 3)
    poll(lambda: idle_nodes(batch, "s") == 3, timeout_s=30, what="3 nodes idle again")
    assert orphan_id not in live_jobs(name) and len(live_jobs(name)) == 3
    batch.pools.delete("s")
    poll(lambda: live_jobs(name) == {}, timeout_s=20, what="all cancelled at pool delete")
    assert not (batch.home / "nodes" / "s").exists()


@pytest.mark.slow
def test_a_slot_slurm_cannot_grant_says_it_is_pending_and_a_shrink_cancels_it(
        slurm_cluster, batch, monkeypatch):
    monkeypatch.setattr(SP.SlurmProvider, "pending_wait_s", 1.0)
    # 2 slots a node = all of its CPUs: a 4th node's allocation waits for resources
    batch.pools.create("p4", "slurm", task_slots_per_node=2, target_nodes=4)
    name = SP.job_name(batch.home, "p4")
    poll(lambda: idle_nodes(batch, "p4") == 3, timeout_s=30, what="3 nodes idle")
    pending = poll(lambda: next((n for n in batch.pools.nodes("p4")
                                 if "pending" in (n.reason or "")), None), timeout_s=30,
                   what="the 4th node saying its allocation is pending")
    assert "waiting for Slurm to grant it" in pending.reason and "Resources" in pending.reason
    assert sorted(s for s, _ in live_jobs(name).values()) == ["PENDING"] + ["RUNNING"] * 3
    batch.service.resize_pool("p4", 3)  # the pending one goes first
    poll(lambda: sorted(s for s, _ in live_jobs(name).values()) == ["RUNNING"] * 3,
         timeout_s=30, what="the pending request cancelled")
    assert idle_nodes(batch, "p4") == 3
