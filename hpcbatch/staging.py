"""Resource files: from what a task names to bytes on its node.

``Stager.stage(chan, files, dest_dir)`` runs on a coordinator worker thread: each
resource file of the task (a local ``source``, a ``container`` with a ``blob_prefix``,
a ``container_url``, a ``storage_path``, a ``url``) becomes one or more
:class:`~hpcbatch.transport.CachedFile` (a file on the coordinator's machine, its
SHA-256, where it goes, its mode), then the channel places them through the node's
cache (``<node root>/cache/<sha256>``, bounded, least recently used evicted): a file the
node already holds with that checksum is not sent again.

Where the bytes are on the coordinator's machine: a blob of a default container is
read where it is; anything else (a blob of a container at an fsspec URL, a URL) is
fetched into ``<home>/cache/fetched/<sha256>`` first (kept for the next task, bounded
by the same cap). A local source's hash is kept per (path, size, mtime) so a file given
to 10,000 tasks is hashed once.

Every failure raises :class:`StagingError` with one line naming the file and why (no
blob under a prefix, a missing container, an HTTP 404 ...); the coordinator fails the
attempt with ``pre_processing_error`` and that line.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import posixpath
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcbatch.errors import HpcBatchError
from hpcbatch.models import _file_mode
from hpcbatch.storage import CHUNK, Storage
from hpcbatch.transport import CachedFile

log = logging.getLogger("hpcbatch.staging")

DEFAULT_CACHE_BYTES = 20 << 30  # a node's (and the coordinator's fetched) cache, at most
BLOB_MODE = 0o644  # a blob's or URL's mode when the task gives none
URL_TIMEOUT_S = 60.0


def cache_bytes_from_env() -> int:
    """HPCBATCH_NODE_CACHE_MB (the cap of each node's cache), else the default."""
    from hpcbatch import env as E
    text = os.environ.get(E.NODE_CACHE_MB, "").strip()
    try:
        return int(float(text) * (1 << 20)) if text else DEFAULT_CACHE_BYTES
    except ValueError:
        log.warning("%s=%r is not a number of MiB; using %d MiB", E.NODE_CACHE_MB, text,
                    DEFAULT_CACHE_BYTES >> 20)
        return DEFAULT_CACHE_BYTES


class StagingError(Exception):
    """A resource file could not be fetched; the message says which and why."""


class Stager:
    def __init__(self, home: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.home = Path(home)
        self.storage = Storage(self.home)
        self.cache_bytes = cache_bytes
        self.fetched_dir = self.home / "cache" / "fetched"
        self._hashes: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()
        self.counts = {"fetched": 0, "hits": 0, "bytes_sent": 0}  # what nodes were sent
        # the latest stagings: (what, seconds, bytes sent, files sent, cache hits)
        self.history: collections.deque = collections.deque(maxlen=1000)

    # ---- what the task names -> files on this machine --------------------------------

    def resolve(self, files: Iterable[Mapping[str, Any]]) -> list[CachedFile]:
        out: list[CachedFile] = []
        for rf in files:
            try:
                out.extend(self._resolve_one(rf))
            except StagingError:
                raise
            except HpcBatchError as exc:
                raise StagingError(f"{_what(rf)}: {exc}") from None
            except OSError as exc:
                raise StagingError(f"{_what(rf)}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from None
        return out

    def _mode(self, rf: Mapping[str, Any], default: int) -> int:
        mode = _file_mode("file_mode", rf.get("file_mode"))
        return int(mode, 8) if mode is not None else default

    def _resolve_one(self, rf: Mapping[str, Any]) -> list[CachedFile]:
        rel = rf.get("file_path") or ""
        if rf.get("container"):
            container, prefix = rf["container"], rf.get("blob_prefix") or ""
            blobs = self.storage.list_blobs(container, prefix)
            if not blobs:
                raise StagingError(f"no blob of container {container!r} starts with "
                                   f"{prefix!r} ('hpcbatch storage ls {container}' lists "
                                   "them)")
            return [self._blob(container, b.name, posixpath.join(rel, b.name) if rel else
                               b.name, self._mode(rf, BLOB_MODE)) for b in blobs]
        if rf.get("storage_path"):
            container, _, blob = rf["storage_path"].partition("/")
            return [self._blob(container, blob, rel, self._mode(rf, BLOB_MODE))]
        if rf.get("container_url"):
            return self._container_url(rf["container_url"], rf.get("blob_prefix") or "",
                                       rel, self._mode(rf, BLOB_MODE))
        if rf.get("url"):
            return [CachedFile(*self._fetch_url(rf["url"]), rel, self._mode(rf, BLOB_MODE))]
        source = rf["source"]
        st = os.stat(source)
        if not os.path.isfile(source):
            raise StagingError(f"{source} is not a file")
        return [CachedFile(source, self._hash_local(source, st), rel,
                           self._mode(rf, st.st_mode & 0o777))]

    def _hash_local(self, path: str, st: os.stat_result) -> str:
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            with self._lock:
                if len(self._hashes) > 100_000:
                    self._hashes.clear()
                self._hashes[key] = digest
        return digest

    def _blob(self, container: str, name: str, rel: str, mode: int) -> CachedFile:
        local = self.storage.local_path(container, name)
        if local is not None:
            view, path = local
            return CachedFile(path, view.sha256 or self._hash_local(path, os.stat(path)),
                              rel, mode)
        view, f = self.storage.open(container, name)
        if view.sha256:
            cached = self.fetched_dir / view.sha256
            if cached.is_file():
                f.close()
                os.utime(cached)
                return CachedFile(str(cached), view.sha256, rel, mode)
        path, digest = self._keep(_iter_file(f), f"{container}/{name}")
        return CachedFile(path, digest, rel, mode)

    def _container_url(self, url: str, prefix: str, rel: str, mode: int) -> list[CachedFile]:
        from hpcbatch.storage import _fs_of
        fs, base = _fs_of(url.rstrip("/"))
        base = base.rstrip("/")
        try:
            found = sorted(fs.find(base))
        except FileNotFoundError:
            found = []
        names = [p[len(base):].lstrip("/") for p in found if p.startswith(base)]
        names = [n for n in names if n.startswith(prefix) and not n.startswith(".hpcbatch/")]
        if not names:
            raise StagingError(f"nothing at {url} starts with {prefix!r}")
        out = []
        for n in names:
            with fs.open(f"{base}/{n}", "rb") as f:
                path, digest = self._keep(iter(lambda f=f: f.read(CHUNK), b""), f"{url}/{n}")
            out.append(CachedFile(path, digest, posixpath.join(rel, n) if rel else n, mode))
        return out

    def _fetch_url(self, url: str) -> tuple[str, str]:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            try:
                response = urllib.request.urlopen(url, timeout=URL_TIMEOUT_S)  # noqa: S310
            except urllib.error.HTTPError as exc:
                raise StagingError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise StagingError(f"{url}: {getattr(exc, 'reason', exc)}") from None
            with response:
                return self._keep(iter(lambda: response.read(CHUNK), b""), url)
        from hpcbatch.storage import _fs_of
        fs, path = _fs_of(url)
        try:
            with fs.open(path, "rb") as f:
                return self._keep(iter(lambda: f.read(CHUNK), b""), url)
        except FileNotFoundError:
            raise StagingError(f"{url} does not exist") from None

    def _keep(self, chunks: Iterable[bytes], what: str) -> tuple[str, str]:
        """The bytes into <home>/cache/fetched/<sha256>: (path, sha256)."""
        from hpcbatch.store import secure_dir
        secure_dir(self.home / "cache")
        secure_dir(self.fetched_dir)
        from hpcbatch.storage import write_hashed
        tmp = self.fetched_dir / f".{uuid.uuid4().hex}.tmp"
        try:
            digest = write_hashed(tmp, chunks)[0].hexdigest()
            dest = self.fetched_dir / digest
            os.replace(tmp, dest)
            tmp = None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        from hpcbatch.launch.nodecache import evict
        evict(str(self.fetched_dir), self.cache_bytes, {digest})
        return str(dest), digest

    # ---- onto the node -------------------------------------------------------------

    def stage(self, chan: Any, files: Iterable[Mapping[str, Any]], dest_dir: str,
              what: str = "") -> dict:
        """Resolve and place; raises StagingError with the reason."""
        t0 = time.monotonic()
        placed = self.resolve(files)
        try:
            out = chan.stage_cached(placed, dest_dir, self.cache_bytes)
        except OSError as exc:
            raise StagingError(str(exc)) from None
        sizes = {f.sha256: os.path.getsize(f.source) for f in placed}
        sent = sum(sizes[s] for s in out.get("fetched", ()))
        elapsed = time.monotonic() - t0
        with self._lock:
            self.history.append((what or dest_dir, elapsed, sent,
                                 len(out.get("fetched", ())), out.get("hits", 0)))
            self.counts["fetched"] += len(out.get("fetched", ()))
            self.counts["hits"] += out.get("hits", 0)
            self.counts["bytes_sent"] += sent
        log.info("%s: %d resource file(s) placed in %.2f s; %d sent (%s bytes), %d from the "
                 "node's cache", what or dest_dir, len(placed), elapsed,
                 len(out.get("fetched", ())), f"{sent:,}", out.get("hits", 0))
        return out


def _iter_file(f: Any) -> Iterable[bytes]:
    with f:
        yield from iter(lambda: f.read(CHUNK), b"")


def _what(rf: Mapping[str, Any]) -> str:
    for key in ("container", "storage_path", "container_url", "url", "source"):
        if rf.get(key):
            extra = f" (prefix {rf.get('blob_prefix')!r})" if key == "container" and \
                rf.get("blob_prefix") else ""
            return f"resource file {key} {rf[key]!r}{extra}"
    return "resource file"


__all__ = ["DEFAULT_CACHE_BYTES", "Stager", "StagingError", "cache_bytes_from_env"]
