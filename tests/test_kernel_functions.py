"""MPI functions: ``batch.run_kernel(fn, ranks=N, params=..., outputs={name: reduce})``
runs a plain Python function on every rank through the harness (real mpiexec, the local
pool), applies the declared reduces and writes the HDF5 result file (read back with
h5ls and h5py). A lambda, a closure over a numpy array, a function of ``__main__`` (a
script run in a subprocess) and one of a module beside that script; a rank that raises
fails the run with that rank's traceback and leaves no process; bad outputs and params
are refused before anything is stored; through a real ``hpcbatch serve`` the packed
function travels as an upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import processes_with, run_cli

from hpcbatch.errors import NotFound, ValidationError
from hpcbatch.kernelrun import KernelRunError, RemoteTraceback
from hpcbatch.kernels import function as kfn

# more ranks than this machine's cores need oversubscribe (as a kernel module's run does)
CORES = os.cpu_count() or 1


def _fit(ranks: int) -> dict:
    return {} if ranks <= CORES else {"oversubscribe": True}


def test_a_lambdas_rank_sum_is_reduced_and_the_result_file_reads_with_h5ls(batch, tmp_path):
    out = tmp_path / "ranks.h5"
    res = batch.run_kernel(lambda comm: {"rank_sum": comm.rank}, ranks=3,
                           outputs={"rank_sum": "sum"}, output=out, **_fit(3))
    assert res["rank_sum"] == 3 and res.reduced["rank_sum"] == 3
    assert res.path == out and res.job_id.startswith("run-lambda-")
    h5ls = shutil.which("h5ls")
    if h5ls is None:
        pytest.skip("h5ls (hdf5-tools) is not installed")
    listing = subprocess.run([h5ls, "-r", str(out)], capture_output=True, text=True,
                             timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert "/result/rank_sum" in listing.stdout and "Dataset {SCALAR}" in listing.stdout
    with h5py.File(out, "r") as f:  # the provenance: the function's name and hash, ranks
        assert f["result/rank_sum"][()] == 3
        assert f["result/rank_sum"].attrs["reduce"] == "sum"
        name = f.attrs["function"]
        assert name.endswith("<lambda>") and f.attrs["kernel"] == name
        assert len(f.attrs["function_sha256"]) == 64
        assert (f.attrs["ranks"], f.attrs["nodes"]) == (3, 1)
        digest = f.attrs["function_sha256"]
    run = batch.service.get_run(res.job_id)  # what listings show: the function's name
    assert run.kernel == name and run.attrs["function_sha256"] == digest
    assert dict(run.function) == {"name": name, "sha256": digest}
    assert [r.id for r in batch.service.list_runs()] == [res.job_id]
    listed = run_cli(batch.home, "results", "list", columns="400")  # no folded names
    assert listed.returncode == 0, listed.stderr
    row = next(ln for ln in listed.stdout.splitlines() if res.job_id in ln)
    assert f"fn {name}" in row and "succeeded" in row and "rank_sum=3" in row
    # `hpcbatch results show` names the function and its hash
    shown = run_cli(batch.home, "results", "show", str(out))
    assert shown.returncode == 0, shown.stderr
    assert f"function  {name}  sha256 {res.attrs['function_sha256']}" in shown.stdout


def test_the_hash_is_of_the_functions_pickled_bytes():
    import cloudpickle
    scale = 3

    def energy(comm, n=1):
        """Energy of n particles."""
        return {"e": n * scale}
    data, header = kfn.pack(energy, {"n": 2}, {"e": "sum"})
    assert header["fn_sha256"] == hashlib.sha256(cloudpickle.dumps(energy, protocol=5)) \
        .hexdigest()
    assert header["name"] == f"{__name__}.test_the_hash_is_of_the_functions_pickled_bytes" \
        ".<locals>.energy"
    assert header["description"] == "Energy of n particles."
    assert header["params"] == {"n": 2} and header["outputs"] == {"e": "sum"}
    assert kfn.short_name(header["name"]) == "energy"


def test_params_a_closure_over_an_array_and_every_reduce(batch, tmp_path):
    base = np.arange(6, dtype=np.float64).reshape(2, 3)  # captured by the closure

    def sweep(comm, scale, shift=0):
        r = comm.rank
        x = base * scale + r + shift
        return {"total": x, "prod": r + 2, "low": x.min(), "high": x.max(), "avg": x,
                "rows": np.arange(r + 1), "each": x[0], "flag": r == 0, "ignored": "text"}
    outputs = {"total": "sum", "prod": "prod", "low": "min", "high": "max", "avg": "mean",
               "rows": "concat", "each": "gather", "flag": "max"}
    res = batch.run_kernel(sweep, ranks=2, params={"scale": 2.0, "shift": 1},
                           outputs=outputs, output=tmp_path / "sweep.h5")
    per = [base * 2.0 + r + 1 for r in range(2)]
    np.testing.assert_array_equal(res["total"], per[0] + per[1])
    assert res["prod"] == 2 * 3
    assert res["low"] == per[0].min() and res["high"] == per[1].max()
    np.testing.assert_allclose(res["avg"], (per[0] + per[1]) / 2)
    assert res["rows"].tolist() == [0, 0, 1]
    assert res["each"].shape == (2, 3) and res["each"].tolist() == [p[0].tolist() for p in per]
    assert res["flag"] == np.True_ and "ignored" not in res.reduced
    assert res.attrs["params"] == {"scale": 2.0, "shift": 1}
    with h5py.File(res.path, "r") as f:
        assert {k: f["result"][k].attrs["reduce"] for k in outputs} == outputs


SCRIPT = '''
import json, sys
import numpy as np
import hpcbatch
from helpermod import local_energy

def energy(comm, n, weights):
    """Energy of the particles of this rank."""
    return {"energy": local_energy(comm.rank, n, weights), "ranks": np.array([comm.rank])}

if __name__ == "__main__":
    with hpcbatch.Batch() as batch:
        res = batch.run_kernel(energy, ranks=2, params={"n": 4, "weights": np.ones(4)},
                               outputs={"energy": "sum", "ranks": "concat"},
                               output=sys.argv[1])
        print(json.dumps({"energy": float(res["energy"]), "ranks": res["ranks"].tolist(),
                          "kernel": res.kernel, "job": res.job_id,
                          "params": res.attrs["params"]}))
'''

HELPER = '''
def local_energy(rank, n, weights):
    return float(sum(weights[:n])) * (rank + 1)
'''


def test_a_function_of_main_and_of_a_module_beside_the_script(home, tmp_path):
    d = tmp_path / "my project"
    d.mkdir()
    (d / "script.py").write_text(SCRIPT)
    (d / "helpermod.py").write_text(HELPER)  # not installed: it travels by value
    env = dict(os.environ, HPCBATCH_HOME=str(home))
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "script.py", str(tmp_path / "e.h5")], cwd=d, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["energy"] == 4.0 * 1 + 4.0 * 2 and got["ranks"] == [0, 1]
    assert got["kernel"] == "__main__.energy" and got["job"].startswith("run-energy-")
    assert got["params"] == {"n": 4, "weights": "ndarray float64[4]"}


def _left(job_id: str) -> list[int]:
    return processes_with({"HPCBATCH_JOB_ID": job_id})


def test_a_rank_that_raises_fails_the_run_with_its_traceback_and_leaves_nothing(batch):
    def fragile(comm):
        if comm.rank == 1:
            raise ValueError(f"bad input on rank {comm.rank}")
        comm.Barrier()  # the other ranks wait for rank 1: the abort must end them
        return {"x": 1}
    t0 = time.monotonic()
    with pytest.raises(KernelRunError) as info:
        batch.run_kernel(fragile, ranks=3, outputs={"x": "sum"}, timeout_s=120, **_fit(3))
    took = time.monotonic() - t0
    err = info.value
    assert str(err).startswith(f"function {__name__}.") and "fragile on 3 ranks exited" \
        in str(err)
    assert "[rank 1] ValueError: bad input on rank 1" in str(err)
    assert err.rank == 1 and "ValueError: bad input on rank 1" in err.traceback
    assert 'raise ValueError(f"bad input on rank {comm.rank}")' in err.traceback
    assert "harness.py" not in err.traceback  # the user's frames, not the harness's
    assert isinstance(err.__cause__, RemoteTraceback) and err.__cause__.rank == 1
    assert took < 60, f"the failed run took {took:.1f} s: a rank was left waiting"
    job_id = err.task.job_id
    assert _left(job_id) == []
    run = batch.service.get_run(job_id)
    assert run.state == "failed" and run.error.startswith("function ")


def test_a_missing_or_non_numeric_output_names_the_key_and_the_rank(batch):
    with pytest.raises(KernelRunError, match=r"output 'a' on rank 1: <lambda>\(\) returned "
                       r"no value for it \(it returned: 'b'\)") as info:
        batch.run_kernel(lambda comm: {"a": 1} if comm.rank == 0 else {"b": 2}, ranks=2,
                         outputs={"a": "sum"})
    assert info.value.traceback is None  # not the user's exception: no harness frames
    with pytest.raises(KernelRunError, match=r"output 'a' on rank 0: values must be numeric"):
        batch.run_kernel(lambda comm: {"a": "text"}, ranks=2, outputs={"a": "sum"})
    with pytest.raises(KernelRunError, match=r"returned list, not a dict of outputs"):
        batch.run_kernel(lambda comm: [1], ranks=1, outputs={"a": "sum"})


def test_bad_function_runs_are_refused_before_anything_is_stored(batch):
    before = len(batch.jobs.list())
    cases = [
        (dict(outputs=None), "outputs: a function run needs outputs"),
        (dict(outputs={"x": "median"}), "outputs: output 'x' has reduce 'median'"),
        (dict(outputs={"a/b": "sum"}), "outputs: output name 'a/b'"),
        (dict(outputs={"x": "sum"}, params={"nope": 1}), "params: function .* does not "
         "accept nope"),
        (dict(outputs={"x": "sum"}, params=[1]), "params: for a function"),
        (dict(outputs={"x": "sum"}, ranks=0), "ranks"),
    ]
    for kw, match in cases:
        with pytest.raises(ValidationError, match=match):
            batch.run_kernel(lambda comm, n=1: {"x": n}, **kw)
    with pytest.raises(ValidationError, match="kernel: function .* takes no argument"):
        batch.run_kernel(lambda: {"x": 1}, outputs={"x": "sum"})
    with pytest.raises(ValidationError, match="outputs: is for a function run"):
        batch.run_kernel("pi", outputs={"x": "sum"})
    with pytest.raises(ValidationError, match="cannot be pickled"):
        import threading
        lock = threading.Lock()
        batch.run_kernel(lambda comm: {"x": lock.locked()}, outputs={"x": "sum"})
    # the service side: an upload that is not there, not a hash, or not a packed function
    with pytest.raises(NotFound, match="no uploaded function"):
        batch.service.start_run(None, function="0" * 64)
    with pytest.raises(ValidationError, match="function: 'xyz' is not the SHA-256"):
        batch.service.start_run(None, function="xyz")
    junk = b"not a function"
    digest = hashlib.sha256(junk).hexdigest()
    batch.service.upload(kfn.FILE_NAME, [junk], digest)
    with pytest.raises(ValidationError, match="is not a packed hpcbatch function"):
        batch.service.start_run(None, function=digest)
    with pytest.raises(ValidationError, match="kernel: is required"):
        batch.service.start_run(None)
    assert len(batch.jobs.list()) == before


def test_a_node_with_another_python_says_so(tmp_path):
    data, header = kfn.pack(lambda comm: {"x": 1}, {}, {"x": "sum"})
    other = data.replace(f'"python":"{kfn.PYTHON}"'.encode(), b'"python":"2.7"', 1)
    path = tmp_path / kfn.FILE_NAME
    path.write_bytes(other)
    with pytest.raises(kfn.FunctionLoadError, match=r"pickled by Python 2\.7 on the client, "
                       r"but node .* runs Python 3\.\d+"):
        kfn.load(path)
    path.write_bytes(data)
    kernel, params = kfn.load(path)
    assert params == {} and kernel.name == header["name"]


@pytest.mark.slow
def test_a_function_run_through_a_real_service_travels_as_an_upload(tmp_path):
    from test_server import Served

    import hpcbatch
    served = Served(tmp_path / "served home", tmp_path / "logs")
    try:
        with hpcbatch.Batch(url=served.url, key=served.key) as remote:
            weights = np.linspace(0, 1, 5)
            res = remote.run_kernel(lambda comm, k: {"w": weights * (comm.rank + k)},
                                    ranks=2, params={"k": 1}, outputs={"w": "sum"},
                                    output=tmp_path / "remote.h5")
            np.testing.assert_allclose(res["w"], weights * 3)
            assert res.path == tmp_path / "remote.h5" and res.path.is_file()
            run = remote.service.get_run(res.job_id)
            assert run.state == "succeeded" and run.params == {"k": 1}
            assert run.function["name"].endswith("<lambda>")
            assert [r.id for r in remote.service.list_runs()] == [res.job_id]
            # the packed function is an upload in the service's home, named by its hash
            uploads = list((served.home / "uploads").glob(f"*/{kfn.FILE_NAME}"))
            assert len(uploads) == 1
            assert hashlib.sha256(uploads[0].read_bytes()).hexdigest() == uploads[0].parent.name
            with pytest.raises(KernelRunError) as info:
                remote.run_kernel(lambda comm: {"w": 1 / 0}, ranks=1, outputs={"w": "sum"})
            assert info.value.rank == 0 and "ZeroDivisionError" in info.value.traceback
            with pytest.raises(NotFound, match="no uploaded function"):
                remote.service.start_run(None, function="1" * 64)
        r = served.client.post("/v1/runs", json={"function": "nope"})
        assert r.status_code == 400 and r.json()["target"] == "function", r.text
    finally:
        served.stop()


def test_the_harness_refuses_a_kernel_and_a_function_together(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcbatch.kernels", "pi", "--function", "f.pkl",
                        "--output", str(tmp_path / "x.h5")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: give a kernel or --function FILE, not both"
    r = subprocess.run([sys.executable, "-m", "hpcbatch.kernels", "--function",
                        str(tmp_path / "none.pkl"), "--output", str(tmp_path / "x.h5")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "none.pkl cannot be opened" in r.stderr
