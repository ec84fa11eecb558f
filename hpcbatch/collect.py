"""After a task's process exits, before its attempt is reported ended: its output files
uploaded to storage, and its stdout/stderr kept in the home.

The coordinator holds a task's exit (the state has not heard it yet, so the task is not
complete and its slot is not reused) while a worker thread runs :meth:`Collector.collect`
over the node's own channel (the local filesystem, or one SFTP session on the agent's
SSH connection): the node matches the output patterns (``nodecache.match``: regular
files of the task directory only, never through a link), the coordinator streams each
match into its container (an atomic, checksummed upload; no file held in memory), then
keeps the logs. Only then does the exit go to the state; a failed upload is the
attempt's ``file_upload_error`` with the reason.

Kept logs: ``<home>/logs/<job>/<task>/<attempt>/stdout.txt`` and ``stderr.txt`` (0600),
at most ``log_cap_bytes`` each (the tail beyond it, the original size in ``kept.json``;
a local node's file within the cap is kept as a second hard link, not copied;
and a local node's successful attempt is kept only before its task directory is
removed, see ``Collector.keep_left``),
so ``task logs`` / ``read_task_file`` / the REST files route answer when the node is
gone, killed, or its pool deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcbatch.storage import CHUNK, Storage

log = logging.getLogger("hpcbatch.collect")

DEFAULT_LOG_CAP_BYTES = 4 << 20
LOG_FILES = ("stdout.txt", "stderr.txt")


def log_cap_from_env() -> int:
    from hpcbatch import env as E
    text = os.environ.get(E.LOG_CAP_BYTES, "").strip()
    try:
        return max(0, int(text)) if text else DEFAULT_LOG_CAP_BYTES
    except ValueError:
        log.warning("%s=%r is not a number of bytes; using %d", E.LOG_CAP_BYTES, text,
                    DEFAULT_LOG_CAP_BYTES)
        return DEFAULT_LOG_CAP_BYTES


def kept_dir(home: Path, job_id: str, task_id: str, attempt: int | str | None = None
             ) -> Path:
    base = home / "logs" / job_id / task_id
    return base if attempt is None else base / str(attempt)


def latest_kept(home: Path, job_id: str, task_id: str) -> Path | None:
    """The kept logs of the task's latest attempt that has them, or None."""
    base = kept_dir(home, job_id, task_id)
    try:
        attempts = sorted(int(n) for n in os.listdir(base) if n.isdigit())
    except FileNotFoundError:
        return None
    for a in reversed(attempts):
        if (base / str(a) / "kept.json").is_file():
            return base / str(a)
    return None


def forget(home: Path, job_id: str, task_id: str | None = None) -> None:
    """Remove the kept logs of a job (or one task of it)."""
    path = home / "logs" / job_id if task_id is None else kept_dir(home, job_id, task_id)
    shutil.rmtree(path, ignore_errors=True)


def _matches_condition(condition: str, success: bool) -> bool:
    return condition == "task_completion" or (condition == "task_success") == success


def blob_name(out: Mapping[str, Any], below: str, exact: bool, values: Mapping[str, str]
              ) -> str:
    """Where one match goes: ``path`` itself for the one file of a pattern without
    wildcards (unless ``path`` ends in '/' or is empty), else ``path`` + the match's
    path below the pattern's fixed directory."""
    path = out.get("path") or ""
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    if exact and path and not path.endswith("/"):
        return path
    if path and not path.endswith("/"):
        path += "/"
    return posixpath.normpath(path + below) if path else below


class Collector:
    def __init__(self, home: str | os.PathLike, log_cap_bytes: int = DEFAULT_LOG_CAP_BYTES):
        self.home = Path(home)
        self.storage = Storage(self.home)
        self.log_cap_bytes = log_cap_bytes
        self._job_dirs: set[str] = set()  # logs/<job> folders already secured

    def collect(self, chan: Any, *, job_id: str, task_id: str, attempt: int, task_dir: str,
                wd: str, outputs: Sequence[Mapping[str, Any]], ran: bool, success: bool,
                node_id: str) -> str | None:
        """Upload the outputs whose condition holds, then keep the logs; the upload
        error (one line), or None."""
        error = None
        with chan.node_files() as files:
            wanted = [o for o in outputs if _matches_condition(
                o.get("upload_condition") or "task_completion", success)] if ran else []
            if wanted:
                try:
                    n, size = self._upload(files, wanted, task_dir, wd, {
                        "job": job_id, "task": task_id, "attempt": str(attempt)})
                    log.info("task %s/%s: %d output file(s) uploaded (%s bytes)", job_id,
                             task_id, n, f"{size:,}")
                except Exception as exc:  # noqa: BLE001 - the attempt's file_upload_error
                    error = _one_line(exc)
            try:
                self._keep_logs(files, job_id, task_id, attempt, task_dir, node_id)
            except Exception as exc:  # noqa: BLE001 - the logs stay on the node
                log.warning("task %s/%s: its stdout/stderr were not kept: %s", job_id,
                            task_id, _one_line(exc))
        return error

    def keep_left(self, files: Any, node_id: str,
                  tasks: Sequence[tuple[str, str, int, str]]) -> int:
        """Before a node's task directories are removed: keep the logs of ``tasks``
        (job, task, attempt, task directory; see Store.completed_on_node) that are not
        kept yet. How many were kept now."""
        n = 0
        for job_id, task_id, attempt, task_dir in tasks:
            if os.path.exists(os.path.join(kept_dir(self.home, job_id, task_id, attempt),
                                           "kept.json")) or not os.path.isdir(task_dir):
                continue
            try:
                self._keep_logs(files, job_id, task_id, attempt, task_dir, node_id)
                n += 1
            except OSError as exc:  # (its directory already gone: nothing to keep)
                log.debug("task %s/%s: logs not kept: %s", job_id, task_id, exc)
        return n

    def _upload(self, files: Any, outputs: Sequence[Mapping[str, Any]], task_dir: str,
                wd: str, values: Mapping[str, str]) -> tuple[int, int]:
        found = files.match({"task_dir": task_dir, "wd": wd,
                             "patterns": [o["pattern"] for o in outputs]})["matches"]
        n = size = 0
        for index, rel, below, _ in found:
            out = outputs[index]
            pattern = out["pattern"]
            exact = not any(c in pattern for c in "*?[")
            name = blob_name(out, below, exact, values)
            container = out["container"]
            if not self.storage.exists(container):
                raise OSError(f"output {pattern!r}: container {container!r} does not exist "
                              f"(deleted?); 'hpcbatch storage create {container}'")
            with files.open(posixpath.join(task_dir, rel)) as f:
                if hasattr(f, "prefetch"):
                    f.prefetch()
                try:
                    view = self.storage.put(container, name,
                                            iter(lambda f=f: f.read(CHUNK), b""))
                except Exception as exc:
                    raise OSError(f"output {rel} -> {container}/{name}: {_one_line(exc)}"
                                  ) from None
            n += 1
            size += view.size
        return n, size

    def _keep_logs(self, files: Any, job_id: str, task_id: str, attempt: int, task_dir: str,
                   node_id: str) -> None:
        # (the keeper runs once per task: plain os calls, no pathlib; the files are
        # written in place and kept.json, renamed in last, is what says they are whole)
        dest = self._attempt_dir(job_id, task_id, attempt)
        record: dict[str, Any] = {"node_id": node_id, "task_dir": task_dir, "files": {}}
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        for name in LOG_FILES:
            try:
                f = files.open(posixpath.join(task_dir, name))
            except FileNotFoundError:
                continue
            with f:
                size = _size_of(f)
                start = max(0, size - self.log_cap_bytes)
                target = os.path.join(dest, name)
                if not (start == 0 and files.here and _link_opened(f, target)):
                    _copy_tail(f, start, size - start, target)
            record["files"][name] = {"size": size, "kept_from": start}
        tmp = os.path.join(dest, ".kept.json.tmp")
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, json.dumps(record).encode())
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(dest, "kept.json"))

    def _attempt_dir(self, job_id: str, task_id: str, attempt: int) -> str:
        """``<home>/logs/<job>/<task>/<attempt>``, made 0700 as needed; the home's logs
        folder and a job's are secured once, then remembered (a job's is forgotten and
        made again when its kept logs were removed meanwhile)."""
        from hpcbatch.store import secure_dir
        job_dir = os.path.join(self.home, "logs", job_id)
        for again in (False, True):
            if again or job_dir not in self._job_dirs:
                secure_dir(self.home / "logs")
                secure_dir(Path(job_dir))
                if len(self._job_dirs) > 4096:
                    self._job_dirs.clear()
                self._job_dirs.add(job_dir)
            path = job_dir
            try:
                for leaf in (task_id, str(attempt)):
                    path = os.path.join(path, leaf)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(path, 0o700)
                return path
            except FileNotFoundError:  # the job's kept logs were removed meanwhile
                self._job_dirs.discard(job_dir)
        raise FileNotFoundError(job_dir)


def _link_opened(f: Any, target: str) -> bool:
    """A local file kept whole without copying: a second name for the very file opened
    (never what a link planted at its path points to), made 0600. False where that
    cannot be done (another filesystem, a name already there) and it is copied."""
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            return False
        if stat.S_IMODE(mode) != 0o600:  # (an agent before 0600 task logs)
            os.fchmod(f.fileno(), 0o600)
        source = f"/proc/self/fd/{f.fileno()}"
        try:
            os.link(source, target)
        except FileExistsError:  # the same attempt kept again
            os.unlink(target)
            os.link(source, target)
        return True
    except OSError:
        return False


def _copy_tail(f: Any, start: int, length: int, target: str) -> None:
    if start:
        f.seek(start)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                break
            os.write(fd, chunk)  # (a regular file: written whole)
            length -= len(chunk)
    finally:
        os.close(fd)


def _size_of(f: Any) -> int:
    with contextlib.suppress(AttributeError, OSError):
        return os.fstat(f.fileno()).st_size
    return int(f.stat().st_size)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["Collector", "DEFAULT_LOG_CAP_BYTES", "blob_name", "forget", "kept_dir",
           "latest_kept", "log_cap_from_env"]
