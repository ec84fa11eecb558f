"""HDF5 result files: reduced datasets, per-rank parts, provenance.

Layout::

    /                      attributes: kernel, params (JSON), ranks, hosts (JSON),
                           mpi_library, mpi4py/numpy/h5py/hpcbatch versions,
                           start_utc, end_utc, timings (JSON), timing_<phase>_s
    /result/<name>         the reduced outputs (attribute reduce=<op>)
    /ranks/<r>/<name>      per-rank outputs a kernel asks to keep (small ones)
    /ranks/<name>          a virtual dataset over <stem>.rank<r>.h5 files for large
                           per-rank outputs, so they never funnel through rank 0

Datasets above 1 MiB are chunked; ``compress=True`` adds gzip.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

CHUNK_ABOVE = 1 << 20
PER_RANK_FILE_ABOVE = 8 << 20


def _dataset(group: h5py.Group, name: str, value: Any, compress: bool) -> h5py.Dataset:
    arr = np.asarray(value)
    kw: dict[str, Any] = {}
    if arr.ndim and arr.nbytes > CHUNK_ABOVE:
        kw["chunks"] = True
        if compress:
            kw["compression"] = "gzip"
            kw["shuffle"] = True
    return group.create_dataset(name, data=arr, **kw)


def write_rank_part(path: Path, rank: int, name: str, value: Any) -> Path:
    """A large per-rank output, written by its own rank to its own file."""
    part = path.with_name(f"{path.stem}.rank{rank}.h5")
    with h5py.File(part, "a") as f:
        if name in f:
            del f[name]
        f.create_dataset(name, data=np.asarray(value))
    return part


def write_result(path: str | Path, *, reduced: dict[str, Any], reduces: dict[str, str],
                 attrs: dict[str, Any], timings: dict[str, float],
                 per_rank: dict[str, list[Any]] | None = None,
                 rank_files: dict[str, list[tuple[tuple, str]]] | None = None,
                 compress: bool = False) -> Path:
    """Write the result file (rank 0). ``rank_files[name]`` lists (shape, dtype) per
    rank of parts already written with :func:`write_rank_part`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
        f.attrs["timings"] = json.dumps(timings)
        for phase, seconds in timings.items():
            f.attrs[f"timing_{phase}_s"] = seconds
        res = f.create_group("result")
        for name, value in reduced.items():
            ds = _dataset(res, name, value, compress)
            ds.attrs["reduce"] = reduces.get(name, "")
        if per_rank or rank_files:
            ranks = f.create_group("ranks")
            for name, values in (per_rank or {}).items():
                for r, value in enumerate(values):
                    _dataset(ranks.require_group(str(r)), name, value, compress)
            for name, parts in (rank_files or {}).items():
                shapes = [tuple(shape) for shape, _ in parts]
                dtype = np.dtype(parts[0][1])
                rows = sum(s[0] if s else 1 for s in shapes)
                tail = shapes[0][1:] if shapes[0] else ()
                layout = h5py.VirtualLayout(shape=(rows, *tail), dtype=dtype)
                at = 0
                for r, shape in enumerate(shapes):
                    n = shape[0] if shape else 1
                    src = h5py.VirtualSource(f"{path.stem}.rank{r}.h5", name,
                                             shape=shape or (1,))
                    layout[at:at + n] = src
                    at += n
                ranks.create_virtual_dataset(name, layout)
    tmp.replace(path)  # readers never see a half-written file
    return path


@dataclasses.dataclass
class ResultFile:
    path: Path
    attrs: dict[str, Any]
    reduced: dict[str, np.ndarray]
    timings: dict[str, float]


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_result(path: str | Path) -> ResultFile:
    path = Path(path)
    with h5py.File(path, "r") as f:
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        reduced = {k: f["result"][k][()] for k in f.get("result", {})}
    return ResultFile(path, attrs, reduced, attrs.get("timings") or {})


def describe(path: str | Path) -> str:
    """A human summary: provenance, timings and every dataset."""
    res = read_result(path)
    a = res.attrs
    lines = [f"{res.path}", f"  kernel    {a.get('kernel')}  ranks {a.get('ranks')}",
             f"  params    {json.dumps(a.get('params'))}",
             f"  hosts     {', '.join(map(str, a.get('hosts') or []))}",
             f"  mpi       {a.get('mpi_library')}",
             f"  versions  hpcbatch {a.get('hpcbatch_version')}, mpi4py "
             f"{a.get('mpi4py_version')}, numpy {a.get('numpy_version')}, h5py "
             f"{a.get('h5py_version')}",
             f"  time      {a.get('start_utc')} .. {a.get('end_utc')}",
             "  timings   " + ", ".join(f"{k} {v:.4f} s" for k, v in res.timings.items()),
             "  datasets"]
    with h5py.File(res.path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                extra = ""
                if obj.size <= 8:
                    extra = " = " + np.array2string(obj[()], precision=8, separator=", ")
                virtual = " (virtual)" if obj.is_virtual else ""
                lines.append(f"    /{name}  {obj.dtype} {list(obj.shape)}{virtual}{extra}")
        f.visititems(visit)
    return "\n".join(lines)
