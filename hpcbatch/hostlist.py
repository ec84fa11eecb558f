"""Slurm-style host lists: ``node[01-16]``, ``gpu[1-2,5],login1``, ``r[1-2]-n[1-3]``."""

from __future__ import annotations

import re

from hpcbatch.errors import ValidationError

_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]")


class HostlistError(ValidationError):
    def __init__(self, text: str, pos: int, why: str):
        self.text, self.pos = text, pos
        super().__init__("hostlist", f"{text!r} at position {pos}: {why} (expected names "
                         "like node[01-16] or gpu[1-2,5],login1)")


def _ranges(text: str, body: str, at: int) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise HostlistError(text, at, f"bad range {part!r} inside []")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostlistError(text, at, f"range {part!r} runs backwards")
        if int(hi) - int(lo) > 100_000:
            raise HostlistError(text, at, f"range {part!r} is too large")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _expand_one(text: str, item: str, offset: int) -> list[str]:
    names = [""]
    i = 0
    while i < len(item):
        ch = item[i]
        if ch == "[":
            end = item.find("]", i)
            if end < 0:
                raise HostlistError(text, offset + i, "'[' is never closed")
            choices = _ranges(text, item[i + 1:end], offset + i)
            names = [n + c for n in names for c in choices]
            i = end + 1
        elif ch == "]":
            raise HostlistError(text, offset + i, "']' without '['")
        elif _NAME_CHARS.match(ch):
            names = [n + ch for n in names]
            i += 1
        else:
            raise HostlistError(text, offset + i, f"character {ch!r} is not allowed")
    return names


def expand_hostlist(text: str) -> list[str]:
    """Expand to host names, in order, without duplicates."""
    if not text or not text.strip():
        raise HostlistError(text, 0, "empty host list")
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append((text[start:i], start))
            start = i + 1
    items.append((text[start:], start))
    out: list[str] = []
    for item, offset in items:
        if not item:
            raise HostlistError(text, offset, "empty name between commas")
        for name in _expand_one(text, item, offset):
            if name not in out:
                out.append(name)
    return out


def compress_hostlist(names: list[str]) -> str:
    """The reverse, for display: ``node01,node02,node03,x`` -> ``node[01-03],x``."""
    groups: dict[tuple[str, int], list[int]] = {}
    order: list[tuple[str, int] | str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if not m:
            order.append(name)
            continue
        key = (m.group(1), len(m.group(2)) if m.group(2).startswith("0") else 0)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(m.group(2)))
    out = []
    for key in order:
        if isinstance(key, str):
            out.append(key)
            continue
        prefix, width = key
        nums = sorted(set(groups[key]))
        spans, lo = [], nums[0]
        for prev, cur in zip(nums, nums[1:] + [None]):
            if cur != prev + 1 if cur is not None else True:
                spans.append(f"{lo:0{width}d}" + (f"-{prev:0{width}d}" if prev != lo else ""))
                lo = cur
        out.append(f"{prefix}{spans[0]}" if len(spans) == 1 and "-" not in spans[0]
                   else f"{prefix}[{','.join(spans)}]")
    return ",".join(out)
