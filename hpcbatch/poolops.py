"""Pool operations: the providers of a coordinator's pools and what changes a pool.

:class:`PoolOps` is the coordinator's room for its pools' providers
(:mod:`hpcbatch.providers`): a pool added (its nodes from the provider, an elastic one
asked to ``grow`` for its target), a resize (a command or an autoscale formula's
decision, :mod:`hpcbatch.autoscaling`), an elastic provider's nodes granted on a worker
thread, a node removed, a pool's new spec stored and a provider made from it (nodes it
no longer lists keep the provider they were started with until they go), and the
providers stopped with the coordinator. It turns these into state events; the state
decides which nodes join and leave.

The module's functions are the rules of the service operations on a pool's spec
(``resized_spec``, ``spec_without_node``), which the service also applies when no
coordinator runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcbatch import state as S
from hpcbatch.autoscaling import Autoscaler, evaluate_dry
from hpcbatch.errors import HpcBatchError, NotFound, ValidationError
from hpcbatch.models import PoolSpec
from hpcbatch.providers import NodeDesc, provider_for

log = logging.getLogger("hpcbatch.coordinator")


class PoolOps:
    """One coordinator's pools: their providers and nodes' descriptions, resizes,
    growth and autoscaling. ``reply`` registers a command's future for the state's
    Reply; ``io`` runs a function on a worker thread."""

    def __init__(self, home: Path, store: Any, state: S.CoordinatorState,
                 inbox: queue.Queue, io: Callable[..., None],
                 reply: Callable[[concurrent.futures.Future], int],
                 stopping: threading.Event):
        self.home = home
        self.store = store
        self.state = state
        self.inbox = inbox
        self._io = io
        self._reply = reply
        self._stopping = stopping
        self.providers: dict[str, Any] = {}
        self.descs: dict[tuple[str, str], NodeDesc] = {}
        # nodes the pool's current provider no longer lists (removed, or a local pool
        # renumbered by a resize) keep the provider they were started with until they go
        self.retired: dict[tuple[str, str], Any] = {}
        self.autoscaler = Autoscaler(store, time.time())
        self._growing: dict[str, int] = {}  # pool -> nodes asked of its provider, not granted

    def provider_of(self, pool_id: str, node_id: str) -> Any:
        return self.retired.get((pool_id, node_id)) or self.providers.get(pool_id)

    # ---- pools added and removed -------------------------------------------------------

    def added(self, spec: PoolSpec) -> S.PoolAdded:
        """The pool's provider made (or the one it has) and its nodes, as a PoolAdded."""
        provider = self.providers.get(spec.id) or provider_for(spec, self.home)
        self.providers[spec.id] = provider
        nodes = provider.grow(spec.target_nodes) if provider.elastic else \
            provider.fixed_nodes()
        for d in nodes:
            self.descs[(spec.id, d.node_id)] = d
        info = S.PoolInfo(spec.id, spec.task_slots_per_node, spec.scheduling_policy,
                          spec.start_task, bool(spec.application_package_references))
        disabled = {n["id"] for n in self.store.list_nodes(spec.id)
                    if json.loads(n["info"] or "{}").get("scheduling") == "disabled"}
        return S.PoolAdded(time.time(), info, tuple(
            S.NodeInfo(d.node_id, d.host, d.slots, d.node_id in disabled) for d in nodes))

    def drop_stale_nodes(self, added: list[S.PoolAdded]) -> None:
        """At start: node records of a fixed pool that its provider no longer lists (it
        was resized, or a node removed) are forgotten."""
        for ev in added:
            listed = {n.node_id for n in ev.nodes}
            provider = self.providers.get(ev.pool.pool_id)
            if listed or provider is not None:  # (an elastic pool's slots: all listed)
                for n in self.store.list_nodes(ev.pool.pool_id):
                    if n["id"] not in listed:
                        self.store.delete_node(ev.pool.pool_id, n["id"])

    def removed(self, pool_id: str) -> None:
        self.providers.pop(pool_id, None)
        for key in [k for k in self.retired if k[0] == pool_id]:
            del self.retired[key]

    def stop_providers(self, final: bool) -> None:
        for provider in list(self.providers.values()):
            try:
                provider.stop(final)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("stopping pool %s", provider.pool_id)

    # ---- nodes of a running pool ---------------------------------------------------------

    def node(self, pool_id: str, node_id: str) -> Any:
        """The state's node; NotFound (naming the pool's nodes) when there is none."""
        self.store.get_pool(pool_id)
        node = self.state.node(pool_id, node_id)
        if node is None:
            known = ", ".join(self.node_ids(pool_id)) or "none"
            raise NotFound(f"node {node_id!r} is not in pool {pool_id!r} (its nodes: {known})")
        return node

    def node_ids(self, pool_id: str) -> list[str]:
        pool = self.state.pools.get(pool_id)
        return [] if pool is None else [n for n, nd in pool.nodes.items() if not nd.leaving]

    def remove_node_events(self, now: float, pool_id: str, node_id: str, running: str,
                           fut: concurrent.futures.Future) -> list[Any]:
        """A node asked to leave its pool: the spec without it stored, then NodeLeaving."""
        node = self.node(pool_id, node_id)
        if node.leaving:
            fut.set_result(None)
            return []
        self.change_pool(spec_without_node(self.store.get_pool(pool_id), self.home,
                                           node_id, self.node_ids(pool_id)))
        return [S.NodeLeaving(now, pool_id, node_id, running, self._reply(fut))]

    # ---- resizing, growing, autoscaling --------------------------------------------------

    def resize_events(self, now: float, pool_id: str, target: int, running: str,
                      fut: concurrent.futures.Future) -> list[Any]:
        new = resized_spec(self.store.get_pool(pool_id), self.home, target)
        provider = self.change_pool(new)
        pool = self.state.pools.get(pool_id)
        if pool is None:  # not started here (yet): the stored size is what it starts with
            fut.set_result(None)
            return []
        keep = None
        if provider.elastic:  # more nodes are asked of the provider, off the loop
            infos: tuple[S.NodeInfo, ...] = ()
            # nodes asked of the provider and not granted yet count (a second resize
            # before the first one's nodes come asks only for the rest)
            have = sum(1 for n in pool.nodes.values() if not n.leaving) + \
                self._growing.get(pool_id, 0)
            if target > have:
                self._growing[pool_id] = self._growing.get(pool_id, 0) + target - have
                self._io(self._grow, provider, pool_id, target - have)
        else:
            # the provider's nodes for a size with room for every id the pool holds now,
            # so an id still held by a leaving node is not needed
            wide = dataclasses.replace(new, target_nodes=min(100_000,
                                                             target + len(pool.nodes)))
            nodes = provider_for(wide, self.home).fixed_nodes()
            for d in nodes:
                self.descs.setdefault((pool_id, d.node_id), d)
            infos = tuple(S.NodeInfo(d.node_id, d.host, d.slots) for d in nodes)
            if provider.ordered:  # its nodes at a size are the first of its list
                keep = tuple(d.node_id for d in provider.fixed_nodes())
        return [S.PoolResized(now, pool_id, target, infos, self._reply(fut), running, keep)]

    def _grow(self, provider: Any, pool_id: str, n: int) -> None:
        """On a worker thread: ask an elastic provider for n more nodes; each granted
        one joins the pool (NodeGranted)."""
        try:
            granted = provider.grow(n)
        except Exception as exc:  # noqa: BLE001 - said in the log and the pool's record
            log.warning("pool %s: %d more node(s) were asked for and not granted: %s",
                        pool_id, n, exc)
            self.inbox.put(("grown", pool_id, (), str(exc), n))
            return
        self.inbox.put(("grown", pool_id, tuple(granted), None, n))

    def granted_events(self, now: float, pool_id: str, granted: tuple[NodeDesc, ...],
                       asked: int) -> list[Any]:
        """What an elastic provider granted (of ``asked``) joins the pool."""
        self._growing[pool_id] = max(0, self._growing.get(pool_id, 0) - asked)
        if pool_id not in self.state.pools or self._stopping.is_set():
            provider = self.providers.get(pool_id)
            if granted and provider is not None:  # nobody to run them: back at once
                self._io(provider.shrink, [d.node_id for d in granted])
            return []
        for d in granted:
            self.descs[(pool_id, d.node_id)] = d
        return [S.NodeGranted(now, pool_id, S.NodeInfo(d.node_id, d.host, d.slots))
                for d in granted]

    def autoscale(self, now: float) -> list[Any]:
        """Sample the pools, evaluate their formulas when due, resize as they say."""
        try:
            decisions = self.autoscaler.tick(self.state, now)
        except Exception:  # noqa: BLE001 - autoscaling never stops the loop
            log.exception("autoscale")
            return []
        events: list[Any] = []
        for pool_id, target, running, record in decisions:
            try:
                events += self.resize_events(now, pool_id, target, running,
                                             concurrent.futures.Future())
            except HpcBatchError as exc:
                self.autoscaler.record(pool_id, "resize", record, str(exc), now)
                continue
            self.autoscaler.record(pool_id, "resize", record, None, now)
        return events

    def evaluate_dry(self, now: float, pool_id: str, formula: str,
                     fut: concurrent.futures.Future) -> None:
        """A formula evaluated over the pool's samples and its metrics now, into fut
        (None: the pool is not running here)."""
        m = self.autoscaler.measure(self.state, pool_id, now)
        if m is None:
            fut.set_result(None)
            return
        points, period = self.autoscaler.history(pool_id)
        try:
            fut.set_result(evaluate_dry(formula, [*points, (now, m)], period, now,
                                        self.store.get_pool(pool_id).target_nodes))
        except Exception as exc:  # noqa: BLE001 - the caller hears it
            fut.set_exception(exc)

    def change_pool(self, spec: PoolSpec) -> Any:
        """Store the pool's new spec and use a provider made from it; nodes it no longer
        lists keep the one they were started with."""
        with self.store.transaction():
            self.store.set_pool_spec(spec)
        old = self.providers.get(spec.id)
        provider = provider_for(spec, self.home)
        listed = {d.node_id for d in provider.fixed_nodes()}
        pool = self.state.pools.get(spec.id)
        if old is not None and pool is not None:
            for node_id in pool.nodes:
                if node_id not in listed:
                    self.retired.setdefault((spec.id, node_id), old)
        self.providers[spec.id] = provider
        return provider


# ---- the service operations' rules (the service applies them too, with no coordinator) --

def resized_spec(spec: PoolSpec, home: Path, target: int) -> PoolSpec:
    """The pool's spec at ``target`` nodes; ValidationError when its provider's nodes are
    not set by its size (a fixed host list) or the size is out of its range."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValidationError("target_nodes", f"{target!r} is not a number of nodes >= 0")
    new = dataclasses.replace(spec, target_nodes=target)  # validates the number
    provider = provider_for(new, home)
    capacity = provider.capacity()
    if capacity is not None and target > capacity:
        raise ValidationError("target_nodes", f"pool {spec.id!r} has {capacity} host(s) in "
                              f"its host list, fewer than the target of {target}; resize it "
                              f"to at most {capacity}, or create a pool with more hosts")
    most = getattr(type(provider), "MAX_NODES", None)
    if most is not None and target > most:
        raise ValidationError("target_nodes", f"{target} is more than the {most} nodes a "
                              f"{spec.provider} pool can have")
    return new


def spec_without_node(spec: PoolSpec, home: Path, node_id: str,
                      present: list[str] | None = None) -> PoolSpec:
    """The pool's spec once ``node_id`` has left: one node fewer, or (a pool defined by
    its host list) that list without it. ``present``: the nodes the pool has now, when a
    coordinator runs it (a local pool's ids need not be 1..N after a removal)."""
    provider = provider_for(spec, home)
    listed = [d.node_id for d in provider.fixed_nodes()]
    have = listed if present is None else present
    if node_id not in have:
        raise NotFound(f"node {node_id!r} is not in pool {spec.id!r} (its nodes: "
                       f"{', '.join(have) or 'none'})")
    if spec.target_nodes <= 1 or len(have) <= 1:
        raise ValidationError("node", f"{node_id!r} is the last node of pool {spec.id!r}; a "
                              "pool keeps at least one (delete the pool instead)")
    smaller = dataclasses.replace(spec, target_nodes=spec.target_nodes - 1)
    # (an SSH pool loses the host from its list: a resize would leave it listed, idle)
    if not provider.ordered and \
            len(provider_for(smaller, home).fixed_nodes()) == smaller.target_nodes:
        return smaller
    hosts = spec.provider_config.get("hosts")
    if isinstance(hosts, list) and node_id in listed:
        config = {**spec.provider_config,
                  "hosts": [h for h in hosts if not (isinstance(h, dict) and
                                                     h.get("name") == node_id)]}
        new = dataclasses.replace(spec, provider_config=config,
                                  target_nodes=spec.target_nodes - 1)
        if [d.node_id for d in provider_for(new, home).fixed_nodes()] == \
                [n for n in listed if n != node_id]:
            return new
    raise ValidationError("node", f"the nodes of pool {spec.id!r} cannot be removed one by "
                          "one; resize it instead")
