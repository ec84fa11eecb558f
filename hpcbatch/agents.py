"""Agents: the life cycle of the node agents one coordinator runs.

:class:`Agents` is the coordinator's room for its nodes' agents (the processes of
:mod:`hpcbatch.launch.agent`) as the state's instructions say: started on a worker
thread (after reaping what earlier agents of this home left on the node), connected
(the channel and token recorded), pinged while a turn waits for the store, shut down or
cut off, fenced (the provider kills what a lost one left), and a node that left its
pool forgotten: its task directories removed, an elastic pool's node given back, its
agent's record dropped once it shut down cleanly. It holds each node's channel; the
providers are :class:`hpcbatch.poolops.PoolOps`'s.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcbatch import state as S
from hpcbatch.launch import protocol as P
from hpcbatch.poolops import PoolOps
from hpcbatch.store import Store
from hpcbatch.timings import Timings

log = logging.getLogger("hpcbatch.coordinator")


class Agents:
    """The agents of one coordinator's nodes. ``channels``: node -> (gen, channel,
    token) of its connected agent; ``io`` runs a function on a worker thread."""

    def __init__(self, home: Path, store: Store, state: S.CoordinatorState, pools: PoolOps,
                 timings: Timings, inbox: queue.Queue, io: Callable[..., None],
                 stopping: threading.Event):
        self.home = home
        self.store = store
        self.state = state
        self.pools = pools
        self.timings = timings
        self.inbox = inbox
        self._io = io
        self._stopping = stopping
        self.channels: dict[tuple[str, str], tuple[int, Any, str]] = {}  # gen, chan, token
        # each node's latest agent (gen, token), kept once its channel is dropped: a lost
        # node's fence (in the same turn as the StopAgent that drops it) needs the token
        self.tokens: dict[tuple[str, str], tuple[int, str]] = {}
        # (provider, node id) on a worker thread before a node's task directories are
        # removed (the coordinator's file room keeps their logs)
        self.before_removal: Callable[[Any, str], None] = lambda provider, node_id: None

    def token(self, key: tuple[str, str]) -> str | None:
        """The token of the node's connected agent (None: it has none)."""
        return self.channels[key][2] if key in self.channels else None

    # ---- started and connected -----------------------------------------------------------

    def start(self, ins: S.StartAgent) -> None:
        """On a worker thread: reap what earlier agents of this home left on the node,
        then start a new agent."""
        key = (ins.pool_id, ins.node_id)
        provider = self.pools.provider_of(*key)
        if provider is None or self._stopping.is_set():
            return
        token = secrets.token_hex(8)
        try:
            store = Store(self.home / "state.db")
            try:
                records = [a for a in store.agents()
                           if (a["pool_id"], a["node_id"]) == key]
                problems = provider.reap_orphans(records)
                for problem in problems:
                    log.warning("%s", problem)
                if not problems:  # (else kept: the next start of the node tries again)
                    with store.transaction():
                        for a in records:
                            store.forget_agent(a["pool_id"], a["node_id"], a["token"])
            finally:
                store.close()
            self.inbox.put(("reaped", ins.pool_id, ins.node_id, not problems))
            chan = provider.start_agent(self.pools.descs[key], token=token,
                                        timings=self.timings)
        except Exception as exc:  # noqa: BLE001 - reported on the node
            self.inbox.put(("startfail", ins.pool_id, ins.node_id, ins.gen, str(exc)))
        else:
            self.inbox.put(("up", ins.pool_id, ins.node_id, ins.gen, chan, token))

    def up(self, now: float, pool_id: str, node_id: str, gen: int, chan: Any,
           token: str) -> list[Any]:
        """A started agent's channel (on the loop thread): recorded, listened to, and
        AgentUp; closed at once if the node has a newer generation or we are stopping."""
        node = self.state.node(pool_id, node_id)
        if node is None or node.gen != gen or self._stopping.is_set():
            chan.close()
            return []
        self.channels[(pool_id, node_id)] = (gen, chan, token)
        self.tokens[(pool_id, node_id)] = (gen, token)
        with self.store.transaction():
            self.store.record_agent(pool_id, node_id, token, getattr(chan, "pid", None),
                                    self.pools.descs[(pool_id, node_id)].host,
                                    self.pools.provider_of(pool_id, node_id)
                                    .node_root(node_id))
        chan.listen(lambda msg, k=(pool_id, node_id, gen), c=chan: self.inbox.put(
            ("msg", *k, msg, c.last_words() if msg is None else "", time.time())))
        return [S.AgentUp(now, pool_id, node_id, gen)]

    def keep_leases(self) -> None:
        """While the turn waits for the store's write lock (another process's long
        transaction): a Ping to each live agent, so their leases do not run out and stop
        every task. Not to a node being fenced: its lease must run out."""
        now = time.time()
        for key, (gen, chan, _) in list(self.channels.items()):
            node = self.state.node(*key)
            if node is not None and node.gen == gen and node.connected and \
                    node.fence_until is None:
                chan.send_many([P.Ping(now)])

    # ---- stopped, fenced, forgotten ------------------------------------------------------

    def stop(self, key: tuple[str, str], gen: int, last: list[Any],
             abort: bool = False) -> tuple[int, Any, str] | None:
        """Shut the agent down (a lost one: cut it off, nothing buffered reaches it);
        returns its (gen, channel, token), or None when it had none."""
        entry = self.channels.get(key)
        if entry is None or entry[0] != gen:
            return None
        del self.channels[key]
        chan = entry[1]
        if abort:
            chan.close(abort=True)
        else:
            chan.send_many([*last, P.Shutdown()])
            chan.close()
        return entry

    def forget(self, key: tuple[str, str], entry: tuple[int, Any, str] | None) -> None:
        """A node that left its pool: once its agent has shut down cleanly, its record is
        forgotten (one that did not stays recorded, for the next start to reap)."""
        self.pools.descs.pop(key, None)
        self.tokens.pop(key, None)
        provider = self.pools.retired.pop(key, None) or self.pools.providers.get(key[0])
        if provider is not None and provider.elastic:  # give the node back
            chan = entry[1] if entry else None
            self._io(self._give_back, provider, key[1], chan)
        if entry is None:
            return
        _, chan, token = entry
        grace = self.timings.kill_grace_s + 5

        def forget() -> None:
            if not chan.wait_closed(grace):
                return
            store = Store(self.home / "state.db")
            try:
                with store.transaction():
                    store.forget_agent(key[0], key[1], token)
            finally:
                store.close()
        self._io(forget)

    def remove_data(self, key: tuple[str, str]) -> None:
        """The task directories of a node that left, removed on a worker thread."""
        provider = self.pools.provider_of(*key)
        if provider is not None:
            self._io(self._remove_node_data, provider, key[1])

    def _remove_node_data(self, provider: Any, node_id: str) -> None:
        try:
            self.before_removal(provider, node_id)
        except Exception:  # noqa: BLE001 - logged; the node's directories go anyway
            log.exception("node %s: keeping its tasks' logs before its task directories "
                          "go", node_id)
        try:
            provider.remove_tree(node_id, "jobs")
        except Exception as exc:  # noqa: BLE001 - a warning: the node has left anyway
            log.warning("pool %s: the task directories of node %s, which left it, could "
                        "not be removed: %s", provider.pool_id, node_id, exc)

    def _give_back(self, provider: Any, node_id: str, chan: Any) -> None:
        """An elastic pool's node left: once its agent has shut down, the provider gives
        the node back (a Slurm allocation cancelled)."""
        if chan is not None:
            chan.wait_closed(self.timings.kill_grace_s + 5)
        try:
            provider.shrink([node_id])
        except Exception:  # noqa: BLE001 - logged; the pool's stop or delete tries again
            log.exception("giving node %s back", node_id)

    def fence(self, ins: S.FenceNode) -> None:
        """Fence a lost node on a worker thread (with its latest agent's token, if that
        is the generation fenced); NodeFenced says whether the provider is sure."""
        gen, token = self.tokens.get((ins.pool_id, ins.node_id), (None, ""))
        self._io(self._fence, ins, token if gen == ins.gen else "")

    def _fence(self, ins: S.FenceNode, token: str) -> None:
        provider = self.pools.provider_of(ins.pool_id, ins.node_id)
        sure = False
        if provider is not None and token:
            try:
                sure = bool(provider.fence(self.pools.descs[(ins.pool_id, ins.node_id)],
                                           token, ins.pids))
            except Exception:  # noqa: BLE001 - not sure, then: the lease decides
                log.exception("fencing node %s", ins.node_id)
        self.inbox.put(("fenced", ins.pool_id, ins.node_id, ins.gen, sure))

    def shut_down_all(self) -> list[tuple[tuple[str, str], str]]:
        """The coordinator stops (its worker threads done): every agent, including one
        whose start is still in the inbox, is shut down and waited for; returns the
        (node, token) of those that shut down cleanly (nothing left to reap)."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "up":
                self.channels[(item[1], item[2])] = (item[3], item[4], item[5])
        chans = list(self.channels.items())
        self.channels.clear()
        for _, (_, chan, _) in chans:
            chan.send_many([P.Shutdown()])
        for _, (_, chan, _) in chans:
            chan.close()
        deadline = time.monotonic() + self.timings.kill_grace_s + 5
        return [(key, token) for key, (_, chan, token) in chans
                if chan.wait_closed(max(0.0, deadline - time.monotonic()))]
