"""The REST routes of storage (``/v1/storage``; see :mod:`hpcbatch.storage_api`)."""

# no "from __future__ import annotations": FastAPI reads the annotations at run time

from collections.abc import Iterator
from typing import Any

import anyio
from fastapi import Path as PathParam
from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from hpcbatch.storage_api import SHA_HEADER


class ContainerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    url: str | None = None
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
        view = await call(lambda s: s.create_container(body.name, body.url,
                                                       exist_ok=body.exist_ok))
        return JSONResponse(view.to_dict(), status_code=201)

    @v1.get("/storage/{container}", tags=["storage"])
    async def get_container(container: str) -> JSONResponse:
        return JSONResponse((await call(lambda s: s.get_container(container))).to_dict())

    @v1.delete("/storage/{container}", tags=["storage"], status_code=204,
               response_class=Response)
    async def delete_container(container: str) -> Response:
        await call(lambda s: s.delete_container(container))
        return Response(status_code=204)

    @v1.get("/storage/{container}/blobs", tags=["storage"])
    async def list_blobs(container: str, prefix: str = "") -> JSONResponse:
        """Its blobs whose names start with ``prefix``: name, size, sha256, modified_at."""
        items = await call(lambda s: s.list_blobs(container, prefix))
        return JSONResponse({"items": [b.to_dict() for b in items]})

    @v1.put("/storage/{container}/blobs/{name:path}", tags=["storage"],
            openapi_extra={"requestBody": {"required": True, "content": octet}})
    async def put_blob(container: str, name: str, request: Request,
                       sha256: str | None = Query(None)) -> JSONResponse:
        """Upload a blob: the body streamed to a temporary file, hashed as it comes,
        renamed to its name once complete (and equal to ``sha256`` when given)."""
        it = request.stream().__aiter__()

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = anyio.from_thread.run(it.__anext__)
                except StopAsyncIteration:
                    return
                if chunk:
                    yield chunk
        view = await call(lambda s: s.put_blob(container, name, chunks(), sha256))
        return JSONResponse(view.to_dict(), status_code=201)

    @v1.get("/storage/{container}/blobs/{name:path}", tags=["storage"],
            responses={200: {"content": octet, "description": "the blob"}})
    async def get_blob(container: str, name: str = PathParam(),
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
    async def delete_blob(container: str, name: str) -> Response:
        await call(lambda s: s.delete_blob(container, name))
        return Response(status_code=204)


__all__ = ["add_routes"]
