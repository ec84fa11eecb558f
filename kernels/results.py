"""HDF5 result files: reduced datasets, per-rank parts, provenance.

Everything is a native HDF5 attribute or group, so ``h5dump -A``, h5py or any HDF5
tool reads it without parsing JSON. Layout (format ``hpcbatch-result/2``)::

    /                      attributes: format, kernel, description (the kernel's),
                           run_id (this run's token, also in the part-file names),
                           ranks, node_ids (str[ranks]: the hpcbatch node each rank ran
                           on, index = rank; its host name outside hpcbatch), hostnames
                           (str[ranks]: the host name each rank saw,
                           socket.gethostname()), mpi_library, mpi4py_version,
                           numpy_version, h5py_version, hpcbatch_version, start_utc,
                           end_utc (ISO 8601 UTC), nodes (how many distinct node_ids);
                           for a Python function's run also function (its qualified
                           name), function_sha256 (of its pickled bytes),
                           function_python, cloudpickle_version
    /params                one attribute per kernel parameter, in its own type (int64,
                           float64, str, bool); f["params"].attrs["samples"] (a
                           function's params that are not scalars: a short description)
    /timings               one attribute per phase (launch, compute, reduce, write), in
                           seconds (the group's attribute units = "s")
    /result/<name>         the final outputs; attributes reduce (the op over ranks, or
                           "finalize" for outputs finalize() derived), description, and
                           units where the kernel knows them
    /ranks/<r>/<name>      per-rank outputs a kernel asks to keep (small ones)
    /ranks/<name>          a virtual dataset over <stem>.<run_id>.rank<r>.h5 files (one
                           per rank, written by that rank) for large per-rank outputs, so
                           large data never funnels through rank 0; rank r's part is rows
                           [offsets[r], offsets[r+1]) (attributes offsets, part_files)

A part file that is missing reads as the virtual dataset's fill value, never as silent
zeros: NaN for floats (and complex), the type's most negative value for signed integers
and its largest for unsigned ones (the dataset's ``missing_value`` attribute holds it);
other types (bool, strings) cannot hold such a marker and are refused for per-rank files.
:func:`missing_parts` (and ``hpcbatch results show``) names the parts that are missing,
and :meth:`ResultFile.per_rank` refuses to return them.

Part-file names carry the run's ``run_id``, so a result file never picks up the parts of
another run written to the same name; writing a result over an older one removes the
parts the older one named.

Datasets above 1 MiB are chunked (about 1 MiB per chunk); ``compress=True`` adds gzip
with the shuffle filter. The file is written as ``<name>.tmp`` and renamed into place,
so a reader never sees a half-written result.

h5py is imported where a file is opened, not with this module: ranks that write no
file never pay its import (~0.1 s).

Per-rank part files sit next to the result file and are found through a relative
path, so they move together; across nodes they need a shared filesystem.

:func:`read_result` also reads files of the first format (params, hosts, hostnames and
timings as JSON strings in root attributes).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import h5py

CHUNK_ABOVE = 1 << 20
CHUNK_TARGET = 1 << 20
PER_RANK_FILE_ABOVE = 8 << 20
FORMAT = "hpcbatch-result/2"
LEGACY_JSON_ATTRS = ("params", "hosts", "hostnames", "timings")  # format 1


def utc(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC).isoformat(
        timespec="milliseconds")


def new_run_id() -> str:
    """A token naming one run's files (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def rank_part_path(path: str | Path, rank: int, run_id: str | None = None) -> Path:
    """``<stem>.<run_id>.rank<r>.h5`` next to the result file (``<stem>.rank<r>.h5``
    without a run id, as the first format named them)."""
    path = Path(path)
    tag = f".{run_id}" if run_id else ""
    return path.with_name(f"{path.stem}{tag}.rank{rank}.h5")


def missing_value(dtype: np.dtype) -> Any:
    """What a virtual dataset of ``dtype`` reads where its part file is missing: NaN for
    floats and complex, the most negative value for signed integers, the largest for
    unsigned ones. Other types have no such marker: ValueError."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        return dtype.type(np.nan)
    if dtype.kind == "i":
        return dtype.type(np.iinfo(dtype).min)
    if dtype.kind == "u":
        return dtype.type(np.iinfo(dtype).max)
    raise ValueError(f"dtype {dtype} cannot mark a missing part (only floats, complex and "
                     "integers can); return it as an integer or float array")


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


def _native(value: Any) -> Any:
    """A value as an HDF5 attribute holds it natively: str, numbers, bools, arrays of
    them (a list of strings becomes a variable-length string array); None is an empty
    attribute (h5dump: NULL)."""
    import h5py
    if value is None:
        return h5py.Empty("f8")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        if not value:
            return np.array([], dtype=h5py.string_dtype())
        arr = np.asarray(value)
        if arr.dtype.kind in "biufc":
            return arr
        return np.array([str(v) for v in value], dtype=h5py.string_dtype())
    if isinstance(value, dict):
        raise TypeError("a dict is written as a group of attributes, not one attribute")
    return value


def _set_attr(obj: h5py.HLObject, key: str, value: Any) -> None:
    obj.attrs[key] = _native(value)


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    """A group that keeps its attributes in the order they were written."""
    return parent[name] if name in parent else parent.create_group(name, track_order=True)


def _attr_group(parent: h5py.Group, name: str, values: dict[str, Any]) -> h5py.Group:
    group = _group(parent, name)
    for key, value in values.items():
        if isinstance(value, dict):
            _attr_group(group, str(key), value)
        else:
            _set_attr(group, str(key), value)
    return group


def write_rank_part(path: str | Path, rank: int, values: dict[str, Any] | str,
                    value: Any = None, *, compress: bool = False,
                    run_id: str | None = None) -> Path:
    """Write large per-rank outputs of ``rank`` to its own file (called by that rank).

    ``values`` is ``{name: array}``; the older form ``(path, rank, name, value)`` adds one
    dataset to the file."""
    import h5py
    part = rank_part_path(path, rank, run_id)
    if isinstance(values, str):
        mode, values = "a", {values: value}
    else:
        mode = "w"
    for arr in values.values():
        missing_value(np.asarray(arr).dtype)  # refused before anything is written
    with h5py.File(part, mode) as f:
        f.attrs["format"] = FORMAT
        f.attrs["rank"] = rank
        f.attrs["result_file"] = Path(path).name
        if run_id:
            f.attrs["run_id"] = run_id
        for name, arr in values.items():
            if name in f:
                del f[name]
            _dataset(f, name, arr, compress)
    return part


def _virtual(group: h5py.Group, name: str, path: Path, parts: list[tuple[tuple, str]],
             run_id: str | None) -> h5py.Dataset:
    import h5py
    shapes = [tuple(shape) or (1,) for shape, _ in parts]
    dtype = np.result_type(*[np.dtype(d) for _, d in parts])
    fill = missing_value(dtype)
    tails = {s[1:] for s in shapes if int(np.prod(s))}
    if len(tails) > 1:
        raise ValueError(f"per-rank output {name!r}: ranks returned different trailing "
                         f"shapes {shapes}; a virtual dataset needs equal ones")
    tail = tails.pop() if tails else shapes[0][1:]
    rows = [s[0] if int(np.prod(s)) else 0 for s in shapes]
    layout = h5py.VirtualLayout(shape=(sum(rows), *tail), dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    files = [rank_part_path(path, r, run_id).name for r in range(len(parts))]
    for r, shape in enumerate(shapes):
        if rows[r]:
            src = h5py.VirtualSource(files[r], name, shape=shape)
            layout[int(offsets[r]):int(offsets[r + 1])] = src
    ds = group.create_virtual_dataset(name, layout, fillvalue=fill)
    ds.attrs["offsets"] = offsets
    ds.attrs["part_files"] = np.array(files, dtype=h5py.string_dtype())
    ds.attrs["missing_value"] = fill
    return ds


def _describe(ds: h5py.Dataset, name: str, descriptions: dict[str, str] | None,
              units: dict[str, str] | None) -> None:
    if descriptions and descriptions.get(name):
        ds.attrs["description"] = descriptions[name]
    if units and units.get(name):
        ds.attrs["units"] = units[name]


def _part_names(f: h5py.File) -> set[str]:
    """The part-file names a result file's virtual datasets refer to (either format)."""
    import h5py
    names: set[str] = set()
    ranks = f.get("ranks")
    if not isinstance(ranks, h5py.Group):
        return names
    for ds in ranks.values():
        if not (isinstance(ds, h5py.Dataset) and ds.is_virtual):
            continue
        for vs in ds.virtual_sources():
            names.add(vs.file_name)
    return {n for n in names if n and "/" not in n and n not in (".", "..")}


def _old_parts(path: Path) -> set[str]:
    """The part files of the result file now at ``path`` (replaced by a new one)."""
    import h5py
    if not path.is_file():
        return set()
    try:
        with h5py.File(path, "r") as f:
            return _part_names(f)
    except (OSError, ValueError):  # not ours, or not HDF5: leave whatever is beside it
        return set()


def write_result(path: str | Path, *, reduced: dict[str, Any], reduces: dict[str, str],
                 attrs: dict[str, Any], timings: dict[str, float],
                 per_rank: dict[str, list[Any]] | None = None,
                 rank_files: dict[str, list[tuple[tuple, str]]] | None = None,
                 compress: bool = False, descriptions: dict[str, str] | None = None,
                 units: dict[str, str] | None = None, run_id: str | None = None,
                 time_write: bool = False, write_started: float | None = None) -> Path:
    """Write the result file (on rank 0).

    ``reduced`` are the final outputs, ``reduces[name]`` their reduce op (absent:
    ``finalize``); ``attrs`` the provenance: a dict value (``params``) becomes a group
    of attributes, anything else a root attribute. ``per_rank`` holds small per-rank
    values (one per rank, in rank order); ``rank_files[name]`` lists ``(shape, dtype)``
    per rank of parts already written with :func:`write_rank_part` under ``run_id``.
    ``descriptions`` and ``units`` are attributes of the datasets of those names.
    With ``time_write`` the time spent from ``write_started`` (default: now) until the
    data is on its way to disk is added to ``timings`` as ``write`` (the dict is updated)
    before the file is renamed into place, together with ``end_utc``.
    """
    import h5py
    t0 = time.time() if write_started is None else write_started
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format"] = FORMAT
            if run_id:
                f.attrs["run_id"] = run_id
            for key, value in attrs.items():
                if isinstance(value, dict):
                    _attr_group(f, key, value)
                else:
                    _set_attr(f, key, value)
            res = f.create_group("result", track_order=True)
            for name, value in reduced.items():
                ds = _dataset(res, name, value, compress)
                ds.attrs["reduce"] = reduces.get(name, "finalize")
                _describe(ds, name, descriptions, units)
            if per_rank or rank_files:
                ranks = f.create_group("ranks")
                for name, values in (per_rank or {}).items():
                    for r, value in enumerate(values):
                        ds = _dataset(ranks.require_group(str(r)), name, value, compress)
                        _describe(ds, name, descriptions, units)
                for name, parts in (rank_files or {}).items():
                    ds = _virtual(ranks, name, path, parts, run_id)
                    _describe(ds, name, descriptions, units)
            _write_timings(f, timings)
        if time_write:
            timings["write"] = time.time() - t0
        with h5py.File(tmp, "r+") as f:
            _write_timings(f, timings)
            if time_write or "end_utc" not in f.attrs:
                f.attrs["end_utc"] = utc()
            ours = _part_names(f)
        stale = _old_parts(path) - ours
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for name in stale:  # the replaced result's parts: nothing refers to them any more
        path.with_name(name).unlink(missing_ok=True)
    return path


def _write_timings(f: h5py.File, timings: dict[str, float]) -> None:
    group = _group(f, "timings")
    group.attrs["units"] = "s"
    for phase, seconds in timings.items():
        group.attrs[phase] = float(seconds)


@dataclasses.dataclass
class MissingPart:
    dataset: str  # /ranks/<name>
    rank: int
    file: str  # the part file's name, next to the result file
    rows: tuple[int, int]  # [start, stop) of the virtual dataset it would fill

    def __str__(self) -> str:
        return (f"{self.dataset}: rank {self.rank}'s part {self.file} is missing (rows "
                f"{self.rows[0]}..{self.rows[1] - 1} read as the fill value)")


def _missing(path: Path, f: h5py.File) -> list[MissingPart]:
    import h5py
    out: list[MissingPart] = []
    ranks = f.get("ranks")
    if not isinstance(ranks, h5py.Group):
        return out
    for name, ds in ranks.items():
        if not (isinstance(ds, h5py.Dataset) and ds.is_virtual):
            continue
        off = [int(x) for x in ds.attrs.get("offsets", [])]
        for vs in ds.virtual_sources():
            start = vs.vspace.get_select_bounds()[0][0]
            rank = next((r for r in range(len(off) - 1) if off[r] == start
                         and off[r + 1] > off[r]), -1)
            stop = off[rank + 1] if rank >= 0 else start
            part = path.with_name(vs.file_name)
            ok = part.is_file()
            if ok:
                try:
                    with h5py.File(part, "r") as pf:
                        ok = vs.dset_name.lstrip("/") in pf
                except OSError:
                    ok = False
            if not ok:
                out.append(MissingPart(f"/ranks/{name}", rank, vs.file_name,
                                       (start, stop)))
    return out


def missing_parts(path: str | Path) -> list[MissingPart]:
    """The per-rank part files a result file's virtual datasets need and cannot find
    (or that lack their dataset)."""
    import h5py
    path = Path(path)
    with h5py.File(path, "r") as f:
        return _missing(path, f)


@dataclasses.dataclass
class ResultFile:
    path: Path
    attrs: dict[str, Any]
    reduced: dict[str, np.ndarray]
    timings: dict[str, float]
    reduces: dict[str, str] = dataclasses.field(default_factory=dict)
    descriptions: dict[str, str] = dataclasses.field(default_factory=dict)
    units: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def kernel(self) -> str | None:
        return self.attrs.get("kernel")

    @property
    def ranks(self) -> int | None:
        return self.attrs.get("ranks")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.attrs.get("params") or {})

    def missing_parts(self) -> list[MissingPart]:
        return missing_parts(self.path)

    def per_rank(self, name: str, *, allow_missing: bool = False) -> list[np.ndarray]:
        """The values every rank kept for ``name`` (per_rank=True outputs), in rank order.
        A part file that is missing raises FileNotFoundError naming it, unless
        ``allow_missing`` (then its rows hold the dataset's ``missing_value``)."""
        import h5py
        with h5py.File(self.path, "r") as f:
            if "ranks" not in f:
                raise KeyError(f"{self.path} holds no per-rank outputs")
            ranks = f["ranks"]
            if name in ranks and isinstance(ranks[name], h5py.Dataset):
                ds = ranks[name]
                if not allow_missing:
                    gone = [m for m in _missing(self.path, f) if m.dataset == f"/ranks/{name}"]
                    if gone:
                        raise FileNotFoundError("; ".join(map(str, gone)))
                off = ds.attrs["offsets"]
                data = ds[()]
                return [data[off[r]:off[r + 1]] for r in range(len(off) - 1)]
            n = int(f.attrs.get("ranks", 0))
            if not n or name not in ranks.get("0", {}):
                raise KeyError(f"{self.path} holds no per-rank output {name!r}")
            return [ranks[str(r)][name][()] for r in range(n)]


def _value(value: Any) -> Any:
    """An attribute as plain Python: str, int, float, bool, lists; empty -> None."""
    import h5py
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_value(v) for v in value.tolist()] if value.dtype.kind in "OSU" \
            else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _legacy(value: Any) -> Any:
    """A format-1 attribute: JSON in a string for dicts, lists and None."""
    value = _value(value)
    if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _attrs_of(group: h5py.Group) -> dict[str, Any]:
    import h5py
    out = {k: _value(v) for k, v in group.attrs.items()}
    for k, sub in group.items():
        if isinstance(sub, h5py.Group):
            out[k] = _attrs_of(sub)
    return out


def read_result(path: str | Path) -> ResultFile:
    """Provenance attributes, every reduced dataset and the timings of a result file.

    ``attrs`` is plain Python (str, int, float, bool, lists, dicts): the root attributes,
    ``params`` (a dict) and ``timings`` (a dict of seconds). Files of the first format
    (JSON strings) read the same; there ``hosts`` becomes ``node_ids``."""
    import h5py
    path = Path(path)
    with h5py.File(path, "r") as f:
        legacy = "format" not in f.attrs
        if legacy:
            attrs = {k: (_legacy(v) if k in LEGACY_JSON_ATTRS else _value(v))
                     for k, v in f.attrs.items() if not k.startswith("timing_")}
            if "hosts" in attrs:
                attrs.setdefault("node_ids", attrs.pop("hosts"))
        else:
            attrs = {k: _value(v) for k, v in f.attrs.items()}
            params = f.get("params")
            attrs["params"] = _attrs_of(params) if isinstance(params, h5py.Group) else {}
            t = f.get("timings")
            attrs["timings"] = ({k: float(v) for k, v in t.attrs.items()
                                 if isinstance(v, float | np.floating)}
                                if isinstance(t, h5py.Group) else {})
        group = f.get("result")
        reduced, reduces, descriptions, units = {}, {}, {}, {}
        if group is not None:
            for k, ds in group.items():
                reduced[k] = ds[()]
                reduces[k] = _value(ds.attrs.get("reduce", ""))
                if "description" in ds.attrs:
                    descriptions[k] = _value(ds.attrs["description"])
                if "units" in ds.attrs:
                    units[k] = _value(ds.attrs["units"])
    timings = attrs.get("timings")
    return ResultFile(path, attrs, reduced, timings if isinstance(timings, dict) else {},
                      reduces, descriptions, units)


def _fmt_value(obj: h5py.Dataset) -> str:
    if obj.size > 8 or obj.dtype.kind not in "biufc":
        return ""
    return " = " + np.array2string(np.asarray(obj[()]), precision=8, separator=", ")


def _fmt_param(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe(path: str | Path) -> str:
    """A human summary (for ``hpcbatch results show``): provenance, timings, datasets,
    and the per-rank part files that are missing."""
    import h5py
    res = read_result(path)
    a = res.attrs
    lines = [f"{res.path}",
             f"  kernel    {a.get('kernel')}  ranks {a.get('ranks')}"
             + (f"  run {a['run_id']}" if a.get("run_id") else ""),
             *([f"  function  {a['function']}  sha256 {a.get('function_sha256')}  python "
                f"{a.get('function_python')}"] if a.get("function") else []),
             "  params    " + (", ".join(f"{k}={_fmt_param(v)}"
                                         for k, v in res.params.items()) or "(none)")]
    node_ids = a.get("node_ids") or []
    hostnames = a.get("hostnames") or []
    for label, names in (("nodes", node_ids), ("hostnames", hostnames)):
        counts: dict[str, int] = {}
        for h in names:
            counts[str(h)] = counts.get(str(h), 0) + 1
        if counts:
            lines.append(f"  {label:<9s} " + ", ".join(f"{h} x{n}" if n > 1 else h
                                                      for h, n in counts.items()))
    if a.get("slurm_job_id"):
        lines.append(f"  slurm     job {a['slurm_job_id']} on "
                     + ", ".join(dict.fromkeys(str(n) for n in a.get("slurm_nodes") or [])))
    lines += [f"  mpi       {a.get('mpi_library')}",
              f"  versions  hpcbatch {a.get('hpcbatch_version')}, mpi4py "
              f"{a.get('mpi4py_version')}, numpy {a.get('numpy_version')}, h5py "
              f"{a.get('h5py_version')}",
              f"  time      {a.get('start_utc')} .. {a.get('end_utc')}",
              "  timings   " + ", ".join(f"{k} {float(v):.4f} s"
                                         for k, v in res.timings.items()),
              "  datasets"]
    with h5py.File(res.path, "r") as f:
        missing = _missing(res.path, f)
        gone = {m.dataset for m in missing}

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            notes = []
            if "reduce" in obj.attrs:
                notes.append(f"reduce={_value(obj.attrs['reduce'])}")
            if "units" in obj.attrs:
                notes.append(f"units={_value(obj.attrs['units'])}")
            if obj.is_virtual:
                notes.append(f"virtual, over {len(obj.virtual_sources())} per-rank files")
            elif obj.compression:
                notes.append(obj.compression)
            note = f" ({', '.join(notes)})" if notes else ""
            if f"/{name}" in gone:
                value = "  PARTS MISSING"
            else:
                try:
                    value = _fmt_value(obj)
                except OSError:
                    value = " (unreadable)"
            lines.append(f"    /{name}  {obj.dtype} {list(obj.shape)}{note}{value}")
            if "description" in obj.attrs:
                lines.append(f"        {_value(obj.attrs['description'])}")
        f.visititems(visit)
    if missing:
        lines.append(f"  MISSING PARTS ({len(missing)}): they read as the fill value "
                     "(NaN for floats), not as data")
        lines += [f"    {m}" for m in missing]
    return "\n".join(lines)
