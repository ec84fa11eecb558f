"""Command-task throughput: N `true` tasks through hpcbatch vs `xargs -P <cores>`.

xargs runs each line through /bin/sh; hpcbatch runs it as a task (its own task
directory with wd/, stdout.txt and stderr.txt, a process group, a store record).
All runners are interleaved over repeats in the same run; ratios use medians.

Task directories are real files, so the filesystem under HPCBATCH_HOME matters:
the runs are made with the home on tmpfs (/dev/shm, like a node's local scratch)
and on the disk holding the temp directory.

    python benchmarks/bench_tasks.py --tasks 2000 --repeats 3

In ``hpcbatch bench`` (suite()) the same `true` tasks also go through GNU parallel, the
service (``Batch(url=...)`` against a real ``hpcbatch serve``), and where installed
HyperQueue (``hyperqueue.cluster.LocalCluster``: server and worker in-process), Dask
(distributed.LocalCluster, one single-thread worker process per slot, each task a
``subprocess.run(["true"])``) and Parsl (HighThroughputExecutor, a ``bash_app``); each
peer's cluster is up before the clock starts, as hpcbatch's coordinator is.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, timed, write_results  # noqa: E402
from bench_service import nodes_idle, wait_until  # noqa: E402

import hpcbatch  # noqa: E402


def run_xargs(lines: Path, cores: int) -> None:
    with open(lines) as f:
        subprocess.run(["xargs", "-P", str(cores), "-d", "\n", "-n", "1", "sh", "-c"],
                       stdin=f, check=True)


def run_api(n: int, cores: int, root: str | None) -> float:
    """Seconds from add_tasks to the last completion (coordinator and agent already up)."""
    with tempfile.TemporaryDirectory(dir=root) as home, \
            hpcbatch.Batch(home, local_slots=cores) as b:
        job = b.jobs.create("bench")
        # the coordinator started and the local node idle before the clock, as the
        # peers' workers are up before theirs
        if b.coordinator is None:  # (reading it starts it)
            raise RuntimeError(f"{home}: another coordinator owns this home")
        wait_until("the local node", lambda: nodes_idle(b.service))

        def go() -> None:
            job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(n))
            counts = job.wait(poll_s=0.01)
            assert counts["succeeded"] == n, counts

        return timed(go)


def run_cli(lines: Path, cores: int, root: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=root) as home:
        env = dict(os.environ, HPCBATCH_HOME=home)
        subprocess.run([sys.executable, "-m", "hpcbatch.cli", "submit", "--each-line",
                        str(lines), "--no-progress"], env=env, check=True,
                       stdout=subprocess.DEVNULL)


# ---- hpcbatch bench ------------------------------------------------------------------------

FULL_TASKS, QUICK_TASKS = 10_000, 200


def _run_true() -> int:
    return subprocess.run(["true"]).returncode


class Peers:
    """The peers' clusters, each started once (outside the clock) and stopped at the end;
    a peer that cannot start is a reason, not a figure."""

    def __init__(self, slots: int, tmp: Path, quick: bool):
        self.slots, self.tmp, self.quick = slots, tmp, quick
        self.skipped: dict[str, str] = {}
        self.stops: list = []

    def start(self, name: str, fn):
        try:
            return fn()
        except ImportError as exc:
            self.skipped[name] = f"{exc.name or name} not installed (pip install 'hpcbatch[bench]')"
        except Exception as exc:  # noqa: BLE001 - the reason is the figure
            self.skipped[name] = f"{name} did not start: {type(exc).__name__}: {exc}"[:300]
        return None

    def hyperqueue(self):
        from hyperqueue import Job
        from hyperqueue.cluster import LocalCluster, WorkerConfig
        cluster = LocalCluster(str(self.tmp / "hq"), WorkerConfig(cores=self.slots))
        self.stops.append(cluster.stop)
        client = cluster.client()

        def go(n: int) -> None:
            wd = Path(tempfile.mkdtemp(dir=self.tmp))
            job = Job(default_workdir=wd)
            for _ in range(n):
                job.program(["true"])
            client.wait_for_jobs([client.submit(job)])
        return go

    def dask(self):
        from dask.distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=self.slots, threads_per_worker=1, processes=True,
                               dashboard_address=None, local_directory=str(self.tmp / "dask"))
        client = Client(cluster)
        self.stops += [cluster.close, client.close]

        def go(n: int) -> None:
            futs = client.map(lambda i: _run_true(), range(n), pure=False)
            assert sum(client.gather(futs)) == 0
            del futs
        return go

    def parsl(self):
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider
        cfg = Config(executors=[HighThroughputExecutor(
            label="bench", max_workers_per_node=self.slots, cores_per_worker=1,
            heartbeat_threshold=600,  # a worker pool starved by the other peers' runs stays
            provider=LocalProvider(init_blocks=1, max_blocks=1))],
            run_dir=str(self.tmp / "parsl"), strategy="none", usage_tracking=0)
        dfk = parsl.load(cfg)
        self.stops.append(dfk.cleanup)
        import logging
        logging.getLogger("parsl").setLevel(logging.WARNING)  # its DEBUG lines: the module log

        @parsl.bash_app
        def true_app():
            return "true"

        def go(n: int) -> None:
            futs = [true_app() for _ in range(n)]
            deadline = time.monotonic() + max(300.0, n / 10)  # a lost pool never answers
            assert all(f.result(timeout=max(1.0, deadline - time.monotonic())) == 0
                       for f in futs)
        go(self.slots)  # the workers connected before the clock starts
        return go

    def stop(self) -> None:
        for fn in reversed(self.stops):
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - stopping peers: best effort
                pass


def run_parallel(lines: Path, cores: int) -> None:
    with open(lines) as f:
        subprocess.run(["parallel", "-j", str(cores), "--will-cite"], stdin=f, check=True,
                       stdout=subprocess.DEVNULL)


def suite(ctx) -> list[dict]:
    """hpcbatch bench: tasks/s of `true` tasks, every runner interleaved per repeat."""
    import shutil

    from bench_service import Server
    n = QUICK_TASKS if ctx.quick else FULL_TASKS
    cores = os.cpu_count() or 1
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    size = f"{n // 1000}k" if n >= 1000 else str(n)
    names = {"xargs": f"xargs -P {cores}, `sh -c true` per line",
             "gnu_parallel": f"GNU parallel -j {cores}, one line a job (its shell)",
             "batch_api": "Batch() embedded, home on tmpfs, coordinator and node up",
             "cli": "hpcbatch submit --each-line, home on tmpfs, incl. start-up",
             "service": "Batch(url=...) against hpcbatch serve (HTTP), server up",
             "hyperqueue": "HyperQueue LocalCluster (server+worker in-process), job.program; "
                           "its wait_for_jobs polls once a second",
             "dask": f"Dask LocalCluster, {cores} worker processes, subprocess.run per task",
             "parsl": f"Parsl HighThroughputExecutor, {cores} workers, bash_app"}
    if ctx.pool:
        names[f"pool_{ctx.pool}"] = f"Batch() on your pool {ctx.pool} (your home)"
    times: dict[str, list[float]] = {k: [] for k in names}
    skipped: dict[str, str] = {}
    if shutil.which("parallel") is None:
        skipped["gnu_parallel"] = "GNU parallel not installed (apt install parallel)"
    with tempfile.TemporaryDirectory(dir=shm) as tmp_s:
        tmp = Path(tmp_s)
        lines = tmp / "tasks.txt"
        lines.write_text("true\n" * n)
        peers = Peers(cores, tmp, ctx.quick)
        srv = None
        try:
            runners: dict = {
                "xargs": lambda: timed(lambda: run_xargs(lines, cores)),
                "gnu_parallel": lambda: timed(lambda: run_parallel(lines, cores)),
                "batch_api": lambda: run_api(n, cores, shm),
                "cli": lambda: timed(lambda: run_cli(lines, cores, shm)),
            }
            ctx.progress("starting hpcbatch serve")
            try:
                (tmp / "svc").mkdir()
                srv = Server(tmp / "svc", tmp / "svc-logs")
                sb = srv.batch()
                wait_until("the local node", lambda: nodes_idle(sb.service))
                counter = iter(range(10**9))

                def service_run() -> float:
                    job = sb.jobs.create(f"bench{next(counter)}")

                    def go() -> None:
                        job.add_tasks({"id": f"t{i}", "command_line": "true"}
                                      for i in range(n))
                        counts = job.wait(poll_s=0.01)
                        assert counts["succeeded"] == n, counts
                    return timed(go)
                runners["service"] = service_run
            except Exception as exc:  # noqa: BLE001 - the reason is the figure
                skipped["service"] = f"hpcbatch serve did not start: {exc}"[:300]
            for peer in ("hyperqueue", "dask", "parsl"):
                if importlib.util.find_spec(peer) is None:
                    skipped[peer] = f"{peer} not installed (pip install 'hpcbatch[bench]')"
                    continue
                if ctx.quick:
                    skipped[peer] = (f"full run only: {peer}'s start-up or its 1 s polling "
                                     f"would dominate {n} tasks in --quick")
                    continue
                ctx.progress(f"starting {peer}")
                go = peers.start(peer, getattr(peers, peer))
                if go is not None:
                    runners[peer] = lambda go=go: timed(lambda: go(n))
            skipped.update(peers.skipped)
            if ctx.pool:
                import hpcbatch
                pb = hpcbatch.Batch()

                def pool_run() -> float:
                    job = pb.jobs.create(f"bench-{os.getpid()}-{time.time_ns()}", pool=ctx.pool)

                    def go() -> None:
                        job.add_tasks({"id": f"t{i}", "command_line": "true"}
                                      for i in range(n))
                        job.wait(poll_s=0.05)
                    return timed(go)
                runners[f"pool_{ctx.pool}"] = pool_run
            for r in range(ctx.repeats):
                for name, fn in runners.items():
                    if name in skipped:
                        continue
                    ctx.progress(f"{name} {size} tasks, repeat {r + 1}/{ctx.repeats}")
                    try:
                        times[name].append(fn())
                    except Exception as exc:  # noqa: BLE001 - the reason is the figure
                        skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        finally:
            if srv is not None:
                srv.stop()
            peers.stop()
    figs = []
    for name, label in names.items():
        base = None if name == "xargs" else "tasks.xargs." + size
        figs.append({
            "name": f"tasks.{name}.{size}", "unit": "tasks/s",
            "values": [] if name in skipped else [n / t for t in times[name]],
            "higher_is_better": True, "baseline": base, "ratios": None,
            "aim": {"ratio_at_least": 0.8} if name == "batch_api" else None,
            "skipped": skipped.get(name), "notes": f"{n:,} tasks; {label}"})
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--disk", action="store_true", help="also run with the home on the disk "
                    "of the temp directory (on a discard-mounted ext4, its deletes slow every "
                    "later run: measured last, kept out of the default)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    disk = tempfile.gettempdir()
    runners = {
        "xargs": lambda lines: timed(lambda: run_xargs(lines, args.cores)),
        "api_tmpfs": lambda lines: run_api(args.tasks, args.cores, shm),
        "cli_tmpfs": lambda lines: timed(lambda: run_cli(lines, args.cores, shm)),
    }
    if args.disk:
        runners["api_disk"] = lambda lines: run_api(args.tasks, args.cores, disk)
    labels = {
        "xargs": f"xargs -P {args.cores} (sh -c per line)",
        "api_tmpfs": "hpcbatch API, home on tmpfs (node up)",
        "cli_tmpfs": "hpcbatch submit CLI, home on tmpfs (incl. start-up)",
        "api_disk": f"hpcbatch API, home on disk ({disk})",
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "tasks.txt"
        lines.write_text("true\n" * args.tasks)
        for _ in range(args.repeats):
            for name, fn in runners.items():
                times[name].append(fn(lines))
    n = args.tasks
    rate = {k: n / median(v) for k, v in times.items()}
    ratio = {k: rate[k] / rate["xargs"] for k in times}
    print_table(f"{n} `true` tasks, {args.cores} slots, median of {args.repeats}",
                ["runner", "seconds", "tasks/s", "ratio vs xargs"],
                [[labels[k], median(times[k]), rate[k], ratio[k]] for k in times])
    path = write_results("tasks", {
        "tasks": n, "cores": args.cores, "repeats": args.repeats, "tmpfs": shm, "disk": disk,
        "seconds": times, "tasks_per_s": rate, "ratio_vs_xargs": ratio,
        "aim": {"ratio_vs_xargs": 0.8},
    }, args.json_out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
