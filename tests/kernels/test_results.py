"""Result files a scientist can read: native HDF5 provenance (no JSON to parse), a units
and description attribute on every output, virtual datasets whose missing parts read
as NaN (and say so), part files tied to their run, and files of the first format."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import h5py
import numpy as np
import pytest
from helpers import run_cli

from hpcbatch.kernels import api, results
from hpcbatch.kernels.results import describe, missing_parts, read_result


def _all_attrs(f: h5py.File):
    """(object name, attribute name, value) of every attribute in the file."""
    found = [("/", k, v) for k, v in f.attrs.items()]
    f.visititems(lambda name, obj: found.extend((name, k, v) for k, v in obj.attrs.items()))
    return found


def _no_json(f: h5py.File) -> None:
    for where, key, value in _all_attrs(f):
        if isinstance(value, str):
            assert not value.startswith(("{", "[")) and value != "null", (where, key, value)


def h5dump_attrs(path) -> str:
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump not installed (Debian package hdf5-tools)")
    r = subprocess.run(["h5dump", "-A", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_params_and_timings_are_attributes_a_script_reads_without_json(harness_to, tmp_path):
    out = tmp_path / "pi.h5"
    harness_to("pi", 2, out, {"samples": 100_003, "seed": 7})
    with h5py.File(out, "r") as f:
        params = dict(f["params"].attrs)
        assert params == {"samples": 100_003, "seed": 7}
        assert isinstance(params["samples"], np.integer)
        t = f["timings"].attrs
        assert t["units"] == "s"
        assert [k for k in t if k != "units"] == ["launch", "compute", "reduce", "write"]
        assert all(isinstance(t[k], np.floating) and t[k] >= 0 for k in t if k != "units")
        # node ids and hostnames: string arrays, one per rank, clearly named
        for key in ("node_ids", "hostnames"):
            names = f.attrs[key]
            assert len(names) == 2 and all(isinstance(n, str) and n for n in names), key
        assert "hosts" not in f.attrs
        assert len(f.attrs["run_id"]) == 12 and f.attrs["format"] == "hpcbatch-result/2"
        # every output has a description, the derived pi too; units where known
        for name in ("hits", "samples", "pi"):
            ds = f["result"][name]
            assert ds.attrs["description"] and ds.attrs["units"] == "1", name
        assert f["result/pi"].attrs["reduce"] == "finalize"
        _no_json(f)

    dump = h5dump_attrs(out)
    params_block = dump[dump.index('GROUP "params"'):dump.index('GROUP "result"')]
    assert 'ATTRIBUTE "samples"' in params_block and "H5T_STD_I64LE" in params_block
    assert "(0): 100003" in params_block
    timings_block = dump[dump.index('GROUP "timings"'):]
    for phase in ("launch", "compute", "reduce", "write"):
        assert f'ATTRIBUTE "{phase}"' in timings_block
    assert "H5T_IEEE_F64LE" in timings_block
    assert 'ATTRIBUTE "node_ids"' in dump and 'ATTRIBUTE "hostnames"' in dump
    assert "{\\\"" not in dump and '"{' not in dump  # no JSON text anywhere

    res = read_result(out)  # the reading side: plain Python, as before
    assert res.attrs["params"] == {"samples": 100_003, "seed": 7} == res.params
    assert type(res.attrs["params"]["samples"]) is int
    assert set(res.timings) == {"launch", "compute", "reduce", "write"}
    assert len(res.attrs["node_ids"]) == 2 and isinstance(res.attrs["node_ids"][0], str)
    assert res.units == {"hits": "1", "samples": "1", "pi": "1"}
    assert res.descriptions["pi"].startswith("the estimate of pi")
    json.dumps(res.attrs)  # service.get_run puts them into JSON as they are
    assert list(res.reduced) == ["hits", "samples", "pi"]  # in the kernel's order

    text = describe(out)
    assert "params    samples=100003, seed=7" in text
    assert "/result/pi  float64 [] (reduce=finalize, units=1)" in text
    assert "the estimate of pi: 4 * hits / samples" in text
    assert "MISSING" not in text


def test_mandelbrot_stores_its_image_once_with_a_description(harness_to, tmp_path):
    out = tmp_path / "m.h5"
    harness_to("mandelbrot", 2, out, {"width": 32, "height": 17, "max_iter": 20})
    with h5py.File(out, "r") as f:
        assert list(f["result"]) == ["image"]
        image = f["result/image"]
        assert image.shape == (17, 32) and image.attrs["reduce"] == "finalize"
        assert "escape-time" in image.attrs["description"]
        assert "ranks" not in f


def test_every_builtin_output_has_a_description():
    for name in api.list_kernels():
        k = api.load_kernel(name)
        for out in [*k.outputs, *k.derived]:
            description, units = k.describe_output(out)
            assert description.strip(), (name, out)
            assert isinstance(units, str)
    assert api.load_kernel("allreduce").describe_output("bandwidth_GBps")[1] == "GB/s"
    assert api.load_kernel("stream").describe_output("gbps")[1] == "GB/s"


def test_an_undeclared_output_still_gets_a_description(harness_to, tmp_path):
    kfile = tmp_path / "plain.py"
    kfile.write_text(textwrap.dedent('''
        from hpcbatch.kernels.api import Output
        PARAMS = {}
        OUTPUTS = {"x": Output("sum")}
        def run(comm):
            return {"x": 1.0}
        def finalize(reduced, params):
            return {"twice": 2 * reduced["x"]}
    '''))
    out = tmp_path / "plain.h5"
    harness_to(str(kfile), 2, out)
    with h5py.File(out, "r") as f:
        assert "reduced over the ranks with sum" in f["result/x"].attrs["description"]
        assert "finalize()" in f["result/twice"].attrs["description"]
        assert "units" not in f["result/x"].attrs  # not known: not invented


def test_keep_false_needs_a_finalize(tmp_path):
    kfile = tmp_path / "nothing.py"
    kfile.write_text(textwrap.dedent('''
        from hpcbatch.kernels.api import Output
        PARAMS = {}
        OUTPUTS = {"x": Output("sum", keep=False)}
        def run(comm):
            return {"x": 1.0}
    '''))
    with pytest.raises(api.KernelDefinitionError, match="keep=False"):
        api.load_kernel(str(kfile))


BIG_KERNEL = textwrap.dedent('''
    import numpy as np
    from hpcbatch.kernels.api import Output, Param

    PARAMS = {"n": Param(int, 600_000, "values per rank")}
    OUTPUTS = {
        "blob": Output("sum", per_rank=True, description="rank r's values, all r",
                       units="K"),
        "ids": Output("max", per_rank=True, description="rank r's ids, all r"),
    }

    def run(comm, n):
        r = comm.rank
        return {"blob": np.full(n, float(r)), "ids": np.full(2 * n, r, dtype=np.int32)}
''')


@pytest.fixture
def big_kernel(tmp_path):
    kfile = tmp_path / "big.py"
    kfile.write_text(BIG_KERNEL)
    return str(kfile)


def test_a_missing_part_reads_nan_and_results_show_names_it(harness_to, big_kernel, tmp_path,
                                                            home):
    out = tmp_path / "big.h5"
    n = 600_000
    harness_to(big_kernel, 2, out)
    with h5py.File(out, "r") as f:
        run_id = f.attrs["run_id"]
        blob, ids = f["ranks/blob"], f["ranks/ids"]
        assert blob.is_virtual and blob.shape == (2 * n,)
        assert blob.attrs["description"] == "rank r's values, all r"
        assert blob.attrs["units"] == "K"
        assert list(blob.attrs["part_files"]) == [f"big.{run_id}.rank{r}.h5" for r in (0, 1)]
        assert blob[n - 1] == 0.0 and blob[n] == 1.0 and ids[2 * n] == 1
    assert missing_parts(out) == []
    part = tmp_path / f"big.{run_id}.rank1.h5"
    assert part.exists() and (tmp_path / f"big.{run_id}.rank0.h5").exists()
    part.unlink()

    with h5py.File(out, "r") as f:
        blob = f["ranks/blob"][()]
        assert (blob[:n] == 0.0).all() and np.isnan(blob[n:]).all()  # not silent zeros
        ids = f["ranks/ids"][()]
        sentinel = np.iinfo(np.int32).min
        assert (ids[:2 * n] == 0).all() and (ids[2 * n:] == sentinel).all()
        assert f["ranks/ids"].attrs["missing_value"] == sentinel
        assert np.isnan(f["ranks/blob"].attrs["missing_value"])

    gone = missing_parts(out)
    assert [(m.dataset, m.rank, m.file, m.rows) for m in gone] == [
        ("/ranks/blob", 1, part.name, (n, 2 * n)), ("/ranks/ids", 1, part.name, (2 * n, 4 * n))]
    with pytest.raises(FileNotFoundError, match=part.name):
        read_result(out).per_rank("blob")
    assert np.isnan(read_result(out).per_rank("blob", allow_missing=True)[1]).all()

    shown = run_cli(home, "results", "show", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "MISSING PARTS (2)" in shown.stdout
    assert f"/ranks/blob: rank 1's part {part.name} is missing" in shown.stdout
    assert "/ranks/blob  float64 [1200000]" in shown.stdout
    assert "PARTS MISSING" in shown.stdout


def test_another_runs_parts_are_never_picked_up(harness_to, big_kernel, tmp_path):
    out = tmp_path / "big.h5"
    n = 600_000
    harness_to(big_kernel, 2, out)
    first = read_result(out).attrs["run_id"]
    keep = tmp_path / "kept"
    keep.mkdir()
    shutil.copy(tmp_path / f"big.{first}.rank1.h5", keep)

    harness_to(big_kernel, 2, out, {"n": n})  # the same output name, again
    second = read_result(out).attrs["run_id"]
    assert second != first
    # the replaced result's parts went with it; only the new run's parts are left
    assert sorted(p.name for p in tmp_path.glob("big.*.rank*.h5")) == [
        f"big.{second}.rank0.h5", f"big.{second}.rank1.h5"]

    # the first run's part back beside the file, the second's gone: still NaN, named
    shutil.copy(keep / f"big.{first}.rank1.h5", tmp_path)
    (tmp_path / f"big.{second}.rank1.h5").unlink()
    with h5py.File(out, "r") as f:
        assert np.isnan(f["ranks/blob"][n:]).all()
    assert {m.file for m in missing_parts(out)} == {f"big.{second}.rank1.h5"}


@pytest.mark.parametrize("dtype,fill", [
    ("float32", "nan"), ("complex128", "nan"), ("int16", np.iinfo(np.int16).min),
    ("uint8", np.iinfo(np.uint8).max)])
def test_missing_parts_read_as_the_documented_fill_value(tmp_path, dtype, fill):
    out = tmp_path / "r.h5"
    parts = []
    for rank in range(3):
        arr = np.full((rank + 1, 2), rank + 1, dtype=dtype)
        results.write_rank_part(out, rank, {"v": arr}, run_id="abc")
        parts.append((arr.shape, arr.dtype.str))
    results.write_result(out, reduced={"x": 1}, reduces={"x": "sum"}, attrs={"ranks": 3},
                         timings={}, rank_files={"v": parts}, run_id="abc")
    results.rank_part_path(out, 1, "abc").unlink()
    with h5py.File(out, "r") as f:
        v = f["ranks/v"][()]
    assert v.shape == (6, 2) and v.dtype == np.dtype(dtype)
    assert (v[0] == 1).all() and (v[3:] == 3).all()
    if fill == "nan":
        assert np.isnan(v[1:3]).all()
    else:
        assert (v[1:3] == fill).all()
    assert [(m.rank, m.rows) for m in missing_parts(out)] == [(1, (1, 3))]


def test_a_per_rank_file_of_bools_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot mark a missing part"):
        results.write_rank_part(tmp_path / "r.h5", 0, {"b": np.zeros(3, dtype=bool)})
    assert not list(tmp_path.iterdir())


def test_a_file_of_the_first_format_still_reads(tmp_path, home):
    """What write_result wrote before: JSON strings in root attributes, a VDS with a 0
    fill value over <stem>.rank<r>.h5."""
    out = tmp_path / "old.h5"
    with h5py.File(tmp_path / "old.rank0.h5", "w") as f:
        f["v"] = np.arange(4.0)
    with h5py.File(out, "w") as f:
        f.attrs["kernel"] = "pi"
        f.attrs["params"] = json.dumps({"samples": 10, "label": "[x]"})
        f.attrs["ranks"] = 2
        f.attrs["hosts"] = json.dumps(["n1", "n2"])
        f.attrs["hostnames"] = json.dumps(["h1", "h2"])
        f.attrs["timings"] = json.dumps({"launch": 0.5, "compute": 1.5})
        f.attrs["timing_launch_s"] = 0.5
        f.attrs["start_utc"] = "2024-01-01T00:00:00.000+00:00"
        f["result/pi"] = 3.0
        f["result/pi"].attrs["reduce"] = "finalize"
        layout = h5py.VirtualLayout(shape=(8,), dtype="f8")
        layout[0:4] = h5py.VirtualSource("old.rank0.h5", "v", shape=(4,))
        layout[4:8] = h5py.VirtualSource("old.rank1.h5", "v", shape=(4,))
        ds = f.create_group("ranks").create_virtual_dataset("v", layout, fillvalue=0)
        ds.attrs["offsets"] = np.array([0, 4, 8])
        ds.attrs["files"] = json.dumps(["old.rank0.h5", "old.rank1.h5"])
    res = read_result(out)
    assert res.params == {"samples": 10, "label": "[x]"}
    assert res.attrs["node_ids"] == ["n1", "n2"] and res.attrs["hostnames"] == ["h1", "h2"]
    assert res.timings == {"launch": 0.5, "compute": 1.5}
    assert float(res.reduced["pi"]) == 3.0
    assert [(m.rank, m.file) for m in missing_parts(out)] == [(1, "old.rank1.h5")]
    text = describe(out)
    assert "samples=10" in text and "nodes     n1, n2" in text and "old.rank1.h5" in text
    shown = run_cli(home, "results", "show", str(out))
    assert shown.returncode == 0 and "MISSING PARTS (1)" in shown.stdout

    # a new result written over it takes its parts away with it
    results.write_result(out, reduced={"x": 1}, reduces={}, attrs={}, timings={})
    assert not (tmp_path / "old.rank0.h5").exists()


def test_a_string_param_that_looks_like_json_stays_a_string(tmp_path):
    out = tmp_path / "s.h5"
    results.write_result(out, reduced={"x": 1}, reduces={"x": "sum"},
                         attrs={"params": {"spec": "[1, 2]", "on": True, "none": None}},
                         timings={"compute": 1.0})
    res = read_result(out)
    assert res.params == {"spec": "[1, 2]", "on": True, "none": None}
    assert res.timings == {"compute": 1.0}


def test_a_run_that_fails_writing_leaves_no_part_files(harness_proc, tmp_path):
    kfile = tmp_path / "ragged.py"
    kfile.write_text(textwrap.dedent('''
        import numpy as np
        from hpcbatch.kernels.api import Output
        PARAMS = {}
        OUTPUTS = {"v": Output(lambda a, b: a, per_rank=True)}
        def run(comm):  # 4.8 MB a rank, trailing shapes that cannot be joined
            return {"v": np.zeros((300_000 // (comm.rank + 1), 2 * (comm.rank + 1)))}
    '''))
    out = tmp_path / "ragged.h5"
    r = harness_proc(str(kfile), 2, out, check=False)
    assert r.returncode != 0 and "different trailing shapes" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ragged.py"]
