"""The kernel API.

A kernel is a module (built in, importable, or a .py file) with:

``PARAMS: dict[str, Param]``
    ``Param(type, default, help, min=None, max=None, choices=None)``; type is
    int, float, str or bool. Command-line values (``k=v``) are converted and
    checked; a bad one raises :class:`KernelParamError` naming the parameter.
``OUTPUTS: dict[str, Output]``
    ``Output(reduce, per_rank=False, description="")``: reduce is "sum", "min",
    "max", "mean", "concat" (gathered in rank order along axis 0) or a callable
    ``f(a, b) -> c`` (associative, applied in rank order). Built-in reduces use
    mpi4py buffer methods (``Reduce``, ``Gatherv``), not pickled objects.
``run(comm, **params) -> dict[str, array | scalar]``
    executed on every rank.
``finalize(reduced, params) -> dict`` (optional)
    on rank 0 after the reduce: derived outputs (``pi`` from hit counts).
``reference(ranks, **params) -> dict``
    a serial numpy reference of the final result, for tests.
``DESCRIPTION`` (optional)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

BUILTIN_REDUCES = ("sum", "min", "max", "mean", "concat")
_NOT_KERNELS = {"api", "harness", "results", "__main__"}


class KernelNotFound(ValueError):
    pass


class KernelParamError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Param:
    type: type
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def convert(self, name: str, text: Any) -> Any:
        if self.type is bool:
            if isinstance(text, bool):
                value = text
            elif str(text).lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(text).lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise KernelParamError(f"{name}={text!r}: expected a bool (true/false)")
        else:
            try:
                if self.type is int and isinstance(text, str):
                    value = int(float(text)) if "e" in text.lower() else int(text, 0)
                    if "e" in text.lower() and float(text) != value:
                        raise ValueError
                else:
                    value = self.type(text)
            except (TypeError, ValueError):
                raise KernelParamError(
                    f"{name}={text!r}: expected {self.type.__name__}") from None
        if self.min is not None and value < self.min:
            raise KernelParamError(f"{name}={value}: must be >= {self.min}")
        if self.max is not None and value > self.max:
            raise KernelParamError(f"{name}={value}: must be <= {self.max}")
        if self.choices is not None and value not in self.choices:
            raise KernelParamError(f"{name}={value!r}: must be one of {list(self.choices)}")
        return value


@dataclasses.dataclass(frozen=True)
class Output:
    reduce: str | Callable[[Any, Any], Any]
    per_rank: bool = False
    description: str = ""


@dataclasses.dataclass
class Kernel:
    name: str
    module: ModuleType
    params: dict[str, Param]
    outputs: dict[str, Output]

    @property
    def description(self) -> str:
        return getattr(self.module, "DESCRIPTION", (self.module.__doc__ or "").strip())

    def run(self, comm, **params) -> dict[str, Any]:
        return self.module.run(comm, **params)

    def finalize(self, reduced: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        fin = getattr(self.module, "finalize", None)
        return dict(reduced, **fin(reduced, params)) if fin else reduced

    def signature(self) -> str:
        return ", ".join(f"{n}: {p.type.__name__} = {p.default!r}"
                         for n, p in self.params.items()) or "(no parameters)"


def list_kernels() -> list[str]:
    pkg = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(pkg)])
                  if m.name not in _NOT_KERNELS and not m.name.startswith("_"))


def _validate(name: str, module: ModuleType) -> Kernel:
    for attr in ("PARAMS", "OUTPUTS", "run"):
        if not hasattr(module, attr):
            raise KernelNotFound(f"{name}: not a kernel module (it has no {attr}); a kernel "
                                 "defines PARAMS, OUTPUTS and run(comm, **params)")
    for out_name, out in module.OUTPUTS.items():
        if not (callable(out.reduce) or out.reduce in BUILTIN_REDUCES):
            raise KernelNotFound(f"{name}: output {out_name!r} has reduce {out.reduce!r}; use "
                                 f"one of {', '.join(BUILTIN_REDUCES)} or a callable")
    return Kernel(name, module, dict(module.PARAMS), dict(module.OUTPUTS))


def load_kernel(name_or_path: str) -> Kernel:
    """A built-in name ("pi"), a dotted module ("mypkg.mykernel") or a .py path."""
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise KernelNotFound(f"kernel file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"hpcbatch_user_kernel_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return _validate(str(path.resolve()), module)
    if name_or_path in list_kernels():
        return _validate(name_or_path, importlib.import_module(f"hpcbatch.kernels.{name_or_path}"))
    if "." in name_or_path:
        try:
            return _validate(name_or_path, importlib.import_module(name_or_path))
        except ModuleNotFoundError:
            pass
    raise KernelNotFound(f"unknown kernel {name_or_path!r}; built-in kernels: "
                         f"{', '.join(list_kernels())} (or give a module name or a .py path)")


def parse_params(kernel: Kernel, items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> converted values, defaults filled in."""
    values = {n: p.default for n, p in kernel.params.items()}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise KernelParamError(f"{item!r} is not k=v; {kernel.name} takes: "
                                   f"{kernel.signature()}")
        if key not in kernel.params:
            raise KernelParamError(f"{kernel.name} has no parameter {key!r}; it takes: "
                                   f"{kernel.signature()}")
        values[key] = kernel.params[key].convert(key, text.strip())
    return values


# ---- reductions ------------------------------------------------------------

def _as_array(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError("kernel outputs must be numeric arrays or scalars")
    return np.ascontiguousarray(arr)


def reduce_outputs(comm, outputs: dict[str, Output], local: dict[str, Any]) -> dict | None:
    """Apply each output's reduce across ranks; the result lands on rank 0."""
    from mpi4py import MPI
    ops = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "mean": MPI.SUM}
    root = comm.rank == 0
    result: dict[str, Any] = {}
    for name, out in outputs.items():
        if name not in local:
            raise KeyError(f"run() did not return output {name!r}")
        shape = np.shape(local[name])
        arr = _as_array(local[name])
        if callable(out.reduce):
            parts = comm.gather(np.asarray(local[name]), root=0)
            if root:
                acc = parts[0]
                for part in parts[1:]:
                    acc = out.reduce(acc, part)
                result[name] = np.asarray(acc)
        elif out.reduce == "concat":
            arr1 = arr.reshape(1) if arr.ndim == 0 else arr
            counts = comm.gather(arr1.shape[0], root=0)
            tail = arr1.shape[1:]
            if root:
                recv = np.empty((sum(counts), *tail), dtype=arr1.dtype)
                row = int(np.prod(tail)) if tail else 1
                comm.Gatherv(arr1, [recv, [c * row for c in counts]], root=0)
                result[name] = recv
            else:
                comm.Gatherv(arr1, None, root=0)
        else:
            recv = np.empty_like(arr) if root else None
            comm.Reduce(arr, recv, op=ops[out.reduce], root=0)
            if root:
                recv = recv.reshape(shape)
                result[name] = recv / comm.size if out.reduce == "mean" else recv
    return result if root else None
