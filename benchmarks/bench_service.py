"""`hpcbatch serve` over real HTTP, each figure against the embedded Batch() in the same run.

Every server is a real ``python -m hpcbatch.cli serve --bind 127.0.0.1:0`` process on its
own home (its local pool: one slot per core), reached with ``Batch(url=..., key=...)``
(httpx) and, for the raw figures, a bare httpx client. Every embedded baseline runs in a
child process of this script (``Batch(home)``: the coordinator in that process), so
its peak RSS is its own.

  add         ADD tasks (``true``) in ONE request: ``Batch(url).jobs.get(J).add_tasks``
              (POST addtaskcollection, atomic, the body streamed by the client, every
              TaskSpec field of each task) and a body of {id, command_line} tasks
              pre-encoded, POSTed raw (the server's part alone); the server's
              peak RSS (VmHWM after resetting it through /proc/PID/clear_refs, and the
              largest VmRSS sampled every 10 ms) above its RSS before the request.
              Baseline: the same tasks through the embedded ``Batch().add_tasks`` (that
              process's VmHWM above its RSS before). Scheduling on the local node is
              disabled first in both, so nothing runs while (or after) the tasks are
              stored.
  throughput  TPUT ``true`` tasks added and waited for (``job.wait()``: the change feed
              over HTTP; the store's change counter embedded), coordinator and agent up
              before the clock starts; home on tmpfs as in bench_tasks.py. Runs
              interleaved over REPEATS; medians.
  stored      a home with STORED completed tasks (1% failed, exit code 1; ids 90%
              ``sim-N``, 10% ``post-N``; each with its attempt row), made by BULK INSERT:
              ``Store.add_tasks`` in chunks of 100,000, then one UPDATE marking every
              task completed (node, task dir, times, usage as a real run writes them),
              one INSERT ... SELECT of the attempts and ``Store.recount()``. The server
              is started on it (seconds until it serves) and on a home with the same
              pool and job but no tasks; each serves the same few queries (counts, the
              job, the job list, one page of each filter below, one task); then
              bytes per stored task = (VmRSS on the full home - VmRSS on the empty one)
              / STORED, after those queries and again after the latency run.
  latency     on the full home, CALLS pages of 1,000 rows for each filter, walking the
              continuation tokens (back to the first page at the end), three ways
              interleaved call by call: ``Batch(url).service.query_tasks`` (HTTP + JSON
              decode to dicts), a raw httpx GET (HTTP, body read, not decoded) and the
              embedded service in this process (``LocalService(home).query_tasks``,
              opened beside the server: reads need no coordinator). p50 / p99 / max ms,
              the server's own ms per request (its request log), and CPU, which the
              machine's load does not stretch: the embedded call's thread CPU and the
              server process's CPU (all threads) per request. An extra page (the failed
              filter with select=id,state,exit_code) shows what decoding every field costs;
              CALLS small GETs (the job's counts) show what one round trip costs beside
              the server's own time.

The machine's load average is recorded before and after each part (2 cores shared).

    python benchmarks/bench_service.py                 # full size (several minutes)
    python benchmarks/bench_service.py --quick         # smoke run (small sizes)
    python benchmarks/bench_service.py --only stored --stored-home /tmp/home1m  # keep it

Writes benchmarks/results/bench_service.json (``--json PATH``) beside a short table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from _common import machine, print_table  # noqa: E402

FULL = {"add": 100_000, "tput": 10_000, "stored": 1_000_000, "calls": 100, "repeats": 2}
QUICK = {"add": 2_000, "tput": 300, "stored": 20_000, "calls": 20, "repeats": 1}
AIMS = {"page_p99_ms": 50.0, "bytes_per_stored_task": 1024}
FILTERS = {"failed": "state eq 'completed' and exit_code ne 0",
           "startswith": "startswith(id,'sim-')"}
# (name, filter, select): the pages timed; the last one is extra (what every field costs)
PAGES = [("failed", FILTERS["failed"], None), ("startswith", FILTERS["startswith"], None),
         ("failed_select3", FILTERS["failed"], ("id", "state", "exit_code"))]
BIG_JOB = "big"
START_TIMEOUT_S = 120.0
CHUNK = 100_000  # bulk insert: tasks per Store.add_tasks call
FAIL_EVERY = 100  # about one task in FAIL_EVERY failed (a hash of its seq picks which)
_ENV_DROP = ("HPCBATCH_URL", "HPCBATCH_KEY", "HPCBATCH_HOME", "HPCBATCH_CAFILE")


# ---- memory of a process --------------------------------------------------------------

def proc_mem(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int | str = "self") -> bool:
    """VmHWM back to the current RSS (Linux clear_refs 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """The largest VmRSS of a process, sampled every period_s on a thread."""

    def __init__(self, pid: int, period_s: float = 0.01):
        self.pid, self.period_s = pid, period_s
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.max = max(self.max, proc_mem(self.pid)["VmRSS"])
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def mib(n: float) -> float:
    return n / (1 << 20)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of xs, nearest rank (p99 of 100 calls: the 99th fastest)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def tasks_of(n: int, prefix: str = "t") -> Iterator[dict[str, str]]:
    return ({"id": f"{prefix}{i:07d}", "command_line": "true"} for i in range(n))


def wait_until(what: str, ok: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(0.02)
    raise TimeoutError(f"{what} not within {timeout_s} s")


def nodes_idle(service: Any) -> bool:
    nodes = service.list_nodes("local")
    return bool(nodes) and all(n.state == "idle" for n in nodes)


def hold_local(service: Any) -> None:
    """Disable scheduling on every local node (tasks stay stored, none start)."""
    wait_until("the local node", lambda: nodes_idle(service))
    for n in service.list_nodes("local"):
        service.disable_node_scheduling("local", n.id)


# ---- a real `hpcbatch serve` -------------------------------------------------------------

class Server:
    """`hpcbatch serve` on ``home`` (any free loopback port), its log in ``logs``."""

    def __init__(self, home: Path, logs: Path):
        self.home = home
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("serve-*.err")))
        self.err_path = logs / f"serve-{n}.err"
        t0 = time.perf_counter()
        with open(logs / f"serve-{n}.out", "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcbatch.cli", "serve", "--home", str(home),
                 "--bind", "127.0.0.1:0"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=clean_env(HPCBATCH_HOME=str(home)), cwd=str(REPO))
        try:
            record = wait_until("service.json", self._record, START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        self.pid = self.proc.pid
        self.url = record["url"]
        self.key = (home / "service.key").read_text().strip()

    def _record(self) -> dict | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited {self.proc.returncode}: "
                               f"{self.err_path.read_text()[-2000:]}")
        try:
            record = json.loads((self.home / "service.json").read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("pid") == self.proc.pid else None

    def batch(self):
        import hpcbatch
        return hpcbatch.Batch(url=self.url, key=self.key)

    def http(self):
        import httpx
        return httpx.Client(base_url=self.url, timeout=600,
                            headers={"Authorization": f"Bearer {self.key}"})

    def mem(self) -> dict[str, int]:
        return proc_mem(self.pid)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def log_size(self) -> int:
        return self.err_path.stat().st_size

    def logged_ms(self, since: int, path: str) -> list[float]:
        """The server's own time (its request log) of each GET of ``path`` logged after
        byte ``since`` of its log."""
        with open(self.err_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        pat = re.compile(rf" GET {re.escape(path)}(?:\?\S*)? -> 200 ([0-9.]+) ms")
        return [float(m.group(1)) for m in pat.finditer(text)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- children: the embedded baselines and the bulk insert ------------------------------

def run_child(name: str, args: dict, timeout_s: float = 3600) -> dict:
    """Run child_<name>(args) in a fresh process of this script; its JSON result."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                        json.dumps({**args, "out": out.name})], check=True,
                       env=clean_env(), cwd=str(REPO), timeout=timeout_s)
        return json.loads(Path(out.name).read_text())


def child_embedded_add(a: dict) -> dict:
    import hpcbatch
    with hpcbatch.Batch(a["home"]) as b:
        job = b.jobs.create("add")
        assert b.coordinator is not None  # started now (it starts lazily), not in the clock
        hold_local(b.service)
        import gc
        gc.collect()
        reset = reset_hwm()
        m0 = proc_mem()
        t0 = time.perf_counter()
        added = job.add_tasks(tasks_of(a["n"]))
        seconds = time.perf_counter() - t0
        m1 = proc_mem()
        assert added == a["n"], added
        assert job.counts()["total"] == a["n"]
    return {"seconds": seconds, "rss_before": m0["VmRSS"], "hwm": m1["VmHWM"],
            "hwm_reset": reset, "peak_growth": m1["VmHWM"] - m0["VmRSS"],
            "rss_after": m1["VmRSS"]}


def child_embedded_tput(a: dict) -> dict:
    import hpcbatch
    with hpcbatch.Batch(a["home"]) as b:
        job = b.jobs.create("tput")
        assert b.coordinator is not None
        wait_until("the local node", lambda: nodes_idle(b.service))
        t0 = time.perf_counter()
        job.add_tasks(tasks_of(a["n"]))
        t_add = time.perf_counter() - t0
        counts = job.wait()
        seconds = time.perf_counter() - t0
    assert counts["succeeded"] == a["n"], counts
    return {"seconds": seconds, "add_s": t_add}


def child_populate(a: dict) -> dict:
    """A home with the local pool and job BIG_JOB holding a['n'] completed tasks."""
    from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
    from hpcbatch.store import Store
    home = Path(a["home"])
    home.mkdir(parents=True, exist_ok=True)
    st = Store(home / "state.db")
    t0 = time.perf_counter()
    st.create_pool(PoolSpec("local", "local", task_slots_per_node=os.cpu_count() or 1),
                   exist_ok=True)
    st.create_job(JobSpec(BIG_JOB, "local"))
    n = a["n"]
    for lo in range(0, n, CHUNK):
        st.add_tasks(BIG_JOB, (TaskSpec(f"{'post' if i % 10 == 9 else 'sim'}-{i:07d}", "true")
                               for i in range(lo, min(n, lo + CHUNK))))
    t_insert = time.perf_counter() - t0
    root = f"{home}/nodes/local/local-1/jobs/{BIG_JOB}/"
    fail = f"((seq * 2654435761) % 4294967296) % {FAIL_EVERY} = 0"
    with st.transaction() as db:
        db.execute(
            "UPDATE tasks SET state = 'completed', "
            f"result = CASE WHEN {fail} THEN 'failure' ELSE 'success' END, "
            f"failure = CASE WHEN {fail} THEN 'exit_code' END, "
            f"failure_kind = CASE WHEN {fail} THEN 'exit_code' END, "
            f"exit_code = CASE WHEN {fail} THEN 1 ELSE 0 END, "
            "node_id = 'local-1', task_dir = ? || id, "
            "started_at = 1.7e9 + seq * 0.001, ended_at = 1.7e9 + seq * 0.001 + 0.0025, "
            "usage = '{\"maxrss_kb\": 22000, \"stime_s\": 0.0, \"utime_s\": 0.001242}' "
            "WHERE job_id = ?", (root, BIG_JOB))
        db.execute(
            "INSERT INTO task_attempts SELECT seq, 0, node_id, started_at, ended_at, "
            "exit_code, signal, failure_kind, failure_detail, result, usage FROM tasks "
            "WHERE job_id = ?", (BIG_JOB,))
    st.recount()
    counts = st.task_counts(BIG_JOB)
    st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    st.close()
    assert counts["completed"] == n, counts
    (home / "bench_service.json").write_text(json.dumps({"stored": n, "counts": counts}))
    return {"seconds": time.perf_counter() - t0, "insert_s": t_insert, "counts": counts,
            "db_bytes": sum(p.stat().st_size for p in home.glob("state.db*"))}


CHILDREN = {"embedded_add": child_embedded_add, "embedded_tput": child_embedded_tput,
            "populate": child_populate}


# ---- the parts ------------------------------------------------------------------------

def part_add(n: int, repeats: int, root: str, logs: Path) -> dict:
    import msgspec
    body = msgspec.json.encode({"atomic": True, "tasks": list(tasks_of(n, "r"))})
    runs: dict[str, list[dict]] = {"embedded": [], "http_client": [], "http_raw": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=root) as home:
            runs["embedded"].append(run_child("embedded_add", {"home": home, "n": n}))
        for way in ("http_client", "http_raw"):
            with tempfile.TemporaryDirectory(dir=root) as home, \
                    Server(Path(home), logs) as srv, srv.batch() as b:
                job = b.jobs.create("add")
                hold_local(b.service)
                reset = reset_hwm(srv.pid)
                m0 = srv.mem()
                with RssSampler(srv.pid) as sampler:
                    t0 = time.perf_counter()
                    if way == "http_client":
                        added = job.add_tasks(tasks_of(n))
                    else:
                        with srv.http() as http:
                            r = http.post("/v1/jobs/add/addtaskcollection", content=body,
                                          headers={"Content-Type": "application/json"})
                        r.raise_for_status()
                        added = r.json()["added"]
                    seconds = time.perf_counter() - t0
                m1 = srv.mem()
                assert added == n, added
                assert job.counts()["total"] == n
                peak = max(m1["VmHWM"] if reset else 0, sampler.max)
                runs[way].append({
                    "seconds": seconds, "rss_before": m0["VmRSS"], "hwm": m1["VmHWM"],
                    "hwm_reset": reset, "sampled_max": sampler.max, "peak": peak,
                    "peak_growth": peak - m0["VmRSS"], "rss_after": m1["VmRSS"]})
    from hpcbatch.models import TaskSpec
    from hpcbatch.store import spec_to_dict
    client_body = 0  # what Batch(url).add_tasks sends: every TaskSpec field of each task
    for t in tasks_of(n):
        client_body += len(json.dumps(spec_to_dict(TaskSpec.coerce(t)),
                                      separators=(",", ":"))) + 1
    out: dict[str, Any] = {"tasks": n, "raw_body_bytes": len(body),
                           "client_body_bytes": client_body, "runs": runs}
    for way, rs in runs.items():
        out[way] = {"seconds": statistics.median(r["seconds"] for r in rs),
                    "peak_growth_mib": mib(statistics.median(r["peak_growth"] for r in rs)),
                    "peak_rss_mib": mib(statistics.median(r.get("peak", r["hwm"])
                                                          for r in rs)),
                    "rss_before_mib": mib(statistics.median(r["rss_before"] for r in rs))}
    base = out["embedded"]
    for way in ("http_client", "http_raw"):
        out[way]["seconds_ratio_vs_embedded"] = out[way]["seconds"] / base["seconds"]
        out[way]["peak_growth_ratio_vs_embedded"] = (
            out[way]["peak_growth_mib"] / base["peak_growth_mib"]
            if base["peak_growth_mib"] else None)
    return out


def part_tput(n: int, repeats: int, root: str, logs: Path) -> dict:
    runs: dict[str, list[dict]] = {"embedded": [], "http": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=root) as home:
            runs["embedded"].append(run_child("embedded_tput", {"home": home, "n": n}))
        with tempfile.TemporaryDirectory(dir=root) as home, \
                Server(Path(home), logs) as srv, srv.batch() as b:
            job = b.jobs.create("tput")
            wait_until("the local node", lambda: nodes_idle(b.service))
            t0 = time.perf_counter()
            job.add_tasks(tasks_of(n))
            t_add = time.perf_counter() - t0
            counts = job.wait()
            seconds = time.perf_counter() - t0
            assert counts["succeeded"] == n, counts
            runs["http"].append({"seconds": seconds, "add_s": t_add})
    out: dict[str, Any] = {"tasks": n, "slots": os.cpu_count(), "runs": runs}
    for way, rs in runs.items():
        s = statistics.median(r["seconds"] for r in rs)
        out[way] = {"seconds": s, "tasks_per_s": n / s,
                    "add_s": statistics.median(r["add_s"] for r in rs)}
    out["ratio_http_vs_embedded"] = out["http"]["tasks_per_s"] / out["embedded"]["tasks_per_s"]
    return out


def exercise(b: Any, http: Any) -> int:
    """The few queries every server serves before its RSS is read; rows returned."""
    s = b.service
    s.job_counts(BIG_JOB)
    s.get_job(BIG_JOB)
    s.list_jobs(counts=True)
    rows = 0
    for flt in (None, *FILTERS.values()):
        rows += len(s.query_tasks(BIG_JOB, filter=flt, max_results=1000).items)
    with contextlib.suppress(Exception):
        s.get_task(BIG_JOB, "sim-0000000")
    http.get(f"/v1/jobs/{BIG_JOB}/taskcounts").raise_for_status()
    return rows


def latency(srv: Server, b: Any, http: Any, local: Any | None, calls: int) -> dict:
    """CALLS pages of each of PAGES, three ways interleaved call by call, walking the
    continuation tokens; ms per call, summaries, and the server's own ms (its log)."""
    out: dict[str, Any] = {}
    route = f"/v1/jobs/{BIG_JOB}/tasks"
    for name, flt, select in PAGES:
        times: dict[str, list[float]] = {"http_client": [], "http_raw": [], "embedded": []}
        tokens: dict[str, str | None] = dict.fromkeys(times)
        rows: dict[str, int] = dict.fromkeys(times, 0)
        cpu_embedded: list[float] = []
        nbytes = 0
        since = srv.log_size()
        cpu0 = srv.cpu_s()
        for _ in range(calls):
            t0 = time.perf_counter()
            page = b.service.query_tasks(BIG_JOB, filter=flt, select=select, max_results=1000,
                                         continuation=tokens["http_client"])
            times["http_client"].append((time.perf_counter() - t0) * 1000)
            tokens["http_client"] = page.continuation
            rows["http_client"] += len(page.items)
            params: dict[str, Any] = {"filter": flt, "maxresults": 1000}
            if select:
                params["select"] = ",".join(select)
            if tokens["http_raw"]:
                params["continuation"] = tokens["http_raw"]
            t0 = time.perf_counter()
            r = http.get(route, params=params)
            body = r.content
            times["http_raw"].append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            nbytes += len(body)
            data = json.loads(body)
            tokens["http_raw"] = data.get("continuation")
            rows["http_raw"] += len(data["items"])
            if local is not None:
                c0, t0 = time.thread_time(), time.perf_counter()
                page = local.query_tasks(BIG_JOB, filter=flt, select=select, max_results=1000,
                                         continuation=tokens["embedded"])
                times["embedded"].append((time.perf_counter() - t0) * 1000)
                cpu_embedded.append((time.thread_time() - c0) * 1000)
                tokens["embedded"] = page.continuation
                rows["embedded"] += len(page.items)
        server_cpu_s = srv.cpu_s() - cpu0
        time.sleep(0.2)  # the last log line written
        server_ms = srv.logged_ms(since, route)
        res: dict[str, Any] = {"filter": flt, "select": select, "calls": calls,
                               "rows_per_call": {k: v / calls for k, v in rows.items()},
                               "bytes_per_call": nbytes / calls,
                               # CPU, which the machine's load does not stretch: the server
                               # process's (every thread) per request it served here, and
                               # this thread's per embedded call
                               "server_cpu_ms_per_request": server_cpu_s * 1000 / (2 * calls)}
        if cpu_embedded:
            res["embedded_cpu_ms"] = {"p50_ms": pct(cpu_embedded, 50),
                                      "p99_ms": pct(cpu_embedded, 99),
                                      "mean_ms": statistics.fmean(cpu_embedded)}
        for way, ms in (*times.items(), ("server_logged", server_ms)):
            if ms:
                res[way] = {"p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": max(ms),
                            "mean_ms": statistics.fmean(ms), "n": len(ms),
                            "ms": [round(x, 3) for x in ms]}
        if times["embedded"]:
            for way in ("http_client", "http_raw"):
                res[way]["p50_ratio_vs_embedded"] = res[way]["p50_ms"] / res["embedded"]["p50_ms"]
                res[way]["p99_ratio_vs_embedded"] = res[way]["p99_ms"] / res["embedded"]["p99_ms"]
        out[name] = res
    # a small answer (the job's counts, one row read): what every round trip costs
    counts_route = f"/v1/jobs/{BIG_JOB}/taskcounts"
    since = srv.log_size()
    ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        b.service.job_counts(BIG_JOB)
        ms.append((time.perf_counter() - t0) * 1000)
    time.sleep(0.2)
    logged = srv.logged_ms(since, counts_route)
    out["small_get"] = {"route": counts_route, "calls": calls, "http_client": {
        "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99)}, "server_logged": {
        "p50_ms": pct(logged, 50) if logged else None,
        "p99_ms": pct(logged, 99) if logged else None}}
    return out


def part_stored(n: int, calls: int, root: str, keep: str | None, logs: Path) -> dict:
    from hpcbatch.service import LocalService
    out: dict[str, Any] = {"stored": n, "how": "bulk insert through hpcbatch.store.Store "
                           "(add_tasks in chunks, then one UPDATE to completed, attempts by "
                           "INSERT ... SELECT, recount): no task ran"}
    tmp = tempfile.mkdtemp(dir=root, prefix="bench-service-")
    try:
        full = Path(keep) if keep else Path(tmp) / "full"
        marker = full / "bench_service.json"
        if keep and marker.exists() and json.loads(marker.read_text()).get("stored") == n:
            out["populate"] = {"reused": str(full)}
        else:
            shutil.rmtree(full, ignore_errors=True)
            out["populate"] = run_child("populate", {"home": str(full), "n": n})
        empty = Path(tmp) / "empty"
        run_child("populate", {"home": str(empty), "n": 0})
        out["home_dir"] = str(full.parent)
        mem: dict[str, dict] = {}
        for which, home in (("empty", empty), ("full", full)):
            with Server(home, logs) as srv, srv.batch() as b, srv.http() as http:
                wait_until("the local node", lambda b=b: nodes_idle(b.service))
                m_start = srv.mem()
                rows = sum(exercise(b, http) for _ in range(3))
                m_queries = srv.mem()
                lat = None
                if which == "full":
                    local = LocalService(home, create=False)
                    try:
                        lat = latency(srv, b, http, local, calls)
                    finally:
                        local.close()
                else:
                    latency(srv, b, http, None, calls)
                m_after = srv.mem()
                mem[which] = {"start_s": srv.start_s, "at_start": m_start,
                              "after_queries": m_queries, "after_latency": m_after,
                              "rows_served_in_queries": rows}
                if lat is not None:
                    out["latency"] = lat
        out["memory"] = mem
        per = {}
        for when in ("at_start", "after_queries", "after_latency"):
            per[when] = {k: (mem["full"][when][k] - mem["empty"][when][k]) / max(n, 1)
                         for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
        out["bytes_per_stored_task"] = per
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- hpcbatch bench ------------------------------------------------------------------------

def suite(ctx) -> list[dict]:
    """hpcbatch bench: pages of 1,000 tasks from a home of STORED completed tasks through
    hpcbatch serve (Batch(url) and raw httpx) and the embedded service, interleaved call
    by call; p50 and p99 per repeat (the full run stores 200,000, not main's 1M)."""
    from hpcbatch.service import LocalService
    n, calls = (20_000, 20) if ctx.quick else (200_000, 100)
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="bench-service-"))
    v: dict[str, list[float]] = {}
    try:
        ctx.progress(f"storing {n:,} completed tasks")
        run_child("populate", {"home": str(tmp / "full"), "n": n})
        with Server(tmp / "full", tmp / "logs") as srv, srv.batch() as b, srv.http() as http:
            wait_until("the local node", lambda: nodes_idle(b.service))
            local = LocalService(tmp / "full", create=False)
            try:
                exercise(b, http)
                for r in range(ctx.repeats):
                    ctx.progress(f"pages, repeat {r + 1}/{ctx.repeats}")
                    lat = latency(srv, b, http, local, calls)
                    for page in ("failed", "startswith"):
                        for way in ("http_client", "http_raw", "embedded"):
                            for q in ("p50", "p99"):
                                v.setdefault(f"{page}.{way}.{q}", []).append(
                                    lat[page][way][f"{q}_ms"])
                    v.setdefault("small_get.p50", []).append(
                        lat["small_get"]["http_client"]["p50_ms"])
            finally:
                local.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = f"{n // 1000}k"
    figs = []
    for page in ("failed", "startswith"):
        for q in ("p50", "p99"):
            base = f"service.page_{q}.{page}.embedded.{size}"
            figs.append({"name": base, "unit": "ms", "values": v[f"{page}.embedded.{q}"],
                         "higher_is_better": False, "baseline": None, "ratios": None,
                         "aim": None, "skipped": None,
                         "notes": f"LocalService.query_tasks in this process, {calls} pages "
                                  f"of 1,000 ({FILTERS[page]})"})
            for way, label in (("http_client", "Batch(url).service.query_tasks (HTTP, decoded)"),
                               ("http_raw", "a raw httpx GET (body read, not decoded)")):
                figs.append({"name": f"service.page_{q}.{page}.{way}.{size}", "unit": "ms",
                             "values": v[f"{page}.{way}.{q}"], "higher_is_better": False,
                             "baseline": base, "ratios": None,
                             "aim": {"value_at_most": AIMS["page_p99_ms"]}
                             if q == "p99" and way == "http_client" else None,
                             "skipped": None, "notes": f"{label}, {n:,} stored"})
    figs.append({"name": "service.small_get_p50", "unit": "ms", "values": v["small_get.p50"],
                 "higher_is_better": False, "baseline": None, "ratios": None, "aim": None,
                 "skipped": None, "notes": "a job's counts over HTTP: one round trip"})
    return figs


# ---- main -----------------------------------------------------------------------------

def summary(res: dict) -> list[list[object]]:
    rows: list[list[object]] = []
    a = res.get("add")
    if a:
        e = a["embedded"]
        rows.append([f"add {a['tasks']:,} tasks, embedded",
                     f"{e['seconds']:.2f} s", f"peak +{e['peak_growth_mib']:.0f} MiB", "1.00"])
        for way, what in (("http_client", "Batch(url) add_tasks"),
                          ("http_raw", "raw POST")):
            h = a[way]
            rows.append([f"add {a['tasks']:,} tasks, {what}", f"{h['seconds']:.2f} s",
                         f"server peak {h['peak_rss_mib']:.0f} MiB "
                         f"(+{h['peak_growth_mib']:.0f})",
                         f"{h['seconds_ratio_vs_embedded']:.2f} (time)"])
    t = res.get("throughput")
    if t:
        rows.append([f"{t['tasks']:,} `true` tasks, embedded Batch()",
                     f"{t['embedded']['tasks_per_s']:.0f} tasks/s",
                     f"{t['embedded']['seconds']:.2f} s", "1.00"])
        rows.append([f"{t['tasks']:,} `true` tasks, Batch(url=...)",
                     f"{t['http']['tasks_per_s']:.0f} tasks/s", f"{t['http']['seconds']:.2f} s",
                     f"{t['ratio_http_vs_embedded']:.2f}"])
    s = res.get("stored")
    if s:
        per = s["bytes_per_stored_task"]
        rows.append([f"RSS per stored task ({s['stored']:,})",
                     f"{per['after_queries']['VmRSS']:.1f} B",
                     f"after latency run {per['after_latency']['VmRSS']:.1f} B",
                     f"aim <= {AIMS['bytes_per_stored_task']} B"])
        m = s["memory"]
        rows.append(["serve start, full / empty home",
                     f"{m['full']['start_s']:.2f} s / {m['empty']['start_s']:.2f} s",
                     f"RSS {mib(m['full']['after_queries']['VmRSS']):.0f} / "
                     f"{mib(m['empty']['after_queries']['VmRSS']):.0f} MiB", ""])
        small = s.get("latency", {}).get("small_get")
        if small:
            rows.append(["small GET (taskcounts), Batch(url)",
                         f"p50 {small['http_client']['p50_ms']:.1f} ms",
                         f"server's own p50 {small['server_logged']['p50_ms'] or 0:.1f} ms", ""])
        for name, lat in s.get("latency", {}).items():
            if name == "small_get":
                continue
            for way in ("embedded", "http_client", "http_raw", "server_logged"):
                if way in lat:
                    x = lat[way]
                    ratio = "1.00" if way == "embedded" else \
                        f"{x['p50_ratio_vs_embedded']:.2f} / {x['p99_ratio_vs_embedded']:.2f}" \
                        if "p50_ratio_vs_embedded" in x else ""
                    rows.append([f"page {name}, {way}",
                                 f"p50 {x['p50_ms']:.1f} ms", f"p99 {x['p99_ms']:.1f} ms",
                                 ratio])
            if "embedded_cpu_ms" in lat:
                c = lat["embedded_cpu_ms"]
                rows.append([f"page {name}, CPU (load-free)",
                             f"embedded p50 {c['p50_ms']:.1f} ms",
                             f"p99 {c['p99_ms']:.1f} ms",
                             f"server {lat['server_cpu_ms_per_request']:.1f} ms/req"])
    return rows


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        a = json.loads(sys.argv[3])
        Path(a["out"]).write_text(json.dumps(CHILDREN[sys.argv[2]](a)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", action="append", choices=("add", "throughput", "stored"),
                    help="run only this part (repeatable); 'stored' includes the latency")
    ap.add_argument("--add", type=int, help=f"tasks in the one request (default "
                    f"{FULL['add']:,}; --quick {QUICK['add']:,})")
    ap.add_argument("--tput", type=int, help=f"`true` tasks run (default {FULL['tput']:,})")
    ap.add_argument("--stored", type=int, help=f"completed tasks stored (default "
                    f"{FULL['stored']:,})")
    ap.add_argument("--calls", type=int, help=f"pages per filter and way (default "
                    f"{FULL['calls']})")
    ap.add_argument("--repeats", type=int, help="runs of add and throughput (medians)")
    ap.add_argument("--stored-home", help="keep the full home here (reused when it holds "
                    "the same number of tasks)")
    ap.add_argument("--stored-dir", default=tempfile.gettempdir(),
                    help="where the full and empty homes go (default: the temp dir, disk)")
    ap.add_argument("--json", dest="json_path", help="where the results go (default "
                    "benchmarks/results/bench_service.json; --quick: "
                    "bench-results/bench_service_quick.json)")
    args = ap.parse_args()
    size = dict(QUICK if args.quick else FULL)
    for k in size:
        if getattr(args, k, None) is not None:
            size[k] = getattr(args, k)
    only = set(args.only or ("add", "throughput", "stored"))
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    res: dict[str, Any] = {"benchmark": "bench_service", "args": {**vars(args), **size},
                           "aims": AIMS, "homes": {"add_throughput": shm,
                                                   "stored": args.stored_dir},
                           "loadavg": {"before": load()}}
    logs = Path(tempfile.mkdtemp(prefix="bench-service-logs-"))
    try:
        if "add" in only:
            res["add"] = part_add(size["add"], size["repeats"], shm, logs)
            res["loadavg"]["after_add"] = load()
        if "throughput" in only:
            res["throughput"] = part_tput(size["tput"], size["repeats"], shm, logs)
            res["loadavg"]["after_throughput"] = load()
        if "stored" in only:
            res["stored"] = part_stored(size["stored"], size["calls"], args.stored_dir,
                                        args.stored_home, logs)
            res["loadavg"]["after_stored"] = load()
    except BaseException:
        print(f"server logs kept in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    rows = summary(res)
    res["table"] = [[str(c) for c in r] for r in rows]
    res["machine"] = machine()
    print_table(f"hpcbatch serve vs embedded (load {res['loadavg']['before'][0]:.2f} -> "
                f"{load()[0]:.2f}, {os.cpu_count()} cores)",
                ["what", "figure", "also", "ratio vs embedded"], rows)
    out = Path(args.json_path) if args.json_path else \
        REPO / "bench-results" / "bench_service_quick.json" if args.quick else \
        HERE / "results" / "bench_service.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
