"""The coordinator at scale: a real Store on disk, a real Coordinator, real local agents.

Each step runs in its own process with the code under test on PYTHONPATH, so the same
script measures a copy of the code before the reshape too (``--baseline DIR``), in the
same run, interleaved:

  start        N active tasks stored (add_tasks in chunks of 100,000): the time from
               ``Coordinator(home).start()`` to the first task's process running (it
               touches a marker file), the coordinator's RSS growth per stored task (and
               its peak; ``--tracemalloc`` adds Python's own count), and a terminate of
               one queued task in the first window and one beyond it: the coordinator
               call, and until the store shows it completed (the old call only queued
               the request, so only the second compares).
  submit       while a coordinator runs one long task, a second process adds M tasks in
               ONE ``Store.add_tasks``; a third takes the write lock every 20 ms (BEGIN
               IMMEDIATE, one tiny write, COMMIT) and reads the node rows and the long
               task's row. Reported: that process's longest lock wait during the submit's
               own transaction and after it; the coordinator's longest turn, its lock
               waits and write-transaction holds (its methods wrapped by this script);
               any node row not idle/running; whether the long task was requeued or ran
               again.
  submit_busy  the same while short tasks keep completing on the other slot, so the
               coordinator has writes to make while the submit holds the lock.
  cpu          K ``true`` tasks on the local pool (home on tmpfs, as bench_tasks.py):
               the coordinator process's CPU per completed task, getrusage(RUSAGE_SELF)
               (the agents are other processes) minus the main thread's thread_time (it
               adds the tasks and waits); per-thread CPU, and with ``--breakdown`` the
               loop's parts (thread_time wrappers).

What the baseline does not run is compared with the issue's figures (BEFORE). Writes
benchmarks/results/bench_scale.json; ``--profile`` keeps cProfile texts of the loop.

    python benchmarks/bench_scale.py --baseline /tmp/base   # 1M stored, 1M submitted, 20k
    python benchmarks/bench_scale.py --tasks 20000 --submit 20000 --busy 300 --cpu-tasks 1000
    python benchmarks/bench_scale.py --only cpu --breakdown --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHUNK = 100_000
# the issue's figures for the code before the reshape (1M tasks; 20,000 `true` tasks)
BEFORE = {"first_dispatch_s": "11-20", "bytes_per_task": 1700, "terminate_ms": 250.0,
          "submit_lock_wait_s": 28.7, "cpu_ms_per_task": 0.09}
AIMS = {"first_dispatch_s": 1.0, "bytes_per_task": 200, "terminate_ms": 10.0,
        "cpu_ms_per_task": 0.1}


# ---- child side: runs with the code under test on sys.path ---------------------------

def _use_code(code: str) -> None:
    """Import hpcbatch from ``code``; a source tree whose launch/ is only installed as
    hpcbatch.launch (setup.py's package_dir) gets it registered from that tree."""
    sys.path.insert(0, code)
    import importlib.util

    import hpcbatch
    if Path(hpcbatch.__file__).resolve().parent != (Path(code) / "hpcbatch").resolve():
        raise SystemExit(f"hpcbatch imported from {hpcbatch.__file__}, not {code}")
    launch = Path(code) / "launch"
    if not (Path(code) / "hpcbatch" / "launch").exists() and launch.is_dir():
        spec = importlib.util.spec_from_file_location(
            "hpcbatch.launch", launch / "__init__.py", submodule_search_locations=[str(launch)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["hpcbatch.launch"] = mod
        spec.loader.exec_module(mod)
        hpcbatch.launch = mod


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, bytes."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _reset_hwm() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _models():
    from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
    return JobSpec, PoolSpec, TaskSpec


def _open_store(home: Path):
    from hpcbatch.store import Store
    return Store(home / "state.db")


def child_populate(a: dict) -> dict:
    """A home with a local pool, and job `a['job']` holding a['n'] tasks of one command."""
    JobSpec, PoolSpec, TaskSpec = _models()
    home = Path(a["home"])
    home.mkdir(parents=True, exist_ok=True)
    st = _open_store(home)
    t0 = time.perf_counter()
    st.create_pool(PoolSpec("local", "local", task_slots_per_node=a["slots"],
                            target_nodes=a["nodes"]), exist_ok=True)
    chunk_s = []
    for job, n, cmd in a["jobs"]:
        st.create_job(JobSpec(job, "local"))
        for lo in range(0, n, CHUNK):
            specs = [TaskSpec(f"t{i}", cmd) for i in range(lo, min(n, lo + CHUNK))]
            t1 = time.perf_counter()
            st.add_tasks(job, specs)
            chunk_s.append(time.perf_counter() - t1)
    st.close()
    return {"populate_s": time.perf_counter() - t0,
            "add_tasks_chunk_s_max": max(chunk_s, default=0.0),
            "db_bytes": sum(p.stat().st_size for p in home.glob("state.db*"))}


def _terminate(coord, job: str, task: str) -> float:
    """Seconds for the coordinator's terminate call (old: kill_task, fire and forget)."""
    t0 = time.perf_counter()
    if hasattr(coord, "terminate_task"):
        coord.terminate_task(job, task).result(timeout=60)
    else:
        coord.kill_task(job, task)
    return time.perf_counter() - t0


def _until_completed(db: sqlite3.Connection, job: str, task: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = db.execute("SELECT state FROM tasks WHERE job_id=? AND id=?",
                         (job, task)).fetchone()
        if row and row[0] == "completed":
            return True
        time.sleep(0.0005)
    return False


def _profiled(run, out: Path):
    """run, profiled (cProfile; the top 40 by cumulative and by own time, as text)."""
    import cProfile
    import pstats

    def wrapped(*args) -> None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            run(*args)
        finally:
            prof.disable()
            with open(out, "w") as f:
                for key in ("cumulative", "tottime"):
                    pstats.Stats(prof, stream=f).sort_stats(key).print_stats(70)
    return wrapped


def _profiled_loop(coord, out: Path) -> None:
    """Profile the coordinator's loop thread."""
    coord._run = _profiled(coord._run, out)


def child_start(a: dict) -> dict:
    from hpcbatch.coordinator import Coordinator
    home, mark = Path(a["home"]), Path(a["mark"])
    shutil.rmtree(mark, ignore_errors=True)
    mark.mkdir(parents=True)
    import gc
    gc.collect()
    if a.get("tracemalloc"):
        import tracemalloc
        tracemalloc.start()
    _reset_hwm()
    rss0, _ = _rss()
    t0 = time.perf_counter()
    coord = Coordinator(home)
    if a.get("profile"):
        _profiled_loop(coord, Path(a["profile"]))
    prof = None
    if a.get("profile"):
        import cProfile
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
    coord.start()
    if prof is not None:
        prof.disable()
        import pstats
        with open(a["profile"] + ".start", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(30)
    start_returned = time.perf_counter() - t0
    first = None
    deadline = time.monotonic() + a.get("timeout_s", 120)
    while time.monotonic() < deadline:
        if any(os.scandir(mark)):
            first = time.perf_counter() - t0
            break
        time.sleep(0.001)
    rss_first, _ = _rss()
    time.sleep(a.get("settle_s", 3.0))  # windows refilled, a few polls and ticks
    gc.collect()
    rss1, hwm = _rss()
    traced = None
    if a.get("tracemalloc"):
        import tracemalloc
        traced = tracemalloc.get_traced_memory()  # (current, peak)
        tracemalloc.stop()
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=60)
    running = db.execute("SELECT COUNT(*) FROM tasks WHERE state IN ('running', 'preparing')"
                         ).fetchone()[0]
    term = {}
    for label, task in (("in_window", a["term_near"]), ("beyond_window", a["term_far"])):
        t1 = time.perf_counter()
        call = _terminate(coord, a["job"], task)
        ok = _until_completed(db, a["job"], task, 60)
        term[label] = {"task": task, "call_ms": call * 1e3,
                       "until_stored_ms": (time.perf_counter() - t1) * 1e3, "completed": ok}
    db.close()
    coord.stop()
    n = a["n"]
    out = {"start_returned_s": start_returned, "first_task_started_s": first,
           "rss_before_mb": rss0 / 2**20, "rss_growth_at_first_mb": (rss_first - rss0) / 2**20,
           "rss_growth_mb": (rss1 - rss0) / 2**20, "peak_growth_mb": (hwm - rss0) / 2**20,
           "bytes_per_task": (rss1 - rss0) / n, "peak_bytes_per_task": (hwm - rss0) / n,
           "in_flight_after_settle": running, "terminate": term,
           "error": repr(coord.error) if coord.error else None}
    if traced:
        out["tracemalloc_bytes_per_task"] = traced[0] / n
        out["tracemalloc_peak_bytes_per_task"] = traced[1] / n
    return out


class _Timer:
    """Durations of the wrapped calls (start time, seconds); for a transaction, the
    hold (from BEGIN IMMEDIATE returned to COMMIT done) and, apart, the lock wait."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.waits: list[tuple[float, float]] = []

    def wrap(self, fn):
        spans = self.spans

        def timed(*args, **kw):
            t = time.time()
            try:
                return fn(*args, **kw)
            finally:
                spans.append((t, time.time() - t))
        return timed

    def wrap_cm(self, cm_fn):
        spans, waits = self.spans, self.waits

        @contextlib.contextmanager
        def timed(*args, **kw):
            t0 = time.time()
            with cm_fn(*args, **kw) as v:
                t = time.time()  # the lock is held from here (BEGIN IMMEDIATE returned)
                waits.append((t0, t - t0))
                try:
                    yield v
                finally:
                    spans.append((t, time.time() - t))  # COMMIT included below
        return timed

    def longest(self, after: float = 0.0) -> tuple[float, float]:
        spans = [s for s in self.spans if s[0] >= after]
        return max(spans, key=lambda s: s[1], default=(0.0, 0.0))


def child_serve(a: dict) -> dict:
    """A coordinator that runs until a['stop'] exists; its turns and write transactions
    timed; reports when it has read every task up to a['expect_seq']."""
    from hpcbatch.coordinator import Coordinator
    home = Path(a["home"])
    coord = Coordinator(home)
    turns, txns = _Timer(), _Timer()
    if hasattr(coord, "_turn"):
        coord._turn = turns.wrap(coord._turn)
    coord.store.transaction = txns.wrap_cm(coord.store.transaction)
    if a.get("profile"):
        _profiled_loop(coord, Path(a["profile"]))
    coord.start()
    stop, loaded = Path(a["stop"]), Path(a["loaded"])
    seen_at = None
    while not stop.exists():
        time.sleep(0.02)
        last = getattr(getattr(coord, "state", coord), "last_seq", 0)
        if seen_at is None and last >= a["expect_seq"]:
            seen_at = time.time()
            loaded.write_text(str(seen_at))
    gens = None
    if hasattr(coord, "state"):
        gens = {n.node_id: n.gen for p in coord.state.pools.values() for n in p.nodes.values()}
    error = repr(coord.error) if coord.error else None
    coord.stop()
    # code without a turn method (the old loop: one write transaction per turn, every
    # query and decision inside it): its transactions are its turns
    return {"turns": turns.spans if hasattr(coord, "_turn") else txns.spans,
            "turn_measure": "_turn" if hasattr(coord, "_turn") else "write transaction",
            "txns": txns.spans, "lock_waits": txns.waits, "loaded_at": seen_at,
            "agent_generations": gens,
            "error": error}


def child_submit(a: dict) -> dict:
    """One add_tasks of a['n'] tasks (specs built before the clock starts)."""
    JobSpec, PoolSpec, TaskSpec = _models()
    st = _open_store(Path(a["home"]))
    st.create_job(JobSpec(a["job"], "local"))
    specs = [TaskSpec(f"t{i}", a["cmd"]) for i in range(a["n"])]
    t0 = time.time()
    st.add_tasks(a["job"], specs)
    t1 = time.time()
    st.close()
    return {"begin": t0, "end": t1}


def child_probe(a: dict) -> dict:
    """Small writes in a loop: how long each waited for the write lock. Also the node
    rows and the long task's row, as seen from outside."""
    db = sqlite3.connect(str(Path(a["home"]) / "state.db"), timeout=120, isolation_level=None)
    stop = Path(a["stop"])
    waits, bad_nodes, task_rows = [], [], set()
    next_look = 0.0
    while not stop.exists():
        t0 = time.time()
        db.execute("BEGIN IMMEDIATE")
        t1 = time.time()
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('bench_probe', ?)",
                   (str(t1),))
        db.execute("COMMIT")
        waits.append((t0, t1 - t0))
        if t1 >= next_look:
            next_look = t1 + 0.1
            for nid, state, reason in db.execute("SELECT id, state, reason FROM nodes"):
                if state not in ("idle", "running"):
                    bad_nodes.append((t1, nid, state, reason))
            row = db.execute("SELECT state, retry_count, requeue_count FROM tasks WHERE "
                             "job_id=? AND id=?", (a["long_job"], "t0")).fetchone()
            task_rows.add(tuple(row) if row else None)
        time.sleep(0.02)
    db.close()
    return {"waits": waits, "bad_nodes": bad_nodes, "long_task_rows": sorted(map(str,
                                                                                task_rows))}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by name (digits dropped)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            stat = Path(f"/proc/self/task/{t.native_id}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = "".join(c for c in t.name if not c.isdigit()).rstrip("-_ ")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


BREAKDOWN = ("_events", "_turn", "state.handle", "_write", "_perform", "store.dispatch_specs",
             "store.mark_preparing", "store.mark_running", "store.finish_attempts",
             "store.transaction", "_handle", "_dispatch", "_load_new_work")


def _breakdown(coord) -> dict[str, list[float]]:
    """Wrap the loop's parts that exist in this code with CPU-time (thread_time) counters:
    {name: [calls, cpu seconds]}, inclusive (a transaction inside _write counts in both)."""
    acc: dict[str, list[float]] = {}
    for name in BREAKDOWN:
        owner, _, attr = name.rpartition(".")
        obj = getattr(coord, owner, None) if owner else coord
        fn = getattr(obj, attr, None)
        if fn is None:
            continue
        slot = acc[name] = [0, 0.0]
        if attr == "transaction":
            def wrapped(*a, _fn=fn, _slot=slot, **kw):
                return _CpuCM(_fn(*a, **kw), _slot)
        else:
            def wrapped(*a, _fn=fn, _slot=slot, **kw):
                t = time.thread_time()
                try:
                    return _fn(*a, **kw)
                finally:
                    _slot[0] += 1
                    _slot[1] += time.thread_time() - t
        setattr(obj, attr, wrapped)
    return acc


class _CpuCM:
    def __init__(self, cm, slot):
        self.cm, self.slot = cm, slot

    def __enter__(self):
        self.t = time.thread_time()
        return self.cm.__enter__()

    def __exit__(self, *exc):
        try:
            return self.cm.__exit__(*exc)
        finally:
            self.slot[0] += 1
            self.slot[1] += time.thread_time() - self.t


def child_cpu(a: dict) -> dict:
    import hpcbatch
    home = Path(a["home"])
    if a.get("profile"):
        from hpcbatch.coordinator import Coordinator
        Coordinator._run = _profiled(Coordinator._run, Path(a["profile"]))
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b = hpcbatch.Batch(home, local_slots=a["slots"])
    try:
        job = b.jobs.create("cpu")
        coord = b.coordinator
        parts = _breakdown(coord) if a.get("breakdown") else {}
        time.sleep(1.0)  # agents up and idle
        threads0 = _thread_cpu()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        m0 = time.thread_time()
        w0 = time.perf_counter()
        job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(a["n"]))
        db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=60)
        while True:
            with coord.progress:
                coord.progress.wait(0.5)
            left = db.execute("SELECT COUNT(*) FROM tasks WHERE job_id='cpu' AND "
                              "state IN ('active', 'preparing', 'running')").fetchone()[0]
            if left == 0 or coord.error is not None:
                break
        wall = time.perf_counter() - w0
        m1 = time.thread_time()
        threads = _thread_cpu()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        ok = db.execute("SELECT COUNT(*) FROM tasks WHERE job_id='cpu' AND state='completed' "
                        "AND result='success'").fetchone()[0]
        db.close()
    finally:
        b.close()
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    main = m1 - m0
    kids = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
    n = a["n"]
    return {"wall_s": wall, "succeeded": ok, "process_cpu_s": proc, "main_thread_cpu_s": main,
            "coordinator_cpu_s": proc - main, "cpu_ms_per_task": (proc - main) / n * 1e3,
            "process_cpu_ms_per_task": proc / n * 1e3,
            "agents_and_tasks_cpu_ms_per_task": kids / n * 1e3,
            "threads_cpu_s": {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads.items()},
            "loop_parts_us_per_task": {k: round(v[1] / n * 1e6, 1) for k, v in parts.items()},
            "loop_parts_calls": {k: v[0] for k, v in parts.items()}}


CHILDREN = {"populate": child_populate, "start": child_start, "serve": child_serve,
            "submit": child_submit, "probe": child_probe, "cpu": child_cpu}


def child_main(name: str, args_json: str) -> None:
    a = json.loads(args_json)
    _use_code(a["code"])
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    result = CHILDREN[name](a)
    Path(a["out"]).write_text(json.dumps(result))


# ---- parent side ------------------------------------------------------------------------

class Runner:
    def __init__(self, work: Path, verbose: bool):
        self.work = work
        self.verbose = verbose
        self.n = 0

    def spawn(self, name: str, code: str, **a) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        out = self.work / f"{self.n:02d}-{name}.json"
        a.update(code=code, out=str(out))
        env = dict(os.environ, PYTHONPATH=code)
        env.pop("HPCBATCH_HOME", None)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", name,
                                 json.dumps(a)], env=env, cwd=code,
                                stdout=None if self.verbose else subprocess.DEVNULL)
        return proc, out

    @staticmethod
    def result(proc: subprocess.Popen, out: Path, timeout_s: float | None = None) -> dict:
        rc = proc.wait(timeout_s)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"{out.stem} failed (exit {rc})")
        return json.loads(out.read_text())

    def run(self, name: str, code: str, **a) -> dict:
        return self.result(*self.spawn(name, code, **a))


def _say(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", flush=True)


def measure_start(r: Runner, code: str, label: str, args) -> dict:
    home = r.work / f"start-{label}"
    mark = r.work / f"mark-{label}"
    cmd = f'touch {mark}/"$HPCBATCH_TASK_ID"; exec sleep 600'
    _say(f"[{label}] storing {args.tasks:,} tasks")
    pop = r.run("populate", code, home=str(home), slots=args.slots, nodes=args.nodes,
                jobs=[["big", args.tasks, cmd]])
    _say(f"[{label}] stored in {pop['populate_s']:.1f} s; starting a coordinator")
    runs = []
    for i in range(args.repeats):
        res = r.run("start", code, home=str(home), mark=str(mark), n=args.tasks, job="big",
                    term_near=f"t{min(100 + i, args.tasks - 1)}",
                    term_far=f"t{args.tasks - 1 - i}", settle_s=args.settle,
                    tracemalloc=args.tracemalloc,
                    profile=str(r.work / f"profile-start-{label}-{i}.txt") if args.profile
                    else None)
        runs.append(res)
        _say(f"[{label}] first task after {res['first_task_started_s']:.3f} s, "
             f"{res['bytes_per_task']:.0f} B/task")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return {"populate": pop, "runs": runs}


def measure_submit_busy(r: Runner, code: str, label: str, args) -> dict:
    return measure_submit(r, code, label, args, busy=args.busy)


def measure_submit(r: Runner, code: str, label: str, args, busy: int = 0) -> dict:
    label = f"{label}-busy" if busy else label
    home = r.work / f"submit-{label}"
    mark = r.work / f"mark-submit-{label}"
    mark.mkdir(parents=True, exist_ok=True)
    stop, loaded = r.work / f"stop-{label}", r.work / f"loaded-{label}"
    for p in (stop, loaded):
        p.unlink(missing_ok=True)
    long_cmd = f"echo $$ >> {mark}/long.pids; exec sleep 3600"
    jobs = [["long", 1, long_cmd]]
    if busy:
        jobs.append(["busy", busy, "sleep 0.05"])
    r.run("populate", code, home=str(home), slots=args.slots, nodes=args.nodes, jobs=jobs)
    base_seq = 1 + busy
    serve = r.spawn("serve", code, home=str(home), stop=str(stop), loaded=str(loaded),
                    expect_seq=base_seq + args.submit,
                    profile=str(r.work / f"profile-submit-{label}.txt") if args.profile
                    else None)
    pids = mark / "long.pids"
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not pids.exists():
        stop.touch()
        raise RuntimeError("the long task did not start")
    probe = r.spawn("probe", code, home=str(home), stop=str(stop), long_job="long")
    time.sleep(2.0)  # steady: heartbeats, pings, the probe's writes
    _say(f"[{label}] long task running; adding {args.submit:,} tasks in one add_tasks")
    sub = r.run("submit", code, home=str(home), job="more", n=args.submit,
                cmd="exec sleep 3600")
    _say(f"[{label}] add_tasks took {sub['end'] - sub['begin']:.1f} s; waiting for the "
         "coordinator to read them")
    deadline = time.monotonic() + args.submit_timeout
    while not loaded.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(args.after)  # would a node be declared lost now?
    stop.touch()
    srv = Runner.result(*serve, timeout_s=120)
    prb = Runner.result(*probe, timeout_s=120)
    restarts = len(pids.read_text().split()) - 1
    t_begin, t_end = sub["begin"], sub["end"]
    waits = prb["waits"]

    def longest(spans, pred):
        sel = [s for s in spans if pred(s)]
        return max((s[1] for s in sel), default=0.0)

    def net(turn):  # the turn without the lock waits inside it
        t, d = turn
        return (t, d - sum(w for wt, w in srv["lock_waits"] if t <= wt <= t + d))

    rows = prb["long_task_rows"]
    interrupted = restarts > 0 or any(r != "('running', 0, 0)" for r in rows)
    during = longest(waits, lambda s: s[0] + s[1] >= t_begin and s[0] <= t_end)
    # what the probe waited past the submit's commit: the coordinator's doing, not the
    # submitter's (a wait that began during the submit counts from its commit on)
    after = max((s[0] + s[1] - max(s[0], t_end) for s in waits if s[0] + s[1] > t_end),
                default=0.0)

    def top(spans, k=5):  # the longest, seconds after the submit began
        return [(round(t - t_begin, 3), round(d, 3))
                for t, d in sorted(spans, key=lambda s: -s[1])[:k]]
    before = longest(waits, lambda s: s[0] + s[1] < t_begin)
    res = {
        "submit_s": t_end - t_begin,
        "read_all_s": (srv["loaded_at"] - t_end) if srv["loaded_at"] else None,
        "probe_wait_max_s": {"before_submit": before, "during_submit_txn": during,
                             "after_submit": after},
        "probe_writes": len(waits),
        "turn_max_s": {"before_submit": longest(srv["turns"], lambda s: s[0] < t_begin),
                       "during_and_after": longest(srv["turns"], lambda s: s[0] >= t_begin)},
        "turn_max_without_lock_wait_s": longest([net(t) for t in srv["turns"]],
                                                lambda s: s[0] >= t_begin),
        "coordinator_lock_wait_max_s": longest(srv["lock_waits"], lambda s: s[0] >= t_begin),
        "coordinator_write_hold_max_s": longest(srv["txns"], lambda s: s[0] >= t_begin),
        "turns_over_1s": sum(1 for s in srv["turns"] if s[1] > 1.0),
        "turn_measure": srv["turn_measure"],
        "nodes_left_usable": prb["bad_nodes"][:10],
        "long_task_restarts": restarts, "long_task_rows": rows,
        "long_task_interrupted": interrupted,
        "longest_turns": top(srv["turns"]), "longest_probe_waits": top(waits),
        "longest_coordinator_lock_waits": top(srv["lock_waits"]),
        "agent_generations": srv["agent_generations"], "error": srv["error"],
    }
    _say(f"[{label}] probe waited at most {during:.2f} s during the submit, {after:.2f} s "
         f"after; longest turn {res['turn_max_s']['during_and_after']:.2f} s; "
         f"interrupted {interrupted}; nodes not usable: {len(prb['bad_nodes'])}")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return res


def measure_cpu(r: Runner, code: str, label: str, args) -> dict:
    runs = []
    root = Path(args.cpu_root) if args.cpu_root else r.work
    for i in range(args.repeats):
        home = Path(tempfile.mkdtemp(prefix=f"cpu-{label}-{i}-", dir=root))
        res = r.run("cpu", code, home=str(home), slots=args.cpu_slots, n=args.cpu_tasks,
                    profile=str(r.work / f"profile-cpu-{label}-{i}.txt") if args.profile
                    else None, breakdown=args.breakdown)
        runs.append(res)
        _say(f"[{label}] {res['succeeded']:,} tasks in {res['wall_s']:.1f} s, coordinator "
             f"{res['cpu_ms_per_task']:.3f} ms CPU/task")
        shutil.rmtree(home, ignore_errors=True)
    return {"runs": runs}


def _min(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return min(vals) if vals else None


def _ratio(now: float | None, before: float | None) -> str:
    if now is None or before is None or now == 0:
        return "-"
    return f"{before / now:.1f}x"


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if abs(v) < 10 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def summarize(results: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    now, base = results.get("now", {}), results.get("baseline", {})

    def row(name: str, aim: str, key: tuple, before_issue: object = None, lower=True):
        def get(side):
            d = side
            for k in key[:-1]:
                d = d.get(k, {}) if isinstance(d, dict) else {}
            if isinstance(d, dict) and "runs" in d:
                return _min(d["runs"], key[-1])
            return d.get(key[-1]) if isinstance(d, dict) else None
        n, b = get(now), get(base)
        rows.append([name, aim, _fmt(n), _fmt(b) if b is not None else _fmt(before_issue)
                     + (" (issue)" if before_issue is not None else ""), _ratio(n, b)
                     if b is not None else "-"])

    if "start" in now:
        row("first task running after start(), s", "<= 1", ("start", "first_task_started_s"),
            BEFORE["first_dispatch_s"])
        row("start() returned after, s", "", ("start", "start_returned_s"))
        row("RSS growth per stored task, B", "<= 200", ("start", "bytes_per_task"),
            BEFORE["bytes_per_task"])
        row("peak RSS growth per stored task, B", "<= 200", ("start", "peak_bytes_per_task"))
        for where in ("in_window", "beyond_window"):
            for k, v in (("call_ms", "call"), ("until_stored_ms", "until stored")):
                n = [x["terminate"][where][k] for x in now["start"]["runs"]]
                b = [x["terminate"][where][k] for x in base.get("start", {}).get("runs", [])]
                # the old call only queued the request: its time says nothing
                fair = k == "until_stored_ms"
                rows.append([f"terminate ({where.replace('_', ' ')}), {v}, ms", "ms",
                             _fmt(min(n)), _fmt(min(b)) if b else
                             f"{BEFORE['terminate_ms']} (issue)" if fair else "-",
                             _ratio(min(n), min(b)) if b and fair else "-"])
    for what in ("submit", "submit_busy"):
        if what not in now:
            continue
        s, bs = now[what], base.get(what)
        rows.append([f"{what}: {results['args']['submit']:,} tasks in one add_tasks"
                     + (f", {results['args']['busy']:,} short tasks completing"
                        if what == "submit_busy" else ", one long task running"),
                     "", "", "", ""])
        for name, aim, get in (
                ("  add_tasks (its one transaction), s", "", lambda d: d["submit_s"]),
                ("  coordinator read them all, s after", "", lambda d: d["read_all_s"]),
                ("  probe's lock wait, during that transaction, s", "",
                 lambda d: d["probe_wait_max_s"]["during_submit_txn"]),
                ("  probe's lock wait past the submit's commit, s", "~0",
                 lambda d: d["probe_wait_max_s"]["after_submit"]),
                ("  longest coordinator turn, s", "",
                 lambda d: d["turn_max_s"]["during_and_after"]),
                ("  the same less its lock waits, s", "< 4",
                 lambda d: d["turn_max_without_lock_wait_s"]),
                ("  longest coordinator lock wait, s", "",
                 lambda d: d["coordinator_lock_wait_max_s"]),
                ("  longest coordinator write txn, s", "~0",
                 lambda d: d["coordinator_write_hold_max_s"]),
                ("  node rows seen not idle/running", "0", lambda d: len(d["nodes_left_usable"])),
                ("  long task requeued/restarted", "False",
                 lambda d: d["long_task_interrupted"])):
            n = get(s)
            b = get(bs) if bs else None
            rows.append([name, aim, _fmt(n), _fmt(b), "-"])
    if "cpu" in now:
        row("coordinator CPU per `true` task, ms", "<= 0.1", ("cpu", "cpu_ms_per_task"),
            BEFORE["cpu_ms_per_task"])
        row("whole process CPU per task, ms", "", ("cpu", "process_cpu_ms_per_task"))
        row("wall for the tasks, s", "", ("cpu", "wall_s"))
    return rows


def suite(ctx) -> list[dict]:
    """hpcbatch bench: the coordinator process's CPU per `true` task on the local pool
    (home on tmpfs; the agents and tasks are other processes, their CPU not counted)."""
    n = 500 if ctx.quick else 10_000
    slots = os.cpu_count() or 1
    root = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=ctx.out))
    r = Runner(work, verbose=False)
    vals, kids, walls = [], [], []
    try:
        for i in range(ctx.repeats):
            ctx.progress(f"coordinator CPU, {n:,} true tasks, repeat {i + 1}/{ctx.repeats}")
            home = Path(tempfile.mkdtemp(prefix=f"cpu-{i}-", dir=root))
            try:
                res = r.run("cpu", str(REPO), home=str(home), slots=slots, n=n)
            finally:
                shutil.rmtree(home, ignore_errors=True)
            if res["succeeded"] != n:
                raise RuntimeError(f"{res['succeeded']} of {n} tasks succeeded")
            vals.append(res["cpu_ms_per_task"])
            kids.append(res["agents_and_tasks_cpu_ms_per_task"])
            walls.append(n / res["wall_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = f"{n // 1000}k" if n >= 1000 else str(n)
    return [
        {"name": f"scale.coordinator_cpu_per_task.{size}", "unit": "ms", "values": vals,
         "higher_is_better": False, "baseline": None, "ratios": None,
         "aim": {"value_at_most": AIMS["cpu_ms_per_task"]}, "skipped": None,
         "notes": f"{n:,} `true` tasks on {slots} local slots: the coordinator process's "
                  "CPU (getrusage) minus its main thread (which adds and waits); the aim "
                  "is HyperQueue's claim of 0.1 ms per task"},
        {"name": f"scale.agents_and_tasks_cpu_per_task.{size}", "unit": "ms", "values": kids,
         "higher_is_better": False, "baseline": None, "ratios": None, "aim": None,
         "skipped": None, "notes": "the agents' and the tasks' CPU (RUSAGE_CHILDREN), "
                                   "for scale: the part the coordinator does not spend"},
        {"name": f"scale.throughput.{size}", "unit": "tasks/s", "values": walls,
         "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
         "skipped": None, "notes": "the same run's wall-clock rate"},
    ]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="start,submit,submit_busy,cpu",
                    help="comma-separated measurements (start, submit, submit_busy, cpu)")
    ap.add_argument("--tasks", type=int, default=1_000_000, help="tasks stored at start")
    ap.add_argument("--submit", type=int, default=1_000_000, help="tasks in the one add_tasks")
    ap.add_argument("--busy", type=int, default=5000, help="submit_busy: short tasks "
                    "(sleep 0.05) that keep completing on the other slot during the submit")
    ap.add_argument("--cpu-tasks", type=int, default=20_000)
    ap.add_argument("--cpu-slots", type=int, default=os.cpu_count())
    ap.add_argument("--cpu-root", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                    help="cpu: where its home lies (default tmpfs, like bench_tasks.py: the "
                    "disk's deletes of 20,000 task directories are slow)")
    ap.add_argument("--nodes", type=int, default=1, help="local agents (start, submit)")
    ap.add_argument("--slots", type=int, default=2, help="slots per agent (start, submit)")
    ap.add_argument("--repeats", type=int, default=1, help="start and cpu runs per code")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds after the first task before memory is read")
    ap.add_argument("--after", type=float, default=6.0, help="seconds watched after the "
                    "coordinator has read every submitted task")
    ap.add_argument("--submit-timeout", type=float, default=600.0)
    ap.add_argument("--baseline", help="a source tree of the code before (e.g. /tmp/base)")
    ap.add_argument("--baseline-only", default="start,submit,cpu",
                    help="which measurements the baseline runs (submit_busy is left out: "
                    "the old code already loses its node in submit)")
    ap.add_argument("--code", default=str(REPO), help="the code measured as 'now'")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the coordinator loop "
                    "(and start()); text files in the work directory, kept")
    ap.add_argument("--breakdown", action="store_true", help="cpu: time the loop's parts "
                    "(wrappers with thread_time; a little overhead)")
    ap.add_argument("--work", help="work directory (default: a new one in the temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_scale.json"))
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(work, args.verbose)
    only = [s for s in args.only.split(",") if s]
    sides = [("now", args.code, only)]
    if args.baseline:
        sides.append(("baseline", args.baseline,
                      [s for s in args.baseline_only.split(",") if s in only]))
    fns = {"start": measure_start, "submit": measure_submit,
           "submit_busy": measure_submit_busy, "cpu": measure_cpu}
    load0 = os.getloadavg()
    results: dict = {"args": vars(args), "loadavg_before": load0, "before_issue": BEFORE,
                     "aims": AIMS}
    try:
        for what in only:  # interleaved: each measurement for both codes, one after other
            for label, code, which in sides:
                if what in which:
                    try:
                        results.setdefault(label, {})[what] = fns[what](r, code, label, args)
                    except Exception as exc:  # noqa: BLE001 - reported, the rest goes on
                        _say(f"[{label}] {what} failed: {exc}")
                        results.setdefault(label, {})[what + "_error"] = str(exc)
    finally:
        results["loadavg_after"] = os.getloadavg()
        if not (args.keep or args.profile):
            shutil.rmtree(work, ignore_errors=True)
    rows = summarize(results)
    results["table"] = rows
    print(f"\nload average before {load0[0]:.2f}, after {results['loadavg_after'][0]:.2f}; "
          f"{os.cpu_count()} cores; work dir {work}")
    header = ["", "aim", "now", "before", "before/now"]
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform
    results["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
