"""batch.executor() against other executors, interleaved in one run, same worker count.

No-op calls (``noop(i)`` returns ``i``) through ``map`` with chunksize 1, ``map`` with
a large chunksize (1,000) and a ``submit`` loop (every future waited for), at 10,000
and 100,000 calls, on: hpcbatch's local pool (2 workers), ``ProcessPoolExecutor(2)``
(the baseline), and, when installed (``pip install 'hpcbatch[bench]'``), Dask
``LocalCluster`` (2 single-threaded worker processes), Parsl ``HighThroughputExecutor``
(2 workers) and ``mpi4py.futures`` (``mpiexec -n 3``: 2 workers, in a subprocess per
repeat). A missing peer is a skipped figure with its reason. Dask and Parsl run the
10,000 size only (100,000 at chunksize 1 takes them minutes per repeat). Also: the same
on an SSH pool of 2 loopback sshd nodes (``--ssh``), and durable calls (recorded as
tasks: ``durable=True``, 64 calls per task).

    python benchmarks/bench_executor.py [--repeats 3] [--quick] [--ssh] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKERS = 2
BIG_CHUNK = 1000
WORKLOADS = ("map_c1", "map_c1000", "submit")
SLOW_PEERS = ("dask", "parsl")
# the peers' clients share this process with hpcbatch's embedded coordinators: on a
# loaded machine their GIL time can delay its pings past the production 4 s lease
TIMINGS = dict(heartbeat_s=1.0, node_timeout_s=30.0, lease_s=40.0)


def noop(i):
    return i


def run_chunk(chunk):
    return [noop(i) for i in chunk]


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(a, min(n, a + size))) for a in range(0, n, size)]


# ---- contenders: each is (name, run(workload, n) -> seconds, close()) -----------------

def _timed_futures(make) -> float:
    t0 = time.perf_counter()
    make()
    return time.perf_counter() - t0


class CfLike:
    """Any concurrent.futures-style executor (hpcbatch, ProcessPool, mpi4py)."""

    def __init__(self, ex, close=None):
        self.ex = ex
        self._close = close or ex.shutdown

    def run(self, workload: str, n: int) -> float:
        ex = self.ex
        if workload == "map_c1":
            return _timed_futures(lambda: sum(1 for _ in ex.map(noop, range(n))))
        if workload == "map_c1000":
            return _timed_futures(lambda: sum(1 for _ in ex.map(noop, range(n),
                                                                chunksize=BIG_CHUNK)))
        def loop():
            fs = [ex.submit(noop, i) for i in range(n)]
            for f in fs:
                f.result()
        return _timed_futures(loop)

    def close(self):
        self._close()


class DaskPeer:
    def __init__(self):
        from dask.distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)

    def run(self, workload: str, n: int) -> float:
        c = self.client
        if workload == "map_c1":
            return _timed_futures(lambda: c.gather(c.map(noop, range(n), pure=False)))
        if workload == "map_c1000":
            return _timed_futures(lambda: c.gather(c.map(run_chunk, _chunks(n, BIG_CHUNK),
                                                         pure=False)))
        return _timed_futures(lambda: c.gather([c.submit(noop, i, pure=False)
                                                for i in range(n)]))

    def close(self):
        self.client.close()
        self.cluster.close()


class ParslPeer:
    def __init__(self, run_dir: Path):
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider
        self.parsl = parsl
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        cfg = Config(executors=[HighThroughputExecutor(
            label="htex", max_workers_per_node=WORKERS, cores_per_worker=1,
            worker_logdir_root=str(run_dir), provider=LocalProvider(
                init_blocks=1, min_blocks=1, max_blocks=1,
                worker_init=f"export PYTHONPATH={path}"))], run_dir=str(run_dir),
            usage_tracking=0, initialize_logging=False)
        self.dfk = parsl.load(cfg)
        self.noop = parsl.python_app(noop)
        self.chunk = parsl.python_app(run_chunk)
        self.noop(0).result()  # the workers are up

    def run(self, workload: str, n: int) -> float:
        if workload == "map_c1000":
            return _timed_futures(lambda: [f.result() for f in
                                           [self.chunk(c) for c in _chunks(n, BIG_CHUNK)]])
        return _timed_futures(lambda: [f.result() for f in [self.noop(i) for i in range(n)]])

    def close(self):
        self.dfk.cleanup()
        self.parsl.clear()


class MpiPeer:
    """mpi4py.futures under mpiexec -n 3 (rank 0 submits, 2 workers): one subprocess per
    round, timing every (workload, size) of that round."""

    def __init__(self, sizes: list[int]):
        exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or \
            shutil.which("mpiexec")
        if not exe:
            raise RuntimeError("no mpiexec on PATH")
        self.cmd = [exe, *mpi_flags(exe), "-n", str(WORKERS + 1), sys.executable, "-m",
                    "mpi4py.futures", str(Path(__file__).resolve()), "--mpi-child",
                    ",".join(map(str, sizes))]
        self.sizes = sizes
        self.pending: dict[tuple[str, int], float] = {}

    def round(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")]))
        env.setdefault("OMPI_MCA_btl", "^ofi")
        env.setdefault("OMPI_MCA_mtl", "^ofi")
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        r = subprocess.run(self.cmd, capture_output=True, text=True, timeout=900, env=env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("{")), None)
        if r.returncode or line is None:
            raise RuntimeError(f"mpiexec failed ({r.returncode}): {r.stderr[-500:]}")
        self.pending = {(w, int(n)): s for w, n, s in json.loads(line)["times"]}

    def run(self, workload: str, n: int) -> float:
        return self.pending[(workload, n)]

    def close(self):
        pass


def mpi_flags(exe: str) -> list[str]:
    """Open MPI refuses more ranks than cores without --oversubscribe."""
    try:
        text = subprocess.run([exe, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return ["--oversubscribe"] if "Open MPI" in text or "OpenRTE" in text else []


def _mpi_child(sizes: str) -> None:
    from mpi4py.futures import MPIPoolExecutor
    times = []
    with MPIPoolExecutor() as ex:
        ex.submit(noop, 0).result()
        peer = CfLike(ex)
        for n in map(int, sizes.split(",")):
            for w in WORKLOADS:
                times.append((w, n, peer.run(w, n)))
    print(json.dumps({"times": times}), flush=True)


# ---- the run ----------------------------------------------------------------------------

def _label(n: int) -> str:
    return f"{n // 1000}k"


def _start(name: str, tmp: Path, sizes: list[int], ssh: bool):
    """(peer, None) or (None, why it is skipped)."""
    try:
        if name == "hpcbatch":
            import hpcbatch
            b = hpcbatch.Batch(tmp / "home", local_slots=WORKERS, **TIMINGS)
            ex = b.executor("local")
            ex.wait_for_workers()
            return CfLike(ex, lambda: (ex.shutdown(), b.close())), None
        if name == "hpcbatch_ssh":
            if not ssh:
                return None, "give --ssh (suite: pool 'ssh'): 2 loopback sshd nodes"
            return _ssh_peer(tmp), None
        if name == "processpool":
            return CfLike(cf.ProcessPoolExecutor(WORKERS)), None
        if name == "dask":
            try:
                import dask.distributed  # noqa: F401
            except ImportError:
                return None, "dask not installed (pip install 'hpcbatch[bench]')"
            return DaskPeer(), None
        if name == "parsl":
            try:
                import parsl  # noqa: F401
            except ImportError:
                return None, "parsl not installed (pip install 'hpcbatch[bench]')"
            return ParslPeer(tmp / "parsl"), None
        if name == "mpi4py":
            try:
                import mpi4py.futures  # noqa: F401
            except ImportError:
                return None, "mpi4py not installed"
            return MpiPeer(sizes), None
    except Exception as exc:  # noqa: BLE001 - a peer that cannot start is reported, skipped
        return None, f"{name} did not start: {type(exc).__name__}: {exc}"
    raise ValueError(name)


def _ssh_peer(tmp: Path):
    import hpcbatch
    from hpcbatch.launch.cluster import cluster_down, cluster_up
    d = tmp / "cluster"
    cluster_up(2, d)
    spec = json.loads((d / "pool.json").read_text())
    spec["python"] = sys.executable
    spec["node_root"] = str(d / "node-roots")
    (d / "pool2.json").write_text(json.dumps(spec))
    b = hpcbatch.Batch(tmp / "ssh-home", local_slots=1, **TIMINGS)
    b.pools.create("ssh2", "ssh", spec=str(d / "pool2.json"), task_slots_per_node=1)
    ex = b.executor("ssh2", env={"PYTHONPATH": str(ROOT)})  # the nodes' "shared" disk
    ex.wait_for_workers(timeout_s=120)

    def close():
        ex.shutdown()
        b.close()
        cluster_down(d)
    return CfLike(ex, close)


def _durable(tmp: Path, n: int, repeats: int) -> dict[str, list[float]]:
    """Durable map, 64 calls per task (the default) and 1,000 (chunksize=1000)."""
    import hpcbatch
    out: dict[str, list[float]] = {}
    with hpcbatch.Batch(tmp / "durable-home", local_slots=WORKERS, **TIMINGS) as b:
        b.jobs.create("warm").add_task("t", "true")
        b.jobs.get("warm").wait()
        for r in range(repeats):
            for chunk in (1, BIG_CHUNK):
                with b.executor(job=f"durable-{r}-{chunk}", durable=True) as ex:
                    t0 = time.perf_counter()
                    assert sum(1 for _ in ex.map(noop, range(n), chunksize=chunk)) == n
                    out.setdefault(f"map_c{chunk}", []).append(n / (time.perf_counter() - t0))
    return out


def measure(repeats: int, quick: bool, ssh: bool, progress=print) -> list[dict]:
    sizes = [10_000] if quick else [10_000, 100_000]
    names = ["hpcbatch", "processpool", "mpi4py", "dask", "parsl", "hpcbatch_ssh"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    peers, skipped = {}, {}
    try:
        for name in names:
            if quick and name in SLOW_PEERS:
                skipped[name] = "left out with --quick (10,000 calls take it ~20 s)"
                continue
            progress(f"starting {name}")
            peer, why = _start(name, tmp, sizes, ssh)
            if peer is None:
                skipped[name] = why
            else:
                peers[name] = peer
        values: dict[str, list[float]] = {}
        for r in range(repeats):
            if "mpi4py" in peers:
                progress(f"repeat {r + 1}: mpi4py round")
                try:
                    peers["mpi4py"].round()
                except Exception as exc:  # noqa: BLE001
                    skipped["mpi4py"] = f"mpi4py.futures failed: {exc}"
                    peers.pop("mpi4py").close()
            for n in sizes:
                for w in WORKLOADS:
                    for name, peer in peers.items():
                        if name in SLOW_PEERS and n > 10_000:
                            continue
                        progress(f"repeat {r + 1}: {name} {w} {n}")
                        secs = peer.run(w, n)
                        values.setdefault(f"{name}.{w}.{_label(n)}", []).append(n / secs)
        durable_n = 1000 if quick else 10_000
        progress(f"durable {durable_n}")
        durable = _durable(tmp, durable_n, repeats)
    finally:
        for peer in peers.values():
            try:
                peer.close()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return _figures(values, skipped, sizes, durable, durable_n)


def _figures(values, skipped, sizes, durable, durable_n) -> list[dict]:
    figs = []

    def fig(name, vals, baseline=None, aim=None, skip=None, notes=""):
        base = values.get(baseline) if baseline else None
        ratios = [a / b for a, b in zip(vals, base)] if base and vals else None
        figs.append({"name": f"executor.{name}", "unit": "tasks/s", "values": vals,
                     "higher_is_better": True,
                     "baseline": f"executor.{baseline}" if baseline and not skip else None,
                     "ratios": ratios, "aim": aim, "skipped": skip, "notes": notes})

    for n in sizes:
        for w in WORKLOADS:
            key = f"{w}.{_label(n)}"
            for name in ("processpool", "mpi4py", "dask", "parsl", "hpcbatch_ssh"):
                why = skipped.get(name)
                if name in SLOW_PEERS and n > 10_000 and not why:
                    why = "100,000 no-op calls take it minutes per repeat; see the 10k figure"
                fig(f"{name}.{key}", values.get(f"{name}.{key}", []) if not why else [],
                    None if name == "processpool" or why else f"processpool.{key}",
                    skip=why, notes=f"{WORKERS} workers" if name != "hpcbatch_ssh" else
                    "2 loopback sshd nodes, 1 worker each")
            ours = values.get(f"hpcbatch.{key}", [])
            fig(f"hpcbatch.{key}", ours, f"processpool.{key}",
                {"ratio_at_least": 0.5} if w == "map_c1" else None,
                notes="local pool, 2 workers")
            for peer in SLOW_PEERS:
                if f"{peer}.{key}" in values:
                    fig(f"hpcbatch.{key}.vs_{peer}", ours, f"{peer}.{key}",
                        {"ratio_at_least": 5.0} if w == "map_c1" else None,
                        notes=f"the hpcbatch figure over {peer}'s")
    for w, vals in durable.items():
        per = 64 if w == "map_c1" else BIG_CHUNK
        figs.append({"name": f"executor.durable.{w}.{_label(durable_n)}", "unit": "tasks/s",
                     "values": vals, "higher_is_better": True, "baseline": None,
                     "ratios": None, "aim": None, "skipped": None,
                     "notes": f"durable=True: every call recorded in a task ({per} per task) "
                              "before it runs, results read back from the task directories"})
    return figs


def table(figs: list[dict]) -> str:
    """Median tasks/s and ratio per figure, one line each."""
    import statistics
    med = statistics.median
    lines = [f"{'figure':<44} {'tasks/s':>10}  {'ratio':>7}  baseline / note"]
    for f in figs:
        name = f["name"].removeprefix("executor.")
        if f["skipped"]:
            lines.append(f"{name:<44} {'skipped':>10}  {'':>7}  {f['skipped']}")
            continue
        ratio = f"{med(f['ratios']):.2f}x" if f["ratios"] else ""
        base = (f["baseline"] or "").removeprefix("executor.")
        aim = f"  (aim >= {f['aim']['ratio_at_least']}x)" if f["aim"] else ""
        lines.append(f"{name:<44} {med(f['values']):>10,.0f}  {ratio:>7}  {base}{aim}")
    return "\n".join(lines)


def suite(ctx) -> list[dict]:
    ssh = ctx.pool == "ssh" if getattr(ctx, "pool", None) else False
    return measure(ctx.repeats, ctx.quick, ssh, progress=ctx.progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ssh", action="store_true", help="also on 2 loopback sshd nodes")
    ap.add_argument("--out", help="JSON file (default bench-results/bench_executor.json)")
    ap.add_argument("--mpi-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.mpi_child:
        _mpi_child(a.mpi_child)
        return 0
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up peers and nodes
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_results
    figs = measure(a.repeats, a.quick, a.ssh, progress=lambda s: print(s, file=sys.stderr))
    print(table(figs))
    path = write_results("bench_executor", {"figures": figs}, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # functions pickled by reference must name an importable module, not __main__
    from benchmarks import bench_executor as _me
    sys.exit(_me.main())
