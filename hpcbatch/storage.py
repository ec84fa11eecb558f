"""Storage: named containers of blobs, kept by the coordinator.

A container's default location is ``<home>/storage/<container>/`` on the coordinator's
machine (``blobs/`` the data, ``meta/`` one JSON per blob with its size, SHA-256 and
time, ``tmp/`` uploads in flight); a container may instead live at any fsspec URL
(``file:///data/in``, ``memory://x``, ``s3://bucket/prefix`` with the user's own fsspec
backend installed), its blobs at ``<url>/<name>`` and their metadata under
``<url>/.hpcbatch/``.

Uploads are atomic: the bytes go to a temporary file in the container, hashed as they
are written, and only a complete one is renamed to its name (a killed upload leaves
no blob, only a temporary file that a later upload removes). A blob's metadata carries
the inode it describes (local containers), so metadata left by a replaced blob is never
taken for the new one's.

Names: a container is an id (letters, digits, '-' or '_'); a blob is a relative path of
'/'-separated parts (no '' / '.' / '..' part, no NUL, not absolute, at most 1,024
characters). Every refusal is a ValidationError naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hpcbatch.errors import Conflict, HpcBatchError, NotFound, ValidationError

CONTAINER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_BLOB_NAME = 1024
CHUNK = 1 << 20  # bytes per read/write of a transfer
STALE_TMP_S = 3600.0  # an upload's temporary file older than this is removed
META_DIR = ".hpcbatch"  # in an fsspec container: its blobs' metadata and uploads in flight


def check_container(name: Any, field: str = "container") -> str:
    if not isinstance(name, str) or not CONTAINER_RE.fullmatch(name):
        raise ValidationError(field, f"{name!r} is not a container name; use 1 to 64 "
                              "letters, digits, '-' or '_'")
    return name


def check_blob_name(name: Any, field: str = "blob", *, prefix: bool = False) -> str:
    """A blob's name (or, with ``prefix``, the start of names: may be '' or end in '/')."""
    if not isinstance(name, str):
        raise ValidationError(field, f"{name!r} must be a string")
    if prefix and name == "":
        return name
    what = "prefix" if prefix else "name"
    if not name or len(name) > MAX_BLOB_NAME:
        raise ValidationError(field, f"a blob {what} has 1 to {MAX_BLOB_NAME} characters")
    if "\0" in name:
        raise ValidationError(field, f"{name!r} holds a NUL byte; remove it")
    if name.startswith("/"):
        raise ValidationError(field, f"{name!r} is absolute; a blob {what} is relative "
                              "('dir/file.txt')")
    parts = name.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts):
        raise ValidationError(field, f"{name!r} has an empty, '.' or '..' part; use "
                              "'dir/file.txt' without them")
    if parts and parts[0] == META_DIR:
        raise ValidationError(field, f"{name!r}: names under {META_DIR}/ are hpcbatch's own")
    return name


@dataclasses.dataclass(frozen=True)
class ContainerView:
    name: str
    url: str | None  # None: the default location under the home
    location: str  # where its blobs are (a directory on the coordinator, or the URL)
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BlobView:
    container: str
    name: str
    size: int
    sha256: str | None  # None: not known (written around hpcbatch into an fsspec location)
    modified_at: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _now() -> float:
    return time.time()


class Storage:
    """The containers of one home. Thread-safe: every write is a rename."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.root = self.home / "storage"

    # ---- containers ----------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self.root / check_container(name) / "container.json"

    def create(self, name: str, url: str | None = None, *, exist_ok: bool = False
               ) -> ContainerView:
        from hpcbatch.store import secure_dir
        check_container(name)
        if url is not None:
            url = _check_url(url, "url")
            _fs_of(url)  # its backend must be installed: said now, not at first upload
        secure_dir(self.home)
        secure_dir(self.root)
        folder = self.root / name
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if exist_ok and (folder / "container.json").is_file():
                view = self.get(name)
                if view.url != url:
                    raise Conflict(f"container {name!r} exists at {view.location}, not "
                                   f"{url or 'the default location'}") from None
                return view
            raise Conflict(f"container {name!r} already exists; pick another name or "
                           f"'hpcbatch storage delete {name}' first") from None
        for sub in ("blobs", "meta", "tmp"):
            os.mkdir(folder / sub, 0o700)
        record = {"name": name, "url": url, "created_at": _now()}
        _write_json_atomic(folder / "container.json", record)
        return self._view(record)

    def _view(self, record: dict[str, Any]) -> ContainerView:
        url = record.get("url")
        loc = url or str(self.root / record["name"] / "blobs")
        return ContainerView(record["name"], url, loc, float(record.get("created_at") or 0))

    def _record(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self._record_path(name).read_text())
        except FileNotFoundError:
            raise NotFound(f"container {name!r} does not exist; 'hpcbatch storage create "
                           f"{name}' makes it ('hpcbatch storage list' shows those there "
                           "are)") from None

    def get(self, name: str) -> ContainerView:
        return self._view(self._record(name))

    def exists(self, name: str) -> bool:
        try:
            return self._record_path(name).is_file()
        except ValidationError:
            return False

    def list(self) -> list[ContainerView]:
        out = []
        if self.root.is_dir():
            for entry in sorted(os.listdir(self.root)):
                if CONTAINER_RE.fullmatch(entry) and (self.root / entry /
                                                      "container.json").is_file():
                    with contextlib.suppress(OSError, ValueError):
                        out.append(self._view(json.loads(
                            (self.root / entry / "container.json").read_text())))
        return out

    def delete(self, name: str) -> None:
        """Remove the container: a default one with its blobs; one at a URL only its
        registration here (the data at the URL is the user's and stays)."""
        self._record(name)  # NotFound
        folder = self.root / name
        gone = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, gone)  # the name is free at once; no half-removed container
        shutil.rmtree(gone, ignore_errors=True)

    # ---- blobs -----------------------------------------------------------------------

    def _backend(self, container: str) -> _Backend:
        record = self._record(container)
        if record.get("url"):
            return _FsspecBackend(container, record["url"])
        return _LocalBackend(container, self.root / container)

    def put(self, container: str, name: str, chunks: Iterable[bytes],
            sha256: str | None = None) -> BlobView:
        """Store the bytes as blob ``name`` (atomically; checked against ``sha256`` when
        given: a mismatch stores nothing)."""
        check_blob_name(name)
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
            raise ValidationError("sha256", f"{sha256!r} is not a SHA-256 in hex")
        return self._backend(container).put(name, chunks, sha256)

    def put_file(self, container: str, name: str, path: str | os.PathLike) -> BlobView:
        with open(path, "rb") as f:
            return self.put(container, name, iter(lambda: f.read(CHUNK), b""))

    def info(self, container: str, name: str) -> BlobView:
        check_blob_name(name)
        return self._backend(container).info(name)

    def open(self, container: str, name: str) -> tuple[BlobView, BinaryIO]:
        """The blob's view and an open file of exactly that version (a blob replaced
        meanwhile does not change what this reads)."""
        check_blob_name(name)
        return self._backend(container).open(name)

    def read(self, container: str, name: str, *, offset: int = 0,
             length: int | None = None) -> tuple[BlobView, Iterator[bytes]]:
        view, f = self.open(container, name)
        return view, _chunks_of(f, offset, length)

    def list_blobs(self, container: str, prefix: str = "") -> list[BlobView]:
        check_blob_name(prefix, "prefix", prefix=True)
        return self._backend(container).list(prefix)

    def delete_blob(self, container: str, name: str) -> None:
        check_blob_name(name)
        self._backend(container).delete(name)

    def local_path(self, container: str, name: str) -> tuple[BlobView, str] | None:
        """(view, path on this machine) of a blob of a default container; None for one
        at a URL (read it with open())."""
        check_blob_name(name)
        backend = self._backend(container)
        if not isinstance(backend, _LocalBackend):
            return None
        view = backend.info(name)
        return view, str(backend.blob_path(name))


def _chunks_of(f: BinaryIO, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
    try:
        if offset:
            f.seek(offset)
        left = length
        while left is None or left > 0:
            data = f.read(CHUNK if left is None else min(CHUNK, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data
    finally:
        f.close()


class _Backend:
    container: str

    def put(self, name: str, chunks: Iterable[bytes], sha256: str | None) -> BlobView:
        raise NotImplementedError

    def info(self, name: str) -> BlobView:
        raise NotImplementedError

    def open(self, name: str) -> tuple[BlobView, BinaryIO]:
        raise NotImplementedError

    def list(self, prefix: str) -> list[BlobView]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def _missing(self, name: str) -> NotFound:
        return NotFound(f"blob {name!r} is not in container {self.container!r} "
                        f"('hpcbatch storage ls {self.container}' lists its blobs)")


def write_hashed(path: Path, chunks: Iterable[bytes], *, fsync: bool = False
                 ) -> tuple[Any, int, os.stat_result]:
    """Write ``chunks`` into a new private file ``path`` (made afresh, never through a
    link), hashing them as they go: (the SHA-256 object, size, the file's stat)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        st = os.fstat(f.fileno())
    return digest, size, st


def checked_sha256(digest: Any, sha256: str | None) -> str:
    """The digest in hex; ValidationError when the sender said another one."""
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        raise ValidationError("sha256", f"the bytes sent hash to {got}, not {sha256}; "
                              "send the file again")
    return got


class _LocalBackend(_Backend):
    """A container under the home: blobs/<name>, meta/<name>.json, tmp/."""

    def __init__(self, container: str, folder: Path):
        self.container = container
        self.folder = folder

    def blob_path(self, name: str) -> Path:
        return self.folder / "blobs" / name

    def _meta_path(self, name: str) -> Path:
        return self.folder / "meta" / f"{name}.json"

    def _clean_tmp(self) -> None:
        tmp = self.folder / "tmp"
        now = _now()
        with contextlib.suppress(OSError):
            for entry in os.scandir(tmp):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_S:
                        os.unlink(entry.path)

    def _dirs_for(self, base: Path, name: str) -> None:
        parent = (base / name).parent
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except (FileExistsError, NotADirectoryError):
            raise Conflict(f"blob {name!r}: a part of its path is a blob already in "
                           f"container {self.container!r}; a name cannot be both a blob "
                           "and a folder") from None

    def put(self, name: str, chunks: Iterable[bytes], sha256: str | None) -> BlobView:
        from hpcbatch.store import storage_full
        self._clean_tmp()
        dest = self.blob_path(name)
        if dest.is_dir():
            raise Conflict(f"blob {name!r} is a folder of blobs in container "
                           f"{self.container!r}; pick another name")
        tmp = self.folder / "tmp" / f"{uuid.uuid4().hex}.part"
        try:
            digest, size, st = write_hashed(tmp, chunks, fsync=True)
            got = checked_sha256(digest, sha256)
            self._dirs_for(self.folder / "blobs", name)
            self._dirs_for(self.folder / "meta", name)
            view = BlobView(self.container, name, size, got, st.st_mtime)
            # the metadata first, naming the inode it is for; then the blob appears
            _write_json_atomic(self._meta_path(name), {**view.to_dict(), "ino": st.st_ino})
            os.replace(tmp, dest)
            tmp = None
            return view
        except OSError as exc:
            full = storage_full(exc, self.folder)
            if full is not None:
                raise full from None
            raise
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _view_of(self, name: str, st: os.stat_result, f: BinaryIO | None = None) -> BlobView:
        try:
            meta = json.loads(self._meta_path(name).read_text())
        except (OSError, ValueError):
            meta = {}
        sha = meta.get("sha256") if meta.get("ino") == st.st_ino and \
            meta.get("size") == st.st_size else None
        if sha is None:  # written around us, or its metadata lost: hash it once, keep it
            with (open(self.blob_path(name), "rb") if f is None else
                  contextlib.nullcontext(f)) as src:
                pos = src.tell()
                h = hashlib.sha256()
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                src.seek(pos)
            sha = h.hexdigest()
            with contextlib.suppress(OSError, HpcBatchError):
                self._dirs_for(self.folder / "meta", name)
                _write_json_atomic(self._meta_path(name), {
                    "container": self.container, "name": name, "size": st.st_size,
                    "sha256": sha, "modified_at": st.st_mtime, "ino": st.st_ino})
        return BlobView(self.container, name, st.st_size, sha, st.st_mtime)

    def info(self, name: str) -> BlobView:
        try:
            st = os.stat(self.blob_path(name), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(name) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._missing(name)
        return self._view_of(name, st)

    def open(self, name: str) -> tuple[BlobView, BinaryIO]:
        try:
            fd = os.open(self.blob_path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(name) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._missing(name) from None
            raise
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._missing(name)
            return self._view_of(name, st, f), f
        except BaseException:
            f.close()
            raise

    def list(self, prefix: str) -> list[BlobView]:
        base = self.folder / "blobs"
        out = []
        # walk only the folders the prefix can reach
        head, _, _ = prefix.rpartition("/")
        start = base / head if head else base
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, base)
            for fn in sorted(filenames):
                name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if not name.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(dirpath, fn), follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        out.append(self._view_of(name, st))
        out.sort(key=lambda b: b.name)
        return out

    def delete(self, name: str) -> None:
        path = self.blob_path(name)
        try:
            if path.is_dir() and not path.is_symlink():
                raise self._missing(name)
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(name) from None
        with contextlib.suppress(OSError):
            os.unlink(self._meta_path(name))
        # empty folders left behind go too (up to blobs/ and meta/)
        for base in (self.folder / "blobs", self.folder / "meta"):
            parent = (base / name).parent
            while parent != base:
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = parent.parent


def _check_url(url: Any, field: str) -> str:
    if not isinstance(url, str) or "://" not in url or "\0" in url:
        raise ValidationError(field, f"{url!r} is not a URL (file:///data, s3://bucket/"
                              "prefix, memory://name ...)")
    return url.rstrip("/")


def _fs_of(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL; a one-line error when fsspec or the backend
    for its protocol is not installed."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise HpcBatchError(f"{url}: containers at a URL need fsspec (pip install "
                            "fsspec)") from None
    del fsspec
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValidationError("url", f"{url}: {exc}".splitlines()[0]) from None


class _FsspecBackend(_Backend):
    """A container at an fsspec URL: <url>/<name>, <url>/.hpcbatch/meta/<name>.json,
    uploads in flight in <url>/.hpcbatch/tmp/."""

    def __init__(self, container: str, url: str):
        self.container = container
        self.url = url
        self.fs, self.path = _fs_of(url)

    def _p(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def put(self, name: str, chunks: Iterable[bytes], sha256: str | None) -> BlobView:
        tmp = self._p(META_DIR, "tmp", f"{uuid.uuid4().hex}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            self.fs.makedirs(self._p(META_DIR, "tmp"), exist_ok=True)
            with self.fs.open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            got = checked_sha256(digest, sha256)
            dest = self._p(name)
            parent = dest.rpartition("/")[0]
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.makedirs(self._p(META_DIR, "meta", *name.split("/")[:-1]), exist_ok=True)
            view = BlobView(self.container, name, size, got, _now())
            with self.fs.open(self._p(META_DIR, "meta", f"{name}.json"), "w") as f:
                json.dump(view.to_dict(), f)
            self.fs.mv(tmp, dest)  # a rename on file://; one PUT on object stores
            tmp = None
            return view
        finally:
            if tmp is not None:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)

    def _view(self, name: str, detail: dict[str, Any]) -> BlobView:
        size = int(detail.get("size") or 0)
        sha = None
        try:
            with self.fs.open(self._p(META_DIR, "meta", f"{name}.json"), "r") as f:
                meta = json.load(f)
            if meta.get("size") == size:
                sha = meta.get("sha256")
        except (OSError, ValueError):
            pass
        mtime = detail.get("mtime") or detail.get("LastModified") or detail.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        try:
            mtime = float(mtime)
        except (TypeError, ValueError):
            mtime = 0.0
        return BlobView(self.container, name, size, sha, mtime)

    def info(self, name: str) -> BlobView:
        try:
            detail = self.fs.info(self._p(name))
        except FileNotFoundError:
            raise self._missing(name) from None
        if detail.get("type") != "file":
            raise self._missing(name)
        return self._view(name, detail)

    def open(self, name: str) -> tuple[BlobView, BinaryIO]:
        view = self.info(name)
        try:
            return view, self.fs.open(self._p(name), "rb")
        except FileNotFoundError:
            raise self._missing(name) from None

    def list(self, prefix: str) -> list[BlobView]:
        base = self.path.rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for path, detail in found.items():
            name = path[len(base):].lstrip("/") if path.startswith(base) else path
            if name.startswith(f"{META_DIR}/") or not name.startswith(prefix):
                continue
            if detail.get("type", "file") == "file":
                out.append(self._view(name, detail))
        out.sort(key=lambda b: b.name)
        return out

    def delete(self, name: str) -> None:
        try:
            self.fs.rm(self._p(name))
        except FileNotFoundError:
            raise self._missing(name) from None
        with contextlib.suppress(Exception):
            self.fs.rm(self._p(META_DIR, "meta", f"{name}.json"))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["BlobView", "ContainerView", "Storage", "check_blob_name", "check_container",
           "sha256_file"]
