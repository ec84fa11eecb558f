"""Kernel benchmarks, each against a baseline measured in the same run.

(a) stream: per-rank triad GB/s of the kernel vs a single-process numpy triad
(b) allreduce: the kernel's latency per size vs raw mpi4py Allreduce, same sizes
(c) HDF5 result write of a large array vs `dd` writing the same bytes, same disk
(d) a 2-rank trivial kernel through hpcbatch (API, warm coordinator; and the CLI)
    vs bare `mpiexec -n 2 python -c ...` doing the same reduce

    python benchmarks/bench_kernels.py [--repeats 5] [--write-mib 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, timed, write_results  # noqa: E402

import hpcbatch  # noqa: E402
from hpcbatch.kernels import stream  # noqa: E402
from hpcbatch.kernels.results import read_result, write_result  # noqa: E402
from hpcbatch.launch.mpi import mpiexec_command  # noqa: E402


def mpirun(ranks: int, argv: list[str], oversubscribe: bool = True) -> str:
    cmd, env = mpiexec_command(ranks, argv, oversubscribe=oversubscribe)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return r.stdout


def harness(kernel: str, ranks: int, out: Path, **params) -> dict:
    argv = [sys.executable, "-m", "hpcbatch.kernels", kernel, "--output", str(out)]
    for k, v in params.items():
        argv += ["--param", f"{k}={v}"]
    mpirun(ranks, argv)
    return read_result(out).reduced


def bench_stream(tmp: Path, repeats: int, n: int) -> dict:
    base, k1, k2 = [], [], []
    a, b, c = np.empty(n), np.full(n, 1.0), np.full(n, 2.0)
    for _ in range(repeats):
        base.append(stream.triad(a, b, c, 3.0, 5))
        k1.append(float(harness("stream", 1, tmp / "s1.h5", n=n)["gbps"][0]))
        k2.append(float(np.mean(harness("stream", 2, tmp / "s2.h5", n=n)["gbps"])))
    return {"numpy_gbps": median(base), "kernel_1rank_gbps": median(k1),
            "kernel_2rank_per_rank_gbps": median(k2),
            "ratio_1rank": median(k1) / median(base), "ratio_2rank_per_rank": median(k2) /
            median(base), "aim": 0.9}


RAW_ALLREDUCE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    sizes, it = json.loads(sys.argv[1]), int(sys.argv[2])
    lat = []
    for nbytes in sizes:
        s = np.full(nbytes // 8, comm.rank + 1.0); r = np.empty_like(s)
        comm.Allreduce(s, r); comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(it):
            comm.Allreduce(s, r)
        lat.append(comm.allreduce((time.perf_counter() - t0) / it * 1e6, op=MPI.MAX))
    if comm.rank == 0:
        print(json.dumps(lat))
""")


def bench_allreduce(tmp: Path, repeats: int) -> dict:
    p = {"min_bytes": 8, "max_bytes": 1 << 22, "iterations": 50}
    sizes = [8 * 2 ** i for i in range(20) if 8 * 2 ** i <= p["max_bytes"]]
    raw, ker = [], []
    for _ in range(repeats):
        raw.append(json.loads(mpirun(2, [sys.executable, "-c", RAW_ALLREDUCE,
                                         json.dumps(sizes), str(p["iterations"])])))
        ker.append(list(harness("allreduce", 2, tmp / "a.h5", **p)["latency_us"]))
    raw_m = np.median(np.array(raw), axis=0)
    ker_m = np.median(np.array(ker), axis=0)
    ratio = raw_m / ker_m  # > 1: the kernel is faster
    return {"sizes_bytes": sizes, "raw_latency_us": raw_m.tolist(),
            "kernel_latency_us": ker_m.tolist(), "ratio_per_size": ratio.tolist(),
            "ratio_median": float(np.median(ratio)), "aim": 0.95}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_write(tmp: Path, repeats: int, mib: int) -> dict:
    """The same bytes (random doubles) written as a result file and by dd from tmpfs, to
    the same disk: into the page cache, and durably (fsync, dd conv=fsync)."""
    data = np.random.default_rng(0).random(mib * (1 << 20) // 8)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp
    src = shm / f"hpcbatch-bench-{os.getpid()}.bin"
    data.tofile(src)
    out, target = tmp / "big.h5", tmp / "dd.bin"
    res: dict = {"mib": mib, "aim": 0.8}
    try:
        for durable in (False, True):
            h5, dd = [], []
            for _ in range(repeats):
                def h5_write(durable: bool = durable) -> None:
                    write_result(out, reduced={"x": data}, reduces={"x": "sum"},
                                 attrs={"kernel": "bench"}, timings={})
                    if durable:
                        _fsync(out)
                h5.append(timed(h5_write))
                out.unlink()
                dd.append(timed(lambda durable=durable: subprocess.run(
                    ["dd", f"if={src}", f"of={target}", "bs=4M"]
                    + (["conv=fsync"] if durable else []), check=True, capture_output=True)))
                target.unlink()
            res["fsync" if durable else "page_cache"] = {
                "h5py_s": median(h5), "dd_s": median(dd), "h5_MiBps": mib / median(h5),
                "dd_MiBps": mib / median(dd), "ratio": median(dd) / median(h5),
                "all_s": {"h5py": h5, "dd": dd}}
    finally:
        src.unlink()
    return res


TRIVIAL = textwrap.dedent("""
    from hpcbatch.kernels.api import Output
    PARAMS = {}
    OUTPUTS = {"x": Output("sum")}
    def run(comm):
        return {"x": comm.rank + 1.0}
    def reference(ranks):
        return {"x": ranks * (ranks + 1) / 2}
""")
BARE = ("from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; "
        "r = np.empty(1) if c.rank == 0 else None; "
        "c.Reduce(np.array([c.rank + 1.0]), r, op=MPI.SUM, root=0)")
# the same, and rank 0 writes the reduced value to an HDF5 file, as the harness does
BARE_H5 = BARE + ("\nif c.rank == 0:\n    import h5py, sys\n"
                  "    with h5py.File(sys.argv[1], 'w') as f: f['result/x'] = r[0]")


def bench_run_overhead(tmp: Path, repeats: int) -> dict:
    kfile = tmp / "trivial.py"
    kfile.write_text(TRIVIAL)
    bare, bare_h5, api, cli = [], [], [], []
    home = tmp / "home"
    with hpcbatch.Batch(home) as batch:
        for i in range(repeats):
            bare.append(timed(lambda: mpirun(2, [sys.executable, "-c", BARE],
                                             oversubscribe=False)))
            bare_h5.append(timed(lambda: mpirun(2, [sys.executable, "-c", BARE_H5,
                                                    str(tmp / "bare.h5")], oversubscribe=False)))
            api.append(timed(lambda i=i: batch.run_kernel(str(kfile), ranks=2,
                                                          output=tmp / f"t{i}.h5")))
    env_home = tmp / "home-cli"
    env = dict(os.environ, HPCBATCH_HOME=str(env_home))
    for i in range(repeats):
        cli.append(timed(lambda i=i: subprocess.run(
            [sys.executable, "-m", "hpcbatch.cli", "run", str(kfile), "--ranks", "2", "-o",
             str(tmp / f"c{i}.h5")], env=env, check=True, capture_output=True)))
    return {"bare_mpiexec_s": median(bare), "bare_mpiexec_h5py_s": median(bare_h5),
            "api_run_kernel_s": median(api), "cli_run_s": median(cli),
            "api_overhead_ms": (median(api) - median(bare)) * 1e3,
            "api_overhead_vs_h5py_ms": (median(api) - median(bare_h5)) * 1e3,
            "cli_overhead_ms": (median(cli) - median(bare)) * 1e3, "aim_overhead_ms": 15,
            "all_s": {"bare": bare, "bare_h5py": bare_h5, "api": api, "cli": cli}}


# ---- hpcbatch bench ------------------------------------------------------------------------

def _fig(name: str, unit: str, values: list[float], *, higher: bool, baseline: str | None = None,
         aim: dict | None = None, notes: str = "", **extra) -> dict:
    return {"name": name, "unit": unit, "values": values, "higher_is_better": higher,
            "baseline": baseline, "ratios": None, "aim": aim, "skipped": None,
            "notes": notes, **extra}


def suite(ctx) -> list[dict]:
    """hpcbatch bench: stream vs numpy, allreduce vs raw mpi4py, HDF5 vs dd, strong scaling
    of pi and heat; every A and B pair run back to back in each repeat."""
    cores = os.cpu_count() or 1
    n = 2_000_000 if ctx.quick else 10_000_000
    mib = 64 if ctx.quick else 512
    ranks = [1, 2] if ctx.quick else sorted({1, 2, 4, max(2, cores)})
    pi_samples = 10_000_000 if ctx.quick else 100_000_000
    heat = {"nx": 512, "ny": 512, "steps": 100} if ctx.quick else \
        {"nx": 2048, "ny": 2048, "steps": 200}
    sizes = [8 * 2 ** i for i in range(20) if 8 * 2 ** i <= 1 << 22]
    shown = {8: "8B", 65536: "64KiB", 1 << 22: "4MiB"}
    v: dict[str, list[float]] = {}

    def add(key: str, x: float) -> None:
        v.setdefault(key, []).append(float(x))

    data = np.random.default_rng(0).random(mib * (1 << 20) // 8)
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=ctx.out) as d:
        tmp = Path(d)
        src = (shm or tmp) / f"hpcbatch-bench-{os.getpid()}.bin"
        data.tofile(src)
        try:
            a, b, c = np.empty(n), np.full(n, 1.0), np.full(n, 2.0)
            for r in range(ctx.repeats):
                rep = f"repeat {r + 1}/{ctx.repeats}"
                ctx.progress(f"stream, {rep}")
                add("numpy", stream.triad(a, b, c, 3.0, 5))
                add("k1", harness("stream", 1, tmp / "s1.h5", n=n)["gbps"][0])
                add("k2", np.mean(harness("stream", 2, tmp / "s2.h5", n=n)["gbps"]))
                ctx.progress(f"allreduce, {rep}")
                raw = json.loads(mpirun(2, [sys.executable, "-c", RAW_ALLREDUCE,
                                            json.dumps(sizes), "50"]))
                ker = list(harness("allreduce", 2, tmp / "a.h5", min_bytes=8,
                                   max_bytes=1 << 22, iterations=50)["latency_us"])
                for size, label in shown.items():
                    i = sizes.index(size)
                    add(f"raw_{label}", raw[i])
                    add(f"ker_{label}", ker[i])
                ctx.progress(f"HDF5 write {mib} MiB vs dd, {rep}")
                for durable in (False, True):
                    mode = "fsync" if durable else "page_cache"
                    out, target = tmp / "big.h5", tmp / "dd.bin"

                    def h5_write(durable: bool = durable, out: Path = out) -> None:
                        write_result(out, reduced={"x": data}, reduces={"x": "sum"},
                                     attrs={"kernel": "bench"}, timings={})
                        if durable:
                            _fsync(out)
                    add(f"h5_{mode}", mib / timed(h5_write))
                    out.unlink()
                    add(f"dd_{mode}", mib / timed(lambda durable=durable, t=target: subprocess.run(
                        ["dd", f"if={src}", f"of={t}", "bs=4M"]
                        + (["conv=fsync"] if durable else []), check=True,
                        capture_output=True)))
                    target.unlink()
                for k in ranks:
                    ctx.progress(f"strong scaling, {k} ranks, {rep}")
                    res = read_result(_run_kernel("pi", k, tmp / "pi.h5", samples=pi_samples))
                    add(f"pi_{k}", res.timings["compute"])
                    res = read_result(_run_kernel("heat", k, tmp / "heat.h5", **heat))
                    add(f"heat_{k}", res.timings["compute"])
        finally:
            src.unlink(missing_ok=True)
    figs = [
        _fig("kernels.stream.numpy_triad", "GB/s", v["numpy"], higher=True,
             notes=f"one process, n={n:,}, numpy a = b + s*c"),
        _fig("kernels.stream.kernel_1rank", "GB/s", v["k1"], higher=True,
             baseline="kernels.stream.numpy_triad", aim={"ratio_at_least": 0.9},
             notes="the stream kernel under mpiexec -n 1, same n"),
        _fig("kernels.stream.kernel_2rank_per_rank", "GB/s", v["k2"], higher=True,
             baseline="kernels.stream.numpy_triad",
             notes="per rank, 2 ranks share one memory bus: below 1 is the bus, not a bug"),
    ]
    for label in shown.values():
        figs += [_fig(f"kernels.allreduce.raw_mpi4py.{label}", "us", v[f"raw_{label}"],
                      higher=False, notes="2 ranks, comm.Allreduce, 50 iterations"),
                 _fig(f"kernels.allreduce.kernel.{label}", "us", v[f"ker_{label}"],
                      higher=False, baseline=f"kernels.allreduce.raw_mpi4py.{label}",
                      aim={"ratio_at_most": 1.05},
                      notes="the allreduce kernel, same sizes and iterations")]
    for mode in ("page_cache", "fsync"):
        figs += [_fig(f"kernels.write.dd.{mode}", "MiB/s", v[f"dd_{mode}"], higher=True,
                      notes=f"dd bs=4M of the same {mib} MiB from tmpfs"
                      + (" conv=fsync" if mode == "fsync" else "")),
                 _fig(f"kernels.write.hdf5.{mode}", "MiB/s", v[f"h5_{mode}"], higher=True,
                      baseline=f"kernels.write.dd.{mode}", aim={"ratio_at_least": 0.8},
                      notes=f"a result file of {mib} MiB of doubles"
                      + (", then fsync" if mode == "fsync" else ""))]
    for kernel, params in (("pi", {"samples": pi_samples}), ("heat", heat)):
        for k in ranks:
            over = k > cores
            figs.append(_fig(
                f"kernels.scaling.{kernel}.{k}rank{'s' if k > 1 else ''}", "s", v[f"{kernel}_{k}"],
                higher=False, baseline=None if k == 1 else f"kernels.scaling.{kernel}.1rank",
                notes=f"compute phase, the slowest rank; {params}; ideal ratio {1 / k:.2g}"
                + (f"; OVERSUBSCRIBED ({k} ranks on {cores} cores)" if over else ""),
                x={"name": "ranks", "value": k}, series=f"{kernel} compute"))
    return figs


def _run_kernel(kernel: str, ranks: int, out: Path, **params) -> Path:
    argv = [sys.executable, "-m", "hpcbatch.kernels", kernel, "--output", str(out)]
    for k, val in params.items():
        argv += ["--param", f"{k}={val}"]
    mpirun(ranks, argv)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream-n", type=int, default=10_000_000)
    ap.add_argument("--write-mib", type=int, default=512)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as d:
        tmp = Path(d)
        res = {"stream": bench_stream(tmp, args.repeats, args.stream_n),
               "allreduce": bench_allreduce(tmp, args.repeats),
               "hdf5_write": bench_write(tmp, args.repeats, args.write_mib),
               "run_overhead": bench_run_overhead(tmp, args.repeats)}
    s, a, w, o = res["stream"], res["allreduce"], res["hdf5_write"], res["run_overhead"]
    print_table(f"kernel benchmarks (median of {args.repeats})",
                ["benchmark", "hpcbatch", "baseline", "ratio", "aim"], [
        ["(a) stream GB/s, 1 rank", s["kernel_1rank_gbps"], s["numpy_gbps"], s["ratio_1rank"],
         ">= 0.9"],
        ["(a) stream GB/s per rank, 2 ranks", s["kernel_2rank_per_rank_gbps"], s["numpy_gbps"],
         s["ratio_2rank_per_rank"], "(shared memory bus)"],
        ["(b) allreduce latency (median ratio)", "", "", a["ratio_median"], ">= 0.95"],
        *[[f"(c) HDF5 write {w['mib']} MiB ({mode}), MiB/s", w[mode]["h5_MiBps"],
           w[mode]["dd_MiBps"], w[mode]["ratio"], ">= 0.8"] for mode in ("page_cache", "fsync")],
        ["(d) run overhead vs bare mpiexec, API ms", o["api_overhead_ms"], "", "", "<= 15"],
        ["(d) run overhead vs bare mpiexec + h5py write, API ms",
         o["api_overhead_vs_h5py_ms"], "", "", "<= 15"],
        ["(d) run overhead vs bare mpiexec, CLI ms", o["cli_overhead_ms"], "", "", "<= 15"],
    ])
    path = write_results("kernels", res, args.json_out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
