"""Where the milliseconds of `hpcbatch run` go, against bare mpiexec doing the same work.

The work: 2 ranks, each adds rank + 1, a sum reduce to rank 0, rank 0 writes it to an
HDF5 file. Measured interleaved in every repeat:

  bare         mpiexec -n 2 python -c '<the reduce>' (no file)
  bare_h5py    the same, rank 0 writes the value with h5py (the work hpcbatch does)
  cli          `hpcbatch run trivial.py --ranks 2 -o x.h5` as a user types it (a fresh
               home: its own coordinator and local agent, started and stopped)
  api_warm     Batch.run_kernel on a coordinator and agent already up
  breakdown    a fresh process doing what `hpcbatch run` does, step by step, with a time
               stamp after each: python start, import hpcbatch.cli, Batch(), coordinator
               start, local agent up, start_run -> the agent starts the task (dispatch),
               task start -> the ranks' processes (mpiexec), rank start -> kernel
               imported (harness imports), -> run() called (MPI init), compute + reduce,
               rank 0's write (the h5py import inside), the ranks' end -> the task's end
               (mpiexec exit), -> job.wait returns (completion reported), read the result,
               Batch close (coordinator and agent stopped)

The aim (DESIGN): hpcbatch run within 15 ms of bare mpiexec doing the same work.

    python benchmarks/bench_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import print_table, timed, write_results  # noqa: E402

AIM_MS = 15.0
KERNEL = textwrap.dedent('''
    """A trivial kernel that stamps, per rank, when its process started, when the harness
    had imported it and when run() was called (MPI initialised)."""
    import json, os, time
    T_IMPORTED = time.time()
    from hpcbatch.kernels.api import Output, Param


    def _proc_start():
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


    PARAMS = {"stamps": Param(str, "", "a directory for the per-rank stamps")}
    OUTPUTS = {"x": Output("sum")}


    def run(comm, stamps):
        t = time.time()
        if stamps:
            with open(os.path.join(stamps, f"rank{comm.rank}.json"), "w") as f:
                json.dump({"proc_start": _proc_start(), "imported": T_IMPORTED,
                           "mpi_ready": t}, f)
        return {"x": comm.rank + 1.0}


    def reference(ranks, stamps):
        return {"x": ranks * (ranks + 1) / 2}
''')
BARE = ("from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; "
        "r = np.empty(1) if c.rank == 0 else None; "
        "c.Reduce(np.array([c.rank + 1.0]), r, op=MPI.SUM, root=0)")
BARE_H5 = BARE + ("\nif c.rank == 0:\n    import h5py, sys\n"
                  "    with h5py.File(sys.argv[1], 'w') as f: f['result/x'] = r[0]")
# (key, label) of the breakdown, in the order a run passes through them
STEPS = [
    ("python_start", "python start (interpreter, site)"),
    ("cli_import", "import hpcbatch.cli (click, rich, every command)"),
    ("batch_open", "Batch(home): the store opened"),
    ("coordinator_start", "coordinator started"),
    ("agent_start", "local agent started, node idle"),
    ("dispatch", "start_run -> the agent starts the task"),
    ("mpiexec_to_ranks", "task start -> the ranks' processes (mpiexec)"),
    ("harness_imports", "rank start -> kernel imported (harness imports)"),
    ("mpi_init", "kernel imported -> run() (MPI init)"),
    ("compute_reduce", "compute + reduce"),
    ("write", "rank 0 writes the result (h5py import included)"),
    ("ranks_exit", "rank 0's write done -> task end (finalize, mpiexec exit)"),
    ("completion", "task end -> job.wait returns"),
    ("read_result", "read the result file back"),
    ("close", "Batch close: coordinator and agent stopped"),
]


def env_for(home: Path, code: str | None = None) -> dict[str, str]:
    """The environment of a measured process; ``code``: a source tree whose hpcbatch/
    is imported instead of this one (the code before a change, for --baseline)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HPCBATCH_URL", "HPCBATCH_KEY", "HPCBATCH_HOME")}
    env["HPCBATCH_HOME"] = str(home)
    if code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
    return env


def mpirun(argv: list[str]) -> None:
    from hpcbatch.launch.mpi import mpiexec_command
    cmd, env = mpiexec_command(2, argv, oversubscribe=False)
    subprocess.run(cmd, env=env, check=True, capture_output=True)


# ---- the breakdown child: what `hpcbatch run` does, stamped ---------------------------------

def child(kernel: str, home: str, out: str, stamps: str) -> None:
    t_py = time.time()
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    t_proc = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME)
                            - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    import hpcbatch.cli  # noqa: F401 - what the CLI imports before it runs a command
    from hpcbatch.client import Batch
    t_import = time.time()
    b = Batch(home)
    t_open = time.time()
    assert b.coordinator is not None
    t_coord = time.time()
    deadline = time.monotonic() + 60
    while not all(n.state == "idle" for n in b.service.list_nodes("local")) or \
            not b.service.list_nodes("local"):
        if time.monotonic() > deadline:
            raise RuntimeError("the local node did not come up in 60 s")
        time.sleep(0.002)
    t_agent = time.time()
    run = b.service.start_run(kernel, ranks=2, params={"stamps": stamps}, pool="local",
                              nodes=None, ranks_per_node=1, oversubscribe=False,
                              timeout_s=None, retries=0, compress=False,
                              output=Path(home) / "x.h5", default_dir=Path.cwd())
    t_submit = time.time()
    import hpcbatch.kernelrun as kr
    reader = kr._import_reader() if hasattr(kr, "_import_reader") else None  # as run_kernel
    job = b.jobs.get(run.job_id)
    job.wait()
    if reader is not None:
        reader.join(10)
    t_wait = time.time()
    att = b.service.task_attempts(run.job_id, "kernel")[-1]
    from hpcbatch.kernels.results import read_result
    res = read_result(b.service.run_output(run.id))
    t_read = time.time()
    b.close()
    t_close = time.time()
    Path(out).write_text(json.dumps({
        "proc": t_proc, "py": t_py, "import": t_import, "open": t_open, "coord": t_coord,
        "agent": t_agent, "submit": t_submit, "wait": t_wait, "read": t_read,
        "close": t_close, "task_start": att.started_at, "task_end": att.ended_at,
        "timings": res.timings, "x": float(res.reduced["x"])}))


def breakdown_ms(c: dict, ranks: list[dict]) -> dict[str, float]:
    """The STEPS in ms from the child's stamps and the ranks'."""
    first_rank = min(r["proc_start"] for r in ranks)
    imported = max(r["imported"] for r in ranks)
    ready = max(r["mpi_ready"] for r in ranks)
    t = c["timings"]
    write_end = ready + t["compute"] + t["reduce"] + t["write"]
    ms = {
        "python_start": c["py"] - c["proc"], "cli_import": c["import"] - c["py"],
        "batch_open": c["open"] - c["import"], "coordinator_start": c["coord"] - c["open"],
        "agent_start": c["agent"] - c["coord"],
        "dispatch": c["task_start"] - c["agent"],
        "mpiexec_to_ranks": first_rank - c["task_start"],
        "harness_imports": imported - first_rank, "mpi_init": ready - imported,
        "compute_reduce": t["compute"] + t["reduce"], "write": t["write"],
        "ranks_exit": c["task_end"] - write_end, "completion": c["wait"] - c["task_end"],
        "read_result": c["read"] - c["wait"], "close": c["close"] - c["read"],
    }
    return {k: v * 1e3 for k, v in ms.items()}


def one_breakdown(kernel: Path, tmp: Path, i, code: str | None = None) -> dict[str, float]:
    home, stamps, out = tmp / f"bd-home{i}", tmp / f"bd-stamps{i}", tmp / f"bd{i}.json"
    stamps.mkdir()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(kernel),
                    str(home), str(out), str(stamps)], check=True, env=env_for(home, code),
                   stdin=subprocess.DEVNULL, capture_output=True, cwd=str(tmp))
    ranks = [json.loads(p.read_text()) for p in sorted(stamps.glob("rank*.json"))]
    if len(ranks) != 2:
        raise RuntimeError(f"{len(ranks)} rank stamps in {stamps}, not 2")
    return breakdown_ms(json.loads(out.read_text()), ranks)


def python_start_ms() -> tuple[float, float, float]:
    """Wall ms of `python -c pass`, of `import hpcbatch.cli`, of `import h5py` (minus
    numpy, which the ranks import anyway): each a fresh interpreter."""
    def wall(code: str) -> float:
        return timed(lambda: subprocess.run([sys.executable, "-c", code], check=True)) * 1e3
    bare = wall("pass")
    return bare, wall("import hpcbatch.cli") - bare, \
        wall("import numpy, h5py") - wall("import numpy")


# ---- measure -----------------------------------------------------------------------------------

def measure(repeats: int, progress=lambda s: None, baseline: str | None = None) -> dict:
    import hpcbatch
    v: dict[str, list[float]] = {}

    def add(k: str, x: float) -> None:
        v.setdefault(k, []).append(x)

    with tempfile.TemporaryDirectory(prefix="hpcbatch-overhead-") as d:
        tmp = Path(d)
        kernel = tmp / "trivial.py"
        kernel.write_text(KERNEL)
        with hpcbatch.Batch(tmp / "warm-home") as warm:
            warm.run_kernel(str(kernel), ranks=2, output=tmp / "w.h5")  # coordinator up
            for i in range(repeats):
                progress(f"run overhead, repeat {i + 1}/{repeats}")
                add("bare", timed(lambda: mpirun([sys.executable, "-c", BARE])) * 1e3)
                add("bare_h5py", timed(lambda: mpirun([sys.executable, "-c", BARE_H5,
                                                       str(tmp / "bare.h5")])) * 1e3)
                home = tmp / f"cli-home{i}"
                add("cli", timed(lambda home=home, i=i: subprocess.run(
                    [sys.executable, "-m", "hpcbatch.cli", "run", str(kernel), "--ranks", "2",
                     "-o", str(tmp / f"c{i}.h5")], env=env_for(home), check=True,
                    capture_output=True, stdin=subprocess.DEVNULL, cwd=str(tmp))) * 1e3)
                add("api_warm", timed(lambda i=i: warm.run_kernel(
                    str(kernel), ranks=2, output=tmp / f"a{i}.h5")) * 1e3)
                for k, ms in one_breakdown(kernel, tmp, i).items():
                    add(f"step_{k}", ms)
                if baseline:  # the code before, the same steps, in the same repeat
                    home = tmp / f"cli-home-base{i}"
                    add("base_cli", timed(lambda home=home, i=i: subprocess.run(
                        [sys.executable, "-m", "hpcbatch.cli", "run", str(kernel), "--ranks",
                         "2", "-o", str(tmp / f"cb{i}.h5")], env=env_for(home, baseline),
                        check=True, capture_output=True, stdin=subprocess.DEVNULL,
                        cwd=str(tmp))) * 1e3)
                    for k, ms in one_breakdown(kernel, tmp, f"b{i}", baseline).items():
                        add(f"base_step_{k}", ms)
                py, cli_imp, h5 = python_start_ms()
                add("python_pass", py)
                add("import_cli", cli_imp)
                add("import_h5py", h5)
    v["cli_over_bare_h5py"] = [a - b for a, b in zip(v["cli"], v["bare_h5py"])]
    v["api_warm_over_bare_h5py"] = [a - b for a, b in zip(v["api_warm"], v["bare_h5py"])]
    if baseline:
        v["base_cli_over_bare_h5py"] = [a - b for a, b in zip(v["base_cli"], v["bare_h5py"])]
    return v


def figures(v: dict[str, list[float]]) -> list[dict]:
    def fig(name, values, notes, baseline=None, aim=None, **kw):
        return {"name": f"overhead.{name}", "unit": "ms", "values": values,
                "higher_is_better": False, "baseline": baseline, "ratios": None, "aim": aim,
                "skipped": None, "notes": notes, **kw}
    figs = [
        fig("bare_mpiexec", v["bare"], "mpiexec -n 2 python -c <reduce>"),
        fig("bare_mpiexec_h5py", v["bare_h5py"], "the same, rank 0 writes it with h5py"),
        fig("hpcbatch_run_cli", v["cli"], "hpcbatch run trivial.py --ranks 2 -o x.h5 "
            "(fresh home: coordinator and agent started and stopped)",
            baseline="overhead.bare_mpiexec_h5py"),
        fig("run_kernel_warm", v["api_warm"], "Batch.run_kernel, coordinator and agent up",
            baseline="overhead.bare_mpiexec_h5py"),
        fig("cli_over_bare", v["cli_over_bare_h5py"], "hpcbatch run minus bare mpiexec + "
            "h5py, per repeat (the DESIGN aim)", aim={"value_at_most": AIM_MS}),
        fig("warm_over_bare", v["api_warm_over_bare_h5py"], "run_kernel on a warm "
            "coordinator minus bare mpiexec + h5py, per repeat", aim={"value_at_most": AIM_MS}),
        fig("import_h5py", v["import_h5py"], "import h5py in a fresh python beyond numpy "
            "(what a rank that writes nothing need not pay)"),
    ]
    for key, label in STEPS:
        figs.append(fig(f"step.{key}", v[f"step_{key}"], label))
    return figs


def suite(ctx) -> list[dict]:
    """hpcbatch bench: the run overhead and its breakdown (--quick: one repeat, ~15 s)."""
    return figures(measure(1 if ctx.quick else ctx.repeats, ctx.progress))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", help="a source tree of the code before (its hpcbatch/ "
                    "is imported instead): its CLI run and steps in the same repeats")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    v = measure(args.repeats, lambda s: print(s, flush=True), args.baseline)
    med = {k: statistics.median(x) for k, x in v.items()}
    if args.baseline:
        rows = [[label, med[f"base_step_{k}"], med[f"step_{k}"]] for k, label in STEPS]
        rows.append(["sum of the steps", sum(med[f"base_step_{k}"] for k, _ in STEPS),
                     sum(med[f"step_{k}"] for k, _ in STEPS)])
        rows += [["hpcbatch run (CLI), total", med["base_cli"], med["cli"]],
                 [f"hpcbatch run over bare mpiexec + h5py (aim <= {AIM_MS:g})",
                  med["base_cli_over_bare_h5py"], med["cli_over_bare_h5py"]],
                 ["bare mpiexec + h5py write, total", med["bare_h5py"], med["bare_h5py"]]]
        print_table(f"hpcbatch run, ms (median of {args.repeats}, interleaved)",
                    ["step", f"before ({args.baseline})", "now"], rows)
    rows = [[label, med[f"step_{k}"]] for k, label in STEPS]
    rows.append(["sum of the steps", sum(med[f"step_{k}"] for k, _ in STEPS)])
    rows += [["hpcbatch run (CLI), total", med["cli"]],
             ["bare mpiexec + h5py write, total", med["bare_h5py"]],
             ["bare mpiexec, total", med["bare"]],
             ["run_kernel on a warm coordinator, total", med["api_warm"]],
             [f"hpcbatch run over bare (aim <= {AIM_MS:g})", med["cli_over_bare_h5py"]],
             [f"warm run_kernel over bare (aim <= {AIM_MS:g})", med["api_warm_over_bare_h5py"]],
             ["import hpcbatch.cli (fresh python, minus `pass`)", med["import_cli"]],
             ["import h5py beyond numpy", med["import_h5py"]]]
    print_table(f"hpcbatch run overhead, ms (median of {args.repeats})", ["step", "ms"], rows)
    print(f"results: {write_results('overhead', {'ms': v, 'median_ms': med}, args.json_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
