"""The REST routes of storage (``/v1/storage``; see :mod:`hpcbatch.storage_api`)."""

# no "from __future__ import annotations": FastAPI reads the annotations at run time

import re
from typing import Annotated, Any

import anyio
from fastapi import Path as PathParam
from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hpcbatch.server.app import Id, IdPath, _doc, _In
from hpcbatch.storage import MAX_BLOB_NAME, META_DIR, check_container
from hpcbatch.storage_api import SHA_HEADER

# hpcbatch.storage.check_blob_name as a pattern: parts split by '/', none empty, '.' or
# '..' (so no leading or trailing '/'), no NUL, the first not META_DIR; 1 to
# MAX_BLOB_NAME characters. "(?![\s\S])" is the end of the text ('$' in Python's re also
# matches before a final newline).
_PART = r"(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)"
_NOT_META = rf"(?!{re.escape(META_DIR)}(?:/|(?![\s\S])))"
BLOB_PATTERN = rf"^{_NOT_META}{_PART}(?:/{_PART})*$"
PREFIX_PATTERN = rf"^(?:{_NOT_META}{_PART}(?:/{_PART})*/?)?$"
_BLOB_DOC = {"pattern": BLOB_PATTERN, "minLength": 1, "maxLength": MAX_BLOB_NAME}
BlobPath = Annotated[str, PathParam(
    json_schema_extra=_BLOB_DOC, description="'dir/file.txt': no empty, '.' or '..' part")]
PrefixQuery = Annotated[str, Query(
    json_schema_extra={"pattern": PREFIX_PATTERN, "maxLength": MAX_BLOB_NAME},
    description="'' (all), or the start of names ('dir/', 'dir/run-')")]
ShaQuery = Annotated[str | None, Query(json_schema_extra={"pattern": r"^[0-9a-f]{64}$"},
                                       description="the body's SHA-256, checked")]


class ContainerIn(_In):
    name: Id
    url: Annotated[str | None, _doc(pattern=r"^[^\x00]*://[^\x00]*$", description=(
        "an fsspec URL of a folder (file:///data, s3://bucket/prefix, memory://name); "
        "its protocol's fsspec backend installed on the service's machine"))] = None
    exist_ok: bool = False


def add_routes(v1: Any, call: Any) -> None:
    """The /v1/storage routes on the app's router; ``call(fn)`` runs fn(service) on a
    worker thread."""
    octet = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}

    @v1.get("/storage", tags=["storage"])
    async def list_containers() -> JSONResponse:
        """The containers (name, url, location, created_at)."""
        items = await call(lambda s: s.list_containers())
        return JSONResponse({"items": [c.to_dict() for c in items]})

    @v1.post("/storage", tags=["storage"], status_code=201)
    async def create_container(body: ContainerIn) -> JSONResponse:
        """Create a container: under the service's home, or at an fsspec ``url``."""
        check_container(body.name, "name")  # the body's field, named as such
        view = await call(lambda s: s.create_container(body.name, body.url,
                                                       exist_ok=body.exist_ok))
        return JSONResponse(view.to_dict(), status_code=201)

    @v1.get("/storage/{container}", tags=["storage"])
    async def get_container(container: IdPath) -> JSONResponse:
        return JSONResponse((await call(lambda s: s.get_container(container))).to_dict())

    @v1.delete("/storage/{container}", tags=["storage"], status_code=204,
               response_class=Response)
    async def delete_container(container: IdPath) -> Response:
        await call(lambda s: s.delete_container(container))
        return Response(status_code=204)

    @v1.get("/storage/{container}/blobs", tags=["storage"])
    async def list_blobs(container: IdPath, prefix: PrefixQuery = "") -> JSONResponse:
        """Its blobs whose names start with ``prefix``: name, size, sha256, modified_at."""
        items = await call(lambda s: s.list_blobs(container, prefix))
        return JSONResponse({"items": [b.to_dict() for b in items]})

    @v1.put("/storage/{container}/blobs/{name:path}", tags=["storage"], status_code=201,
            openapi_extra={"requestBody": {"required": True, "content": octet}})
    async def put_blob(container: IdPath, name: BlobPath, request: Request,
                       sha256: ShaQuery = None) -> JSONResponse:
        """Upload a blob: the body streamed to a temporary file, hashed as it comes,
        renamed to its name once complete (and equal to ``sha256`` when given)."""
        from hpcbatch.server.app import body_chunks
        chunks = body_chunks(request)
        view = await call(lambda s: s.put_blob(container, name, chunks, sha256))
        return JSONResponse(view.to_dict(), status_code=201)

    @v1.get("/storage/{container}/blobs/{name:path}", tags=["storage"],
            responses={200: {"content": octet, "description": "the blob"}})
    async def get_blob(container: IdPath, name: BlobPath,
                       info: bool = Query(False)) -> Response:
        """The blob's bytes, streamed (``X-Checksum-Sha256``: their SHA-256); with
        ``info=true`` its JSON description instead."""
        if info:
            return JSONResponse((await call(lambda s: s.blob_info(container, name))).to_dict())
        view, chunks = await call(lambda s: s.read_blob(container, name))

        def next_chunk() -> bytes | None:
            return next(chunks, None)

        async def stream() -> Any:
            try:
                while True:
                    data = await anyio.to_thread.run_sync(next_chunk)
                    if data is None:
                        return
                    yield data
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        headers = {"Content-Length": str(view.size), "X-Modified-At": str(view.modified_at)}
        if view.sha256:
            headers[SHA_HEADER] = view.sha256
        return StreamingResponse(stream(), media_type="application/octet-stream",
                                 headers=headers)

    @v1.delete("/storage/{container}/blobs/{name:path}", tags=["storage"], status_code=204,
               response_class=Response)
    async def delete_blob(container: IdPath, name: BlobPath) -> Response:
        await call(lambda s: s.delete_blob(container, name))
        return Response(status_code=204)


__all__ = ["add_routes"]
