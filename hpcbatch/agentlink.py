"""Translations between the agent protocol and the state machine, both directions.

Pure functions: what an agent said (a :mod:`hpcbatch.launch.protocol` message) as
state events, and the state's instructions for a node as protocol messages. The
coordinator calls them; nothing here does I/O.
"""

from __future__ import annotations

import logging
from typing import Any

from hpcbatch import env as E
from hpcbatch import state as S
from hpcbatch.launch import protocol as P
from hpcbatch.models import RunId, RunKind

log = logging.getLogger("hpcbatch.coordinator")


def task_row(r: Any) -> S.TaskRow:
    """A store row (hpcbatch.store.TaskRow) as the state's TaskRow."""
    return S.TaskRow(r.seq, r.job_id, r.id, r.pool_id, r.neg_priority, r.required_slots,
                     r.instances, r.slots_per_instance, r.max_retries, r.retry_count, r.flags,
                     r.attempt)


def task_row_of(r: Any, attempt: int) -> S.TaskRow:
    """A task's full store row (a dict, as Store.get_task returns it) as the state's
    TaskRow, for a reactivation: its retry count starts again at 0; ``attempt``: the
    number its next attempt gets."""
    return S.TaskRow(r["seq"], r["job_id"], r["id"], r["pool_id"], r["neg_priority"],
                     r["required_slots"], r["instances"], r["slots_per_instance"],
                     r["max_retries"], 0, r["flags"], attempt)


def events_of(pool_id: str, node_id: str, gen: int, msg: Any, words: str,
              t: float) -> list[Any]:
    """State events for one message of agent ``gen`` (None: its channel ended, and
    ``words`` is what its end said), received at ``t``."""
    if msg is None:
        return [S.AgentClosed(t, pool_id, node_id, gen, words)]
    if isinstance(msg, P.Heartbeat):
        return [S.Heartbeat(t, pool_id, node_id, gen)]
    if isinstance(msg, P.Events):
        out: list[Any] = []
        for it in msg.items:
            try:
                run = RunId.parse(it.id) if getattr(it, "id", None) is not None else None
            except ValueError:
                run = None
            if isinstance(it, P.Started) and run is not None:
                out.append(S.RunStarted(t, pool_id, node_id, gen, run, it.pid))
            elif isinstance(it, P.Exited) and run is not None:
                out.append(S.RunExited(t, pool_id, node_id, gen, run, it.exit_code, it.signal,
                                       it.timed_out, it.killed, it.start_failed, it.start,
                                       it.end, tuple(sorted(it.usage.items())),
                                       it.stderr_tail))
            elif isinstance(it, P.Error):
                out.append(S.AgentError(t, pool_id, node_id, gen, it.message, run))
            elif isinstance(it, P.Reaped) and it.pids:
                log.info("node %s: reaped %d leftover process(es)", node_id, len(it.pids))
        return out
    if isinstance(msg, P.Hello):
        info = (("hostname", msg.hostname), ("pid", msg.pid), ("cores", msg.cores),
                ("python", msg.python))
        return [S.AgentHello(t, pool_id, node_id, gen, msg.root, msg.protocol, info)]
    if isinstance(msg, P.Error):
        return [S.AgentError(t, pool_id, node_id, gen, msg.message)]
    if isinstance(msg, P.Bye):  # unasked (asked, the node is gone): lost now, not at EOF
        return [S.AgentClosed(t, pool_id, node_id, gen, "its agent stopped on its own")]
    return [S.AgentError(t, pool_id, node_id, gen, f"unreadable message: {msg!r}"[:300])]


def run_message(ins: S.RunTask, spec: Any, token: str | None,
                inter_node_env: dict[str, str] | None = None) -> P.Run:
    """The Run for a RunTask: the command line (the coordination command for a
    COORDINATION run), the task's own environment under the state's HPCBATCH_* one, the
    provider's inter-node variables for a multi-instance run, and the agent's token; a
    task that names its HPCBATCH_TASK_WORKING_DIR (TaskSpec working_dir) runs there."""
    cmd = spec.coordination_command if ins.run.kind is RunKind.COORDINATION else \
        spec.command_line
    env = dict(spec.environment)
    cwd = env.get(E.TASK_WORKING_DIR)  # the task's own working_dir (else its wd/)
    env.update(ins.env)
    env.update(inter_node_env or {})
    if cwd:
        env[E.TASK_WORKING_DIR] = cwd
    if token:
        env[E.AGENT_TOKEN] = token
    return P.Run(ins.run.wire, cmd, ins.task_dir, env, spec.max_wall_clock_time_s, ins.slots,
                 dict(ins.files) or None, tuple(ins.dirs), ins.log_prefix, cwd or None)


def message_of(ins: Any, token: str | None) -> Any:
    """The protocol message of a start-task run, a kill, a reap or a ping (None for an
    instruction that is not a message to the node)."""
    if isinstance(ins, S.RunStartTask):
        env = dict(ins.env)
        if token:
            env[E.AGENT_TOKEN] = token
        return P.Run(RunId.START_WIRE, ins.command, ins.task_dir, env)
    if isinstance(ins, S.KillRun):
        return P.Kill(ins.run.wire, ins.reason)
    if isinstance(ins, S.Reap):
        return P.Reap(dict(ins.match), ins.sessions)
    if isinstance(ins, S.Ping):
        return P.Ping(ins.t)
    return None
