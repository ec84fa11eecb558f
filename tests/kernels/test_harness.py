"""The harness and `hpcbatch run` as users meet them: errors, files, provenance."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from helpers import run_cli

from hpcbatch.kernels import api


def harness_direct(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcbatch.kernels", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,needle", [
    (["nope", "--output", "x.h5"], "unknown kernel 'nope'; built-in kernels: "),
    (["pi", "--param", "darts=3", "--output", "x.h5"], "pi has no parameter 'darts'"),
    (["pi", "--param", "samples=lots", "--output", "x.h5"], "samples='lots': expected int"),
    (["pi", "--param", "samples=0", "--output", "x.h5"], "samples=0: must be >= 1"),
    (["pi"], "--output FILE.h5 is required"),
])
def test_bad_input_to_the_harness_is_one_line_exit_2(args, needle, tmp_path):
    t0 = time.monotonic()
    r = harness_direct(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert needle in r.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("args,needle", [
    (["run", "nope", "--ranks", "2"], "unknown kernel 'nope'"),
    (["run", "pi", "--ranks", "2", "-p", "darts=1"], "pi has no parameter 'darts'; it takes: "
                                                      "samples: int = 50000000, seed: int"),
    (["run", "pi", "--ranks", "2", "-p", "seed=x"], "seed='x': expected int"),
])
def test_bad_input_to_run_starts_no_mpi(home, args, needle):
    r = run_cli(home, *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
    assert not (home / "state.db").exists(), "nothing may be stored for a rejected run"


@pytest.mark.slow
def test_run_pi_main_job(home, tmp_path):
    out = tmp_path / "pi.h5"
    r = run_cli(home, "run", "pi", "--ranks", "4", "--oversubscribe", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"result file: {out}" in r.stdout
    with h5py.File(out, "r") as f:
        assert abs(f["result/pi"][()] - math.pi) < 1e-3
        assert f.attrs["ranks"] == 4
        assert dict(f["params"].attrs) == {"samples": 50_000_000, "seed": 12345}
        assert "Open MPI" in f.attrs["mpi_library"] or "MPICH" in f.attrs["mpi_library"]
        assert set(f["timings"].attrs) == {"units", "launch", "compute", "reduce", "write"}
        for key in ("mpi4py_version", "numpy_version", "h5py_version", "hpcbatch_version",
                    "start_utc", "end_utc", "node_ids", "hostnames", "run_id"):
            assert key in f.attrs
    for tool, flag in (("h5ls", "-r"), ("h5dump", "-H")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian package hdf5-tools)")
        t = subprocess.run([tool, flag, str(out)], capture_output=True, text=True)
        assert t.returncode == 0 and "result" in t.stdout, t.stderr
    shown = run_cli(home, "results", "show", str(out))
    assert shown.returncode == 0 and "/result/pi" in shown.stdout and "ranks 4" in shown.stdout


BAD_KERNEL = textwrap.dedent('''
    from hpcbatch.kernels.api import Output
    PARAMS = {}
    OUTPUTS = {"x": Output("sum")}

    def run(comm):
        if comm.rank == 2:
            raise RuntimeError("boom on purpose")
        comm.Barrier()  # the other ranks would wait here forever without MPI_Abort
        return {"x": 1}
''')


def _mpi_segments() -> set[str]:
    """The MPI shared-memory segments in /dev/shm (MPICH's, Open MPI's sm BTL's)."""
    from hpcbatch.kernels.harness import MPI_SHM_PREFIXES
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(MPI_SHM_PREFIXES)}
    except FileNotFoundError:
        return set()


def test_a_failing_rank_aborts_the_run_quickly_with_its_traceback(home, tmp_path):
    kfile = tmp_path / "bad kernel.py"
    kfile.write_text(BAD_KERNEL)
    before = _mpi_segments()
    t0 = time.monotonic()
    r = run_cli(home, "run", str(kfile), "--ranks", "4", "--oversubscribe", "-o",
                str(tmp_path / "bad.h5"), timeout_s=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1
    assert "[rank 2] RuntimeError: boom on purpose" in r.stderr
    assert "Traceback" in r.stderr
    assert not (tmp_path / "bad.h5").exists()
    # the aborting rank unlinked the node's MPI segments: the run leaves none behind
    assert _mpi_segments() - before == set()


SLOW_KERNEL = textwrap.dedent('''
    import os, time
    from hpcbatch.kernels.api import Output, Param
    PARAMS = {"dir": Param(str, "", "where each rank writes its pid")}
    OUTPUTS = {"x": Output("sum")}

    def run(comm, dir):
        with open(os.path.join(dir, f"rank{comm.rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
        return {"x": 1}
''')


def test_ctrl_c_on_run_stops_every_rank_and_the_job(home, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from helpers import pid_alive, poll

    from hpcbatch.store import Store
    kfile = tmp_path / "slow.py"
    kfile.write_text(SLOW_KERNEL)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", "run", str(kfile),
                             "--ranks", "2", "-p", f"dir={pids}", "-o", str(tmp_path / "s.h5")],
                            env=dict(os.environ, HPCBATCH_HOME=str(home)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ranks = poll(lambda: [int(p.read_text()) for p in pids.glob("*.pid")
                              if p.read_text()] if len(list(pids.glob("*.pid"))) == 2 else None,
                     timeout_s=60, what="both ranks running")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    for pid in ranks:
        poll(lambda pid=pid: not pid_alive(pid), timeout_s=10, what=f"rank {pid} gone")
    store = Store(home / "state.db")
    try:
        rows = [{"state": t["state"], "failure": t["failure"]}
                for j in store.list_jobs() for t in store.list_tasks(j["id"])]
    finally:
        store.close()
    # the run is over for good: the next coordinator on this home will not start it again
    assert rows == [{"state": "completed", "failure": "killed:terminate"}]


USER_KERNEL = textwrap.dedent('''
    import numpy as np
    from hpcbatch.kernels.api import Output, Param

    PARAMS = {"n": Param(int, 3, "values per rank"), "big": Param(int, 0, "per-rank floats")}
    OUTPUTS = {
        "total": Output("sum"),
        "low": Output("min"),
        "avg": Output("mean"),
        "ids": Output("concat"),
        "prod": Output(lambda a, b: a * b),
        "part": Output("max", per_rank=True),
        "blob": Output("sum", per_rank=True),
    }

    def run(comm, n, big):
        r = comm.rank
        return {"total": np.full(n, r + 1.0), "low": r + 10, "avg": float(r),
                "ids": np.arange(r + 1) + 100 * r, "prod": r + 2,
                "part": np.array([r, r * r]), "blob": np.full(max(big, 1), float(r))}
''')


@pytest.mark.slow
def test_a_user_kernel_file_with_every_reduce(home, tmp_path):
    kfile = tmp_path / "mine.py"
    kfile.write_text(USER_KERNEL)
    out = tmp_path / "mine.h5"
    big = 700_000  # 5.6 MB per rank: per-rank files joined by a virtual dataset
    r = run_cli(home, "run", str(kfile), "--ranks", "2", "-p", "n=4", "-p", f"big={big}",
                "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with h5py.File(out, "r") as f:
        res = f["result"]
        assert res["total"][()].tolist() == [3.0] * 4
        assert res["low"][()] == 10 and res["avg"][()] == 0.5
        assert res["ids"][()].tolist() == [0, 100, 101]
        assert res["prod"][()] == 6 and res["prod"].attrs["reduce"] == "custom:<lambda>"
        assert f["ranks/0/part"][()].tolist() == [0, 0]
        assert f["ranks/1/part"][()].tolist() == [1, 1]
        blob = f["ranks/blob"]
        assert blob.is_virtual and blob.shape == (2 * big,)
        assert blob[big - 1] == 0.0 and blob[big] == 1.0
        run_id = f.attrs["run_id"]
    assert (tmp_path / f"mine.{run_id}.rank1.h5").exists()


def test_api_run_kernel(batch, tmp_path):
    res = batch.run_kernel("pi", ranks=2, params={"samples": 100_000},
                           output=tmp_path / "p.h5")
    assert res.path == tmp_path / "p.h5"
    assert abs(float(res.reduced["pi"]) - math.pi) < 0.05
    assert res.timings["compute"] >= 0 and res.attrs["kernel"] == "pi"


def test_a_kernel_module_importable_only_here_runs_on_the_ranks(batch, tmp_path,
                                                                monkeypatch):
    import sys

    pkg = tmp_path / "labkernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "double.py").write_text(textwrap.dedent('''
        from hpcbatch.kernels.api import Output
        PARAMS = {}
        OUTPUTS = {"x": Output("sum")}
        def run(comm):
            return {"x": 2.0}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))  # on this process's path, not the ranks'
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert str(tmp_path) in sys.path
    res = batch.run_kernel("labkernels.double", ranks=2, output=tmp_path / "d.h5")
    assert float(res.reduced["x"]) == 4.0


def test_param_conversion():
    k = api.load_kernel("pi")
    assert api.parse_params(k, ["samples=1e6"]) == {"samples": 1_000_000, "seed": 12345}
    with pytest.raises(api.KernelParamError, match="expected int"):
        api.parse_params(k, ["samples=1.5e0"])
    assert np.int64(api.parse_params(k, ["seed=0x10"])["seed"]) == 16
