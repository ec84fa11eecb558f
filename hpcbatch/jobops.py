"""Job operations: the jobs a coordinator knows and the commands that end or reopen work.

:class:`JobOps` is the coordinator's room for jobs: the ones it has told the state of
(each as a :class:`hpcbatch.state.JobInfo`), a task or a job terminated and a failed
task reactivated (checked against the store first, so the caller hears a NotFound or
Conflict as such, then turned into state events), and, at start, a job an earlier
coordinator left terminating completed.

``check_reactivatable`` is the rule of a reactivation, which the service also applies
when no coordinator runs.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from hpcbatch import agentlink as link
from hpcbatch import state as S
from hpcbatch.errors import Conflict, HpcBatchError
from hpcbatch.models import JobState, TaskState


class JobOps:
    """One coordinator's jobs. ``reply`` registers a command's future for the state's
    Reply."""

    def __init__(self, store: Any, reply: Callable[[concurrent.futures.Future], int]):
        self.store = store
        self._reply = reply
        self.known: set[str] = set()  # the jobs the state has heard of

    def jobs_known(self, jobs: list[dict]) -> S.JobsKnown:
        self.known.update(j["id"] for j in jobs)
        return S.JobsKnown(time.time(), tuple(map(_job_info, jobs)))

    def forgotten(self, now: float, job_id: str) -> S.JobForgotten:
        self.known.discard(job_id)
        return S.JobForgotten(now, job_id)

    def finish_terminating(self) -> None:
        """At start: a job left terminating by an earlier coordinator completes (its tasks
        in flight then were requeued just now: they are completed as terminated)."""
        released = self.store.end_running_job_tasks(time.time())
        for job in self.store.list_jobs():
            if job["state"] == JobState.TERMINATING.value:
                self.store.terminate_job_tasks(job["id"], time.time(), in_flight=True)
                self.store.set_job_state(job["id"], JobState.COMPLETED)
            elif released and job["state"] == JobState.ACTIVE.value and \
                    job["spec"].release_task is not None and \
                    job["spec"].on_all_tasks_complete == "terminate_job" and \
                    self.store.unfinished(job["id"]) == 0 and \
                    self.store.task_counts(job["id"])["total"] > 0:
                # its tasks were done and its release tasks ran when the coordinator
                # stopped: it completes (they were stopped, as recorded)
                self.store.set_job_state(job["id"], JobState.COMPLETED)

    # ---- the commands ----------------------------------------------------------------

    def terminate_task_events(self, now: float, job_id: str, task_id: str,
                              fut: concurrent.futures.Future) -> list[Any]:
        try:
            row = self.store.get_task(job_id, task_id)
        except HpcBatchError as exc:
            fut.set_exception(exc)
            return []
        if row["state"] == "completed":
            fut.set_result(None)
            return []
        reply = self._reply(fut)
        return [S.TerminateAsked(now, row["seq"], job_id, reply)]

    def terminate_job_events(self, now: float, job_id: str,
                             fut: concurrent.futures.Future) -> list[Any]:
        job = self.store.get_job(job_id)
        if job["state"] == JobState.COMPLETED.value:
            raise Conflict(f"job {job_id!r} is already completed")
        if job["state"] == JobState.TERMINATING.value:
            fut.set_result(None)
            return []
        return [S.JobTerminateAsked(now, job_id, self._reply(fut))]

    def reactivated_row(self, job_id: str, task_id: str) -> S.TaskRow:
        """The task's row to reactivate (its next attempt number); Conflict when it
        cannot be (see check_reactivatable)."""
        row = self.store.get_task(job_id, task_id)
        check_reactivatable(row, self.store.get_job(job_id))
        attempts = self.store.attempts(job_id, task_id)
        return link.task_row_of(row, max((a["attempt"] + 1 for a in attempts), default=0))


def _job_info(j: dict[str, Any]) -> S.JobInfo:
    spec = j["spec"]
    prep = spec.preparation_task
    return S.JobInfo(j["id"], j["pool_id"], spec.priority,
                     spec.on_all_tasks_complete == "terminate_job", prep is not None,
                     prep.wait_for_success if prep else True,
                     prep.max_task_retry_count if prep else 0,
                     prep.rerun_on_node_reboot_after_success if prep else True,
                     spec.release_task is not None)


# ---- the service operations' rule (the service applies it too, with no coordinator) --

def check_reactivatable(task: dict[str, Any], job: dict[str, Any]) -> None:
    """Conflict unless the task is completed and failed and its job is not terminating."""
    where = f"task {task['job_id']}/{task['id']}"
    if task["state"] != TaskState.COMPLETED.value:
        raise Conflict(f"{where} is {task['state']}; only a failed completed task can be "
                       "reactivated")
    if task["result"] != "failure":
        raise Conflict(f"{where} succeeded; only a failed completed task can be reactivated")
    if job["state"] == JobState.TERMINATING.value:
        raise Conflict(f"job {job['id']!r} is terminating; reactivate its tasks once it has "
                       "completed")
