"""File work on nodes: what the coordinator copies to and from its nodes around a task.

:class:`FileWork` is the coordinator's room for file work on nodes: a task's resource
files staged into its directory (:class:`hpcbatch.staging.Stager`), application
packages (:mod:`hpcbatch.apps`) copied once per agent and added to the runs that use
them, a job's preparation and release tasks (whose resource files are copied before
their Run is sent), and, at a task's exit, its output files uploaded and its logs kept
(:class:`hpcbatch.collect.Collector`) before the state hears of the exit.

The loop thread calls it (an agent's exits as they arrive, a turn's instructions after
its commit); the copies run on the coordinator's worker threads and answer through its
inbox (``"staged"``, ``"appsstaged"``, ``"collected"``, or a start failure as an
agent's ``"msg"``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcbatch import env as E
from hpcbatch import state as S
from hpcbatch.apps import AppRef, AppStore, node_env
from hpcbatch.collect import Collector, log_cap_from_env
from hpcbatch.errors import HpcBatchError
from hpcbatch.launch import protocol as P
from hpcbatch.models import RunKind
from hpcbatch.staging import Stager, StagingError, cache_bytes_from_env

log = logging.getLogger("hpcbatch.coordinator")
APP_CACHE_S = 1.0  # how long a resolved application package reference is reused
KEEPER_BACKLOG = 10_000  # local tasks' logs waiting to be kept, at most


class FileWork:
    """Staging, application packages, job preparation/release runs and collection at
    exit, for one coordinator. ``channels`` is the coordinator's (node -> (gen, channel,
    token)), read only; ``io`` runs a function on one of its worker threads."""

    def __init__(self, home: Path, store: Any, state: S.CoordinatorState,
                 channels: dict[tuple[str, str], tuple[int, Any, str]],
                 inbox: queue.Queue, io: Callable[..., None]):
        self.home = home
        self.store = store
        self.state = state
        self.channels = channels
        self.inbox = inbox
        self._io = io
        self.stager = Stager(home, cache_bytes_from_env())  # resource files
        # output files and kept logs: what each started task needs collected at its exit
        self.collector = Collector(home, log_cap_from_env())
        self._collect: dict[tuple[str, str, Any], tuple[Any, ...]] = {}
        self._keeper = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="hpcbatch-logs")  # local nodes' logs, off the exit path
        self._keeping = 0  # tasks queued on the keeper
        self._keeping_lock = threading.Lock()
        self.apps = AppStore(home)
        # application package archives already on each node (node -> node archive paths),
        # with a lock per node so two tasks' copies do not both send one archive
        self._node_apps: dict[tuple[str, str], set[str]] = {}
        self._node_apps_lock: dict[tuple[str, str], threading.Lock] = {}
        self._pool_apps: dict[str, tuple[AppRef, ...]] = {}  # each pool's own references
        self._app_cache: dict[tuple, tuple[float, list[Any]]] = {}  # see resolve_apps

    def pool_added(self, pool_id: str, refs: tuple[AppRef, ...]) -> None:
        """The pool's own application package references (every run there gets them)."""
        self._pool_apps[pool_id] = refs

    def agent_up(self, key: tuple[str, str]) -> None:
        """A new agent on the node: which packages it has is looked at again."""
        self._node_apps.pop(key, None)

    def shutdown(self) -> None:
        """The coordinator stops: the logs being kept now are kept, no more."""
        self._keeper.shutdown(wait=True, cancel_futures=True)

    # ---- collection at exit (hpcbatch.collect) -----------------------------------------

    def expect_exit(self, ins: S.RunTask, spec: Any) -> None:
        """A task (or an application of a multi-instance one) is sent: what its exit
        will need collected."""
        if ins.run.kind in (RunKind.TASK, RunKind.APPLICATION):
            self._collect[(ins.pool_id, ins.node_id, ins.run)] = (
                spec.output_files, ins.task_dir,
                spec.environment.get(E.TASK_WORKING_DIR) or
                ins.env.get(E.TASK_WORKING_DIR) or f"{ins.task_dir}/wd",
                ins.env.get(E.JOB_ID), ins.env.get(E.TASK_ID),
                int(ins.env.get(E.TASK_ATTEMPT) or 0))

    def hold_exits(self, evs: list[Any]) -> list[Any]:
        """A task's exit waits (off the loop) until its output files are uploaded and
        its logs kept, unless it has no outputs and runs on a node whose files are on
        this machine (its logs are then kept beside, or later, and the exit goes on at
        once)."""
        if not self._collect:
            return evs
        out = []
        for ev in evs:
            entry = None
            if isinstance(ev, S.RunExited):
                entry = self._collect.pop((ev.pool_id, ev.node_id, ev.run), None)
            chan_entry = self.channels.get((ev.pool_id, ev.node_id)) if entry else None
            if entry is None or chan_entry is None or chan_entry[0] != ev.gen or \
                    not entry[3]:
                out.append(ev)
                continue
            outputs, tdir, wd, job_id, task_id, attempt = entry
            chan = chan_entry[1]
            ran = ev.start_failed is None
            success = ran and ev.exit_code == 0 and ev.signal is None and \
                not ev.timed_out and not ev.killed
            kw = dict(job_id=job_id, task_id=task_id, attempt=attempt, task_dir=tdir, wd=wd,
                      ran=ran, success=success, node_id=ev.node_id)
            if not outputs and getattr(chan, "files_here", False):
                # its files stay on this machine: a successful attempt's logs are read
                # there, and kept only before hpcbatch removes its directory (see
                # keep_left); another attempt would write over a failed one's, so those
                # are kept now, beside (under a flood the keeper may fall behind, then
                # what it has not reached is left there)
                if success:
                    out.append(ev)
                    continue
                with self._keeping_lock:
                    room = self._keeping < KEEPER_BACKLOG
                    self._keeping += room
                if room:
                    self._keeper.submit(self._keep_quietly, chan, kw)
                out.append(ev)
                continue

            def work(ev=ev, chan=chan, outputs=outputs, kw=kw) -> None:
                try:
                    error = self.collector.collect(chan, outputs=outputs, **kw)
                except Exception as exc:  # noqa: BLE001 - the node's files unreachable
                    error = f"output files of node {ev.node_id} unreachable: {exc}" \
                        if outputs and kw["ran"] else None
                    if not outputs:
                        log.warning("task %s/%s: its logs were not kept: %s",
                                    kw["job_id"], kw["task_id"], exc)
                self.inbox.put(("collected", dataclasses.replace(ev, upload_error=error)
                                if error else ev))
            self._io(work)
        return out

    def keep_left(self, provider: Any, node_id: str) -> None:
        """On a worker thread, before hpcbatch removes the task directories of a node
        whose files are on this machine (it left its pool): the logs of the tasks that
        ended there and were not kept at their exit, kept now."""
        if not provider.files_here:
            return
        from hpcbatch.store import Store
        from hpcbatch.transport import local_node_files
        store = Store(self.home / "state.db")
        try:
            tasks = store.completed_on_node(provider.pool_id, node_id)
        finally:
            store.close()
        n = self.collector.keep_left(local_node_files(), node_id, tasks)
        if n:
            log.info("node %s: the logs of %d task(s) kept before its task directories "
                     "go", node_id, n)

    def _keep_quietly(self, chan: Any, kw: dict[str, Any]) -> None:
        try:
            self.collector.collect(chan, outputs=(), **kw)
        except Exception as exc:  # noqa: BLE001 - the logs stay on the node
            log.warning("task %s/%s: its logs were not kept: %s", kw["job_id"],
                        kw["task_id"], exc)
        finally:
            with self._keeping_lock:
                self._keeping -= 1

    # ---- resource files (hpcbatch.staging) ---------------------------------------------

    def stage(self, ins: S.StageFiles, spec: Any) -> None:
        entry = self.channels.get((ins.pool_id, ins.node_id))
        chan = entry[1] if entry else None
        groups = [((spec.resource_files if which == "resource" else
                    spec.common_resource_files), dest) for which, dest in ins.groups
                  if which != "apps"]
        apps = [dest for which, dest in ins.groups if which == "apps"]
        refs = spec.application_package_references
        if apps and chan is not None and not any(files for files, _ in groups):
            # only packages, all on the node already (the usual case after the first
            # task there): answered at once, without a worker thread's round trip
            have = self._node_apps.get((ins.pool_id, ins.node_id), ())
            try:
                there = all(a.node_archive(root) in have for root in apps
                            for a in self.resolve_apps(ins.pool_id, refs))
            except HpcBatchError:
                there = False
            if there:
                self.inbox.put(("staged", ins.seq, ins.run, ins.token, None))
                return

        def work() -> None:
            error = None
            try:
                if chan is None:
                    raise OSError("its agent is gone")
                for root in apps:
                    self._put_apps((ins.pool_id, ins.node_id), chan, root,
                                   self.resolve_apps(ins.pool_id, refs))
                for files, dest in groups:
                    if files:
                        self.stager.stage(chan, files, dest, f"node {ins.node_id}")
            except StagingError as exc:  # the pre_processing_error's detail
                error = f"resource files for node {ins.node_id}: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported as the task's failure
                error = f"copying resource files to node {ins.node_id} failed: {exc}"
            self.inbox.put(("staged", ins.seq, ins.run, ins.token, error))
        self._io(work)

    # ---- application packages (hpcbatch.apps) ---------------------------------------

    def resolve_apps(self, pool_id: str, refs: Any) -> list[Any]:
        """The pool's packages and then the task's (which win for the same name),
        resolved to stored versions; NotFound when one is gone. Kept for a second (a
        pool's every task would otherwise read the package files again)."""
        key = (pool_id, tuple((r["application_id"], r.get("version")) if isinstance(r, dict)
                              else r for r in refs or ()))
        now = time.monotonic()
        hit = self._app_cache.get(key)
        if hit is not None and now - hit[0] < APP_CACHE_S:
            return hit[1]
        apps = self.apps.resolve_all([*self._pool_apps.get(pool_id, ()),
                                      *AppRef.check_list("apps", refs)])
        if len(self._app_cache) > 1000:
            self._app_cache.clear()
        self._app_cache[key] = (now, apps)
        return apps

    def with_apps(self, msg: P.Run, key: tuple[str, str], refs: Any) -> P.Run:
        """The Run with its packages to unpack, their variables and PATH (bin/), when
        the task (``refs``) or its pool has any; else the Run as it is."""
        if not refs and not self._pool_apps.get(key[0]):
            return msg
        root = (self.state.node(*key).root if self.state.node(*key) else None) or ""
        try:
            apps = self.resolve_apps(key[0], refs)
        except HpcBatchError as exc:  # deleted since it was staged: the run says so
            log.warning("node %s: %s", key[1], exc)
            return msg
        return dataclasses.replace(msg, env={**node_env(apps, root), **msg.env},
                                   apps=tuple(a.wire(root) for a in apps))

    def _put_apps(self, key: tuple[str, str], chan: Any, root: str, apps: list[Any]) -> None:
        """Copy each package's archive to the node once (per agent); blocking."""
        lock = self._node_apps_lock.setdefault(key, threading.Lock())
        with lock:
            have = self._node_apps.setdefault(key, set())
            for app in apps:
                there = app.node_archive(root)
                if there not in have:
                    chan.put_files([(app.archive, there.rsplit("/", 1)[1])],
                                   there.rsplit("/", 1)[0])
                    have.add(there)

    def stage_node_apps(self, ins: S.StageNodeApps) -> None:
        """The pool's packages copied to a node (before its start task), on a worker."""
        key = (ins.pool_id, ins.node_id)
        entry = self.channels.get(key)
        node = self.state.node(*key)
        root = (node.root if node else None) or ""

        def work() -> None:
            error = None
            try:
                if entry is None:
                    raise OSError("its agent is gone")
                self._put_apps(key, entry[1], root, self.resolve_apps(ins.pool_id, ()))
            except Exception as exc:  # noqa: BLE001 - reported on the node
                error = f"copying them to node {ins.node_id} failed: {exc}"
            self.inbox.put(("appsstaged", ins.pool_id, ins.node_id, ins.gen, error))
        self._io(work)

    # ---- job preparation and release tasks --------------------------------------------

    def job_task_run(self, ins: S.RunJobTask, token: str | None) -> P.Run | None:
        """The Run of a job's preparation or release task (None: sent later, after its
        resource files reach the node, by a worker thread)."""
        key = (ins.pool_id, ins.node_id)
        spec = self.store.get_job(ins.job_id)["spec"]
        task = spec.preparation_task if ins.run.kind is RunKind.JOB_PREP else \
            spec.release_task
        env = {**task.environment, **dict(ins.env)}
        if token:
            env[P.AGENT_TOKEN_ENV] = token
        msg = P.Run(ins.run.wire, task.command_line, ins.task_dir, env,
                    task.max_wall_clock_time_s, 0, cwd=ins.task_dir)  # (takes no slot)
        msg = self.with_apps(msg, key, ())
        if not task.resource_files:
            return msg
        entry = self.channels.get(key)
        gen = self.state.node(*key).gen if self.state.node(*key) else 0

        def work() -> None:
            error = None
            try:
                if entry is None:
                    raise OSError("its agent is gone")
                entry[1].put_files([(f.source, f.file_path) for f in task.resource_files],
                                   ins.task_dir)
            except Exception as exc:  # noqa: BLE001 - reported as its failure to start
                error = f"copying its resource files to node {ins.node_id} failed: {exc}"
            if error is None:
                entry[1].send_many([msg])
                return
            now = time.time()
            self.inbox.put(("msg", ins.pool_id, ins.node_id, gen, P.Events((P.Exited(
                id=msg.id, exit_code=None, start_failed=error, start=now, end=now),)), "",
                now))
        self._io(work)
        return None
