"""Application packages: versioned archives kept in the home, unpacked once per node.

``AppStore(home)`` keeps ``<home>/apps/<name>/<version>/`` (the archive, as uploaded, and
``package.json``: its format, sha256, size, upload time, whether it has a ``bin/``) and
``<home>/apps/<name>/app.json`` (the default version). An archive is checked in full at
upload (:mod:`hpcbatch.launch.appunpack`: every byte read, no entry outside the package);
a bad one is refused with nothing stored.

Pools and tasks name packages by :class:`AppRef` (Azure Batch's
``application_package_references``: ``application_id`` and an optional ``version``,
the default when omitted). A node gets a package's archive under
``<node root>/apps/.archives/`` and unpacks it into ``<node root>/apps/<name>/<version>/``
(the agent, once, see appunpack); a task sees ``HPCBATCH_APP_<NAME>_<VERSION>`` and,
for a reference without a version (or naming the default), ``HPCBATCH_APP_<NAME>``,
with ``bin/`` on its PATH.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcbatch.env import APP_PREFIX
from hpcbatch.errors import Conflict, NotFound, ValidationError
from hpcbatch.launch import appunpack

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME_RULE = "use 1 to 64 letters, digits, '-' or '_'"
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RULE = "use 1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit"
ENV_PREFIX = APP_PREFIX


def check_name(field: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(field, f"{name!r} is not a valid application name; {NAME_RULE}")
    return name


def check_version(field: str, version: Any) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ValidationError(field, f"{version!r} is not a valid version; {VERSION_RULE}")
    return version


def env_key(text: str) -> str:
    """A name or version as it appears in a variable name: [A-Z0-9_]."""
    return re.sub(r"[^A-Z0-9]", "_", text.upper())


@dataclasses.dataclass(frozen=True)
class AppRef:
    """A reference to an application package: ``version`` None is its default version."""

    application_id: str
    version: str | None = None

    def __post_init__(self) -> None:
        check_name("application_package_references.application_id", self.application_id)
        if self.version is not None:
            check_version("application_package_references.version", self.version)

    @property
    def label(self) -> str:
        return self.application_id + (f":{self.version}" if self.version else "")

    @classmethod
    def parse(cls, text: str) -> AppRef:
        """'NAME' or 'NAME:VERSION' (the CLI's --app)."""
        name, _, version = str(text).partition(":")
        return cls(name, version or None)

    @classmethod
    def check_list(cls, field: str, value: Any) -> tuple[AppRef, ...]:
        if value is None:
            return ()
        if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
            raise ValidationError(field, "must be a list of {'application_id': ..., "
                                  "'version': ...}")
        out: list[AppRef] = []
        for i, item in enumerate(value):
            where = f"{field}[{i}]"
            try:
                if isinstance(item, AppRef):
                    ref = item
                elif isinstance(item, str):
                    ref = cls.parse(item)
                elif isinstance(item, Mapping):
                    unknown = sorted(set(item) - {"application_id", "version"})
                    if unknown or "application_id" not in item:
                        raise ValidationError(where, f"unknown field(s) {', '.join(unknown)}; "
                                              "known: application_id, version" if unknown
                                              else "needs an 'application_id'")
                    ref = cls(item["application_id"], item.get("version"))
                else:
                    raise ValidationError(where, f"{item!r} is not an application reference")
            except ValidationError as exc:
                if exc.field.startswith(field):
                    raise
                raise ValidationError(f"{where}.{exc.field.split('.')[-1]}", exc.rule) from None
            if any(r.application_id == ref.application_id for r in out):
                raise ValidationError(field, f"application {ref.application_id!r} is named "
                                      "twice; name each once")
            out.append(ref)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class AppView:
    """One version of an application package, as listings show it."""

    name: str
    version: str
    format: str
    sha256: str
    size: int
    uploaded_at: float
    has_bin: bool
    default: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ResolvedApp:
    """A reference resolved to a stored version (what a node unpacks)."""

    name: str
    version: str
    archive: str  # on the coordinator's machine
    format: str
    sha256: str
    is_default: bool  # named without a version, or naming the default one

    def node_dir(self, root: str) -> str:
        return posixpath.join(root, "apps", self.name, self.version)

    def node_archive(self, root: str) -> str:
        ext = "zip" if self.format == "zip" else "tar.gz"
        return posixpath.join(root, "apps", ".archives",
                              f"{self.name}-{self.version}-{self.sha256[:16]}.{ext}")

    def wire(self, root: str) -> dict[str, str]:
        """The agent protocol's Run.apps item."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "archive": self.node_archive(root), "dir": self.node_dir(root)}

    def env(self, root: str) -> dict[str, str]:
        d = self.node_dir(root)
        out = {f"{ENV_PREFIX}{env_key(self.name)}_{env_key(self.version)}": d}
        if self.is_default:
            out[f"{ENV_PREFIX}{env_key(self.name)}"] = d
        return out


def node_env(apps: Iterable[ResolvedApp], root: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for app in apps:
        out.update(app.env(root))
    return out


class AppStore:
    """The application packages of one home."""

    def __init__(self, home: str | os.PathLike):
        self.root = Path(home) / "apps"

    # ---- upload, list, delete, default ---------------------------------------

    def upload(self, name: str, version: str, source: str | os.PathLike, *,
               default: bool = False, keep_source: bool = True) -> AppView:
        """Check the archive and keep it as NAME VERSION (Conflict if that exists)."""
        from hpcbatch.store import secure_dir, storage_full
        check_name("name", name)
        check_version("version", version)
        src = Path(source)
        fmt = appunpack.archive_format(src.name)
        if fmt is None:
            raise ValidationError("archive", f"{src.name!r} is neither a .zip nor a .tar.gz "
                                  "(.tgz); give the package as one of those")
        if not src.is_file():
            raise ValidationError("archive", f"{src} is not a file on this machine")
        folder = self.root / name / version
        if (folder / "package.json").exists():
            raise Conflict(f"application {name!r} already has version {version!r}; delete "
                           f"it first (hpcbatch app delete {name} {version}) or pick "
                           "another version")
        try:
            info = appunpack.check(str(src), fmt)
        except appunpack.ArchiveError as exc:
            raise ValidationError("archive", f"{src.name}: {exc}; nothing was stored") from None
        secure_dir(self.root)
        secure_dir(self.root / name)
        tmp = self.root / name / f".{version}.upload-{os.getpid()}-{time.monotonic_ns()}"
        try:
            secure_dir(tmp)
            archive = tmp / f"archive.{fmt}"
            if keep_source:
                shutil.copyfile(src, archive)
            else:
                shutil.move(src, archive)
            os.chmod(archive, 0o600)
            sha = appunpack.sha256_of(str(archive))
            meta = {"name": name, "version": version, "format": fmt, "sha256": sha,
                    "size": archive.stat().st_size, "uploaded_at": time.time(),
                    "has_bin": info["has_bin"]}
            _write_json(tmp / "package.json", meta)
            try:
                os.rename(tmp, folder)
            except OSError:
                raise Conflict(f"application {name!r} version {version!r} was uploaded by "
                               "someone else just now") from None
        except OSError as exc:
            full = storage_full(exc, self.root)
            if full is not None:
                raise full from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if default or self._default(name) is None:
            self.set_default(name, version)
        return self.get(name, version)

    def get(self, name: str, version: str) -> AppView:
        meta = self._meta(name, version)
        return AppView(meta["name"], meta["version"], meta["format"], meta["sha256"],
                       meta["size"], meta["uploaded_at"], meta["has_bin"],
                       self._default(name) == version)

    def list(self, name: str | None = None) -> list[AppView]:
        if name is not None:
            check_name("name", name)
            names = [name] if (self.root / name).is_dir() else []
            if not names:
                raise NotFound(f"no application {name!r}; see hpcbatch app list")
        else:
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir()
                           and NAME_RE.fullmatch(p.name)) if self.root.is_dir() else []
        out = []
        for n in names:
            for v in sorted(self._versions(n)):
                out.append(self.get(n, v))
        return out

    def delete(self, name: str, version: str | None = None) -> list[str]:
        """Delete one version (or, without one, every version); returns what went."""
        check_name("name", name)
        versions = self._versions(name)
        if version is not None:
            check_version("version", version)
            if version not in versions:
                raise NotFound(self._missing(name, version))
            versions = [version]
        elif not versions:
            raise NotFound(f"no application {name!r}; see hpcbatch app list")
        for v in versions:
            shutil.rmtree(self.root / name / v)
        left = self._versions(name)
        if not left:
            shutil.rmtree(self.root / name, ignore_errors=True)
        elif self._default(name) not in left:
            self.set_default(name, sorted(left, key=_version_key)[-1])
        return [f"{name}:{v}" for v in versions]

    def set_default(self, name: str, version: str) -> AppView:
        check_name("name", name)
        check_version("version", version)
        self._meta(name, version)
        _write_json(self.root / name / "app.json", {"default_version": version})
        return self.get(name, version)

    # ---- references ------------------------------------------------------------

    def resolve(self, ref: AppRef) -> ResolvedApp:
        """The stored version a reference names (NotFound naming what is missing)."""
        default = self._default(ref.application_id)
        version = ref.version or default
        if version is None:
            raise NotFound(f"no application {ref.application_id!r}; upload it with "
                           f"hpcbatch app upload {ref.application_id} VERSION ARCHIVE")
        meta = self._meta(ref.application_id, version)
        return ResolvedApp(ref.application_id, version,
                           str(self.root / ref.application_id / version /
                               f"archive.{meta['format']}"), meta["format"], meta["sha256"],
                           ref.version is None or ref.version == default)

    def check_refs(self, field: str, refs: Iterable[AppRef]) -> None:
        """ValidationError naming the first reference that names nothing stored."""
        for i, ref in enumerate(refs):
            try:
                self.resolve(ref)
            except NotFound as exc:
                raise ValidationError(f"{field}[{i}]", str(exc)) from None

    def resolve_all(self, refs: Iterable[AppRef]) -> list[ResolvedApp]:
        out: dict[str, ResolvedApp] = {}
        for ref in refs:  # a task's own reference overrides the pool's of the same name
            out[ref.application_id] = self.resolve(ref)
        return list(out.values())

    # ---- the files -------------------------------------------------------------

    def _versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        return [p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name)
                and (p / "package.json").is_file()]

    def _default(self, name: str) -> str | None:
        try:
            v = json.loads((self.root / name / "app.json").read_text()).get("default_version")
        except (OSError, ValueError):
            return None
        return v if isinstance(v, str) and v in self._versions(name) else None

    def _meta(self, name: str, version: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / name / version / "package.json").read_text())
        except (OSError, ValueError):
            raise NotFound(self._missing(name, version)) from None

    def _missing(self, name: str, version: str) -> str:
        have = sorted(self._versions(name), key=_version_key)
        if not have:
            return f"no application {name!r}; see hpcbatch app list"
        return (f"application {name!r} has no version {version!r} (it has "
                f"{', '.join(have)})")


class Apps:
    """``batch.apps``: the application packages of a Batch's service (embedded or
    remote, the same calls)."""

    def __init__(self, batch: Any):
        self._batch = batch

    def upload(self, name: str, version: str, archive: str | os.PathLike, *,
               default: bool = False) -> AppView:
        """Check ``archive`` (.zip / .tar.gz on this machine) and keep it as NAME VERSION;
        the first version of a name, or ``default=True``, becomes its default."""
        return self._batch.service.upload_app(name, version, archive, default=default)

    def list(self, name: str | None = None) -> list[AppView]:
        return self._batch.service.list_apps(name)

    def delete(self, name: str, version: str | None = None) -> list[str]:
        return self._batch.service.delete_app(name, version)

    def set_default(self, name: str, version: str) -> AppView:
        return self._batch.service.set_default_app(name, version)


def refuse_if_used(store: AppStore, pools: Iterable[Any], name: str,
                   version: str | None) -> None:
    """Conflict when deleting ``name`` (``version``, or every version) would take a
    package from a pool that names it: its nodes get their pool's packages before their
    start task, so each new node (a resize, a lost node back) would be unusable."""
    try:
        versions = [a.version for a in store.list(name)]
    except (NotFound, ValidationError):
        return  # AppStore.delete says what is wrong
    if version is not None and version not in versions:
        return
    for pool in pools:
        for ref in pool.application_package_references:
            if ref.application_id != name:
                continue
            if version is None or ref.version == version or (
                    ref.version is None and versions == [version]):
                raise Conflict(f"application {ref.label!r} is used by pool {pool.id!r}, "
                               "whose nodes need it; delete the pool first "
                               f"(hpcbatch pool delete {pool.id})")


def _version_key(v: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.-]", v))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


__all__ = ["AppRef", "Apps", "AppStore", "AppView", "ResolvedApp", "check_name", "check_version",
           "env_key", "node_env"]
