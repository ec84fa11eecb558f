"""`hpcbatch bench`: the runner writes results.json that validates against
benchmarks/results.schema.json, a table and plots (or says why not), and reports
numbers, never a zero for what it could not measure.

The end-to-end runs use two cheap modules (state: the pure coordinator state; queries:
the embedded service's pages), with one repeat: about 10 s each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcbatch.benchmarks import suite

REPO = Path(__file__).resolve().parent.parent
jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((REPO / "benchmarks" / "results.schema.json").read_text())
CHEAP = ["state", "queries"]


def validate(doc: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc)]
    assert not errors, errors


def run_bench(argv: list[str], tmp_path: Path, env: dict | None = None,
              timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                          cwd=str(tmp_path), env=env or dict(os.environ),
                          stdin=subprocess.DEVNULL)


def check_numbers(doc: dict, modules: list[str]) -> None:
    assert [m["name"] for m in doc["modules"]] == modules
    assert all(m["status"] == "ok" and m["figures"] > 0 for m in doc["modules"]), doc["modules"]
    for f in doc["figures"]:
        assert f["module"] in modules and f["name"].startswith(f["module"] + ".")
        assert f["skipped"] is None, f
        assert len(f["values"]) == doc["options"]["repeats"]
        assert all(isinstance(x, float | int) and x > 0 for x in f["values"]), f
        assert f["min"] <= f["median"] <= f["max"]
    assert doc["summary"]["measured"] == len(doc["figures"]) > 0
    assert doc["machine"]["cores"] >= 1 and doc["versions"]["hpcbatch"]


@pytest.mark.slow
def test_bench_quick_writes_valid_results_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out dir"
    r = run_bench(["hpcbatch", "bench", "--quick", "--only", *CHEAP, "--repeats", "1",
                   "--no-progress", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    validate(doc)
    check_numbers(doc, CHEAP)
    assert doc["options"]["quick"] is True
    assert doc["plots"]["skipped"] is None and doc["plots"]["files"]
    for name in doc["plots"]["files"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out / "results.md").read_text()
    assert all(f"| {f['name']} |" in table for f in doc["figures"])
    assert f"results: {out / 'results.json'}" in r.stdout


@pytest.mark.slow
def test_bench_from_a_checkout_without_matplotlib_reports_the_skipped_plots(tmp_path):
    """python -m benchmarks, with matplotlib hidden: JSON and table still written, the
    plots skipped with the reason."""
    hide = tmp_path / "hide"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('hidden by the test', name='matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), str(REPO)]))
    out = tmp_path / "o"
    r = run_bench([sys.executable, "-m", "benchmarks", "--quick", "--only", "state",
                   "--repeats", "1", "--no-progress", "--out", str(out)], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    validate(doc)
    check_numbers(doc, ["state"])
    assert doc["plots"]["files"] == []
    assert "matplotlib not installed" in doc["plots"]["skipped"]
    assert not list(out.glob("*.png"))
    assert "Plots: skipped (matplotlib not installed" in (out / "results.md").read_text()
    assert "plots skipped: matplotlib not installed" in r.stdout


def test_bench_rejects_an_unknown_module_in_one_line(tmp_path):
    r = run_bench(["hpcbatch", "bench", "--only", "nosuch", "--out", str(tmp_path / "o")],
                  tmp_path, timeout_s=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--only nosuch" in lines[0] and "state" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_rejects_zero_repeats(tmp_path):
    r = run_bench(["hpcbatch", "bench", "--repeats", "0", "--only", "state"], tmp_path,
                  timeout_s=60)
    assert r.returncode == 2 and "--repeats" in r.stderr and "Traceback" not in r.stderr


# ---- the runner's arithmetic, on figures as modules return them --------------------------

def fig(name: str, values: list[float], **kw) -> dict:
    return {"name": name, "unit": "tasks/s", "values": values, "higher_is_better": True,
            "baseline": None, "ratios": None, "aim": None, "skipped": None, "notes": "",
            **kw}


def test_ratios_are_per_repeat_and_the_aim_is_judged_on_the_median():
    figs = suite.normalize("t", [
        fig("t.base", [100.0, 200.0, 400.0]),
        fig("t.ours", [90.0, 100.0, 380.0], baseline="t.base", aim={"ratio_at_least": 0.8}),
        fig("t.cpu", [0.3, 0.2, 0.4], aim={"value_at_most": 0.1}),
    ])
    suite.complete(figs)
    base, ours, cpu = figs
    assert ours["ratios"] == [0.9, 0.5, 0.95]  # repeat by repeat, not median / median
    assert (ours["ratio_min"], ours["ratio_median"], ours["ratio_max"]) == (0.5, 0.9, 0.95)
    assert ours["met"] is True
    assert (cpu["min"], cpu["median"], cpu["max"]) == (0.2, 0.3, 0.4) and cpu["met"] is False
    assert base["met"] is None and base["ratios"] is None


def test_a_skipped_peer_is_never_a_zero_nor_a_pass():
    figs = suite.normalize("t", [
        fig("t.xargs", [10.0, 12.0]),
        fig("t.dask", [0.0], skipped="dask not installed (pip install 'hpcbatch[bench]')",
            baseline="t.xargs", aim={"ratio_at_least": 0.5}),
        fig("t.ours", [5.0, 6.0], baseline="t.dask"),
        fig("t.empty", []),
    ])
    suite.complete(figs)
    _, dask, ours, empty = figs
    assert dask["values"] == [] and dask["median"] is None and dask["met"] is None
    assert ours["ratios"] is None and "baseline skipped: dask not installed" in ours["notes"]
    assert empty["skipped"] and empty["values"] == []
    doc_md = suite.markdown({
        "started_utc": "2026-01-01T00:00:00Z", "seconds": 1.0,
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "os": "y", "python": "3"},
        "versions": {}, "options": {"quick": True, "repeats": 2}, "figures": figs,
        "modules": [], "plots": {"files": [], "skipped": "none"}})
    assert "| t.dask | skipped |" in doc_md and "0 tasks/s" not in doc_md


def test_only_accepts_names_with_or_without_the_prefix():
    assert suite.resolve_only(["bench_state.py", "queries,state"]) == ["state", "queries"]
    assert "tasks" in suite.resolve_only(None)
    with pytest.raises(ValueError, match="--only x: no benchmark module"):
        suite.resolve_only(["x"])


def _cmdlines_with(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def test_bench_stopped_by_sigterm_stops_the_running_module(tmp_path):
    """The module runs in a session of its own (so a hang can be killed as a group); when
    the runner is stopped, that session goes too."""
    import signal
    import time
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "hpcbatch.benchmarks", "--only", "state",
                             "--repeats", "50", "--no-progress", "--out", str(out)],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "state" / "progress.log").exists() or \
                not (out / "state" / "progress.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        child = [p for p in _cmdlines_with(str(out / "state")) if p != proc.pid]
        assert child, "the module's child process was not found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        deadline = time.monotonic() + 30
        while _cmdlines_with(str(out / "state")):
            assert time.monotonic() < deadline, "the module's process outlived the runner"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
