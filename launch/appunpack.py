"""Application package archives: checked, and unpacked once per node (standard library only).

Uploaded beside the agent; the coordinator's side (:mod:`hpcbatch.apps`) checks an
archive with the same rules at upload. An archive is a ``.zip`` or a ``.tar.gz``; every
entry must stay inside the package: no absolute path, no ``..`` above its root, no link
that resolves outside it (links are followed as the file system would, through other
links of the archive), no device, fifo or socket.

``python appunpack.py unpack ARCHIVE APP_DIR VERSION SHA256`` (the agent runs it as a
child) unpacks into ``APP_DIR/VERSION`` exactly once: under an ``flock`` on
``APP_DIR/.VERSION.lock`` it unpacks into a private ``.VERSION.tmp-PID`` and renames
that into place, so nobody ever sees a half-unpacked package; a second unpacker that
waited for the lock finds the package there (its ``.hpcbatch-app.json`` names the
archive's sha256) and does nothing. Each unpack adds a line to ``APP_DIR/unpack.log``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import time
import zipfile
import zlib

MARKER = ".hpcbatch-app.json"
FORMATS = ("zip", "tar.gz")
MAX_LINK_HOPS = 40


class ArchiveError(ValueError):
    """The archive is unreadable or an entry would land outside the package."""


def archive_format(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".zip"):
        return "zip"
    if low.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    return None


def _clean(name: str) -> str:
    """The entry's path inside the package, or ArchiveError."""
    if not name or "\0" in name:
        raise ArchiveError(f"entry {name!r} has an empty or unprintable name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"entry {name!r} is an absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"entry {name!r} has a '..' component (it would land outside "
                           "the package)")
    return "/".join(parts)


def _resolve(links: dict[str, str], path: str, where: str) -> None:
    """Follow ``path`` (relative to the package root) through the archive's links;
    ArchiveError when it climbs above the root."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    todo.reverse()
    stack: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if not stack:
                raise ArchiveError(f"{where} points outside the package")
            stack.pop()
            continue
        stack.append(part)
        cur = "/".join(stack)
        target = links.get(cur)
        if target is None:
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            raise ArchiveError(f"{where}: too many levels of links")
        if target.startswith("/"):
            raise ArchiveError(f"{where} points to the absolute path {target!r}")
        stack.pop()
        todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))


def _entries(path: str, fmt: str) -> list[tuple[str, str, str, int]]:
    """(name, kind, link target, mode) of every entry, kind file/dir/symlink/hardlink;
    reads every byte (a corrupt archive fails its checksum here)."""
    out = []
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ArchiveError(f"entry {bad!r} fails its CRC check (a corrupt archive)")
                for info in zf.infolist():
                    mode = (info.external_attr >> 16) & 0o177777
                    if stat.S_ISLNK(mode):
                        out.append((info.filename, "symlink",
                                    zf.read(info).decode(errors="replace"), 0o777))
                    elif info.is_dir():
                        out.append((info.filename, "dir", "", 0o755))
                    elif mode and not stat.S_ISREG(mode):
                        raise ArchiveError(f"entry {info.filename!r} is not a file, folder "
                                           "or link")
                    else:
                        out.append((info.filename, "file", "", (mode & 0o777) or 0o644))
        else:
            with gzip.open(path) as whole:  # to its end: the gzip CRC and length checked
                while whole.read(1 << 20):
                    pass
            with tarfile.open(path, "r:gz") as tf:
                for m in tf:
                    if m.issym():
                        out.append((m.name, "symlink", m.linkname, 0o777))
                    elif m.islnk():
                        out.append((m.name, "hardlink", m.linkname, 0))
                    elif m.isdir():
                        out.append((m.name, "dir", "", m.mode & 0o777))
                    elif m.isfile():
                        f = tf.extractfile(m)
                        while f is not None and f.read(1 << 20):
                            pass
                        out.append((m.name, "file", "", m.mode & 0o777))
                    else:
                        raise ArchiveError(f"entry {m.name!r} is a device, fifo or other "
                                           "special file")
    except ArchiveError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, ValueError,
            zlib.error) as exc:
        raise ArchiveError(f"not a readable {fmt} archive ({exc})") from None
    return out


def check(path: str, fmt: str) -> dict:
    """Check every entry; returns {'entries': N, 'has_bin': bool}. ArchiveError else."""
    if fmt not in FORMATS:
        raise ArchiveError(f"unknown archive format {fmt!r}; use .zip or .tar.gz")
    entries = _entries(path, fmt)
    links: dict[str, str] = {}
    clean = []
    for name, kind, target, _mode in entries:
        norm = _clean(name)
        if not norm:
            if kind == "dir":
                continue
            raise ArchiveError(f"entry {name!r} names the package root")
        if kind == "symlink":
            links[norm] = target
        clean.append((norm, kind, target))
    for norm, kind, target in clean:
        where = f"entry {norm!r}"
        parent = norm.rpartition("/")[0]
        if parent:
            _resolve(links, parent, where)
        if kind == "symlink":
            _resolve(links, (parent + "/" if parent else "") + target, f"link {where}")
        elif kind == "hardlink":
            _resolve(links, _clean(target), f"hard link {where}")
    has_bin = any(n == "bin" or n.startswith("bin/") for n, _, _ in clean)
    return {"entries": len(clean), "has_bin": has_bin}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(path: str, fmt: str, dest: str) -> None:
    """Every entry into the fresh directory ``dest`` (already checked)."""
    def target(name: str) -> str:
        return os.path.join(dest, *_clean(name).split("/"))

    def write(name: str, src, mode: int) -> None:
        p = target(name)
        os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            os.fchmod(out.fileno(), (mode & 0o777) or 0o644)

    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not _clean(info.filename):
                    continue
                mode = (info.external_attr >> 16) & 0o177777
                if stat.S_ISLNK(mode):
                    p = target(info.filename)
                    os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                    os.symlink(zf.read(info).decode(), p)
                elif info.is_dir():
                    os.makedirs(target(info.filename), mode=0o755, exist_ok=True)
                else:
                    with zf.open(info) as src:
                        write(info.filename, src, mode & 0o777)
        return
    with tarfile.open(path, "r:gz") as tf:
        dirs = []
        for m in tf:
            if not _clean(m.name):
                continue
            if m.isdir():
                os.makedirs(target(m.name), mode=0o755, exist_ok=True)
                dirs.append((target(m.name), m.mode & 0o777))
            elif m.issym():
                p = target(m.name)
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                os.symlink(m.linkname, p)
            elif m.islnk():
                p = target(m.name)
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                os.link(target(m.linkname), p, follow_symlinks=False)
            else:
                write(m.name, tf.extractfile(m), m.mode)
        for d, mode in reversed(dirs):
            os.chmod(d, mode | 0o700)


def unpack(archive: str, app_dir: str, version: str, sha256: str) -> bool:
    """Unpack once into app_dir/version (True: this call did it; False: already there)."""
    fmt = archive_format(archive)
    if fmt is None:
        raise ArchiveError(f"{archive} is neither a .zip nor a .tar.gz")
    if "/" in version or version in ("", ".", ".."):
        raise ArchiveError(f"bad version {version!r}")
    os.makedirs(app_dir, mode=0o700, exist_ok=True)
    dest = os.path.join(app_dir, version)
    lock_fd = os.open(os.path.join(app_dir, f".{version}.lock"),
                      os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with open(os.path.join(dest, MARKER)) as f:
                if json.load(f).get("sha256") == sha256:
                    return False
        except (OSError, ValueError):
            pass
        for name in os.listdir(app_dir):  # what an unpacker killed half-way left
            if name.startswith(f".{version}.tmp-") or name.startswith(f".{version}.old-"):
                shutil.rmtree(os.path.join(app_dir, name), ignore_errors=True)
        got = sha256_of(archive)
        if got != sha256:
            raise ArchiveError(f"{archive} hashes to {got}, not {sha256} (a damaged copy)")
        check(archive, fmt)
        tmp = os.path.join(app_dir, f".{version}.tmp-{os.getpid()}")
        os.mkdir(tmp, 0o700)
        try:
            _extract(archive, fmt, tmp)
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"version": version, "sha256": sha256, "unpacked_at": time.time()},
                          f)
            os.chmod(tmp, 0o755)
            if os.path.lexists(dest):  # another content under this version (re-uploaded)
                old = os.path.join(app_dir, f".{version}.old-{os.getpid()}")
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with open(os.path.join(app_dir, "unpack.log"), "a") as f:
            f.write(f"{time.time():.3f} {version} {sha256} {os.getpid()}\n")
        return True
    finally:
        os.close(lock_fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] != "unpack":
        print("usage: appunpack.py unpack ARCHIVE APP_DIR VERSION SHA256", file=sys.stderr)
        return 2
    try:
        unpack(*args[1:])
    except (OSError, ArchiveError) as exc:
        print(f"unpacking {args[1]} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
