"""API keys: made, listed and revoked by ``hpcbatch keys``, checked on every request.

A key is ``hpcb_<id>_<secret>`` (id: 8 hex digits, secret: 32 random bytes, urlsafe
base64). Only its SHA-256 is stored, in ``<home>/keys.json`` (0600)::

    [{"id": "1a2b3c4d", "name": "ci", "hash": "<sha256 hex>", "created_at": 1.7e9,
      "read_only": false}, ...]

A presented key is looked up by its id and its hash compared with
``hmac.compare_digest`` (constant time: the comparison says nothing about how much of
the secret was right). A read-only key may read (GET/HEAD) and nothing else. The
server reads keys.json again whenever it changes on disk, so a key revoked while the
service runs is refused from its next request on.

Besides the stored keys, ``hpcbatch serve`` makes one *session key* per start for the
same user's local clients (``<home>/service.key``); its hash is held in memory only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from hpcbatch.errors import HpcBatchError, NotFound, ValidationError

PREFIX = "hpcb"
KEY_RE = re.compile(r"hpcb_([0-9a-f]{8})_([A-Za-z0-9_-]{20,100})")
KEYS_FILE = "keys.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:-]{0,63}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(id, key text) of a fresh random key."""
    key_id = secrets.token_hex(4)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


@dataclasses.dataclass(frozen=True)
class Key:
    """A stored key (never its text)."""

    id: str
    name: str
    hash: str
    created_at: float
    read_only: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_entry(entry: object, path: Path) -> Key:
    if not isinstance(entry, dict):
        raise HpcBatchError(f"{path} is damaged (an entry is not an object); fix or remove it")
    try:
        key = Key(str(entry["id"]), str(entry.get("name", "")), str(entry["hash"]),
                  float(entry.get("created_at", 0)), bool(entry.get("read_only", False)))
    except (KeyError, TypeError, ValueError):
        raise HpcBatchError(f"{path} is damaged (an entry lacks id or hash); fix or remove "
                            "it") from None
    if not re.fullmatch(r"[0-9a-f]{64}", key.hash):
        raise HpcBatchError(f"{path} is damaged (key {key.id}'s hash is not a SHA-256)")
    return key


class KeyFile:
    """``<home>/keys.json``: every change under an flock, written to a temporary file
    (0600) and renamed over it (a reader never sees half a file)."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.path = self.home / KEYS_FILE

    def read(self) -> list[Key]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError:
            raise HpcBatchError(f"{self.path} is not valid JSON; fix or remove it (every "
                                "key in it stops working)") from None
        if not isinstance(data, list):
            raise HpcBatchError(f"{self.path} is damaged (not a list); fix or remove it")
        return [_check_entry(e, self.path) for e in data]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from hpcbatch.store import secure_dir, storage_full
        try:
            secure_dir(self.home)
            fd = os.open(self.home / "keys.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise (storage_full(exc, self.home) or exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, keys: list[Key]) -> None:
        from hpcbatch.store import storage_full
        tmp = self.path.with_name(f".{KEYS_FILE}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump([k.to_dict() for k in keys], f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise (storage_full(exc, self.home) or exc) from None

    def create(self, name: str = "", *, read_only: bool = False) -> tuple[Key, str]:
        """A new key: (what is stored, the key text, to be shown once)."""
        name = name or ""
        if name and not NAME_RE.fullmatch(name):
            raise ValidationError("name", f"{name!r}: up to 64 letters, digits, spaces and "
                                  "._@:- (starting with a letter or digit)")
        with self._locked():
            keys = self.read()
            taken = {k.id for k in keys}
            key_id, text = new_key()
            while key_id in taken:
                key_id, text = new_key()
            key = Key(key_id, name, digest(text), time.time(), read_only)
            self._write([*keys, key])
        return key, text

    def revoke(self, key_id: str) -> Key:
        with self._locked():
            keys = self.read()
            gone = [k for k in keys if k.id == key_id]
            if not gone:
                known = ", ".join(k.id for k in keys) or "none"
                raise NotFound(f"no key {key_id!r} in {self.path} (keys: {known}; 'hpcbatch "
                               "keys list' shows them)")
            self._write([k for k in keys if k.id != key_id])
        return gone[0]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a request: the key's id and name, and whether it may write."""

    key_id: str
    name: str
    read_only: bool


class KeyRing:
    """What the server checks keys against: keys.json (read again when it changes) and
    the session keys given to it (hashes only, in memory)."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.file = KeyFile(home) if home is not None else None
        self._stat: tuple | None = None
        self._keys: dict[str, Key] = {}
        self._session: dict[str, Key] = {}
        self.error: str | None = None  # keys.json could not be read (every stored key fails)

    def add_session_key(self, name: str = "session") -> str:
        """A key valid for this process's life only; returns its text."""
        key_id, text = new_key()
        self._session[key_id] = Key(key_id, name, digest(text), time.time(), False)
        return text

    def _refresh(self) -> None:
        if self.file is None:
            return
        try:
            st = os.stat(self.file.path)
            stamp: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stat:
            return
        try:
            keys = self.file.read() if stamp is not None else []
            self.error = None
        except HpcBatchError as exc:
            keys, self.error = [], str(exc)
        self._keys = {k.id: k for k in keys}
        self._stat = stamp

    def check(self, presented: str | None) -> Caller | None:
        """The caller a key text names, or None (no such key, or a wrong secret)."""
        if not presented:
            return None
        m = KEY_RE.fullmatch(presented)
        if m is None:
            hmac.compare_digest(digest(presented), "0" * 64)  # the same work either way
            return None
        self._refresh()
        key = self._session.get(m.group(1)) or self._keys.get(m.group(1))
        expected = key.hash if key is not None else "0" * 64
        if not hmac.compare_digest(digest(presented), expected) or key is None:
            return None
        return Caller(key.id, key.name, key.read_only)


__all__ = ["Caller", "Key", "KeyFile", "KeyRing", "digest", "new_key"]
