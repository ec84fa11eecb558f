"""What a coordinator finds in the store when it starts, and what it records there when
it stops: both inside one store transaction the coordinator opens.

At start (:func:`found`): every task that was in flight is requeued (its agent may run
on until its lease ends, so the pools whose nodes had agents are held until then), every
node is recorded offline until its new agent says hello, a job whose terminate was under
way is finished, and the state hears of the jobs, the pools and the open task counts. At
stop (:func:`left`): the agents that shut down cleanly are forgotten (one that did not
stays recorded, and the next coordinator reaps what it left) and every node is recorded
offline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hpcbatch import state as S
from hpcbatch.jobops import JobOps
from hpcbatch.models import NodeState, PoolSpec
from hpcbatch.poolops import PoolOps
from hpcbatch.store import Store
from hpcbatch.timings import Timings


def found(store: Store, jobs: JobOps, pools: PoolOps, timings: Timings, now: float,
          pool_added: Callable[[PoolSpec], S.PoolAdded]) -> tuple[list[Any], int]:
    """The state events for a coordinator starting on this store, and how many tasks in
    flight were requeued."""
    # nodes whose earlier agents may still run what is requeued now
    suspects: dict[str, set[str]] = {}
    for a in store.agents():
        suspects.setdefault(a["pool_id"], set()).add(a["node_id"])
    requeued = store.requeue_in_flight()
    for n in store.list_nodes():
        if n["state"] != NodeState.OFFLINE.value:
            store.upsert_node(n["pool_id"], n["id"], NodeState.OFFLINE.value, n["slots"],
                              None, "coordinator restarted")
    jobs.finish_terminating()
    events: list[Any] = [S.Started(now, tuple(store.open_counts().items()),
                                   store.last_task_seq()),
                         jobs.jobs_known(store.list_jobs())]
    added = [pool_added(p) for p in store.list_pools()]
    pools.drop_stale_nodes(added)
    events += added
    if requeued:  # a cut-off agent runs on until its lease ends
        until = now + timings.fence_wait_s
        events += [S.PoolHeld(now, pool_id, until, tuple(sorted(nodes)))
                   for pool_id, nodes in sorted(suspects.items())]
    return events, requeued


def left(store: Store, gone: Iterable[tuple[tuple[str, str], str]],
         nodes: Iterable[S.Node]) -> None:
    """Forget the agents that shut down cleanly; record these nodes offline."""
    for (pool_id, node_id), token in gone:
        store.forget_agent(pool_id, node_id, token)
    for node in nodes:
        store.upsert_node(node.pool_id, node.node_id, NodeState.OFFLINE.value, node.slots,
                          None, "coordinator stopped")
