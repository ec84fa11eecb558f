"""Slurm pools on a real Slurm test cluster: a cold start, and short tasks vs Slurm's own.

Starts a 3-node Slurm cluster of its own (``hpcbatch cluster up --slurm``; root and the
Slurm packages needed, else every figure is skipped with the reason) and measures, in
one run:

* **cold start**: a task is pending on a slurm pool of 0 nodes; the pool is resized to
  1: the time until the task runs, split into the allocation (sbatch until squeue says
  RUNNING), the agent's start (srun --overlap until the node is idle) and the dispatch
  (node idle until the task started);
* **N short tasks** (``true``) on a 3-node slurm pool (2 slots a node) already up,
  against the same N as one ``sbatch --array=0-(N-1)`` (submit until squeue has none
  left) and as ``srun -N1 -n1 true`` in a loop (one after the other, as a script does),
  interleaved per repeat.

    python benchmarks/bench_slurm.py [--tasks 1000] [--repeats 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_results  # noqa: E402

FAST = dict(heartbeat_s=0.25, node_timeout_s=5.0, lease_s=6.0, reconnect_min_s=0.25,
            reconnect_max_s=1.0, kill_grace_s=0.5, work_poll_s=0.05)


def _why_not() -> str | None:
    from hpcbatch.launch import slurmcluster as SC
    from hpcbatch.launch.cluster import ClusterError
    try:
        SC.check_slurm()
    except ClusterError as exc:
        return str(exc)
    return None


def _poll(pred, timeout_s: float = 120.0, interval_s: float = 0.005):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise TimeoutError("benchmark step did not finish in time")


def cold_start(home: Path) -> dict[str, float]:
    """A task pending on a pool of 0 nodes, then resize to 1: where the time goes."""
    import hpcbatch
    from hpcbatch.providers import slurm as SP
    b = hpcbatch.Batch(home, **FAST)
    try:
        b.pools.create("cold", "slurm", target_nodes=0)
        job = b.jobs.create("c", pool="cold")
        job.add_task("t", "true")
        t0 = time.time()
        b.service.resize_pool("cold", 1)
        idle = _poll(lambda: next((time.time() for n in b.pools.nodes("cold")
                                   if n.state in ("idle", "running")), None))
        job.wait(timeout_s=120)
        started = job.task("t").started_at
        idle = min(idle, started)  # (polled: it may be seen only once the task runs)
        alloc = next(iter(SP.allocations_of(home, "cold").allocs.values()))
        return {"total_s": started - t0, "allocation_s": alloc.granted_at - t0,
                "sbatch_s": alloc.submitted_at - t0,
                "agent_start_s": idle - alloc.granted_at, "dispatch_s": started - idle}
    finally:
        b.close()


def hpcbatch_tasks(b, n: int, rep: int) -> float:
    job = b.jobs.create(f"many{rep}", pool="s3")
    t0 = time.perf_counter()
    job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(n))
    job.wait(timeout_s=600)
    return time.perf_counter() - t0


def array_tasks(n: int, out: Path) -> float:
    t0 = time.perf_counter()
    jid = subprocess.run(["sbatch", "--parsable", f"--array=0-{n - 1}", "-N1", "-n1",
                          f"--output={out}/arr-%A_%a.out", "--job-name=bench-array",
                          "--wrap", "true"], capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    _poll(lambda: not subprocess.run(["squeue", "-h", "-j", jid, "-o", "%i"],
                                     capture_output=True, text=True).stdout.strip(),
          timeout_s=900, interval_s=0.05)
    return time.perf_counter() - t0


def srun_loop(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["srun", "-N1", "-n1", "--quiet", "true"], check=True)
    return time.perf_counter() - t0


def run(n: int, repeats: int, progress=lambda s: None) -> dict:
    from hpcbatch.launch import slurmcluster as SC
    why = _why_not()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        tmp = Path(tmp)
        cl = SC.slurm_up(3, tmp / "cluster")
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cl.conf)
        try:
            progress("cold start")
            cold = [cold_start(tmp / f"home-cold{r}") for r in range(repeats)]
            import hpcbatch
            b = hpcbatch.Batch(tmp / "home", **FAST)
            try:
                from hpcbatch.providers import slurm as SP
                b.pools.create("s3", "slurm", target_nodes=0, task_slots_per_node=2)
                name = SP.job_name(b.home, "s3")
                ours, arr, loop = [], [], []
                for rep in range(repeats):
                    progress(f"{n} tasks, repeat {rep + 1}")
                    b.service.resize_pool("s3", 3)  # (not timed: the pool is up first)
                    _poll(lambda: sum(x.state == "idle" for x in b.pools.nodes("s3")) == 3)
                    ours.append(hpcbatch_tasks(b, n, rep))
                    b.service.resize_pool("s3", 0)  # the nodes go back to Slurm ...
                    _poll(lambda: not SP.jobs_named(name), interval_s=0.05)
                    arr.append(array_tasks(n, tmp))  # ... for its own array and srun
                    loop.append(srun_loop(n))
            finally:
                b.close()
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
            SC.slurm_down(tmp / "cluster")
    return {"tasks": n, "cold": cold, "hpcbatch_s": ours, "array_s": arr, "srun_loop_s": loop}


def _figures(res: dict, n: int) -> list[dict]:
    names = {"ours": f"slurm.pool_3nodes.{n}", "arr": f"slurm.sbatch_array.{n}",
             "loop": f"slurm.srun_loop.{n}"}
    if "skipped" in res:
        return [{"name": nm, "unit": "tasks/s", "values": [], "higher_is_better": True,
                 "baseline": None, "ratios": None, "aim": None, "skipped": res["skipped"],
                 "notes": ""} for nm in [*names.values(), "slurm.cold_start"]]
    rate = {k: [n / s for s in res[v]] for k, v in
            (("ours", "hpcbatch_s"), ("arr", "array_s"), ("loop", "srun_loop_s"))}
    figs = [{"name": names["ours"], "unit": "tasks/s", "values": rate["ours"],
             "higher_is_better": True, "baseline": names["arr"],
             "ratios": [a / b for a, b in zip(rate["ours"], rate["arr"])],
             "aim": {"ratio_at_least": 1.0}, "skipped": None,
             "notes": f"{n} x 'true' on a 3-node slurm pool (2 slots/node), submit to done; "
                      "ratio vs the same as sbatch --array"},
            {"name": names["arr"], "unit": "tasks/s", "values": rate["arr"],
             "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
             "skipped": None, "notes": "sbatch --array, submit until squeue is empty"},
            {"name": names["loop"], "unit": "tasks/s", "values": rate["loop"],
             "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
             "skipped": None, "notes": "srun -N1 -n1 true, one after another"}]
    for part in ("total_s", "allocation_s", "agent_start_s", "dispatch_s"):
        figs.append({"name": f"slurm.cold_start.{part.removesuffix('_s')}", "unit": "s",
                     "values": [c[part] for c in res["cold"]], "higher_is_better": False,
                     "baseline": None, "ratios": None,
                     "aim": {"value_at_most": 5.0} if part == "total_s" else None,
                     "skipped": None,
                     "notes": "pending task on a 0-node slurm pool, resize to 1: until it runs"})
    return figs


def suite(ctx) -> list[dict]:
    n = 30 if ctx.quick else 1000  # --quick: about 20 s (the srun loop dominates)
    res = run(n, 1 if ctx.quick else max(1, ctx.repeats), ctx.progress)
    return _figures(res, n)


def main() -> int:
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # tear the cluster down
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    res = run(args.tasks, args.repeats, lambda s: print(f"... {s}", flush=True))
    if "skipped" in res:
        print(f"skipped: {res['skipped']}")
        return 0
    n = args.tasks
    c = {k: median([x[k] for x in res["cold"]]) for k in res["cold"][0]}
    rows = [["cold start: pending task -> running (s)", c["total_s"], ""],
            ["  allocation: resize -> squeue RUNNING (s)", c["allocation_s"],
             f"sbatch answered after {c['sbatch_s']:.3f} s"],
            ["  agent: allocation -> node idle (s)", c["agent_start_s"], "srun --overlap"],
            ["  dispatch: node idle -> task started (s)", c["dispatch_s"], ""],
            [f"{n} tasks, hpcbatch slurm pool (tasks/s)", n / median(res["hpcbatch_s"]),
             f"{median(res['hpcbatch_s']):.2f} s"],
            [f"{n} tasks, sbatch --array (tasks/s)", n / median(res["array_s"]),
             f"{median(res['array_s']):.2f} s"],
            [f"{n} tasks, srun in a loop (tasks/s)", n / median(res["srun_loop_s"]),
             f"{median(res['srun_loop_s']):.2f} s"]]
    print_table(f"Slurm pools on a 3-node test cluster (median of {args.repeats})",
                ["measure", "value", "note"], rows)
    print(f"results: {write_results('slurm', res, args.json_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
