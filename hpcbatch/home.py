"""A coordinator's home directory: where it is, and one coordinator per home."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hpcbatch import env as E
from hpcbatch.errors import CoordinatorBusy
from hpcbatch.store import secure_dir, storage_full


def default_home() -> Path:
    return Path(os.environ.get(E.HOME) or Path.home() / ".hpcbatch").expanduser()


class HomeLock:
    """One coordinator per home directory (an flock; released by the kernel on death).
    The home is made 0700 and the lock file 0600; a full disk is one line naming it."""

    def __init__(self, home: Path):
        self.path = home / "coordinator.lock"
        self.fd: int | None = None
        try:
            secure_dir(home)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise (storage_full(exc, home) or exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CoordinatorBusy(
                f"another coordinator (pid {other}) is running on {home}; wait for it to "
                f"finish, stop it, or set {E.HOME} to another directory") from None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise (storage_full(exc, home) or exc) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
