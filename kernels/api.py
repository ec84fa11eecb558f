"""The kernel API: what a kernel module declares, and the reduce the harness applies.

A kernel is a module (a built-in in ``hpcbatch.kernels``, any importable module, or a
``.py`` file) with:

``PARAMS: dict[str, Param]``
    ``Param(type, default, help="", min=None, max=None, choices=None)``; ``type`` is
    int, float, str or bool. Command-line values (``k=v``) are converted and checked
    by :func:`parse_params`; a bad one raises :class:`KernelParamError` (a ValueError)
    naming the parameter and the rule, and listing the kernel's parameters with their
    types and defaults. Ints accept ``1000``, ``1_000``, ``1e6`` and ``0x10``; bools
    accept true/false, yes/no, on/off, 1/0.
``OUTPUTS: dict[str, Output]``
    ``Output(reduce, per_rank=False, description="", units="", keep=True)``.
    ``description`` and ``units`` (a UDUNITS-style string such as ``"s"``, ``"GB/s"``,
    ``"1"`` for dimensionless; empty when unknown) become attributes of the dataset in
    the result file. ``keep=False``: the reduced value only feeds ``finalize()`` and is
    not stored (mandelbrot's gathered rows, from which ``finalize`` builds the image).
    ``reduce`` is one of

    * ``"sum"``, ``"prod"``, ``"min"``, ``"max"``: elementwise over ranks
      (``comm.Reduce``);
    * ``"mean"``: the sum divided by the number of ranks (ints become float64);
    * ``"concat"``: every rank's array in rank order, joined along axis 0
      (``comm.Gatherv``); lengths may differ, trailing dimensions may not; a scalar
      counts as one row;
    * ``"gather"``: every rank's value as one row, in rank order: shape
      ``(ranks, *shape)`` (``comm.Gather``; every rank the same shape);
    * a callable ``f(a, b) -> c``: associative, applied left to right in rank order
      (``f(f(r0, r1), r2) ...``) on rank 0, after a pickled ``comm.gather``.

    The built-in reduces move numpy buffers (no pickling of the data); all ranks must
    return the same shape (same trailing shape for concat); dtypes are promoted to a
    common one. Scalars are 0-d arrays. ``per_rank=True`` also keeps each rank's own
    value in the result file (``/ranks/<r>/<name>``, or one file per rank joined by a
    virtual dataset ``/ranks/<name>`` when the parts add up to more than 8 MiB).
``run(comm, **params) -> dict[str, np.ndarray | scalar]``
    runs on every rank; returns one value per declared output.
``finalize(reduced: dict, params: dict) -> dict`` (optional)
    runs on rank 0 after the reduce; what it returns is added to (or replaces) the
    reduced outputs, e.g. ``pi`` from the summed hit counts.
``DERIVED: dict[str, Derived]`` (optional)
    ``Derived(description, units="")`` for what ``finalize`` returns: the description
    and units of each derived output in the result file.
``reference(ranks: int, **params) -> dict`` (required for built-ins)
    a serial numpy reference of the final (reduced + finalized) result, for tests.
``DESCRIPTION: str`` (optional; else the module docstring's first line)

Functions: :func:`load_kernel`, :func:`list_kernels`, :func:`parse_params`,
:func:`reduce_outputs`. Errors: :class:`KernelNotFound`, :class:`KernelParamError`,
:class:`KernelDefinitionError` (all ValueError).

Example::

    from hpcbatch.kernels.api import Output, Param

    PARAMS = {"n": Param(int, 1000, "values per rank", min=1)}
    OUTPUTS = {"total": Output("sum"), "parts": Output("concat")}

    def run(comm, n):
        x = np.arange(n) + comm.rank * n
        return {"total": x.sum(), "parts": x}

    def reference(ranks, n):
        x = np.arange(ranks * n)
        return {"total": x.sum(), "parts": x}
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

BUILTIN_REDUCES = ("sum", "prod", "min", "max", "mean", "concat", "gather")
PARAM_TYPES = (int, float, str, bool)
_NOT_KERNELS = {"api", "harness", "results", "function", "__main__"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# one Reduce call moves at most this many elements (MPI counts are C ints)
_REDUCE_CHUNK = 1 << 28


class KernelNotFound(ValueError):
    """No kernel by that name, module or path."""


class KernelParamError(ValueError):
    """A parameter value that does not convert or breaks its rule."""


class KernelDefinitionError(ValueError):
    """The module is not a valid kernel (missing PARAMS/OUTPUTS/run, bad declarations)."""


# ---- declarations ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Param:
    type: type
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def convert(self, name: str, value: Any) -> Any:
        """``value`` (a string from the command line, or a Python value) -> checked value."""
        converted = self._convert(name, value)
        if self.min is not None and converted < self.min:
            raise KernelParamError(f"{name}={converted!r}: must be >= {self.min}")
        if self.max is not None and converted > self.max:
            raise KernelParamError(f"{name}={converted!r}: must be <= {self.max}")
        if self.choices is not None and converted not in self.choices:
            raise KernelParamError(
                f"{name}={converted!r}: must be one of {', '.join(map(repr, self.choices))}")
        return converted

    def _convert(self, name: str, value: Any) -> Any:
        kind = self.type
        if isinstance(value, str):
            value = value.strip()
        if kind is bool:
            if isinstance(value, bool | np.bool_):
                return bool(value)
            if str(value).lower() in _TRUE:
                return True
            if str(value).lower() in _FALSE:
                return False
            raise KernelParamError(f"{name}={value!r}: expected bool (true/false, yes/no, 1/0)")
        if kind is int:
            out = _to_int(value)
            if out is None:
                raise KernelParamError(f"{name}={value!r}: expected int (e.g. 1000, 1e6, 0x10)")
            return out
        if kind is float:
            if isinstance(value, bool):
                raise KernelParamError(f"{name}={value!r}: expected float")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise KernelParamError(f"{name}={value!r}: expected float") from None
            if math.isnan(out):
                raise KernelParamError(f"{name}={value!r}: expected a float, not nan")
            return out
        return str(value)

    def describe(self) -> str:
        rules = []
        if self.min is not None:
            rules.append(f">= {self.min}")
        if self.max is not None:
            rules.append(f"<= {self.max}")
        if self.choices is not None:
            rules.append("one of " + "/".join(map(str, self.choices)))
        return ", ".join(rules)


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if float(value).is_integer() else None
    text = str(value)
    for base in (0, 10):  # 0x10, 0b101, 1_000 ... then 010
        try:
            return int(text, base)
        except ValueError:
            pass
    try:
        f = float(text)
    except ValueError:
        return None
    if not f.is_integer():
        return None
    return int(f)


@dataclasses.dataclass(frozen=True)
class Output:
    reduce: str | Callable[[Any, Any], Any]
    per_rank: bool = False
    description: str = ""

    units: str = ""
    keep: bool = True

    @property
    def reduce_name(self) -> str:
        """What the result file records as this output's ``reduce`` attribute."""
        if isinstance(self.reduce, str):
            return self.reduce
        return f"custom:{getattr(self.reduce, '__name__', 'callable')}"


@dataclasses.dataclass(frozen=True)
class Derived:
    """An output ``finalize()`` computes on rank 0 (declared in ``DERIVED``)."""
    description: str
    units: str = ""


@dataclasses.dataclass
class Kernel:
    name: str
    module: ModuleType
    params: dict[str, Param]
    outputs: dict[str, Output]
    derived: dict[str, Derived] = dataclasses.field(default_factory=dict)

    @property
    def description(self) -> str:
        text = getattr(self.module, "DESCRIPTION", None) or (self.module.__doc__ or "")
        return text.strip()

    @property
    def has_reference(self) -> bool:
        return callable(getattr(self.module, "reference", None))

    def run(self, comm, **params) -> dict[str, Any]:
        return self.module.run(comm, **params)

    def finalize(self, reduced: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        fin = getattr(self.module, "finalize", None)
        if fin is None:
            return dict(reduced)
        extra = fin(dict(reduced), dict(params))
        if not isinstance(extra, dict):
            raise TypeError(f"{self.name}: finalize() returned {type(extra).__name__}, "
                            "expected a dict of derived outputs")
        kept = {n: v for n, v in reduced.items()
                if n not in self.outputs or self.outputs[n].keep}
        return {**kept, **extra}

    def describe_output(self, name: str) -> tuple[str, str]:
        """(description, units) of an output as the result file records them: the
        declared ones, else a description saying where the value came from."""
        out = self.outputs.get(name)
        if out is not None and name not in self.derived:
            return (out.description or f"{name} returned by every rank's run(), reduced "
                    f"over the ranks with {out.reduce_name}", out.units)
        d = self.derived.get(name)
        if d is not None:
            return d.description, d.units
        return (f"{name} computed by {self.name}'s finalize() on rank 0 from the reduced "
                "outputs", "")

    def reference(self, ranks: int, **params) -> dict[str, Any]:
        if not self.has_reference:
            raise NotImplementedError(f"kernel {self.name} has no reference()")
        return self.module.reference(ranks, **params)

    def defaults(self) -> dict[str, Any]:
        return {n: p.default for n, p in self.params.items()}

    def signature(self) -> str:
        """``samples: int = 10000000, seed: int = 12345`` (used in error messages)."""
        return ", ".join(f"{n}: {p.type.__name__} = {p.default!r}"
                         for n, p in self.params.items()) or "(no parameters)"


# ---- finding kernels -------------------------------------------------------------------

def list_kernels() -> list[str]:
    """Names of the built-in kernels (modules of this package)."""
    pkg = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(pkg)])
                  if m.name not in _NOT_KERNELS and not m.name.startswith("_"))


def _fail(name: str, why: str) -> KernelDefinitionError:
    return KernelDefinitionError(f"{name} is not a valid kernel: {why}")


def _accepts(fn: Callable, names: list[str], skip: int) -> list[str]:
    """The parameter names ``fn`` cannot take (after ``skip`` positional ones)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    ps = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return []
    takes = {p.name for p in ps[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [n for n in names if n not in takes]


def _validate(name: str, module: ModuleType) -> Kernel:
    for attr in ("PARAMS", "OUTPUTS", "run"):
        if not hasattr(module, attr):
            raise _fail(name, f"it has no {attr}; a kernel defines PARAMS, OUTPUTS and "
                        "run(comm, **params) (see hpcbatch.kernels.api)")
    params, outputs = module.PARAMS, module.OUTPUTS
    if not isinstance(params, dict) or not all(isinstance(p, Param) for p in params.values()):
        raise _fail(name, "PARAMS must be a dict of name -> Param(...)")
    if not isinstance(outputs, dict) or not outputs or not all(
            isinstance(o, Output) for o in outputs.values()):
        raise _fail(name, "OUTPUTS must be a non-empty dict of name -> Output(...)")
    for pname, p in params.items():
        if not pname.isidentifier():
            raise _fail(name, f"parameter name {pname!r} is not a Python identifier")
        if p.type not in PARAM_TYPES:
            raise _fail(name, f"parameter {pname!r} has type {p.type!r}; use int, float, str "
                        "or bool")
        try:
            p.convert(pname, p.default)
        except KernelParamError as exc:
            raise _fail(name, f"the default of parameter {pname!r} breaks its own rule "
                        f"({exc})") from None
    for oname, out in outputs.items():
        if not (callable(out.reduce) or out.reduce in BUILTIN_REDUCES):
            raise _fail(name, f"output {oname!r} has reduce {out.reduce!r}; use one of "
                        f"{', '.join(BUILTIN_REDUCES)} or a callable f(a, b) -> c")
    derived = getattr(module, "DERIVED", None) or {}
    if not isinstance(derived, dict) or not all(
            isinstance(d, Derived) for d in derived.values()):
        raise _fail(name, "DERIVED must be a dict of name -> Derived(description, units)")
    if not any(o.keep for o in outputs.values()) and not callable(
            getattr(module, "finalize", None)):
        raise _fail(name, "every output has keep=False and there is no finalize(): the "
                    "result file would hold nothing")
    if not callable(module.run):
        raise _fail(name, "run must be a function run(comm, **params)")
    missing = _accepts(module.run, list(params), skip=1)
    if missing:
        raise _fail(name, f"run() does not accept parameter(s) {', '.join(missing)}")
    return Kernel(name, module, dict(params), dict(outputs), dict(derived))


def _load_file(path: Path) -> ModuleType:
    mod_name = "hpcbatch_user_kernel_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise KernelNotFound(f"kernel file {path} cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # so values of classes it defines can be pickled
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise KernelDefinitionError(f"kernel file {path} failed to import: "
                                    f"{type(exc).__name__}: {exc}") from exc
    return module


def load_kernel(name_or_path: str | Path) -> Kernel:
    """A built-in name (``"pi"``), a dotted module (``"mypkg.mykernel"``) or a .py path."""
    text = str(name_or_path).strip()
    if not text:
        raise KernelNotFound(f"no kernel name given; built-in kernels: "
                             f"{', '.join(list_kernels())}")
    if text.endswith(".py") or "/" in text or isinstance(name_or_path, Path):
        path = Path(text).expanduser()
        if not path.is_file():
            raise KernelNotFound(f"kernel file {path} does not exist (a name ending in .py "
                                 "or containing / is read as a path); built-in kernels: "
                                 f"{', '.join(list_kernels())}")
        return _validate(str(path.resolve()), _load_file(path.resolve()))
    builtins = list_kernels()
    if text in builtins:
        return _validate(text, importlib.import_module(f"hpcbatch.kernels.{text}"))
    tried = f"built-in name {text!r}"
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", text):
        try:
            module = importlib.import_module(text)
        except ModuleNotFoundError as exc:
            # only "that module does not exist" means unknown; a missing dependency of an
            # existing module is that module's problem
            if exc.name is None or not (text == exc.name or text.startswith(exc.name + ".")):
                raise KernelDefinitionError(f"kernel module {text} failed to import: "
                                            f"{exc}") from exc
            tried += f", module {text!r} (not importable)"
        except Exception as exc:
            raise KernelDefinitionError(f"kernel module {text} failed to import: "
                                        f"{type(exc).__name__}: {exc}") from exc
        else:
            return _validate(text, module)
    raise KernelNotFound(f"unknown kernel {text!r}; built-in kernels: {', '.join(builtins)} "
                         f"(tried {tried}; give a built-in name, an importable module such "
                         "as mypkg.mykernel, or a path to a .py file)")


def parse_params(kernel: Kernel, items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> converted, checked values with defaults filled in."""
    values = kernel.defaults()
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep:
            raise KernelParamError(f"{item!r} is not k=v; {kernel.name} takes: "
                                   f"{kernel.signature()}")
        if key not in kernel.params:
            raise KernelParamError(f"{kernel.name} has no parameter {key!r}; it takes: "
                                   f"{kernel.signature()}")
        try:
            values[key] = kernel.params[key].convert(key, text)
        except KernelParamError as exc:
            raise KernelParamError(f"{exc}; {kernel.name} takes: {kernel.signature()}") from None
    return values


# ---- reductions ------------------------------------------------------------------------

class ReduceError(ValueError):
    """Ranks returned outputs the declared reduce cannot combine (raised on every rank)."""


def _as_array(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"values must be numeric arrays or scalars, got dtype {arr.dtype}")
    return np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


def _wire_dtype(dtype: np.dtype, op: str) -> np.dtype:
    """A dtype MPI can reduce with ``op`` that holds every value of ``dtype``."""
    if dtype.kind == "b":
        return np.dtype(np.int64) if op in ("sum", "mean") else np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def _check(outputs: dict[str, Output], metas: list[dict]) -> dict[str, tuple]:
    """Every rank runs this on the same gathered metadata, so all raise together."""
    plan = {}
    for name, out in outputs.items():
        per = [m[name] for m in metas]
        for r, m in enumerate(per):
            if isinstance(m, str):
                raise ReduceError(f"output {name!r} on rank {r}: {m}")
        op = out.reduce if isinstance(out.reduce, str) else "custom"
        if op == "custom":
            plan[name] = (op, None, None)
            continue
        dtype = np.result_type(*[np.dtype(d) for _, d in per])
        if op in ("min", "max") and dtype.kind == "c":
            raise ReduceError(f"output {name!r}: {op} of complex values is undefined")
        if op == "concat":
            rows = [(s[0] if s else 1) if math.prod(s) else 0 for s, _ in per]
            tails = {tuple(s[1:]) for s, _ in per if math.prod(s)}
            if len(tails) > 1:
                raise ReduceError(f"output {name!r} (concat): trailing shapes differ across "
                                  f"ranks: " + ", ".join(f"rank {r} {tuple(s)}"
                                                         for r, (s, _) in enumerate(per)))
            plan[name] = (op, dtype, (rows, tails.pop() if tails else tuple(per[0][0][1:])))
        else:
            shapes = {tuple(s) for s, _ in per}
            if len(shapes) > 1:
                raise ReduceError(f"output {name!r} ({op}): every rank must return the same "
                                  f"shape, got " + ", ".join(f"rank {r} {tuple(s)}"
                                                             for r, (s, _) in enumerate(per)))
            plan[name] = (op, dtype, per[0][0])
    return plan


def reduce_outputs(comm, outputs: dict[str, Output], local: dict[str, Any], *,
                   source: str = "run()") -> dict | None:
    """Apply each output's reduce across ``comm``; the results land on rank 0.

    Collective: every rank must call it. Returns ``{name: np.ndarray}`` on rank 0 and
    None elsewhere. A rank whose ``local`` lacks an output or holds a value that cannot
    be combined makes every rank raise :class:`ReduceError` (no rank is left waiting).
    ``source``: what returned ``local``, as the errors name it.
    """
    from mpi4py import MPI
    mpi_ops = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX,
               "mean": MPI.SUM}
    root = comm.rank == 0
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    if not isinstance(local, dict):
        meta = {n: f"{source} returned {type(local).__name__}, not a dict of outputs"
                for n in outputs}
        local = {}
    for name, out in outputs.items():
        if name in meta:
            continue
        if name not in local:
            meta[name] = (f"{source} returned no value for it (it returned: "
                          f"{', '.join(map(repr, local)) or 'nothing'})")
            continue
        if callable(out.reduce):
            meta[name] = ((), "u1")
            continue
        try:
            arr = _as_array(local[name])
        except (TypeError, ValueError) as exc:
            meta[name] = str(exc)
            continue
        arrays[name] = arr
        meta[name] = (arr.shape, arr.dtype.str)
    # one small pickled exchange of shapes and dtypes; the data itself moves as buffers
    plan = _check(outputs, comm.allgather(meta))

    result: dict[str, Any] = {}
    for name, out in outputs.items():
        op, dtype, shape = plan[name]
        if op == "custom":
            parts = comm.gather(local[name], root=0)
            if root:
                acc = parts[0]
                for part in parts[1:]:
                    acc = out.reduce(acc, part)
                result[name] = np.asarray(acc)
            continue
        wire = _wire_dtype(dtype, op)
        arr = np.asarray(arrays[name], dtype=wire, order="C")
        if op == "gather":
            recv = np.empty((comm.size, *shape), dtype=wire) if root else None
            comm.Gather(arr.reshape(-1), recv, root=0)
            if root:
                result[name] = recv.astype(dtype, copy=False)
            continue
        if op == "concat":
            rows, tail = shape
            send = arr.reshape((-1, *tail)) if arr.size else np.empty((0, *tail), wire)
            row = math.prod(tail)
            if root:
                recv = np.empty((sum(rows), *tail), dtype=wire)
                comm.Gatherv(send, [recv, [n * row for n in rows]], root=0)
                result[name] = recv.astype(dtype, copy=False)
            else:
                comm.Gatherv(send, None, root=0)
            continue
        flat = arr.reshape(-1)
        recv = np.empty_like(flat) if root else None
        for lo in range(0, max(flat.size, 1), _REDUCE_CHUNK):
            hi = min(lo + _REDUCE_CHUNK, flat.size)
            comm.Reduce(flat[lo:hi], recv[lo:hi] if root else None, op=mpi_ops[op], root=0)
        if root:
            value = recv.reshape(shape)
            if op == "mean":
                value = np.true_divide(value, comm.size)
                if dtype.kind == "f":
                    value = value.astype(dtype, copy=False)
            elif wire != dtype:
                value = value.astype(dtype if op != "sum" or dtype.kind != "b" else wire)
            result[name] = value
    return result if root else None
