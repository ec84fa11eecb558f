"""List queries and kept counts at 1,000,000 tasks in one job.

Builds a home with one job of N tasks directly through the store (add_tasks from a
generator, then the coordinator's own batch writes: mark_preparing, mark_running,
finish_attempts, 10,000 at a time): 70% completed (a tenth of them with exit code 1),
10% running, 20% active; ids alternate 'sim-NNNNNNN' / 'ana-NNNNNNN'. Then, each in a
process of its own (so its peak RSS is its own), through LocalService:

  filtered     query_tasks(filter="state eq 'completed' and exit_code ne 0"), 1,000 rows,
               each call the next page (continuation), 100 calls
  startswith   query_tasks(filter="startswith(id,'sim-')"), 1,000 rows, the same way
  sparse       query_tasks(filter="startswith(id,'sim-000012')"): five ids, one page
  counts       job_counts (the kept counts: one row)
  task_list    what 'hpcbatch task list JOB --max 10' asks: a page of 10 and the counts

and the old paths in the same run (fewer calls: each reads every row) as the baseline:
list_tasks(job, 'completed') filtered in Python, list_tasks(job) filtered by prefix,
the GROUP BY count of the job's rows, and list_tasks(limit=10) with that count. p50/p99,
the peak RSS of each process, and the ratio old/new are printed and written to
benchmarks/results/bench_queries.json. '--cli' also times the real CLI ('task list
--max 10', 'job show') as processes. '--write-path' times the coordinator's batch writes
per task on a fresh store (100,000 tasks), for this code and, with '--baseline DIR', for
a copy of the code before kept counts (e.g. ``git archive COMMIT | tar -x -C DIR``).

    python benchmarks/bench_queries.py                       # 1,000,000 tasks
    python benchmarks/bench_queries.py --tasks 100000 --calls 20
    python benchmarks/bench_queries.py --write-path --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

FILTERED = "state eq 'completed' and exit_code ne 0"
STARTSWITH = "startswith(id,'sim-')"
SPARSE = "startswith(id,'sim-000012')"
TASK_LIST_FIELDS = ("id", "state", "result", "exit_code", "signal", "retry_count", "node_id",
                    "started_at", "ended_at")
JOB = "big"
BATCH = 10_000
# what task_counts ran before counts were kept: a GROUP BY over the job's rows
OLD_COUNT_SQL = ("SELECT state, result, COUNT(*) AS n, SUM(retry_count) AS r, "
                 "SUM(requeue_count) AS q FROM tasks WHERE job_id=? GROUP BY state, result")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def stats(times: list[float]) -> dict:
    return {"calls": len(times), "p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3,
            "max_ms": max(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3}


# ---- build ------------------------------------------------------------------------------

def _task_id(i: int) -> str:
    return f"sim-{i:07d}" if i % 2 == 0 else f"ana-{i:07d}"


def build(home: Path, n: int) -> dict:
    from hpcbatch.models import TaskSpec
    from hpcbatch.service import LocalService
    t0 = time.perf_counter()
    service = LocalService(home)
    store = service.store
    service.create_job(JOB)
    store.add_tasks(JOB, (TaskSpec(_task_id(i), f"simulate --case {i} --out case-{i}.h5")
                          for i in range(n)))
    added = time.perf_counter() - t0
    first = store.list_tasks(JOB, limit=1)[0]["seq"]  # seqs are dense: one add_tasks
    for lo in range(0, n, BATCH):
        seqs = range(first + lo, first + min(n, lo + BATCH))
        placed = [q for q in seqs if (q - first) % 10 < 8]
        store.mark_preparing((q, f"n{q % 50}", f"/nodes/jobs/{JOB}/{q}", 1.7e9 + q)
                             for q in placed)
        store.mark_running((q, 1.7e9 + q) for q in placed)
        done = [q for q in placed if (q - first) % 10 < 7]
        store.finish_attempts(
            dict(seq=q, outcome="failure" if (q // 10) % 10 == 3 else "success",
                 node_id=f"n{q % 50}", started_at=1.7e9 + q, ended_at=1.7e9 + q + q % 97,
                 exit_code=1 if (q // 10) % 10 == 3 else 0, signal=None,
                 failure_kind="exit_code" if (q // 10) % 10 == 3 else None,
                 failure_detail=None, usage={"max_rss_kb": 1000}, retry_count=0)
            for q in done)
    counts = store.task_counts(JOB)
    problems = store.count_problems()
    service.close()
    size = sum(p.stat().st_size for p in home.glob("state.db*"))
    return {"tasks": n, "add_s": added, "build_s": time.perf_counter() - t0,
            "db_mb": size / 2**20, "counts": counts, "count_problems": problems,
            "peak_rss_mb": peak_rss_mb()}


# ---- the measured calls -------------------------------------------------------------------

def _walk(service, flt: str, rows: int):
    """A call that reads the next page of ``flt`` each time (from the start again after
    the last)."""
    state = {"token": None}

    def call():
        page = service.query_tasks(JOB, filter=flt, max_results=rows,
                                   continuation=state["token"])
        assert len(page.items) == rows or page.continuation is None
        state["token"] = page.continuation
        return page
    return call


def new_paths(home: Path, calls: int) -> dict:
    from hpcbatch.service import LocalService
    service = LocalService(home, create=False)
    rss0 = peak_rss_mb()

    def task_list():
        page = service.query_tasks(JOB, select=TASK_LIST_FIELDS, max_results=10)
        counts = service.job_counts(JOB) if page.continuation else None
        return page, counts

    cases = {"filtered": _walk(service, FILTERED, 1000),
             "startswith": _walk(service, STARTSWITH, 1000),
             "sparse": lambda: service.query_tasks(JOB, filter=SPARSE),
             "counts": lambda: service.job_counts(JOB),
             "task_list": task_list}
    out = {}
    for name, call in cases.items():
        call()  # warm: the pages are in the OS cache, the statements prepared
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out[name] = stats(times)
    plans = {name: service.store.explain_query_tasks(JOB, _flt(text), after=1)
             for name, text in (("filtered", FILTERED), ("startswith", STARTSWITH),
                                ("sparse", SPARSE))}
    sparse_rows = len(service.query_tasks(JOB, filter=SPARSE).items)  # 5 (even ids)
    service.close()
    return {"cases": out, "plans": plans, "sparse_rows": sparse_rows, "rss_before_mb": rss0,
            "peak_rss_mb": peak_rss_mb()}


def _flt(text: str):
    from hpcbatch.query import parse_filter
    return parse_filter(text)


def old_paths(home: Path, calls: int) -> dict:
    """What answered these before: every row read, then filtered in Python."""
    from hpcbatch.service import LocalService
    service = LocalService(home, create=False)
    store = service.store

    def filtered():
        rows = [t for t in service.list_tasks(JOB, "completed") if t.exit_code != 0]
        return rows[:1000]

    def startswith():
        return [t for t in service.list_tasks(JOB) if t.id.startswith("sim-")][:1000]

    def counts():
        return store._tuples(OLD_COUNT_SQL, (JOB,))

    def task_list():
        return service.list_tasks(JOB, limit=10), counts()

    cases = {"filtered": filtered, "startswith": startswith, "counts": counts,
             "task_list": task_list}
    out = {}
    for name, call in cases.items():
        times = []
        for _ in range(calls if name in ("filtered", "startswith") else calls * 3):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out[name] = stats(times)
    service.close()
    return {"cases": out, "peak_rss_mb": peak_rss_mb()}


def cli_runs(home: Path, runs: int) -> dict:
    env = dict(os.environ, HPCBATCH_HOME=str(home), COLUMNS="200")
    out = {}
    for name, args in (("task_list_max_10", ["task", "list", JOB, "--max", "10"]),
                       ("job_show", ["job", "show", JOB]),
                       ("task_list_filtered_max_10",
                        ["task", "list", JOB, "--max", "10", "--filter", FILTERED])):
        times, rss = [], []
        for _ in range(runs):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _CHILD_CLI, *args], env=env,
                               capture_output=True, text=True, timeout=300)
            times.append(time.perf_counter() - t)
            if p.returncode != 0:
                raise RuntimeError(f"hpcbatch {' '.join(args)}: {p.stderr}")
            rss.append(float(p.stdout.strip().splitlines()[-1]))
        out[name] = {**stats(times), "peak_rss_mb": max(rss)}
    return out


# the CLI in a process that reports its own peak RSS last
_CHILD_CLI = """
import contextlib, io, resource, sys
from hpcbatch.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
sys.exit(rc)
"""


# ---- the coordinator's batch writes ----------------------------------------------------------

def write_path(n: int, batch: int = 1000, repeats: int = 3) -> dict:
    """Per-task µs of the writes a coordinator turn makes (add, preparing, running,
    finish) on a fresh store of n tasks: the best of ``repeats``."""
    from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
    from hpcbatch.store import Store
    best: dict[str, float] = {}
    for _ in range(repeats):
        d = tempfile.mkdtemp(prefix="bench-writes-")
        try:
            s = Store(Path(d) / "state.db")
            s.create_pool(PoolSpec("p", task_slots_per_node=4))
            s.create_job(JobSpec("j", "p"))
            t = time.perf_counter()
            s.add_tasks("j", [TaskSpec(f"t{i}", "true") for i in range(n)])
            took = {"add": time.perf_counter() - t, "preparing": 0.0, "running": 0.0,
                    "finish": 0.0}
            seqs = [r["seq"] for r in s.list_tasks("j")]
            for i in range(0, n, batch):
                chunk = seqs[i:i + batch]
                t = time.perf_counter()
                s.mark_preparing((q, "n1", "/x", 1.0) for q in chunk)
                took["preparing"] += time.perf_counter() - t
                t = time.perf_counter()
                s.mark_running((q, 2.0) for q in chunk)
                took["running"] += time.perf_counter() - t
                items = [dict(seq=q, outcome="success" if q % 10 else "retry", node_id="n1",
                              started_at=2.0, ended_at=3.0, exit_code=0 if q % 10 else 1,
                              signal=None, failure_kind=None if q % 10 else "exit_code",
                              failure_detail=None, usage=None, retry_count=0 if q % 10 else 1)
                         for q in chunk]
                t = time.perf_counter()
                s.finish_attempts(items)
                took["finish"] += time.perf_counter() - t
            s.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
        for k, v in took.items():
            us = v / n * 1e6
            best[k] = min(best.get(k, us), us)
    return {"tasks": n, "batch": batch, "us_per_task": best}


# ---- driver --------------------------------------------------------------------------------

def _child(phase: str, code: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    p = subprocess.run([sys.executable, __file__, "--phase", phase, *args], env=env,
                       capture_output=True, text=True, timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def suite(ctx) -> list[dict]:
    """hpcbatch bench: p50 / p99 ms of the embedded service's list pages and counts on one
    job of N tasks (70% completed, 10% running, 20% active; quick 20k, full 200k)."""
    n, calls = (20_000, 20) if ctx.quick else (200_000, 50)
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    v: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=root, prefix="bench-queries-") as d:
        ctx.progress(f"storing {n:,} tasks")
        build(Path(d) / "home", n)
        for r in range(ctx.repeats):
            ctx.progress(f"queries, repeat {r + 1}/{ctx.repeats}")
            res = new_paths(Path(d) / "home", calls)["cases"]
            for case, st in res.items():
                for q in ("p50", "p99"):
                    v.setdefault(f"{case}.{q}", []).append(st[f"{q}_ms"])
    size = f"{n // 1000}k"
    labels = {"filtered": "a page of 1,000 of a filter (state and exit code)",
              "startswith": "a page of 1,000 of startswith(id, ...)",
              "sparse": "a filter matching 5 tasks",
              "counts": "the job's counts", "task_list": "hpcbatch task list: 10 rows + counts"}
    return [{"name": f"queries.{case}.{q}.{size}", "unit": "ms", "values": v[f"{case}.{q}"],
             "higher_is_better": False, "baseline": None, "ratios": None,
             "aim": {"value_at_most": 50.0} if q == "p99" else None, "skipped": None,
             "notes": f"{labels[case]}; {calls} calls, embedded LocalService"}
            for case in labels for q in ("p50", "p99")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=100, help="calls per new-path case")
    ap.add_argument("--old-calls", type=int, default=3,
                    help="calls of each old path that reads every row (counts: 3x)")
    ap.add_argument("--cli", type=int, default=3, help="CLI processes per command (0: none)")
    ap.add_argument("--write-path", action="store_true",
                    help="also time the coordinator's batch writes per task")
    ap.add_argument("--write-tasks", type=int, default=100_000)
    ap.add_argument("--write-batch", type=int, action="append",
                    help="tasks per write call (repeatable; default 1000 and 4: a busy "
                    "turn, and the few a turn of a small pool writes)")
    ap.add_argument("--baseline", help="a copy of the code before, for --write-path")
    ap.add_argument("--write-rounds", type=int, default=3,
                    help="--write-path: rounds, now and baseline interleaved")
    ap.add_argument("--home", help="reuse (or keep) this home instead of a temporary one")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_queries.json"))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.phase:  # in a child process: one phase, its JSON on the last line
        home = Path(a.arg[0]) if a.arg else None
        result = {"build": lambda: build(home, a.tasks),
                  "new": lambda: new_paths(home, a.calls),
                  "old": lambda: old_paths(home, a.old_calls),
                  "writes": lambda: {str(b): write_path(a.write_tasks if b >= 100 else
                                                        a.write_tasks // 10, b)
                                     for b in a.write_batch or (1000, 4)}}[a.phase]()
        print(json.dumps(result))
        return

    from _common import print_table, write_results
    work = Path(a.home) if a.home else Path(tempfile.mkdtemp(prefix="bench-queries-"))
    home = work if a.home else work / "home"
    common = ["--tasks", str(a.tasks), "--calls", str(a.calls), "--old-calls",
              str(a.old_calls), "--write-tasks", str(a.write_tasks),
              *(x for b in a.write_batch or () for x in ("--write-batch", str(b)))]
    try:
        info = home / "bench_queries_build.json"  # what building the reused home took
        if (home / "state.db").exists():
            built = {"reused": str(home), **(json.loads(info.read_text())
                                             if info.exists() else {})}
        else:
            print(f"building {a.tasks:,} tasks in {home} ...", file=sys.stderr)
            built = _child("build", REPO, *common, "--arg", str(home))
            info.write_text(json.dumps(built))
            print(f"  built in {built['build_s']:.1f} s ({built['db_mb']:.0f} MB)",
                  file=sys.stderr)
        new = _child("new", REPO, *common, "--arg", str(home))
        old = _child("old", REPO, *common, "--arg", str(home))
        cli = cli_runs(home, a.cli) if a.cli else {}
        writes: dict = {}
        if a.write_path:  # interleaved rounds, the best of each (the load moves meanwhile)
            codes = {"now": REPO, **({"baseline": Path(a.baseline)} if a.baseline else {})}
            for _ in range(a.write_rounds):
                for name, code in codes.items():
                    got = _child("writes", code, *common)
                    have = writes.setdefault(name, got)
                    for b, w in got.items():
                        for k, us in w["us_per_task"].items():
                            have[b]["us_per_task"][k] = min(have[b]["us_per_task"][k], us)
    finally:
        if not a.home:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    ratios = {}
    for name, s in new["cases"].items():
        o = old["cases"].get(name)
        ratio = o["p50_ms"] / s["p50_ms"] if o else None
        if ratio:
            ratios[name] = ratio
        rows.append([name, s["p50_ms"], s["p99_ms"], o["p50_ms"] if o else "-",
                     f"{ratio:,.0f}x" if ratio else "-"])
    print_table(f"list queries at {a.tasks:,} tasks (ms; {a.calls} calls each, old: "
                f"{a.old_calls})", ["case", "p50", "p99", "old p50", "old/new"], rows)
    print(f"peak RSS: new paths {new['peak_rss_mb']:.0f} MB, old paths "
          f"{old['peak_rss_mb']:.0f} MB")
    for name, c in cli.items():
        print(f"CLI {name}: p50 {c['p50_ms']:.0f} ms, peak RSS {c['peak_rss_mb']:.0f} MB")
    for name, plan in new["plans"].items():
        print(f"plan {name}: {' | '.join(plan)}")
    if writes:
        keys = ("add", "preparing", "running", "finish")
        wrows = [[f"{code}, {b} a call", *(w["us_per_task"][k] for k in keys)]
                 for code, by in writes.items() for b, w in by.items()]
        print_table(f"coordinator batch writes, µs per task (best of {3 * a.write_rounds})",
                    ["code", *keys], wrows)
    aims = {"filtered_p99_ms": 50.0, "startswith_p99_ms": 50.0}
    path = write_results("bench_queries", {
        "args": vars(a), "build": built, "new": new, "old": old, "ratio_old_over_new": ratios,
        "cli": cli, "write_path": writes, "aims": aims,
        "met": {"filtered_p99_ms": new["cases"]["filtered"]["p99_ms"] <= 50.0,
                "startswith_p99_ms": new["cases"]["startswith"]["p99_ms"] <= 50.0},
    }, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
