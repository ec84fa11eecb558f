#!/usr/bin/env python3
"""A node's cache of resource files, placing them in task directories, and finding a
task's output files.

Standard library only: uploaded to nodes beside ``agent.py``. The coordinator puts a
file it sends into ``<node root>/cache/<sha256>`` (SFTP, or a copy on this machine),
then runs ``place`` (``python3 nodecache.py place`` with a JSON request on stdin, or
the function in-process for local nodes): each newly fetched file is checked against
its SHA-256 (a mismatch removes it and fails), each entry is copied from the cache to
its path in the task's directory (no symbolic link followed below the node root; the
file written under a temporary name, given its mode, renamed into place) and the cache
entry's time is renewed. Then the cache is trimmed to its size cap, least recently used
first, never removing an entry this request used or one used in the last minute (a
concurrent request may be about to copy it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

ERROR = "error"  # the key of the answer to a request that failed (see check_answer)


def check_answer(answer: dict) -> dict:
    """The answer of a request (``place``, ``match``); OSError with its reason if it failed."""
    if ERROR in answer:
        raise OSError(answer[ERROR])
    return answer


CHUNK = 1 << 20
RECENT_S = 60.0


def _agent():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import agent  # the copy uploaded beside this file
    except ImportError:  # pragma: no cover - installed package
        from hpcbatch.launch import agent
    return agent


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(root: str) -> str:
    return os.path.join(root, "cache")


def have(root: str, digests: list[str]) -> list[str]:
    """Those of ``digests`` already in the node's cache."""
    d = cache_dir(root)
    return [s for s in digests if os.path.isfile(os.path.join(d, s))]


def place(request: dict) -> dict:
    """``request``: root, dest_dir, entries [{sha256, rel, mode}], fetched [sha256 ...]
    (to check), cap_bytes. Returns {"placed": n, "evicted": n}; raises OSError naming
    the file on any failure."""
    root, dest_dir = request["root"], request["dest_dir"]
    cdir = cache_dir(root)
    for digest in request.get("fetched") or ():
        path = os.path.join(cdir, digest)
        got = sha256_of(path)
        if got != digest:
            os.unlink(path)
            raise OSError(f"the copy of a resource file on this node hashes to {got}, not "
                          f"{digest}: it was damaged on the way (fetch it again)")
    used = set()
    for entry in request["entries"]:
        digest, rel, mode = entry["sha256"], entry["rel"], int(entry["mode"])
        check_rel(rel, dest_dir)
        src = os.path.join(cdir, digest)
        try:
            os.utime(src)  # used now: the last to be evicted
        except FileNotFoundError:
            raise OSError(f"{rel}: its cached copy {digest[:12]} vanished (evicted); "
                          "fetch it again") from None
        used.add(digest)
        copy_into(root, dest_dir, rel, src, mode)
    return {"placed": len(request["entries"]),
            "evicted": evict(cdir, int(request.get("cap_bytes") or 0), used)}


def check_rel(rel: str, dest_dir: str) -> list[str]:
    """The parts of a relative destination path; OSError if it leaves ``dest_dir``."""
    parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or rel.startswith("/"):
        raise OSError(f"refusing resource file path {rel!r}: it must stay inside "
                      f"{dest_dir}")
    return parts


def copy_into(base: str, dest_dir: str, rel: str, src: str, mode: int) -> None:
    """Copy the file ``src`` to ``dest_dir/rel`` with permission bits ``mode`` (not
    setuid/setgid), written to a temporary name and renamed into place. Below ``base``
    no symbolic link is followed: missing folders are made 0700, a link where a folder
    should be is refused, and a link in the file's place is replaced."""
    import threading
    parts = check_rel(rel, dest_dir)
    fd = _agent().open_dir_below(base, os.path.join(dest_dir, *parts[:-1]))
    name = parts[-1]
    tmp = f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                      os.O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            with open(src, "rb") as s, os.fdopen(out, "wb") as dst:
                copy_fd(s.fileno(), dst.fileno())
                os.fchmod(dst.fileno(), mode & 0o777)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            tmp = None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
    finally:
        os.close(fd)


def copy_fd(src: int, dst: int) -> None:
    """All of src into dst in the kernel (copy_file_range: a reflink where the
    filesystem can; else sendfile; else read/write)."""
    size = os.fstat(src).st_size
    done = 0
    for fn in (getattr(os, "copy_file_range", None), getattr(os, "sendfile", None)):
        if fn is None:
            continue
        try:
            while done < size:
                n = fn(src, dst, size - done, done, None) if fn is not os.sendfile else \
                    os.sendfile(dst, src, done, size - done)
                if n == 0:
                    break
                done += n
            if done >= size:
                return
        except OSError:
            pass
    os.lseek(src, done, os.SEEK_SET)
    os.lseek(dst, done, os.SEEK_SET)
    while True:
        block = os.read(src, CHUNK)
        if not block:
            return
        os.write(dst, block)


def evict(cdir: str, cap_bytes: int, keep: set[str] = frozenset()) -> int:
    """Remove the least recently used entries until the cache holds at most cap_bytes;
    returns how many went."""
    if cap_bytes <= 0:
        return 0
    entries = []
    total = 0
    now = time.time()
    try:
        scan = list(os.scandir(cdir))
    except FileNotFoundError:
        return 0
    for e in scan:
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if e.name.startswith(".") or ".tmp-" in e.name:
            if now - st.st_mtime > 3600:  # an upload that never finished
                try:
                    os.unlink(e.path)
                except OSError:
                    pass
            continue
        total += st.st_size
        entries.append((st.st_mtime, e.name, st.st_size, e.path))
    gone = 0
    for mtime, name, size, path in sorted(entries):
        if total <= cap_bytes:
            break
        if name in keep or now - mtime < RECENT_S:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        gone += 1
    return gone


def _fixed_dir(pattern: str) -> str:
    """The leading directories of a glob that hold no wildcard ('out/**/*.h5' -> 'out')."""
    parts = pattern.split("/")[:-1]
    fixed = []
    for p in parts:
        if any(c in p for c in "*?["):
            break
        fixed.append(p)
    return "/".join(fixed)


def match(request: dict) -> dict:
    """``request``: task_dir, wd (the working directory, absolute), patterns. Returns
    {"matches": [[pattern index, path relative to the task dir, path below the
    pattern's fixed part, size] ...]}: regular files only (a symbolic link is skipped),
    never outside the task directory (or the working directory, where it is elsewhere)."""
    import glob
    tdir = os.path.realpath(request["task_dir"])
    wd = request["wd"]
    inside = (tdir + os.sep, os.path.realpath(wd) + os.sep)  # (a working_dir elsewhere)
    out = []
    for i, pattern in enumerate(request["patterns"]):
        base = os.path.normpath(os.path.join(wd, _fixed_dir(pattern)))
        for hit in sorted(glob.glob(pattern, root_dir=wd, recursive=True)):
            path = os.path.normpath(os.path.join(wd, hit))
            real = os.path.realpath(path)
            if real != path or not real.startswith(inside):
                continue  # through a link, or outside the task's directory
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            out.append([i, os.path.relpath(path, tdir), os.path.relpath(path, base),
                        st.st_size])
    return {"matches": out}


def main(argv: list[str]) -> int:
    if argv[:1] == ["match"]:
        try:
            out = match(json.load(sys.stdin))
        except (OSError, ValueError, KeyError) as exc:
            print(json.dumps({ERROR: str(exc)}))
            return 1
        print(json.dumps(out))
        return 0
    if argv[:1] == ["place"]:
        try:
            out = place(json.load(sys.stdin))
        except (OSError, ValueError, KeyError) as exc:
            print(json.dumps({ERROR: str(exc)}))
            return 1
        print(json.dumps(out))
        return 0
    if argv[:1] == ["have"]:
        print(json.dumps(have(argv[1], argv[2:])))
        return 0
    print("usage: nodecache.py place < request.json | have ROOT SHA...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
