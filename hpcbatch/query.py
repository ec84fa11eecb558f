"""List queries: a filter language after Azure Batch's ``$filter``, ``select`` of
fields, and continuation tokens.

A filter such as ``state eq 'completed' and exit_code ne 0`` or
``startswith(id,'sim-') and not (node_id eq 'n3')`` is parsed here into a tree and
compiled into a parameterised SQL condition over a fixed set of columns: the user's
text never becomes SQL, only ``?`` parameters do. The grammar::

    expr       := term ('or' term)*
    term       := factor ('and' factor)*
    factor     := 'not' factor | '(' expr ')' | 'startswith' '(' FIELD ',' STRING ')'
                | FIELD OP value
    OP         := eq | ne | lt | le | gt | ge
    value      := 'text' (a quote doubled: '') | NUMBER | null

Keywords, operators and field names are case-insensitive; the fields are those of
:data:`TASK_FIELDS` and :data:`JOB_FIELDS`. Times (``started_at``, ``ended_at``,
``created_at`` ...) compare with epoch seconds or an ISO-8601 string (UTC when it names
no zone). Comparisons are two-valued as in OData: ``exit_code ne 0`` is true for a task
that has no exit code, ``not (x lt 5)`` is true where x is null. A filter that does not
parse raises ``ValidationError("filter", "... at position N ...")`` (N counts characters
from 1).

Pages are walked by keyset, never OFFSET: tasks of a job in submission order (seq),
jobs in creation order (seq). A continuation token is urlsafe base64 of the last key,
the query it belongs to and an HMAC made with a key kept in the home's database, so a
token that was altered, or is used with another job or filter, is a
``ValidationError("continuation", ...)``.

This module builds SQL text and parameters; :mod:`hpcbatch.store` runs them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hpcbatch.errors import ValidationError
from hpcbatch.models import FailureKind, JobState, TaskResult, TaskState

MAX_RESULTS = 1000  # the most items a page holds (Azure Batch's maxresults limit)
MAX_FILTER_CHARS = 2000
MAX_TERMS = 64  # comparisons and startswith calls in one filter
MAX_DEPTH = 32  # nesting of parentheses and 'not'
MAX_TOKEN_CHARS = 1024
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge")
_SQL_OP = {"eq": "=", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_KEYWORDS = ("and", "or", "not", "null", "startswith", *OPERATORS)


# ---- fields ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    """A field a filter may name: its SQL expression (whitelisted, never from the
    user), its kind (text, int, time, enum), whether it can be null, and for an enum
    its values."""

    name: str
    sql: str
    kind: str
    nullable: bool = False
    values: tuple[str, ...] = ()


def _enum(name: str, sql: str, values: Iterable[Any], nullable: bool = False) -> Field:
    return Field(name, sql, "enum", nullable, tuple(str(getattr(v, "value", v)) for v in values))


TASK_FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("id", "id", "text"),
    _enum("state", "state", TaskState),
    _enum("result", "result", TaskResult, nullable=True),
    _enum("failure_kind", "failure_kind", FailureKind, nullable=True),
    Field("exit_code", "exit_code", "int", nullable=True),
    Field("signal", "signal", "int", nullable=True),
    Field("retry_count", "retry_count", "int"),
    Field("requeue_count", "requeue_count", "int"),
    Field("node_id", "node_id", "text", nullable=True),
    Field("started_at", "started_at", "time", nullable=True),
    Field("ended_at", "ended_at", "time", nullable=True),
    Field("priority", "(-neg_priority)", "int"),
    Field("required_slots", "required_slots", "int"),
    Field("command_line", "command_line", "text"),
)}

JOB_FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("id", "j.id", "text"),
    Field("pool_id", "j.pool_id", "text"),
    _enum("state", "j.state", JobState),
    Field("priority", "COALESCE(json_extract(j.spec, '$.priority'), 0)", "int"),
    Field("max_task_retry_count", "COALESCE(json_extract(j.spec, '$.max_task_retry_count'), 0)",
          "int"),
    Field("on_all_tasks_complete", "json_extract(j.spec, '$.on_all_tasks_complete')", "text"),
    Field("created_at", "j.created_at", "time"),
    Field("completed_at", "j.completed_at", "time", nullable=True),
)}

# what a page item holds: every TaskView / JobView field (select picks some)
TASK_ITEM_FIELDS = ("job_id", "id", "state", "command_line", "spec", "required_slots",
                    "result", "failure", "failure_kind", "failure_detail", "exit_code",
                    "signal", "retry_count", "requeue_count", "node_id", "task_dir",
                    "started_at", "ended_at", "usage", "seq")
JOB_ITEM_FIELDS = ("id", "pool_id", "state", "priority", "on_all_tasks_complete",
                   "max_task_retry_count", "created_at", "completed_at", "counts")


# ---- the filter's tree --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cmp:
    field: Field
    op: str
    value: Any  # str, int, float or None


@dataclasses.dataclass(frozen=True)
class Prefix:
    field: Field
    prefix: str


@dataclasses.dataclass(frozen=True)
class Not:
    child: Any


@dataclasses.dataclass(frozen=True)
class BoolOp:
    op: str  # 'and' | 'or'
    children: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Filter:
    """A parsed filter: its SQL condition and parameters, and what a plan can use: the
    top-level ``state eq`` value and the top-level range of ``id`` (lo, hi) that every
    matching task lies in (hi None: no upper bound)."""

    text: str
    sql: str
    params: tuple[Any, ...]
    state: str | None = None
    id_range: tuple[str, str | None] | None = None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


# ---- tokens ---------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[(),])
""", re.VERBOSE)


@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str  # str, num, name, punct, end
    text: str
    pos: int  # 1-based
    value: Any = None


def _bad(pos: int, what: str, hint: str = "") -> ValidationError:
    return ValidationError("filter", f"{what} at position {pos}" + (f"; {hint}" if hint else ""))


def _shown(tok: _Tok) -> str:
    return "the end of the filter" if tok.kind == "end" else repr(tok.text[:40])


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN_RE.match(text, i)
        if m is None:
            if text[i] == "'":
                raise _bad(i + 1, "unterminated string", "a quote inside one is written ''")
            raise _bad(i + 1, f"unexpected character {text[i]!r}")
        kind = m.lastgroup
        s = m.group()
        if kind == "str":
            out.append(_Tok("str", s, i + 1, s[1:-1].replace("''", "'")))
        elif kind == "num":
            end = m.end()
            if end < len(text) and (text[end].isalnum() or text[end] == "_"):
                raise _bad(end + 1, f"unexpected character {text[end]!r} after the number "
                           f"{s}")
            value: Any = float(s) if any(c in s for c in ".eE") else int(s)
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(i + 1, f"{s} is not a finite number")
            out.append(_Tok("num", s, i + 1, value))
        elif kind != "ws":
            out.append(_Tok(kind, s, i + 1))
        i = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


# ---- the parser ------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str, fields: Mapping[str, Field]):
        self.text = text
        self.fields = fields
        self.toks = _tokens(text)
        self.i = 0
        self.terms = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def word(self, tok: _Tok, *words: str) -> bool:
        return tok.kind == "name" and tok.text.lower() in words

    def expect_punct(self, ch: str, what: str) -> _Tok:
        tok = self.take()
        if tok.kind != "punct" or tok.text != ch:
            raise _bad(tok.pos, f"expected {what}, found {_shown(tok)}")
        return tok

    def parse(self) -> Any:
        node = self.expr(0)
        tok = self.peek()
        if tok.kind != "end":
            if self.word(tok, "and", "or"):
                raise _bad(tok.pos, f"expected a condition after {tok.text!r}")
            raise _bad(tok.pos, f"expected 'and', 'or' or the end of the filter, found "
                       f"{_shown(tok)}")
        return node

    def expr(self, depth: int) -> Any:
        children = [self.term(depth)]
        while self.word(self.peek(), "or"):
            self.take()
            children.append(self.term(depth))
        return children[0] if len(children) == 1 else BoolOp("or", tuple(children))

    def term(self, depth: int) -> Any:
        children = [self.factor(depth)]
        while self.word(self.peek(), "and"):
            self.take()
            children.append(self.factor(depth))
        return children[0] if len(children) == 1 else BoolOp("and", tuple(children))

    def factor(self, depth: int) -> Any:
        tok = self.peek()
        if depth >= MAX_DEPTH:
            raise _bad(tok.pos, f"the filter nests deeper than {MAX_DEPTH} levels")
        if self.word(tok, "not"):
            self.take()
            return Not(self.factor(depth + 1))
        if tok.kind == "punct" and tok.text == "(":
            self.take()
            node = self.expr(depth + 1)
            self.expect_punct(")", "')'")
            return node
        if self.word(tok, "startswith"):
            return self.startswith()
        return self.comparison()

    def count_term(self, tok: _Tok) -> None:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise _bad(tok.pos, f"the filter has more than {MAX_TERMS} conditions")

    def field(self, tok: _Tok) -> Field:
        if tok.kind != "name":
            raise _bad(tok.pos, f"expected a field name, found {_shown(tok)}",
                       f"fields: {', '.join(self.fields)}")
        f = self.fields.get(tok.text.lower())
        if f is None:
            if tok.text.lower() in _KEYWORDS:
                raise _bad(tok.pos, f"expected a field name, found the keyword {tok.text!r}")
            raise _bad(tok.pos, f"unknown field {tok.text!r}",
                       f"fields: {', '.join(self.fields)}")
        return f

    def startswith(self) -> Prefix:
        name_tok = self.take()
        self.count_term(name_tok)
        self.expect_punct("(", "'(' after startswith")
        tok = self.take()
        f = self.field(tok)
        if f.kind != "text":
            raise _bad(tok.pos, f"startswith takes a text field, not {f.name} ({f.kind})")
        self.expect_punct(",", "','")
        val = self.take()
        if val.kind != "str":
            raise _bad(val.pos, f"startswith takes a quoted prefix, found {_shown(val)}")
        self.expect_punct(")", "')'")
        return Prefix(f, val.value)

    def comparison(self) -> Cmp:
        tok = self.take()
        f = self.field(tok)
        self.count_term(tok)
        op_tok = self.take()
        if not self.word(op_tok, *OPERATORS):
            raise _bad(op_tok.pos, f"expected a comparison operator ({' '.join(OPERATORS)}) "
                       f"after {f.name}, found {_shown(op_tok)}")
        op = op_tok.text.lower()
        val = self.take()
        return Cmp(f, op, self.value(f, op, val))

    def value(self, f: Field, op: str, tok: _Tok) -> Any:
        if self.word(tok, "null"):
            if op not in ("eq", "ne"):
                raise _bad(tok.pos, f"null compares with eq or ne only, not {op}")
            return None
        if tok.kind not in ("str", "num"):
            raise _bad(tok.pos, f"expected a value for {f.name}, found {_shown(tok)}",
                       "a value is a quoted string, a number or null")
        if f.kind == "int":
            if tok.kind != "num" or not isinstance(tok.value, int):
                raise _bad(tok.pos, f"{f.name} is an integer; {tok.text} is not one")
            if not -2**63 <= tok.value < 2**63:
                raise _bad(tok.pos, f"{tok.text} is out of range for {f.name}")
            return tok.value
        if f.kind == "time":
            if tok.kind == "num":
                return tok.value
            return _epoch(tok.value, tok.pos, f.name)
        if tok.kind != "str":
            raise _bad(tok.pos, f"{f.name} takes a quoted string, not {tok.text}")
        if f.kind == "enum":
            if op not in ("eq", "ne"):
                raise _bad(tok.pos, f"{f.name} compares with eq or ne only, not {op}")
            if tok.value not in f.values:
                raise _bad(tok.pos, f"{tok.value!r} is not a {f.name}",
                           f"one of {', '.join(f.values)}")
        return tok.value


def _epoch(text: str, pos: int, name: str) -> float:
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise _bad(pos, f"{name} takes epoch seconds or an ISO-8601 time, not {text!r}",
                   "such as '2024-05-01T12:00:00Z'") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


# ---- SQL ---------------------------------------------------------------------------------

def _next_prefix(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (None: there is
    none). SQLite compares text as UTF-8 bytes, which is code point order."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop()) + 1
        if 0xD800 <= c <= 0xDFFF:  # surrogates are not text
            c = 0xE000
        if c <= 0x10FFFF:
            return "".join(chars) + chr(c)
    return None


def _sql(node: Any, params: list[Any]) -> str:
    if isinstance(node, BoolOp):
        glue = f" {node.op.upper()} "
        return "(" + glue.join(_sql(c, params) for c in node.children) + ")"
    if isinstance(node, Not):
        return f"(NOT {_sql(node.child, params)})"
    if isinstance(node, Prefix):
        col = node.field.sql
        guard = f"{col} IS NOT NULL AND " if node.field.nullable else ""
        if node.prefix == "":
            return f"({col} IS NOT NULL)" if node.field.nullable else "(1)"
        hi = _next_prefix(node.prefix)
        if hi is None:
            params += [len(node.prefix), node.prefix]
            return f"({guard}substr({col}, 1, ?) = ?)"
        params += [node.prefix, hi]
        return f"({guard}{col} >= ? AND {col} < ?)"
    assert isinstance(node, Cmp)
    col = node.field.sql
    if node.value is None:
        return f"({col} IS {'NOT ' if node.op == 'ne' else ''}NULL)"
    params.append(node.value)
    if not node.field.nullable:
        return f"({col} {_SQL_OP[node.op]} ?)"
    if node.op == "eq":
        return f"({col} IS ?)"
    if node.op == "ne":
        return f"({col} IS NOT ?)"
    return f"({col} IS NOT NULL AND {col} {_SQL_OP[node.op]} ?)"


def _conjuncts(node: Any) -> tuple[Any, ...]:
    if isinstance(node, BoolOp) and node.op == "and":
        return tuple(x for c in node.children for x in _conjuncts(c))
    return (node,)


def _plan_hints(node: Any) -> tuple[str | None, tuple[str, str | None] | None]:
    state = None
    id_range: tuple[str, str | None] | None = None
    for c in _conjuncts(node):
        if isinstance(c, Cmp) and c.field.name == "state" and c.op == "eq" \
                and c.value is not None and state is None:
            state = c.value
        if id_range is not None or c.__class__ not in (Cmp, Prefix) or c.field.name != "id":
            continue
        if isinstance(c, Prefix) and c.prefix:
            id_range = (c.prefix, _next_prefix(c.prefix))
        elif isinstance(c, Cmp) and c.op == "eq" and isinstance(c.value, str):
            id_range = (c.value, c.value + "\0")
    return state, id_range


def parse_filter(text: str | None, fields: Mapping[str, Field] = TASK_FIELDS
                 ) -> Filter | None:
    """The filter compiled for ``fields`` (None: no filter; blank text is none too)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValidationError("filter", f"must be text, not {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise _bad(MAX_FILTER_CHARS + 1, f"the filter is longer than {MAX_FILTER_CHARS} "
                   "characters")
    if "\0" in text:
        raise _bad(text.index("\0") + 1, "unexpected character '\\x00'")
    if not text.strip():
        return None
    node = _Parser(text, fields).parse()
    params: list[Any] = []
    sql = _sql(node, params)
    state, id_range = _plan_hints(node) if fields is TASK_FIELDS else (None, None)
    return Filter(text, sql, tuple(params), state, id_range)


# ---- select ---------------------------------------------------------------------------

def parse_select(select: str | Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    """The fields a page's items hold, in the order given (None: all of ``known``).
    A comma-separated string is split."""
    if select is None:
        return tuple(known)
    if isinstance(select, str):
        names = [s.strip() for s in select.split(",")]
    elif isinstance(select, Iterable):
        names = list(select)
    else:
        raise ValidationError("select", f"must be field names, not {type(select).__name__}")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ValidationError("select", f"field names are text, not {name!r}")
        name = name.strip()
        if name not in known:
            raise ValidationError("select", f"unknown field {name!r}; known: "
                                  f"{', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValidationError("select", f"names no field; known: {', '.join(known)}")
    return tuple(out)


def check_max_results(max_results: Any) -> int:
    if isinstance(max_results, bool) or not isinstance(max_results, int) \
            or not 1 <= max_results <= MAX_RESULTS:
        raise ValidationError("max_results", f"must be an integer from 1 to {MAX_RESULTS}, "
                              f"not {max_results!r}")
    return max_results


# ---- continuation tokens ------------------------------------------------------------------

_MAC_BYTES = 16


def make_token(key: bytes, kind: str, scope: str, flt: Filter | None, last: int) -> str:
    body = json.dumps({"k": kind, "s": scope, "f": flt.digest if flt else "", "a": last},
                      separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")


def read_token(key: bytes, token: str | None, kind: str, scope: str,
               flt: Filter | None) -> int | None:
    """The last key of the page before (None: the first page)."""
    if token is None or token == "":
        return None
    bad = ValidationError("continuation", "not a continuation token this service made "
                          "(copy it whole from the previous page)")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS \
            or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raise bad from None
    body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if len(raw) <= _MAC_BYTES or not hmac.compare_digest(
            mac, hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]):
        raise bad
    data = json.loads(body)
    if data.get("k") != kind or data.get("s") != scope:
        raise ValidationError("continuation", f"this token pages another list, not the "
                              f"{kind} of {scope!r}")
    if data.get("f") != (flt.digest if flt else ""):
        raise ValidationError("continuation", "this token was made for another filter; use "
                              "it with the filter of the page it came from")
    last = data.get("a")
    if isinstance(last, bool) or not isinstance(last, int):
        raise bad
    return last


# ---- page items ---------------------------------------------------------------------------

def _json_decoder():
    """json.loads, or msgspec's decoder (5x faster on a task's spec) where msgspec is
    installed; text it refuses (NaN, which json.dumps writes) goes to json.loads."""
    try:
        import msgspec
    except ImportError:
        return json.loads
    decode = msgspec.json.Decoder().decode
    error = msgspec.DecodeError

    def loads(text: str) -> Any:
        try:
            return decode(text)
        except error:
            return json.loads(text)
    return loads


_decode = _json_decoder()


def _loads(text: Any, default: Any) -> Any:
    if text is None or text == "":
        return default
    return json.loads(text) if isinstance(text, str) else text


def task_columns(fields: Sequence[str]) -> tuple[str, ...]:
    """The tasks columns a page with these item fields reads (seq always, first)."""
    return ("seq", *(f for f in fields if f != "seq"))


def task_item(row: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """A page item: the same values TaskView.from_row(row).to_dict() gives."""
    out: dict[str, Any] = {}
    for f in fields:
        v = row[f]
        if f == "spec":
            v = _loads(v, {})
        elif f == "usage":
            v = _loads(v, None)
        elif f in ("retry_count", "requeue_count"):
            v = v or 0
        elif f == "required_slots" and v is None:
            v = 1
        out[f] = v
    return out


def task_items(rows: Iterable[Sequence[Any]], columns: Sequence[str],
               fields: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """Page items (as task_item makes them) from tuple rows of ``columns``: one C-level
    pick per row, then only the fields that need it are converted."""
    pos = [list(columns).index(f) for f in fields]
    pick = operator.itemgetter(*pos) if len(pos) > 1 else (lambda r, i=pos[0]: (r[i],))
    spec, usage = "spec" in fields, "usage" in fields
    zeros = [f for f in ("retry_count", "requeue_count") if f in fields]
    slots = "required_slots" in fields
    loads = _decode
    out = []
    for r in rows:
        d = dict(zip(fields, pick(r)))
        if spec:
            v = d["spec"]
            d["spec"] = loads(v) if v else {}
        if usage:
            v = d["usage"]
            d["usage"] = loads(v) if v else None
        for f in zeros:
            d[f] = d[f] or 0
        if slots and d["required_slots"] is None:
            d["required_slots"] = 1
        out.append(d)
    return tuple(out)


def job_item(row: Mapping[str, Any], fields: Sequence[str],
             counts: Mapping[str, int] | None) -> dict[str, Any]:
    """A page item: the same values JobView.from_row(row, counts).to_dict() gives."""
    spec = _loads(row["spec"], {})
    out: dict[str, Any] = {}
    for f in fields:
        if f in ("priority", "max_task_retry_count"):
            out[f] = spec.get(f, 0)
        elif f == "on_all_tasks_complete":
            out[f] = spec.get(f, "no_action")
        elif f == "counts":
            out[f] = None if counts is None else dict(counts)
        else:
            out[f] = row[f]
    return out




# ---- pages (what LocalService answers) ---------------------------------------------------

def task_page(store: Any, job_id: str, *, filter: str | None = None,
              select: str | Sequence[str] | None = None, max_results: int = MAX_RESULTS,
              continuation: str | None = None) -> Any:
    """A page of the job's tasks (a :class:`hpcbatch.views.Page`), in submission order."""
    from hpcbatch.views import Page
    limit = check_max_results(max_results)
    flt = parse_filter(filter, TASK_FIELDS)
    fields = parse_select(select, TASK_ITEM_FIELDS)
    key = store.query_key()
    after = read_token(key, continuation, "tasks", job_id, flt)
    store.get_job(job_id)  # NotFound
    columns = task_columns(fields)
    rows = store.query_tasks(job_id, flt, columns, after, limit + 1)  # tuples, seq first
    more = len(rows) > limit
    rows = rows[:limit]
    token = make_token(key, "tasks", job_id, flt, rows[-1][0]) if more else None
    return Page(task_items(rows, columns, fields), token)


def job_page(store: Any, *, filter: str | None = None,
             select: str | Sequence[str] | None = None, max_results: int = MAX_RESULTS,
             continuation: str | None = None) -> Any:
    """A page of the jobs (a :class:`hpcbatch.views.Page`), oldest first, each with its
    kept task counts."""
    from hpcbatch.store import COUNT_KEYS
    from hpcbatch.views import Page
    limit = check_max_results(max_results)
    flt = parse_filter(filter, JOB_FIELDS)
    fields = parse_select(select, JOB_ITEM_FIELDS)
    key = store.query_key()
    after = read_token(key, continuation, "jobs", "", flt)
    rows = store.query_jobs(flt, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    items = []
    for r in rows:
        counts = None if r["total"] is None else {k: r[k] for k in COUNT_KEYS}
        items.append(job_item(r, fields, counts))
    token = make_token(key, "jobs", "", flt, rows[-1]["seq"]) if more else None
    return Page(tuple(items), token)


__all__ = [
    "Filter", "Field", "JOB_FIELDS", "JOB_ITEM_FIELDS", "MAX_RESULTS", "TASK_FIELDS",
    "TASK_ITEM_FIELDS", "check_max_results", "job_item", "job_page", "make_token",
    "parse_filter", "parse_select", "read_token", "task_columns", "task_item", "task_page",
]
