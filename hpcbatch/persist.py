"""A turn's persistence instructions, written through the store.

The coordinator calls :func:`write` inside the turn's one transaction, with the
``PERSIST`` instructions the state emitted, in their order.
"""

from __future__ import annotations

from typing import Any

from hpcbatch import state as S
from hpcbatch.models import JobState
from hpcbatch.store import Store

# the writes made between a turn's finished attempts and its placements
_BETWEEN = frozenset({S.CompleteUnstarted, S.TerminateJobTasks, S.CompleteJobIfDone,
                      S.ReactivateTask})


def write(st: Store, writes: list[Any]) -> None:
    """One statement per kind where it can: attempts that ended, terminated jobs' tasks
    and job completion, reactivations, then tasks placed (a retried or reactivated task
    is placed again in the same turn), then node records."""
    by: dict[type, list[Any]] = {}
    for w in writes:
        by.setdefault(type(w), []).append(w)
    running = [(w.seq, w.t) for w in by.get(S.MarkRunning, ())]
    finished = [dict(seq=w.seq, outcome=w.outcome, node_id=w.node_id,
                     started_at=w.started_at, ended_at=w.ended_at, exit_code=w.exit_code,
                     signal=w.signal, failure_kind=w.failure_kind,
                     failure_detail=w.failure_detail, usage=dict(w.usage),
                     retry_count=w.retry_count) for w in by.get(S.FinishAttempt, ())]
    preparing = [(w.seq, w.node_id, w.task_dir, w.t) for w in by.get(S.MarkPreparing, ())]
    if not by.keys() & _BETWEEN:  # the usual turn: one write of the three
        st.write_turn(running, finished, preparing)
        preparing = []
    elif running or finished:
        st.write_turn(running, finished)
    for w in by.get(S.CompleteUnstarted, ()):
        st.complete_unstarted(w.seq, w.failure_kind, w.failure_detail, w.t)
    for w in by.get(S.TerminateJobTasks, ()):
        st.terminate_job_tasks(w.job_id, w.t)
    # before a reactivation of the same turn (which reopens a completed job), after
    # every write that ends a task
    for w in by.get(S.CompleteJobIfDone, ()):
        if st.get_job(w.job_id)["state"] != JobState.COMPLETED.value and \
                st.unfinished(w.job_id) == 0:
            st.set_job_state(w.job_id, JobState.COMPLETED)
    for w in by.get(S.ReactivateTask, ()):
        st.reactivate_task(w.seq)
    if preparing:
        st.mark_preparing(preparing)
    for w in writes:  # in their order: a node dropped can come back in the same turn
        if isinstance(w, S.PersistNode):
            st.upsert_node(w.pool_id, w.node_id, w.state.value, w.slots,
                           dict(w.info) or None, w.reason)
        elif isinstance(w, S.DropNode):
            st.delete_node(w.pool_id, w.node_id)
    for w in by.get(S.PersistJobTask, ()):
        st.upsert_job_task(w.job_id, w.pool_id, w.node_id, w.kind, w.state, w.t,
                           w.task_dir, w.exit_code, w.detail, w.retry_count)
