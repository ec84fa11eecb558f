"""Autoscale formulas: a small expression language, parsed and evaluated here (no eval).

A formula is statements separated by ``;`` or line ends (a line that ends in, or whose
next line starts with, an operator goes on), as in Azure Batch::

    $samples = $PendingTaskSlots.GetSamplePercent(TimeInterval_Minute * 2);
    $now = $PendingTaskSlots.GetSample(1);
    $slots = $samples < 50 ? $now : max($now, avg($PendingTaskSlots.GetSample(60s)));
    $TargetNodes = min(3, ceil($slots / 4));
    $NodeDeallocationOption = taskcompletion;

Values are numbers, time intervals (``60s``, ``500ms``, ``5m``, ``2h``, ``1d``,
``TimeInterval_Minute * 5``), strings (``"requeue"``) and lists of samples. Operators:
``+ - * / %``, comparisons, ``&& || !``, ``c ? a : b``; functions ``min max avg sum len
ceil floor round abs std percentile`` (over lists and arguments). Service variables
(read only, sampled by the coordinator): ``$PendingTasks`` (= active + running, as in
Batch), ``$ActiveTasks``, ``$RunningTasks``, ``$PendingTaskSlots`` / ``$ActiveTaskSlots``
/ ``$RunningTaskSlots`` (work counted in slots: an ordinary task its slots, a
multi-instance one instances x slots per instance), ``$CurrentNodes``, ``$IdleNodes``,
``$TimeSinceLastTask``. Used bare, a sampled variable is its latest sample; its methods
are ``GetSample(N)`` (the last N samples), ``GetSample(interval [, end] [, percent])``
(the samples of that window; with ``percent``, an error unless that share of the
window's samples is there), ``GetSamplePercent(interval [, end])``, ``Count()``,
``GetSamplePeriod()``. A formula sets ``$TargetNodes`` (rounded up) and may set
``$NodeDeallocationOption`` (requeue, terminate, taskcompletion, retaineddata).
Every error names its line and column.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hpcbatch.errors import ValidationError

MAX_FORMULA_CHARS = 8192  # Azure Batch's limits
MAX_STATEMENTS = 100
MAX_DEPTH = 64  # nested expressions
MAX_TREE_DEPTH = 150  # of the parsed tree (a chain 1+1+1... nests too), so evaluating
# it stays well inside Python's recursion limit

# what happens to the tasks of a node that leaves (Batch's nodeDeallocationOption)
DEALLOCATION_OPTIONS = ("requeue", "terminate", "taskcompletion", "retaineddata")
_OPTION_ALIASES = {"task_completion": "taskcompletion", "retained_data": "retaineddata"}

# the sampled service variables, and what each is
METRICS: dict[str, str] = {
    "PendingTasks": "tasks active or running (Batch's $PendingTasks)",
    "ActiveTasks": "tasks waiting for a node",
    "RunningTasks": "tasks placed on a node (preparing or running)",
    "PendingTaskSlots": "slots the active and running tasks need",
    "ActiveTaskSlots": "slots the waiting tasks need",
    "RunningTaskSlots": "slots the placed tasks use",
    "CurrentNodes": "nodes in the pool (not leaving)",
    "IdleNodes": "nodes idle (no task on them)",
    "TimeSinceLastTask": "time since a task of the pool last ran",
}
INTERVAL_METRICS = frozenset({"TimeSinceLastTask"})
ALIASES = {"CurrentDedicatedNodes": "CurrentNodes", "TargetDedicatedNodes": "TargetNodes"}
SETTABLE = ("TargetNodes", "NodeDeallocationOption")

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
          "d": 86400.0, "w": 604800.0}
INTERVALS = {"TimeInterval_Zero": 0.0, "TimeInterval_Millisecond": 0.001,
             "TimeInterval_Second": 1.0, "TimeInterval_Minute": 60.0,
             "TimeInterval_Hour": 3600.0, "TimeInterval_Day": 86400.0,
             "TimeInterval_Week": 604800.0}


def normalize_option(value: str, field: str = "deallocation") -> str:
    """'task_completion' -> 'taskcompletion'; ValidationError for anything not an option."""
    v = _OPTION_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if v not in DEALLOCATION_OPTIONS:
        raise ValidationError(field, f"{value!r} is not one of requeue, terminate, "
                              "task_completion (taskcompletion), retained_data")
    return v


class FormulaError(ValidationError):
    """A formula that does not parse or cannot be evaluated: one line naming line:col."""

    def __init__(self, line: int, col: int, message: str, *, stage: str = "syntax"):
        self.line, self.col, self.stage = line, col, stage
        super().__init__("formula", f"line {line}:{col}: {message}")


# ---------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True, slots=True)
class Interval:
    """A time interval, in seconds."""

    seconds: float

    def __str__(self) -> str:
        s = self.seconds
        for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
            if s and s % size == 0:
                return f"{s / size:g}{unit}"
        return f"{s:g}s"


@dataclasses.dataclass(frozen=True, slots=True)
class Samples:
    """One sampled variable's history: (time, value) oldest first, taken every
    ``period_s``."""

    name: str
    points: tuple[tuple[float, float], ...]
    period_s: float

    def latest(self) -> float | None:
        return self.points[-1][1] if self.points else None


def show(value: Any) -> str:
    """A value as 'autoscale evaluate' prints it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float | int):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, Interval):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Samples):
        v = value.latest()
        latest = "none" if v is None else (str(Interval(v)) if value.name in INTERVAL_METRICS
                                          else f"{v:g}")
        return f"{latest} ({len(value.points)} samples)"
    if isinstance(value, list):
        inner = ", ".join(f"{v:g}" for v in value[:8])
        return f"[{inner}{', ...' if len(value) > 8 else ''}] ({len(value)} values)"
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, Interval):
        return "a time interval"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list of samples"
    if isinstance(value, Samples):
        return "a sampled variable"
    return "a number"


# ---------------------------------------------------------------- tokens

@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    kind: str  # num, interval, str, var, name, op, nl, eof
    text: str
    line: int
    col: int
    value: Any = None


_OPS = ("&&", "||", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "!", "?",
        ":", "(", ")", ",", ".", "=", ";")
# a line break does not end a statement after these, nor before a line starting with one
_GOES_ON_AFTER = frozenset({"&&", "||", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<",
                            ">", "!", "?", ":", "(", ",", ".", "="})
_GOES_ON_BEFORE = frozenset({"&&", "||", "==", "!=", "<=", ">=", "+", "*", "/", "%", "<",
                             ">", "?", ":", ")", ",", ".", "="})
_NUM_RE = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokenize(text: str) -> list[Token]:
    if not isinstance(text, str):
        raise FormulaError(1, 1, "a formula is text")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(1, 1, f"the formula has {len(text)} characters; at most "
                           f"{MAX_FORMULA_CHARS}")
    out: list[Token] = []
    i, line, start = 0, 1, 0
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        col = i - start + 1
        if c == "\n":
            if depth == 0 and out and out[-1].kind != "nl" and out[-1].text not in \
                    _GOES_ON_AFTER:
                out.append(Token("nl", "\\n", line, col))
            i += 1
            line, start = line + 1, i
            continue
        if c in " \t\r":
            i += 1
            continue
        if text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise FormulaError(line, col, "a comment /* is never closed with */")
            line += text.count("\n", i, end)
            if "\n" in text[i:end]:
                start = text.rfind("\n", i, end) + 1
            i = end + 2
            continue
        m = _NUM_RE.match(text, i)
        if m:
            j = m.end()
            u = _NAME_RE.match(text, j)
            number = float(m.group())
            if u:
                unit = u.group()
                if unit not in _UNITS:
                    raise FormulaError(line, col, f"{m.group()}{unit}: {unit!r} is not a "
                                       "time unit (ms, s, m, h, d, w)")
                out.append(Token("interval", text[i:u.end()], line, col,
                                 Interval(number * _UNITS[unit])))
                i = u.end()
            else:
                out.append(Token("num", m.group(), line, col, number))
                i = j
            continue
        if c == "$":
            m = _NAME_RE.match(text, i + 1)
            if not m:
                raise FormulaError(line, col, "'$' must begin a variable name such as "
                                   "$TargetNodes")
            out.append(Token("var", text[i:m.end()], line, col, m.group()))
            i = m.end()
            continue
        m = _NAME_RE.match(text, i)
        if m:
            out.append(Token("name", m.group(), line, col, m.group()))
            i = m.end()
            continue
        if c in "\"'":
            end = i + 1
            while end < n and text[end] != c and text[end] != "\n":
                end += 1
            if end >= n or text[end] != c:
                raise FormulaError(line, col, f"a string {c} is never closed")
            out.append(Token("str", text[i:end + 1], line, col, text[i + 1:end]))
            i = end + 1
            continue
        for op in _OPS:
            if text.startswith(op, i):
                break
        else:
            raise FormulaError(line, col, f"unexpected character {c!r}")
        if op in _GOES_ON_BEFORE and out and out[-1].kind == "nl":
            out.pop()  # this line goes on from the last one
        depth += 1 if op == "(" else -1 if op == ")" else 0
        depth = max(depth, 0)
        out.append(Token("op", op, line, col))
        i += len(op)
    out.append(Token("eof", "end of formula", line, n - start + 1))
    return out


# ---------------------------------------------------------------- parsing

# nodes: (kind, line, col, ...)
#   num value | interval value | str value | var name | name name
#   unary op operand | binary op left right | and/or left right
#   cond test yes no | call name args | method target name args
#   assign target(var/name node) expr


@dataclasses.dataclass(frozen=True, slots=True)
class Formula:
    text: str
    statements: tuple[tuple, ...]

    def assigned(self) -> list[str]:
        """The variables the formula assigns, in order ('$x' or 'x')."""
        seen: dict[str, None] = {}
        for st in self.statements:
            if st[0] == "assign":
                target = st[3]
                seen["$" + target[3] if target[0] == "var" else target[3]] = None
        return list(seen)


_BINARY = [("||",), ("&&",), ("==", "!="), ("<", "<=", ">", ">="), ("+", "-"),
           ("*", "/", "%")]


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self) -> Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, tok: Token, message: str) -> FormulaError:
        return FormulaError(tok.line, tok.col, message)

    def expect(self, op: str, what: str) -> Token:
        tok = self.peek()
        if tok.kind == "op" and tok.text == op:
            return self.take()
        raise self.error(tok, f"expected {what}, found {_found(tok)}")

    def statements(self) -> list[tuple]:
        out: list[tuple] = []
        while True:
            while self.peek().kind == "nl" or self._is(";"):
                self.take()
            if self.peek().kind == "eof":
                return out
            if len(out) >= MAX_STATEMENTS:
                raise self.error(self.peek(), f"more than {MAX_STATEMENTS} statements")
            out.append(self.statement())
            tok = self.peek()
            if not (tok.kind in ("nl", "eof") or self._is(";")):
                raise self.error(tok, f"expected ';' or a new line after the statement, "
                                 f"found {_found(tok)}")

    def _is(self, op: str) -> bool:
        tok = self.peek()
        return tok.kind == "op" and tok.text == op

    def statement(self) -> tuple:
        tok = self.peek()
        nxt = self.toks[self.i + 1]
        if tok.kind in ("var", "name") and nxt.kind == "op" and nxt.text == "=":
            self.take()
            eq = self.take()
            name = ALIASES.get(tok.value, tok.value) if tok.kind == "var" else tok.value
            if tok.kind == "var" and name in METRICS:
                raise self.error(tok, f"{tok.text} is a service variable (read only); "
                                 f"assign to {', '.join('$' + s for s in SETTABLE)} or a "
                                 "variable of your own")
            if tok.kind == "name" and (name in _CONSTANTS or name in FUNCTIONS):
                raise self.error(tok, f"{name} is a built-in name; pick another")
            if self.peek().kind in ("nl", "eof") or self._is(";"):
                raise self.error(self.peek(), f"expected a value after '=', found "
                                 f"{_found(self.peek())}")
            return ("assign", eq.line, eq.col, (tok.kind, tok.line, tok.col, name),
                    self.expr())
        return self.expr()

    def expr(self) -> tuple:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(self.peek(), f"the expression nests more than {MAX_DEPTH} deep")
        try:
            return self.ternary()
        finally:
            self.depth -= 1

    def ternary(self) -> tuple:
        test = self.binary(0)
        if self._is("?"):
            q = self.take()
            yes = self.expr()
            self.expect(":", "':' of the '?' at line "
                        f"{q.line}:{q.col}")
            no = self.expr()
            return ("cond", q.line, q.col, test, yes, no)
        return test

    def binary(self, level: int) -> tuple:
        if level == len(_BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek().kind == "op" and self.peek().text in _BINARY[level]:
            op = self.take()
            right = self.binary(level + 1)
            kind = {"&&": "and", "||": "or"}.get(op.text, "binary")
            left = (kind, op.line, op.col, op.text, left, right)
        return left

    def unary(self) -> tuple:
        tok = self.peek()
        if tok.kind == "op" and tok.text in ("-", "+", "!"):
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error(tok, f"the expression nests more than {MAX_DEPTH} deep")
            try:
                return ("unary", tok.line, tok.col, tok.text, self.unary())
            finally:
                self.depth -= 1
        return self.postfix()

    def postfix(self) -> tuple:
        node = self.primary()
        while self._is("."):
            dot = self.take()
            name = self.take()
            if name.kind != "name":
                raise self.error(name, f"expected a method name after '.', found "
                                 f"{_found(name)}")
            self.expect("(", f"'(' after .{name.text}")
            node = ("method", name.line, name.col, node, name.text, self.args())
            del dot
        return node

    def args(self) -> tuple:
        out = []
        if self._is(")"):
            self.take()
            return ()
        while True:
            out.append(self.expr())
            if self._is(","):
                self.take()
                continue
            self.expect(")", "',' or ')' in the argument list")
            return tuple(out)

    def primary(self) -> tuple:
        tok = self.take()
        if tok.kind in ("num", "interval", "str"):
            return (tok.kind, tok.line, tok.col, tok.value)
        if tok.kind == "var":
            return ("var", tok.line, tok.col, ALIASES.get(tok.value, tok.value))
        if tok.kind == "name":
            if self._is("("):
                self.take()
                if tok.value not in FUNCTIONS:
                    raise self.error(tok, f"unknown function {tok.value}()"
                                     + _did_you_mean(tok.value, FUNCTIONS)
                                     + f"; known: {', '.join(sorted(FUNCTIONS))}")
                return ("call", tok.line, tok.col, tok.value, self.args())
            return ("name", tok.line, tok.col, tok.value)
        if tok.kind == "op" and tok.text == "(":
            inner = self.expr()
            self.expect(")", f"')' closing the '(' at line {tok.line}:{tok.col}")
            return inner
        raise self.error(tok, f"expected a value, found {_found(tok)}")


def _found(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the formula"
    if tok.kind == "nl":
        return "the end of the line"
    return repr(tok.text)


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _children(node: tuple) -> list[tuple]:
    out = []
    for child in node[3:]:
        if isinstance(child, tuple) and child and isinstance(child[0], str) and \
                len(child) >= 3 and isinstance(child[1], int):
            out.append(child)
        elif isinstance(child, tuple):
            out.extend(c for c in child if isinstance(c, tuple) and c and
                       isinstance(c[0], str) and len(c) >= 3 and isinstance(c[1], int))
    return out


def _check_depth(top: tuple) -> None:
    stack = [(top, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise FormulaError(node[1], node[2], f"the statement is too deep (more than "
                               f"{MAX_TREE_DEPTH} operations in a chain); split it with "
                               "variables")
        stack.extend((c, depth + 1) for c in _children(node))


def parse(text: str) -> Formula:
    """The formula's statements; FormulaError (line:col) when it does not parse."""
    statements = _Parser(tokenize(text)).statements()
    for st in statements:
        _check_depth(st)
    if not statements:
        raise FormulaError(1, 1, "the formula is empty; set $TargetNodes, e.g. "
                           "'$TargetNodes = min(4, $PendingTasks)'")
    return Formula(text, tuple(statements))


# ---------------------------------------------------------------- evaluation

def _numbers(args: list[Any], fn: str, node: tuple) -> list[float]:
    flat: list[float] = []
    for a in args:
        if isinstance(a, list):
            flat.extend(a)
        elif isinstance(a, Samples):
            flat.extend(v for _, v in a.points)
        elif isinstance(a, bool | int | float):
            flat.append(float(a))
        else:
            raise FormulaError(node[1], node[2], f"{fn}() takes numbers and lists of "
                               f"samples, not {_kind(a)}", stage="evaluation")
    return flat


def _aggregate(fn: str):
    def call(args: list[Any], node: tuple) -> Any:
        if fn in ("min", "max") and args and all(isinstance(a, Interval) for a in args):
            pick = min if fn == "min" else max
            return Interval(pick(a.seconds for a in args))
        values = _numbers(args, fn, node)
        if fn in ("sum", "len"):
            return float(sum(values)) if fn == "sum" else float(len(values))
        if not values:
            raise FormulaError(node[1], node[2], f"{fn}() of no values (no samples yet? "
                               "check with .GetSamplePercent() first)", stage="evaluation")
        if fn == "min":
            return min(values)
        if fn == "max":
            return max(values)
        mean = sum(values) / len(values)
        if fn == "avg":
            return mean
        return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # std
    return call


def _one_number(fn: str, op):
    def call(args: list[Any], node: tuple) -> Any:
        if len(args) != 1:
            raise FormulaError(node[1], node[2], f"{fn}() takes one argument, not "
                               f"{len(args)}", stage="evaluation")
        a = args[0]
        if isinstance(a, Interval) and fn in ("abs", "ceil", "floor", "round"):
            return Interval(float(op(a.seconds)))
        if not isinstance(a, bool | int | float):
            raise FormulaError(node[1], node[2], f"{fn}() takes a number, not {_kind(a)}",
                               stage="evaluation")
        return float(op(a))
    return call


def _percentile(args: list[Any], node: tuple) -> float:
    if len(args) != 2 or not isinstance(args[1], int | float):
        raise FormulaError(node[1], node[2], "percentile() takes a list of samples and a "
                           "percent, e.g. percentile($PendingTasks.GetSample(5m), 90)",
                           stage="evaluation")
    values = sorted(_numbers([args[0]], "percentile", node))
    p = float(args[1])
    if not values:
        raise FormulaError(node[1], node[2], "percentile() of no values", stage="evaluation")
    if not 0 <= p <= 100:
        raise FormulaError(node[1], node[2], f"percentile {p:g} is not between 0 and 100",
                           stage="evaluation")
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


FUNCTIONS = {
    "min": _aggregate("min"), "max": _aggregate("max"), "avg": _aggregate("avg"),
    "sum": _aggregate("sum"), "len": _aggregate("len"), "std": _aggregate("std"),
    "ceil": _one_number("ceil", math.ceil), "floor": _one_number("floor", math.floor),
    "round": _one_number("round", lambda v: math.floor(v + 0.5)),
    "abs": _one_number("abs", abs), "percentile": _percentile,
}
_CONSTANTS: dict[str, Any] = {**{k: Interval(v) for k, v in INTERVALS.items()},
                              **{o: o for o in DEALLOCATION_OPTIONS}, **_OPTION_ALIASES}


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluation:
    """What a formula decided: the target (None when it set none), the deallocation
    option, and every variable's value as text ($ names first)."""

    target_nodes: int
    deallocation: str
    variables: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"target_nodes": self.target_nodes, "deallocation": self.deallocation,
                "variables": dict(self.variables)}


class _Evaluator:
    def __init__(self, samples: Mapping[str, Samples], now: float, target_nodes: int):
        self.samples = samples
        self.now = now
        self.vars: dict[str, Any] = {"TargetNodes": float(target_nodes),
                                     "NodeDeallocationOption": "requeue"}
        self.locals: dict[str, Any] = {}

    def err(self, node: tuple, message: str) -> FormulaError:
        return FormulaError(node[1], node[2], message, stage="evaluation")

    def run(self, formula: Formula) -> None:
        for st in formula.statements:
            if st[0] == "assign":
                target = st[3]
                value = self.value(self.eval(st[4]), st[4])
                if target[0] == "var":
                    self.vars[target[3]] = value
                else:
                    self.locals[target[3]] = value
            else:
                self.eval(st)

    def value(self, v: Any, node: tuple) -> Any:
        """A sampled variable used as a value is its latest sample; a list of one sample
        (GetSample(1)) is that number."""
        if isinstance(v, list) and len(v) == 1:
            return v[0]
        if isinstance(v, Samples):
            latest = v.latest()
            if latest is None:
                raise self.err(node, f"${v.name} has no samples yet")
            return Interval(latest) if v.name in INTERVAL_METRICS else latest
        return v

    def number(self, node: tuple, what: str) -> float:
        v = self.value(self.eval(node), node)
        if isinstance(v, bool | int | float):
            return float(v)
        raise self.err(node, f"{what} must be a number, not {_kind(v)}")

    def eval(self, node: tuple) -> Any:
        kind = node[0]
        if kind in ("num", "interval", "str"):
            return node[3]
        if kind == "var":
            name = node[3]
            if name in self.vars:
                return self.vars[name]
            if name in self.samples:
                return self.samples[name]
            known = sorted({*METRICS, *SETTABLE, *self.vars})
            raise self.err(node, f"unknown variable ${name}"
                           + _did_you_mean(name, known, "$")
                           + f"; service variables: {', '.join('$' + k for k in METRICS)}")
        if kind == "name":
            name = node[3]
            if name in self.locals:
                return self.locals[name]
            if name in _CONSTANTS:
                return _CONSTANTS[name]
            raise self.err(node, f"unknown name {name}"
                           + _did_you_mean(name, [*self.locals, *_CONSTANTS])
                           + " (assign it first; service variables start with $)")
        if kind == "unary":
            v = self.value(self.eval(node[4]), node[4])
            if node[3] == "!":
                if not isinstance(v, bool | int | float):
                    raise self.err(node, f"'!' takes a number, not {_kind(v)}")
                return 0.0 if v else 1.0
            if isinstance(v, Interval):
                return Interval(-v.seconds if node[3] == "-" else v.seconds)
            if not isinstance(v, bool | int | float):
                raise self.err(node, f"'{node[3]}' takes a number, not {_kind(v)}")
            return -float(v) if node[3] == "-" else float(v)
        if kind in ("and", "or"):
            left = self.number(node[4], f"the left side of '{node[3]}'")
            if kind == "and" and not left:
                return 0.0
            if kind == "or" and left:
                return 1.0
            return 1.0 if self.number(node[5], f"the right side of '{node[3]}'") else 0.0
        if kind == "cond":
            test = self.number(node[3], "the condition before '?'")
            return self.eval(node[4] if test else node[5])
        if kind == "binary":
            return self.binary(node)
        if kind == "call":
            args = [self.eval(a) for a in node[4]]
            return FUNCTIONS[node[3]](args, node)
        if kind == "method":
            return self.method(node)
        raise self.err(node, f"cannot evaluate {kind}")  # pragma: no cover

    def binary(self, node: tuple) -> Any:
        op = node[3]
        a = self.value(self.eval(node[4]), node[4])
        b = self.value(self.eval(node[5]), node[5])
        num = (bool, int, float)
        if op in ("==", "!=") and isinstance(a, str) and isinstance(b, str):
            return 1.0 if (a == b) == (op == "==") else 0.0
        if op in ("==", "!=", "<", "<=", ">", ">="):
            if isinstance(a, Interval) and isinstance(b, Interval):
                x, y = a.seconds, b.seconds
            elif isinstance(a, num) and isinstance(b, num):
                x, y = float(a), float(b)
            else:
                hint = (" (write a time such as 120s or TimeInterval_Minute * 2)"
                        if isinstance(a, Interval) or isinstance(b, Interval) else "")
                raise self.err(node, f"cannot compare {_kind(a)} with {_kind(b)}{hint}")
            return 1.0 if {"==": x == y, "!=": x != y, "<": x < y, "<=": x <= y,
                           ">": x > y, ">=": x >= y}[op] else 0.0
        if isinstance(a, num) and isinstance(b, num):
            x, y = float(a), float(b)
            if op in ("/", "%") and y == 0:
                raise self.err(node, f"division by zero ({'/' if op == '/' else '%'} of "
                               f"{x:g} by 0)")
            r = {"+": x + y, "-": x - y, "*": x * y}.get(op)
            if r is None:
                r = x / y if op == "/" else math.fmod(x, y)
            if not math.isfinite(r):
                raise self.err(node, f"the result of {x:g} {op} {y:g} is too large")
            return r
        if isinstance(a, Interval) and isinstance(b, Interval) and op in "+-/":
            if op == "/":
                if b.seconds == 0:
                    raise self.err(node, "division by zero (a time interval divided by 0s)")
                return a.seconds / b.seconds
            return Interval(a.seconds + b.seconds if op == "+" else a.seconds - b.seconds)
        if op in "*/" and isinstance(a, Interval) and isinstance(b, num):
            if op == "/" and b == 0:
                raise self.err(node, "division by zero (a time interval divided by 0)")
            return Interval(a.seconds * b if op == "*" else a.seconds / b)
        if op == "*" and isinstance(a, num) and isinstance(b, Interval):
            return Interval(a * b.seconds)
        raise self.err(node, f"'{op}' cannot combine {_kind(a)} and {_kind(b)}"
                       + (" (take avg(), max(), sum() ... of the list first)"
                          if isinstance(a, list) or isinstance(b, list) else ""))

    def method(self, node: tuple) -> Any:
        target = self.eval(node[3])
        name = node[4]
        if not isinstance(target, Samples):
            raise self.err(node, f".{name}() is a method of sampled variables such as "
                           f"$PendingTasks, not of {_kind(target)}")
        args = [self.value(self.eval(a), a) for a in node[5]]
        s = target
        if name == "Count" and not args:
            return float(len(s.points))
        if name == "GetSamplePeriod" and not args:
            return Interval(s.period_s)
        if name == "GetSamplePercent":
            start, end = self._window(node, args, name, 2)
            return self._percent(s, start, end)
        if name == "GetSample":
            if len(args) == 1 and isinstance(args[0], int | float):
                n = args[0]
                if n < 1 or n != int(n):
                    raise self.err(node, f"GetSample({n:g}): a count of samples is a whole "
                                   "number >= 1 (or give a time: GetSample(60s))")
                values = [v for _, v in s.points[-int(n):]]
            else:
                percent = None
                if len(args) >= 2 and isinstance(args[-1], int | float):
                    percent = float(args.pop())
                    if not 0 <= percent <= 100:
                        raise self.err(node, f"GetSample: percent {percent:g} is not "
                                       "between 0 and 100")
                start, end = self._window(node, args, name, 2)
                values = [v for t, v in s.points if self.now - start < t <= self.now - end]
                if percent is not None:
                    have = self._percent(s, start, end)
                    if have < percent:
                        raise self.err(node, f"${s.name}.GetSample: {have:.0f}% of the "
                                       f"samples of that window are there, {percent:g}% "
                                       "asked")
            if not values:
                raise self.err(node, f"${s.name} has no samples in that window yet "
                               "(guard with .GetSamplePercent())")
            return values
        raise self.err(node, f"unknown method .{name}() of ${s.name}"
                       + _did_you_mean(name, ("GetSample", "GetSamplePercent", "Count",
                                              "GetSamplePeriod"))
                       + "; known: GetSample, GetSamplePercent, Count, GetSamplePeriod")

    def _window(self, node: tuple, args: list[Any], name: str,
                most: int) -> tuple[float, float]:
        if not 1 <= len(args) <= most or not all(isinstance(a, Interval) for a in args):
            raise self.err(node, f"{name}() takes a time (GetSample(60s), "
                           f"{name}(TimeInterval_Minute * 5)) or a start and an end time"
                           + (", or a count (GetSample(1))" if name == "GetSample" else ""))
        start = args[0].seconds
        end = args[1].seconds if len(args) > 1 else 0.0
        if start < 0 or end < 0 or end > start:
            last = args[1] if len(args) > 1 else "0s"
            raise self.err(node, f"{name}: the window {args[0]}..{last} ago is empty; give "
                           "the older time first")
        return start, end

    def _percent(self, s: Samples, start: float, end: float) -> float:
        want = max(1, math.floor((start - end) / s.period_s + 1e-9))
        have = sum(1 for t, _ in s.points if self.now - start < t <= self.now - end)
        return min(100.0, 100.0 * have / want)


def evaluate(formula: Formula | str, samples: Mapping[str, Samples] | Sequence[Samples],
             *, now: float, target_nodes: int = 0) -> Evaluation:
    """Run the formula over the sampled metrics; FormulaError (line:col) when it fails
    or sets no usable $TargetNodes. ``target_nodes``: the pool's target now (what
    $TargetNodes reads before the formula sets it)."""
    if isinstance(formula, str):
        formula = parse(formula)
    if not isinstance(samples, Mapping):
        samples = {s.name: s for s in samples}
    ev = _Evaluator(samples, now, target_nodes)
    ev.run(formula)
    last = {("$" + st[3][3] if st[3][0] == "var" else st[3][3]): st
            for st in formula.statements if st[0] == "assign"}
    where = last.get("$TargetNodes")
    line, col = (where[1], where[2]) if where else (1, 1)
    if where is None:
        raise FormulaError(1, 1, "the formula never sets $TargetNodes", stage="evaluation")
    target = ev.vars["TargetNodes"]
    if not isinstance(target, bool | int | float):
        raise FormulaError(line, col, f"$TargetNodes must be a number, not {_kind(target)}",
                           stage="evaluation")
    if not math.isfinite(target) or target < 0:
        raise FormulaError(line, col, f"$TargetNodes is {target:g}; a number of nodes is "
                           ">= 0", stage="evaluation")
    option = ev.vars["NodeDeallocationOption"]
    if not isinstance(option, str) or _OPTION_ALIASES.get(option, option) not in \
            DEALLOCATION_OPTIONS:
        st = last.get("$NodeDeallocationOption")
        raise FormulaError(st[1] if st else 1, st[2] if st else 1,
                           f"$NodeDeallocationOption is {show(option)!r}; it is one of "
                           f"{', '.join(DEALLOCATION_OPTIONS)}", stage="evaluation")
    option = _OPTION_ALIASES.get(option, option)
    nodes = math.ceil(target - 1e-9)
    variables: dict[str, str] = {}
    for name in METRICS:
        if name in samples:
            variables["$" + name] = show(samples[name])
    for name, value in ev.vars.items():
        variables["$" + name] = show(value)
    variables["$TargetNodes"] = str(nodes)
    variables["$NodeDeallocationOption"] = option
    for name, value in ev.locals.items():
        variables[name] = show(value)
    return Evaluation(nodes, option, variables)


def check(text: str) -> Formula:
    """Parse a formula and check the names it reads and the methods it calls exist
    (without samples): FormulaError (line:col) otherwise."""
    formula = parse(text)
    assigned_locals: set[str] = set()
    assigned_vars: set[str] = set(SETTABLE)

    def walk(node: tuple) -> None:
        kind = node[0]
        if kind == "var" and node[3] not in METRICS and node[3] not in assigned_vars:
            raise FormulaError(node[1], node[2], f"unknown variable ${node[3]}"
                               + _did_you_mean(node[3], [*METRICS, *assigned_vars], "$")
                               + f"; service variables: "
                               f"{', '.join('$' + k for k in METRICS)}")
        if kind == "name" and node[3] not in assigned_locals and node[3] not in _CONSTANTS:
            raise FormulaError(node[1], node[2], f"unknown name {node[3]}"
                               + _did_you_mean(node[3], [*assigned_locals, *_CONSTANTS])
                               + " (assign it first; service variables start with $)")
        for child in node[3:]:
            if isinstance(child, tuple) and child and isinstance(child[0], str) and \
                    len(child) >= 3 and isinstance(child[1], int):
                walk(child)
            elif isinstance(child, tuple):
                for c in child:
                    if isinstance(c, tuple) and c and isinstance(c[0], str):
                        walk(c)

    for st in formula.statements:
        if st[0] == "assign":
            walk(st[4])
            target = st[3]
            (assigned_vars if target[0] == "var" else assigned_locals).add(target[3])
        else:
            walk(st)
    if "TargetNodes" not in {st[3][3] for st in formula.statements
                             if st[0] == "assign" and st[3][0] == "var"}:
        raise FormulaError(1, 1, "the formula never sets $TargetNodes")
    return formula
