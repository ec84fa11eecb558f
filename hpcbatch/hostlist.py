"""Slurm-style host lists: ``node[01-16]``, ``gpu[1-2,5],login1``, ``rack[1-2]-n[1-3]``.

``expand_hostlist`` turns a host list into names, in order (left bracket group
varies slowest, as Slurm does), without duplicates. ``compress_hostlist`` is the
reverse, for display and for passing long lists around.

Grammar (whitespace is allowed only at the ends and around top-level commas)::

    hostlist := item ("," item)*
    item     := (chars | "[" range ("," range)* "]")+
    range    := digits | digits "-" digits          (zero padding from the first number)
    chars    := [A-Za-z0-9._-]+

A name may not start with '-' or '.', so no expansion can turn into an option of
ssh or mpiexec. Expansion is capped (MAX_HOSTS) before anything is built, so a
hostile list such as ``n[0-99999][0-99999]`` is refused at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hpcbatch.errors import ValidationError

MAX_HOSTS = 100_000  # names one host list may expand to
MAX_DIGITS = 18  # per number inside brackets
MAX_NAME = 253  # DNS limit for a whole name
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_EXCERPT = 60


class HostlistError(ValidationError):
    """Bad host-list syntax; ``text`` and ``pos`` (0-based) locate the offending part."""

    def __init__(self, text: str, pos: int, why: str):
        self.text, self.pos, self.why = text, pos, why
        super().__init__("hostlist", f"{_show(text, pos)} at position {pos}: {why} (expected "
                         "names like node[01-16] or gpu[1-2,5],login1)")


def _show(text: str, pos: int) -> str:
    """The text, or for a long one the part around pos, quoted."""
    if len(text) <= _EXCERPT:
        return repr(text)
    lo = max(0, pos - _EXCERPT // 2)
    hi = min(len(text), lo + _EXCERPT)
    return ("..." if lo else "") + repr(text[lo:hi]) + ("..." if hi < len(text) else "")


def _split_top(text: str) -> list[tuple[str, int]]:
    """Split at commas outside brackets: [(item, offset), ...] with whitespace trimmed."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append((text[start:i], start))
            start = i + 1
    items.append((text[start:], start))
    out = []
    for item, offset in items:
        stripped = item.lstrip(" \t")
        offset += len(item) - len(stripped)
        out.append((stripped.rstrip(" \t"), offset))
    return out


def _parse_number(text: str, s: str, at: int, part: str) -> int:
    if not s:
        raise HostlistError(text, at, "a number is missing in the range")
    if not s.isascii() or not s.isdigit():
        bad = next(i for i, c in enumerate(s) if not (c.isascii() and c.isdigit()))
        raise HostlistError(text, at + bad, f"{s[bad]!r} in range {part!r} is not a digit")
    if len(s) > MAX_DIGITS:
        raise HostlistError(text, at, f"number {s[:20]!r}... has more than {MAX_DIGITS} digits")
    return int(s)


def _bracket(text: str, body: str, at: int) -> list[tuple[int, int, int]]:
    """Parse the inside of [...] (which starts at text[at]) into (lo, hi, width) ranges."""
    if not body:
        raise HostlistError(text, at - 1, "'[]' is empty")
    out = []
    pos = at
    for part in body.split(","):
        if not part:
            raise HostlistError(text, pos, "empty range between commas inside []")
        lo_s, dash, hi_s = part.partition("-")
        lo = _parse_number(text, lo_s, pos, part)
        hi = _parse_number(text, hi_s, pos + len(lo_s) + 1, part) if dash else lo
        if hi < lo:
            raise HostlistError(text, pos, f"range {part!r} runs backwards")
        width = len(lo_s) if len(lo_s) > 1 and lo_s.startswith("0") else 0
        out.append((lo, hi, width))
        pos += len(part) + 1
    return out


def _parse_item(text: str, item: str, offset: int) -> list:
    """An item as a list of parts: literal strings, and bracket groups as lists of
    (lo, hi, width) ranges (the names themselves are made later, by _names)."""
    if item[:1] in ("-", "."):  # would read as an option of ssh or mpiexec
        raise HostlistError(text, offset, f"a host name may not start with {item[0]!r}")
    parts: list = []
    i = 0
    while i < len(item):
        ch = item[i]
        if ch == "[":
            end = item.find("]", i + 1)
            if end < 0:
                raise HostlistError(text, offset + i, "'[' is never closed")
            nested = item.find("[", i + 1, end)
            if nested >= 0:
                raise HostlistError(text, offset + nested, "'[' inside [] (brackets nest)")
            parts.append(_bracket(text, item[i + 1:end], offset + i + 1))
            i = end + 1
        elif ch == "]":
            raise HostlistError(text, offset + i, "']' without '['")
        elif ch in _NAME_CHARS:
            j = i
            while j < len(item) and item[j] in _NAME_CHARS:
                j += 1
            parts.append(item[i:j])
            i = j
        else:
            raise HostlistError(text, offset + i, f"character {ch!r} is not allowed in host "
                                "names")
    return parts


def _count(parts: list) -> int:
    n = 1
    for p in parts:
        if isinstance(p, list):
            n *= sum(hi - lo + 1 for lo, hi, _ in p)
    return n


def _names(parts: list) -> Iterable[str]:
    if not parts:
        yield ""
        return
    head, rest = parts[0], parts[1:]
    choices = [head] if isinstance(head, str) else [
        str(v).zfill(w) for lo, hi, w in head for v in range(lo, hi + 1)]
    tails = list(_names(rest))
    for c in choices:
        for t in tails:
            yield c + t


def expand_hostlist(text: str) -> list[str]:
    """``"node[01-03],login1"`` -> ``["node01", "node02", "node03", "login1"]``.

    Order is kept, duplicates are dropped; bad syntax raises HostlistError naming the
    offending text and its position."""
    if not isinstance(text, str):
        raise HostlistError(repr(text), 0, f"a host list is text, not {type(text).__name__}")
    if not text.strip():
        raise HostlistError(text, 0, "empty host list")
    parsed = []
    total = 0
    for item, offset in _split_top(text):
        if not item:
            raise HostlistError(text, offset, "empty name between commas")
        parts = _parse_item(text, item, offset)
        total += _count(parts)
        if total > MAX_HOSTS:
            raise HostlistError(text, offset, f"expands to more than {MAX_HOSTS} hosts")
        parsed.append((parts, offset))
    out: list[str] = []
    seen: set[str] = set()
    for parts, offset in parsed:
        for name in _names(parts):
            if len(name) > MAX_NAME:
                raise HostlistError(text, offset, f"host name {name[:20]!r}... is longer than "
                                    f"{MAX_NAME} characters")
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


_TAIL = re.compile(r"^(.*?)(\d+)([^\d]*)$", re.S)


def _check_name(name: str, index: int) -> None:
    where = f"name #{index + 1} {name!r}"
    if not isinstance(name, str) or not name:
        raise HostlistError(repr(name), 0, f"{where} is not a host name")
    bad = next((i for i, c in enumerate(name) if c not in _NAME_CHARS), None)
    if bad is not None:
        raise HostlistError(name, bad, f"character {name[bad]!r} is not allowed in host names")
    if name[0] in "-.":
        raise HostlistError(name, 0, f"a host name may not start with {name[0]!r}")


def compress_hostlist(names: Iterable[str]) -> str:
    """The reverse of expand_hostlist: ``node01,node02,node03,x`` -> ``node[01-03],x``.

    Names are grouped by what surrounds their last number (``n1-ib``, ``n2-ib`` ->
    ``n[1-2]-ib``); groups keep the order of their first name, numbers are sorted.
    ``expand_hostlist(compress_hostlist(names))`` gives the same set of names."""
    names = list(names)
    for i, name in enumerate(names):
        _check_name(name, i)
    parsed: list[tuple[str, str, str] | None] = []
    padded: dict[tuple[str, str], set[int]] = {}
    for name in names:
        m = _TAIL.match(name)
        if not m or len(m.group(2)) > MAX_DIGITS:
            parsed.append(None)
            continue
        prefix, digits, suffix = m.groups()
        parsed.append((prefix, digits, suffix))
        if len(digits) > 1 and digits.startswith("0"):
            padded.setdefault((prefix, suffix), set()).add(len(digits))
    groups: dict[tuple[str, str, int], set[int]] = {}
    order: list[tuple[str, str, int] | str] = []
    literals: set[str] = set()
    for name, p in zip(names, parsed):
        if p is None:
            if name not in literals:
                literals.add(name)
                order.append(name)
            continue
        prefix, digits, suffix = p
        if len(digits) > 1 and digits.startswith("0"):
            width = len(digits)
        elif len(digits) in padded.get((prefix, suffix), ()):
            width = len(digits)  # n10 joins n01..n09: zfill(2) gives it back unchanged
        else:
            width = 0
        key = (prefix, suffix, width)
        if key not in groups:
            groups[key] = set()
            order.append(key)
        groups[key].add(int(digits))
    out = []
    for key in order:
        if isinstance(key, str):
            out.append(key)
            continue
        prefix, suffix, width = key
        nums = sorted(groups[key])
        spans, lo = [], nums[0]
        for prev, cur in zip(nums, nums[1:] + [None]):
            if cur is None or cur != prev + 1:
                spans.append(str(lo).zfill(width) if lo == prev
                             else f"{str(lo).zfill(width)}-{str(prev).zfill(width)}")
                lo = cur
        if len(nums) == 1:
            out.append(f"{prefix}{spans[0]}{suffix}")
        else:
            out.append(f"{prefix}[{','.join(spans)}]{suffix}")
    return ",".join(out)
