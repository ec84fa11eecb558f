"""The REST routes of application packages (``/v1/apps``), added to the service's app.

An archive reaches the service the way resource files do: streamed and checksummed to
``PUT /v1/uploads/<sha256>`` first, then named by the path that answered in
``POST /v1/apps`` (only a path under the home's ``uploads/`` is taken).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Query

from hpcbatch.apps import VERSION_RE, VERSION_RULE, check_name, check_version
from hpcbatch.errors import ValidationError
from hpcbatch.server.app import ID_PATTERN, Id, IdPath, _doc, _In

VERSION_PATTERN = f"^{VERSION_RE.pattern}$"
Version = Annotated[str, _doc(pattern=VERSION_PATTERN, description=VERSION_RULE)]
VersionQuery = Annotated[str | None, Query(json_schema_extra={"pattern": VERSION_PATTERN},
                                           description=VERSION_RULE)]
NameQuery = Annotated[str | None, Query(json_schema_extra={"pattern": ID_PATTERN})]


class AppIn(_In):
    name: Id
    version: Version
    source: str  # what PUT /v1/uploads answered
    default: bool = False


class DefaultIn(_In):
    version: Version


def add_routes(v1: Any, call: Any, json: Any, plain: Any, home: Path | None) -> None:
    """Add the /v1/apps routes to the router ``v1`` (``call``: fn(service) off the loop)."""

    @v1.get("/apps", tags=["apps"])
    async def list_apps(name: NameQuery = None) -> Any:
        """Every version of every package (or of ``name``)."""
        return json({"items": plain(await call(lambda s: s.list_apps(name)))})

    @v1.post("/apps", tags=["apps"], status_code=201)
    async def upload_app(body: AppIn) -> Any:
        """Keep an uploaded archive as NAME VERSION (checked in full; a bad one is a 400
        and nothing is stored)."""
        check_name("name", body.name)  # a bad name or version is named before the source
        check_version("version", body.version)
        src = Path(body.source).resolve()
        uploads = (Path(home) / "uploads").resolve() if home is not None else None
        if uploads is None or uploads not in src.parents:
            raise ValidationError("source", f"{body.source!r} is not a file uploaded with "
                                  "PUT /v1/uploads/<sha256>; upload the archive first")
        return json(plain(await call(lambda s: s.upload_app(
            body.name, body.version, str(src), default=body.default))), status_code=201)

    @v1.delete("/apps/{name}", tags=["apps"])
    async def delete_app(name: IdPath, version: VersionQuery = None) -> Any:
        """Delete one version, or (without ``version``) every version."""
        return json({"deleted": list(await call(lambda s: s.delete_app(name, version)))})

    @v1.post("/apps/{name}/default", tags=["apps"])
    async def set_default(name: IdPath, body: DefaultIn) -> Any:
        return json(plain(await call(lambda s: s.set_default_app(name, body.version))))
