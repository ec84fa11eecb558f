"""HDF5 result files: reduced datasets, per-rank parts, provenance.

Layout::

    /                      attributes: kernel, params (JSON), ranks, hosts (JSON list,
                           one name per rank), hostnames (JSON, socket.gethostname() per
                           rank), mpi_library, mpi4py_version, numpy_version,
                           h5py_version, hpcbatch_version, start_utc, end_utc,
                           timings (JSON {phase: seconds}) and timing_<phase>_s
    /result/<name>         the reduced outputs (attribute reduce=<op>, description)
    /ranks/<r>/<name>      per-rank outputs a kernel asks to keep (small ones)
    /ranks/<name>          a virtual dataset over <stem>.rank<r>.h5 files (one per rank,
                           written by that rank) for large per-rank outputs, so large
                           data never funnels through rank 0; rank r's part is rows
                           [offsets[r], offsets[r+1]) (attribute offsets)

Datasets above 1 MiB are chunked (about 1 MiB per chunk); ``compress=True`` adds gzip
with the shuffle filter. The file is written as ``<name>.tmp`` and renamed into place,
so a reader never sees a half-written result.

h5py is imported where a file is opened, not with this module: ranks that write no
file never pay its import (~0.1 s).

Per-rank part files sit next to the result file and are found through a relative
path, so the three move together; across nodes they need a shared filesystem.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import h5py

CHUNK_ABOVE = 1 << 20
CHUNK_TARGET = 1 << 20
PER_RANK_FILE_ABOVE = 8 << 20


def utc(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC).isoformat(
        timespec="milliseconds")


def rank_part_path(path: str | Path, rank: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}.h5")


def _chunks(arr: np.ndarray) -> tuple[int, ...] | bool:
    """About CHUNK_TARGET bytes per chunk, whole trailing rows where they fit."""
    row = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    if arr.ndim == 1 or 0 < row <= CHUNK_TARGET:
        rows = max(1, min(arr.shape[0], CHUNK_TARGET // max(row, 1)))
        return (rows, *arr.shape[1:])
    return True  # rows larger than the target: let h5py split them


def _dataset(group: h5py.Group, name: str, value: Any, compress: bool) -> h5py.Dataset:
    arr = np.asarray(value)
    kw: dict[str, Any] = {}
    if arr.ndim and arr.nbytes > CHUNK_ABOVE:
        kw["chunks"] = _chunks(arr)
        if compress:
            kw.update(compression="gzip", compression_opts=4, shuffle=True)
    return group.create_dataset(name, data=arr, **kw)


def _set_attr(obj: h5py.HLObject, key: str, value: Any) -> None:
    if isinstance(value, dict | list | tuple):
        value = json.dumps(value, default=str)
    elif value is None:
        value = "null"
    obj.attrs[key] = value


def write_rank_part(path: str | Path, rank: int, values: dict[str, Any] | str,
                    value: Any = None, *, compress: bool = False) -> Path:
    """Write large per-rank outputs of ``rank`` to its own file (called by that rank).

    ``values`` is ``{name: array}``; the older form ``(path, rank, name, value)`` adds one
    dataset to the file."""
    import h5py
    part = rank_part_path(path, rank)
    if isinstance(values, str):
        mode, values = "a", {values: value}
    else:
        mode = "w"
    with h5py.File(part, mode) as f:
        for name, arr in values.items():
            if name in f:
                del f[name]
            _dataset(f, name, arr, compress)
    return part


def _virtual(group: h5py.Group, name: str, path: Path,
             parts: list[tuple[tuple, str]]) -> None:
    import h5py
    shapes = [tuple(shape) or (1,) for shape, _ in parts]
    dtype = np.result_type(*[np.dtype(d) for _, d in parts])
    tails = {s[1:] for s in shapes if int(np.prod(s))}
    if len(tails) > 1:
        raise ValueError(f"per-rank output {name!r}: ranks returned different trailing "
                         f"shapes {shapes}; a virtual dataset needs equal ones")
    tail = tails.pop() if tails else shapes[0][1:]
    rows = [s[0] if int(np.prod(s)) else 0 for s in shapes]
    layout = h5py.VirtualLayout(shape=(sum(rows), *tail), dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    for r, shape in enumerate(shapes):
        if rows[r]:
            src = h5py.VirtualSource(rank_part_path(path, r).name, name, shape=shape)
            layout[int(offsets[r]):int(offsets[r + 1])] = src
    ds = group.create_virtual_dataset(name, layout, fillvalue=0)
    ds.attrs["offsets"] = offsets
    ds.attrs["files"] = json.dumps([rank_part_path(path, r).name for r in range(len(parts))])


def write_result(path: str | Path, *, reduced: dict[str, Any], reduces: dict[str, str],
                 attrs: dict[str, Any], timings: dict[str, float],
                 per_rank: dict[str, list[Any]] | None = None,
                 rank_files: dict[str, list[tuple[tuple, str]]] | None = None,
                 compress: bool = False, descriptions: dict[str, str] | None = None,
                 time_write: bool = False, write_started: float | None = None) -> Path:
    """Write the result file (on rank 0).

    ``reduced`` are the final outputs, ``reduces[name]`` their reduce op; ``per_rank``
    holds small per-rank values (one per rank, in rank order); ``rank_files[name]`` lists
    ``(shape, dtype)`` per rank of parts already written with :func:`write_rank_part`.
    With ``time_write`` the time spent from ``write_started`` (default: now) until the
    data is on its way to disk is added to ``timings`` as ``write`` (the dict is updated)
    before the file is renamed into place, together with ``end_utc``.
    """
    import h5py
    t0 = time.time() if write_started is None else write_started
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                _set_attr(f, key, value)
            res = f.create_group("result")
            for name, value in reduced.items():
                ds = _dataset(res, name, value, compress)
                ds.attrs["reduce"] = reduces.get(name, "finalize")
                if descriptions and descriptions.get(name):
                    ds.attrs["description"] = descriptions[name]
            if per_rank or rank_files:
                ranks = f.create_group("ranks")
                for name, values in (per_rank or {}).items():
                    for r, value in enumerate(values):
                        _dataset(ranks.require_group(str(r)), name, value, compress)
                for name, parts in (rank_files or {}).items():
                    _virtual(ranks, name, path, parts)
            _write_timings(f, timings)
        if time_write:
            timings["write"] = time.time() - t0
        with h5py.File(tmp, "r+") as f:
            _write_timings(f, timings)
            if time_write or "end_utc" not in f.attrs:
                f.attrs["end_utc"] = utc()
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_timings(f: h5py.File, timings: dict[str, float]) -> None:
    f.attrs["timings"] = json.dumps(timings)
    for phase, seconds in timings.items():
        f.attrs[f"timing_{phase}_s"] = float(seconds)


@dataclasses.dataclass
class ResultFile:
    path: Path
    attrs: dict[str, Any]
    reduced: dict[str, np.ndarray]
    timings: dict[str, float]
    reduces: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def kernel(self) -> str | None:
        return self.attrs.get("kernel")

    @property
    def ranks(self) -> int | None:
        return self.attrs.get("ranks")

    def per_rank(self, name: str) -> list[np.ndarray]:
        """The values every rank kept for ``name`` (per_rank=True outputs), in rank order."""
        import h5py
        with h5py.File(self.path, "r") as f:
            if "ranks" not in f:
                raise KeyError(f"{self.path} holds no per-rank outputs")
            ranks = f["ranks"]
            if name in ranks and isinstance(ranks[name], h5py.Dataset):
                ds = ranks[name]
                off = ds.attrs["offsets"]
                data = ds[()]
                return [data[off[r]:off[r + 1]] for r in range(len(off) - 1)]
            n = int(f.attrs.get("ranks", 0))
            if not n or name not in ranks.get("0", {}):
                raise KeyError(f"{self.path} holds no per-rank output {name!r}")
            return [ranks[str(r)][name][()] for r in range(n)]


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_result(path: str | Path) -> ResultFile:
    """Provenance attributes, every reduced dataset and the timings of a result file."""
    import h5py
    path = Path(path)
    with h5py.File(path, "r") as f:
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        group = f.get("result")
        reduced, reduces = {}, {}
        if group is not None:
            for k, ds in group.items():
                reduced[k] = ds[()]
                reduces[k] = _attr(ds.attrs.get("reduce", ""))
    timings = attrs.get("timings")
    return ResultFile(path, attrs, reduced, timings if isinstance(timings, dict) else {},
                      reduces)


def _fmt_value(obj: h5py.Dataset) -> str:
    if obj.size > 8 or obj.dtype.kind not in "biufc":
        return ""
    return " = " + np.array2string(np.asarray(obj[()]), precision=8, separator=", ")


def describe(path: str | Path) -> str:
    """A human summary (for ``hpcbatch results show``): provenance, timings, datasets."""
    import h5py
    res = read_result(path)
    a = res.attrs
    hosts = a.get("hosts") or []
    counts: dict[str, int] = {}
    for h in hosts:
        counts[str(h)] = counts.get(str(h), 0) + 1
    lines = [f"{res.path}",
             f"  kernel    {a.get('kernel')}  ranks {a.get('ranks')}",
             f"  params    {json.dumps(a.get('params'))}",
             "  hosts     " + ", ".join(f"{h} x{n}" if n > 1 else h for h, n in counts.items()),
             f"  mpi       {a.get('mpi_library')}",
             f"  versions  hpcbatch {a.get('hpcbatch_version')}, mpi4py "
             f"{a.get('mpi4py_version')}, numpy {a.get('numpy_version')}, h5py "
             f"{a.get('h5py_version')}",
             f"  time      {a.get('start_utc')} .. {a.get('end_utc')}",
             "  timings   " + ", ".join(f"{k} {float(v):.4f} s" for k, v in res.timings.items()),
             "  datasets"]
    with h5py.File(res.path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            notes = []
            if "reduce" in obj.attrs:
                notes.append(f"reduce={_attr(obj.attrs['reduce'])}")
            if obj.is_virtual:
                notes.append("virtual, over per-rank files")
            elif obj.compression:
                notes.append(obj.compression)
            note = f" ({', '.join(notes)})" if notes else ""
            try:
                value = _fmt_value(obj)
            except OSError:  # a virtual dataset whose part files are missing
                value = " (part files missing)"
            lines.append(f"    /{name}  {obj.dtype} {list(obj.shape)}{note}{value}")
        f.visititems(visit)
    return "\n".join(lines)
