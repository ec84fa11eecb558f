"""Storage through the service: the same methods on ``LocalService`` (the home's
:class:`hpcbatch.storage.Storage`) and ``RemoteService`` (HTTP, streamed both ways),
and the transfers the CLI and ``batch.storage`` use. The REST routes under
``/v1/storage`` are in :mod:`hpcbatch.server.storage_routes`.

Routes::

    GET    /v1/storage                              the containers
    POST   /v1/storage            {"name", "url"?}  create one
    GET    /v1/storage/{c}                          one container
    DELETE /v1/storage/{c}                          delete it (a default one with its blobs)
    GET    /v1/storage/{c}/blobs?prefix=            its blobs (name, size, sha256, time)
    PUT    /v1/storage/{c}/blobs/{name}?sha256=     upload (streamed; atomic; checked)
    GET    /v1/storage/{c}/blobs/{name}             download (streamed; X-Checksum-Sha256;
                                                    ?info=true: its JSON description)
    DELETE /v1/storage/{c}/blobs/{name}             delete it
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.storage import (
    CHUNK,
    BlobView,
    ContainerView,
    Storage,
    check_blob_name,
    sha256_file,
)

SHA_HEADER = "X-Checksum-Sha256"


def containers_checked(storage: Storage, tasks: Iterable[Any]) -> Iterator[Any]:
    """The tasks, each coerced to a TaskSpec and refused (ValidationError naming the
    field) when a resource or output file names a container that does not exist."""
    from hpcbatch.errors import ValidationError
    from hpcbatch.models import TaskSpec
    known: dict[str, bool] = {}

    def exists(name: str) -> bool:
        if name not in known:
            known[name] = storage.exists(name)
        return known[name]
    for t in tasks:
        spec = TaskSpec.coerce(t)
        for i, rf in enumerate(spec.resource_files):
            name = rf.container or (rf.storage_path or "").partition("/")[0]
            if name and not exists(name):
                field = "container" if rf.container else "storage_path"
                raise ValidationError(f"task {spec.id}: resource_files[{i}].{field}",
                                      f"container {name!r} does not exist; 'hpcbatch "
                                      f"storage create {name}' makes it")
        for i, of in enumerate(spec.output_files):
            if not exists(of.container):
                raise ValidationError(f"task {spec.id}: output_files[{i}].container",
                                      f"container {of.container!r} does not exist; "
                                      f"'hpcbatch storage create {of.container}' makes it")
        yield spec


class LocalStorageMethods:
    """Mixed into LocalService (which has ``home``)."""

    home: Any

    @property
    def storage(self) -> Storage:
        s = self.__dict__.get("_storage")
        if s is None:
            s = self.__dict__["_storage"] = Storage(self.home)
        return s

    def create_container(self, name: str, url: str | None = None, *,
                         exist_ok: bool = False) -> ContainerView:
        return self.storage.create(name, url, exist_ok=exist_ok)

    def get_container(self, name: str) -> ContainerView:
        return self.storage.get(name)

    def list_containers(self) -> list[ContainerView]:
        return self.storage.list()

    def delete_container(self, name: str) -> None:
        self.storage.delete(name)

    def list_blobs(self, container: str, prefix: str = "") -> list[BlobView]:
        return self.storage.list_blobs(container, prefix)

    def put_blob(self, container: str, name: str, chunks: Iterable[bytes],
                 sha256: str | None = None) -> BlobView:
        return self.storage.put(container, name, chunks, sha256)

    def blob_info(self, container: str, name: str) -> BlobView:
        return self.storage.info(container, name)

    def read_blob(self, container: str, name: str) -> tuple[BlobView, Iterator[bytes]]:
        """The blob's view and its bytes, streamed (close the iterator to stop early)."""
        return self.storage.read(container, name)

    def delete_blob(self, container: str, name: str) -> None:
        self.storage.delete_blob(container, name)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _blob_path(container: str, name: str) -> str:
    check_blob_name(name)
    return f"/v1/storage/{_q(container)}/blobs/{urllib.parse.quote(name, safe='/')}"


class RemoteStorageMethods:
    """Mixed into RemoteService (``_json``, ``_send``, ``_bulk_timeout``)."""

    def create_container(self, name: str, url: str | None = None, *,
                         exist_ok: bool = False) -> ContainerView:
        out = self._json("POST", "/v1/storage", json={"name": name, "url": url,  # type: ignore[attr-defined]
                                                      "exist_ok": exist_ok})
        return ContainerView(**out)

    def get_container(self, name: str) -> ContainerView:
        return ContainerView(**self._json("GET", f"/v1/storage/{_q(name)}"))  # type: ignore[attr-defined]

    def list_containers(self) -> list[ContainerView]:
        return [ContainerView(**c) for c in self._json("GET", "/v1/storage")["items"]]  # type: ignore[attr-defined]

    def delete_container(self, name: str) -> None:
        self._json("DELETE", f"/v1/storage/{_q(name)}")  # type: ignore[attr-defined]

    def list_blobs(self, container: str, prefix: str = "") -> list[BlobView]:
        out = self._json("GET", f"/v1/storage/{_q(container)}/blobs",  # type: ignore[attr-defined]
                         params={"prefix": prefix} if prefix else None)
        return [BlobView(**b) for b in out["items"]]

    def put_blob(self, container: str, name: str, chunks: Iterable[bytes],
                 sha256: str | None = None) -> BlobView:
        out = self._json("PUT", _blob_path(container, name),  # type: ignore[attr-defined]
                         params={"sha256": sha256} if sha256 else None, content=iter(chunks),
                         headers={"Content-Type": "application/octet-stream"},
                         timeout=self._bulk_timeout())  # type: ignore[attr-defined]
        return BlobView(**out)

    def blob_info(self, container: str, name: str) -> BlobView:
        return BlobView(**self._json("GET", _blob_path(container, name),  # type: ignore[attr-defined]
                                     params={"info": "true"}))

    def read_blob(self, container: str, name: str) -> tuple[BlobView, Iterator[bytes]]:
        response = self._send("GET", _blob_path(container, name), stream=True,  # type: ignore[attr-defined]
                              timeout=self._bulk_timeout())  # type: ignore[attr-defined]
        h = response.headers
        view = BlobView(container, name, int(h.get("content-length") or 0),
                        h.get(SHA_HEADER) or None, float(h.get("x-modified-at") or 0))

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.iter_bytes(1 << 20)
            finally:
                response.close()
        return view, chunks()

    def delete_blob(self, container: str, name: str) -> None:
        self._json("DELETE", _blob_path(container, name))  # type: ignore[attr-defined]


# ---- transfers (the CLI's and batch.storage's) ------------------------------------------

def _local_files(path: Path) -> list[tuple[Path, str]]:
    """(file, name relative to path) of every file under a directory, or the file."""
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise ValidationError("path", f"{path} is not a file or directory on this machine")
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            if full.is_file() and not full.is_symlink():
                out.append((full, full.relative_to(path).as_posix()))
    return out


def upload_path(service: Any, container: str, path: str | os.PathLike, name: str | None = None,
                *, progress: Callable[[int], None] | None = None) -> list[BlobView]:
    """Upload a file (as ``name``, default its file name) or a directory recursively
    (its files as ``name/<relative path>``, default its relative paths); each blob
    checked against the SHA-256 computed here."""
    src = Path(path).expanduser()
    files = _local_files(src)
    out = []
    for full, rel in files:
        if src.is_dir():
            blob = f"{name.rstrip('/')}/{rel}" if name else rel
        else:
            blob = name[:-1] + "/" + rel if name and name.endswith("/") else (name or rel)
        check_blob_name(blob)
        digest = sha256_file(full)

        def chunks(f=full) -> Iterator[bytes]:
            with open(f, "rb") as fh:
                while block := fh.read(CHUNK):
                    if progress is not None:
                        progress(len(block))
                    yield block
        out.append(service.put_blob(container, blob, chunks(), digest))
    return out


def upload_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f, _ in _local_files(Path(path).expanduser()))


def download(service: Any, container: str, name: str, dest: str | os.PathLike, *,
             progress: Callable[[int], None] | None = None,
             blobs: list[BlobView] | None = None) -> list[Path]:
    """Download blob ``name`` to ``dest`` (a file, or into it when it is a directory),
    or, when ``name`` is a prefix ending in '/' (or '' for all), every blob under it into
    the directory ``dest`` keeping the names below the prefix. Each file is written
    whole, checked against the blob's SHA-256, then renamed into place."""
    target = Path(dest).expanduser()
    if name == "" or name.endswith("/"):
        items = blobs if blobs is not None else service.list_blobs(container, name)
        if not items:
            raise NotFound(f"no blob in container {container!r} starts with {name!r}")
        pairs = [(b.name, target / b.name[len(name):]) for b in items]
    else:
        check_blob_name(name)
        pairs = [(name, target / name.rpartition("/")[2] if target.is_dir() else target)]
    written = []
    for blob, out in pairs:
        out.parent.mkdir(parents=True, exist_ok=True)
        view, chunks = service.read_blob(container, blob)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            if view.sha256 and h.hexdigest() != view.sha256:
                raise HpcBatchError(f"blob {blob!r} of container {container!r} arrived with "
                                    f"SHA-256 {h.hexdigest()}, not {view.sha256}; download "
                                    "it again")
            os.replace(tmp, out)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            tmp.unlink(missing_ok=True)
        written.append(out)
    return written


class StorageClient:
    """``batch.storage``: containers and blobs through the batch's service.

    ::

        batch.storage.create("in")
        batch.storage.upload("in", "data/")           # a directory, recursively
        [b.name for b in batch.storage.ls("in", "data/")]
        batch.storage.download("out", "job1/", "results/")
    """

    def __init__(self, batch: Any):
        self._batch = batch

    @property
    def _s(self) -> Any:
        return self._batch.service

    def create(self, name: str, url: str | None = None, *, exist_ok: bool = False
               ) -> ContainerView:
        return self._s.create_container(name, url, exist_ok=exist_ok)

    def list(self) -> list[ContainerView]:
        return self._s.list_containers()

    def get(self, name: str) -> ContainerView:
        return self._s.get_container(name)

    def delete(self, name: str, blob: str | None = None) -> None:
        """Delete the container, or only its blob ``blob``."""
        if blob is None:
            self._s.delete_container(name)
        else:
            self._s.delete_blob(name, blob)

    def ls(self, container: str, prefix: str = "") -> list[BlobView]:
        return self._s.list_blobs(container, prefix)

    def upload(self, container: str, path: str | os.PathLike, name: str | None = None
               ) -> list[BlobView]:
        return upload_path(self._s, container, path, name)

    def put_bytes(self, container: str, name: str, data: bytes) -> BlobView:
        return self._s.put_blob(container, name, [data], hashlib.sha256(data).hexdigest())

    def get_bytes(self, container: str, name: str) -> bytes:
        view, chunks = self._s.read_blob(container, name)
        return b"".join(chunks)

    def download(self, container: str, name: str, dest: str | os.PathLike) -> list[Path]:
        return download(self._s, container, name, dest)


__all__ = ["SHA_HEADER", "LocalStorageMethods", "RemoteStorageMethods", "StorageClient",
           "download", "upload_path"]
