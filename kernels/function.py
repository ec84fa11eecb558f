"""MPI functions: a plain Python function run on every rank as a kernel.

``batch.run_kernel(fn, ranks=4, params={...}, outputs={"energy": "sum"})`` packs ``fn``
with cloudpickle (lambdas, closures and functions of ``__main__`` travel by value; so
do functions of modules that are not installed, such as one beside the script), sends
the packed file to the service as an upload (content-addressed), and runs the harness
with ``--function`` on every rank. Each rank calls ``fn(comm, **params)``, which returns
a dict; every declared output is reduced to rank 0 (``kernels.api.reduce_outputs``) and
written to the same HDF5 result file a kernel module's run writes.

The packed file (``function.pkl``, format ``hpcbatch-function/1``) is a magic line, one
line of JSON (the header: the function's qualified name, the SHA-256 of its pickled
bytes, the outputs and their reduces, a summary of the params, the client's Python and
cloudpickle versions, the lengths of the two sections) and two cloudpickle sections:
the function, and the params with any callable reduces. The service reads only the
header (it never unpickles what a client sent); the ranks unpickle the rest.

Reduces: ``sum``, ``prod``, ``min``, ``max``, ``mean`` (elementwise over ranks),
``concat`` (joined along axis 0 in rank order), ``gather`` (one row per rank: shape
``(ranks, *shape)``), or a callable ``f(a, b) -> c`` applied in rank order.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

MAGIC = b"hpcbatch-function/1\n"
FILE_NAME = "function.pkl"  # the upload's name, and the resource file's on the nodes
MAX_HEADER_BYTES = 1 << 16
OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
PARAM_SHOWN = 200  # characters of a param's repr kept in the provenance
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


class FunctionLoadError(ValueError):
    """The packed function cannot be read or unpickled here (a rank says which and why)."""


def qualified_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) \
        or type(fn).__name__
    return f"{module}.{name}"


def short_name(name: str) -> str:
    """``__main__.sweep.<locals>.<lambda>`` -> ``lambda`` (for job ids)."""
    last = name.rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", last).strip("-")[:30] or "function"


def summarize_param(value: Any) -> Any:
    """A param as the provenance records it: scalars and short strings as themselves,
    anything else as a short description (arrays by dtype and shape)."""
    import numpy as np
    if isinstance(value, bool | int | float | str) and not (
            isinstance(value, str) and len(value) > PARAM_SHOWN):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype}{list(value.shape)}"
    text = repr(value)
    return text if len(text) <= PARAM_SHOWN else text[:PARAM_SHOWN - 3] + "..."


def _not_installed(module_name: str) -> Any:
    """The module of that name when cloudpickle would pickle what it defines by
    reference but the ranks may not be able to import it (it is not in site-packages or
    the standard library: a module beside the script, a test module); else None."""
    if module_name in ("__main__", "__mp_main__") or module_name.startswith("hpcbatch"):
        return None
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return None
    path = os.path.realpath(path)
    if {"site-packages", "dist-packages"} & set(Path(path).parts):
        return None  # installed (a venv's, the system's, Debian's apt packages)
    installed = {os.path.realpath(p) for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (p := sysconfig.get_paths().get(key))}
    if any(path.startswith(p + os.sep) for p in installed):
        return None
    return module


def _check_outputs(outputs: Any) -> dict[str, Any]:
    from hpcbatch.errors import ValidationError
    from hpcbatch.kernels.api import BUILTIN_REDUCES, Output
    if not isinstance(outputs, dict) or not outputs:
        raise ValidationError("outputs", "a function run needs outputs={name: reduce} (reduce "
                              f"one of {', '.join(BUILTIN_REDUCES)} or f(a, b) -> c), e.g. "
                              "outputs={'energy': 'sum'}")
    checked = {}
    for name, reduce in outputs.items():
        if not isinstance(name, str) or not OUTPUT_NAME.fullmatch(name):
            raise ValidationError("outputs", f"output name {name!r} must be letters, digits, "
                                  "'_', '.', '-' (starting with a letter or '_'), at most "
                                  "128 characters")
        if isinstance(reduce, Output):
            reduce = reduce.reduce
        if not (callable(reduce) or (isinstance(reduce, str) and reduce in BUILTIN_REDUCES)):
            raise ValidationError("outputs", f"output {name!r} has reduce {reduce!r}; use one "
                                  f"of {', '.join(BUILTIN_REDUCES)} or a callable f(a, b) -> c")
        checked[name] = reduce
    return checked


def _check_signature(fn: Any, params: dict[str, Any], name: str) -> None:
    from hpcbatch.errors import ValidationError
    from hpcbatch.kernels.api import _accepts
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind is p.VAR_POSITIONAL for p in ps):
        raise ValidationError("kernel", f"function {name} takes no argument; it is called "
                              "fn(comm, **params) on every rank (the first argument is the "
                              "MPI communicator)")
    missing = _accepts(fn, list(params), skip=1)
    if missing:
        raise ValidationError("params", f"function {name} does not accept "
                              f"{', '.join(missing)}; it is called fn(comm, **params)")


def pack(fn: Any, params: dict[str, Any] | None, outputs: Any) -> tuple[bytes, dict[str, Any]]:
    """The packed file of ``fn`` (its bytes) and its header. Raises ValidationError for
    a bad ``outputs``/``params``, or a function that cannot be pickled."""
    import cloudpickle

    from hpcbatch.errors import ValidationError
    if not callable(fn):
        raise ValidationError("kernel", f"{fn!r} is neither a kernel name nor a function")
    name = qualified_name(fn)
    reduces = _check_outputs(outputs)
    if params is None:
        params = {}
    if not isinstance(params, dict) or not all(isinstance(k, str) and k.isidentifier()
                                                 for k in params):
        raise ValidationError("params", "for a function, params is a dict of keyword "
                              "arguments (names that are Python identifiers)")
    _check_signature(fn, params, name)
    # what fn uses from modules that are not installed (one beside the script, say)
    # travels with it: the nodes may not have them on their path
    by_value = [m for name in list(sys.modules) if "." not in name
                and (m := _not_installed(name)) is not None]
    for m in by_value:
        cloudpickle.register_pickle_by_value(m)
    try:
        fn_bytes = cloudpickle.dumps(fn, protocol=5)
        rest = cloudpickle.dumps({"params": params,
                                  "reduces": {n: r for n, r in reduces.items() if callable(r)}},
                                 protocol=5)
    except Exception as exc:
        raise ValidationError("kernel", f"function {name} (or its params) cannot be pickled "
                              f"with cloudpickle: {type(exc).__name__}: {exc}") from None
    finally:
        for m in by_value:
            cloudpickle.unregister_pickle_by_value(m)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    header = {"name": name, "description": doc[0] if doc else f"Python function {name}",
              "fn_sha256": hashlib.sha256(fn_bytes).hexdigest(),
              "outputs": {n: (r if isinstance(r, str)
                              else f"custom:{getattr(r, '__name__', 'callable')}")
                          for n, r in reduces.items()},
              "params": {k: summarize_param(v) for k, v in params.items()},
              "python": PYTHON,
              "cloudpickle": cloudpickle.__version__,
              "fn_bytes": len(fn_bytes), "rest_bytes": len(rest)}
    line = json.dumps(header, separators=(",", ":")).encode()
    if len(line) > MAX_HEADER_BYTES:
        raise ValidationError("params", f"the params' summary of function {name} is over "
                              f"{MAX_HEADER_BYTES} bytes; pass fewer params")
    return MAGIC + line + b"\n" + fn_bytes + rest, header


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header of a packed function file and where its sections start (reads only
    the header: what the service does with a client's upload)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise FunctionLoadError(f"function file {path} cannot be opened "
                                f"({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        head = f.read(len(MAGIC) + MAX_HEADER_BYTES + 1)
    if not head.startswith(MAGIC):
        raise FunctionLoadError(f"{path} is not a packed hpcbatch function "
                                f"({MAGIC.decode().strip()})")
    end = head.find(b"\n", len(MAGIC))
    try:
        if end < 0:
            raise ValueError("no end of header")
        header = json.loads(head[len(MAGIC):end])
        if not isinstance(header, dict):
            raise ValueError("not an object")
        for key, kind in (("name", str), ("fn_sha256", str), ("outputs", dict),
                          ("params", dict), ("python", str), ("fn_bytes", int),
                          ("rest_bytes", int)):
            if not isinstance(header.get(key), kind):
                raise ValueError(f"{key} missing or not a {kind.__name__}")
    except ValueError as exc:
        raise FunctionLoadError(f"{path}: its header is broken ({exc})") from None
    return header, end + 1


class FunctionKernel:
    """A packed function, unpickled on a rank, seen as the harness sees a Kernel."""

    def __init__(self, header: dict[str, Any], fn: Any, reduces: dict[str, Any]):
        from hpcbatch.kernels.api import Output
        self.header = header
        self.name = header["name"]
        self.fn = fn
        self.outputs = {n: Output(reduces.get(n, r)) for n, r in header["outputs"].items()}
        self.derived: dict[str, Any] = {}
        self.description = header.get("description") or f"Python function {self.name}"

    def run(self, comm, **params) -> Any:
        return self.fn(comm, **params)

    def finalize(self, reduced: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        return dict(reduced)

    def describe_output(self, name: str) -> tuple[str, str]:
        return (f"{name} returned by {self.name} on every rank, reduced over the ranks "
                f"with {self.outputs[name].reduce_name}", "")

    def provenance(self) -> dict[str, Any]:
        """The result file's extra root attributes for a function run."""
        return {"function": self.name, "function_sha256": self.header["fn_sha256"],
                "function_python": self.header["python"],
                "cloudpickle_version": self.header.get("cloudpickle") or ""}


def find(name: str) -> Path:
    """The packed function file a rank reads: an absolute path, else ``name`` in the
    task's shared directory (a multi-node run's common resource file), its working
    directory, or here."""
    p = Path(name)
    if p.is_absolute():
        return p
    for var in ("HPCBATCH_TASK_SHARED_DIR", "HPCBATCH_TASK_WORKING_DIR"):
        base = os.environ.get(var)
        if base and (Path(base) / p).is_file():
            return Path(base) / p
    return Path.cwd() / p


def load(path: str | os.PathLike) -> tuple[FunctionKernel, dict[str, Any]]:
    """Unpickle a packed function on a rank: the kernel and the params to call it with.
    A Python version other than the client's, or a module the function needs that this
    node lacks, is one FunctionLoadError naming both."""
    import cloudpickle
    header, start = read_header(path)
    here = PYTHON
    where = f"node {socket.gethostname()} ({sys.executable})"
    if header["python"] != here:
        raise FunctionLoadError(f"function {header['name']} was pickled by Python "
                                f"{header['python']} on the client, but {where} runs Python "
                                f"{here}; give the pool the client's Python version")
    with open(path, "rb") as f:
        f.seek(start)
        fn_bytes = f.read(header["fn_bytes"])
        rest = f.read(header["rest_bytes"])
    if len(fn_bytes) != header["fn_bytes"] or len(rest) != header["rest_bytes"]:
        raise FunctionLoadError(f"function file {path} is truncated")
    if hashlib.sha256(fn_bytes).hexdigest() != header["fn_sha256"]:
        raise FunctionLoadError(f"function file {path}: the function's bytes do not match "
                                "their SHA-256")
    try:
        fn = cloudpickle.loads(fn_bytes)
        extra = cloudpickle.loads(rest)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise FunctionLoadError(f"function {header['name']} needs module {missing}, which "
                                f"{where} cannot import; install it there (or define what "
                                "it needs in the script)") from exc
    return FunctionKernel(header, fn, extra.get("reduces") or {}), dict(extra["params"])


_DYNAMIC_FRAME = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (.+)$')


def _codes(fn: Any) -> list[Any]:
    """The code objects of ``fn``, of what it defines, and of the functions it names
    among its globals (one level): what a rank's traceback can pass through."""
    import types
    seen: dict[int, Any] = {}
    todo = [getattr(fn, "__code__", None)]
    glb = getattr(fn, "__globals__", {}) or {}
    top = todo[0]
    for name in (top.co_names if top is not None else ()):
        obj = glb.get(name)
        if isinstance(obj, types.FunctionType):
            todo.append(obj.__code__)
    while todo:
        code = todo.pop()
        if not isinstance(code, types.CodeType) or id(code) in seen:
            continue
        seen[id(code)] = code
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return list(seen.values())


def restore_traceback(text: str, fn: Any) -> str:
    """A rank's traceback with the frames cloudpickle left as ``<dynamic-code>`` (it
    drops file names, to pickle deterministically) given back their file and source line,
    where ``fn`` (on the client) has a code object of that name spanning that line."""
    import linecache
    codes = _codes(fn)
    out: list[str] = []
    for line in text.splitlines():
        m = _DYNAMIC_FRAME.match(line)
        found = None
        if m:
            lineno, name = int(m.group(2)), m.group(3)
            for code in codes:
                lines = {n for _, _, n in code.co_lines() if n is not None}
                if code.co_name == name and lineno in lines:
                    found = code.co_filename
                    break
        if found is None:
            out.append(line)
            continue
        indent = m.group(1)
        out.append(f'{indent}File "{found}", line {lineno}, in {name}')
        source = linecache.getline(found, lineno).strip()
        if source:
            out.append(f"{indent}    {source}")
    return "\n".join(out)
