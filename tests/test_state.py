"""The pure coordinator state: events in, exact instruction lists out (no I/O, no clock)."""

from __future__ import annotations

import pytest

from hpcbatch import env as E
from hpcbatch import state as S
from hpcbatch.models import FailureKind, NodeState, RunId, RunKind
from hpcbatch.timings import Timings

TM = Timings()
ROOT = "/r"


def row(seq, task=None, job="j", pool="p", prio=0, **kw):
    return S.TaskRow(seq, job, task or f"t{seq}", pool, -prio, **kw)


def env_of(ins):
    return dict(ins.env)


def without(out, *types):
    return [i for i in out if not isinstance(i, types)]


def only(out, *types):
    return [i for i in out if isinstance(i, types)]


def node_rec(node="n1", state=NodeState.IDLE, reason=None, slots=1, pool="p", reconnecting=False,
             hello=True, **info):
    """The node record the state writes (once the agent said hello, its root is in it)."""
    if hello:
        info["root"] = f"{ROOT}/{node}"
    return S.PersistNode(pool, node, state, slots, reason,
                         tuple(sorted({**info, "reconnecting": reconnecting}.items())))


def pool_up(nodes=(("n1", 1),), *, prefetch=0, rows=(), policy="pack", start_task=None,
            timings=TM, hello=True):
    """A state with pool p of these nodes, each agent up and said hello (at t=1)."""
    st = S.CoordinatorState(timings, prefetch=prefetch)
    if rows:
        st.handle(S.Started(0.0, (("j", len(rows)),), max(r.seq for r in rows)))
    st.handle(S.PoolAdded(0.0, S.PoolInfo("p", nodes[0][1], policy, start_task),
                          tuple(S.NodeInfo(n, f"h-{n}", s) for n, s in nodes)))
    st.handle(S.WindowLoaded(0.0, "p", tuple(rows), True))
    if hello:
        for n, _ in nodes:
            st.handle(S.AgentUp(0.5, "p", n, 1))
        st._out = []
        outs = [st.handle(S.AgentHello(1.0, "p", n, 1, f"{ROOT}/{n}", 2)) for n, _ in nodes]
        st.hello_out = [i for o in outs for i in o]
    return st


def run_of(seq, node="n1", attempt=0, slots=1, job="j", task=None):
    task = task or f"t{seq}"
    tdir = f"{ROOT}/{node}/jobs/{job}/{task}"
    env = {E.POOL_ID: "p", E.NODE_ID: node, E.JOB_ID: job, E.TASK_ID: task, E.TASK_DIR: tdir,
           E.TASK_WORKING_DIR: f"{tdir}/wd", E.NODE_SHARED_DIR: f"{ROOT}/{node}/shared",
           E.TASK_ATTEMPT: str(attempt)}  # (HPCBATCH_JOB_PREP_DIR: a job with one only)
    return S.RunTask("p", node, seq, RunId(seq), tdir, env, slots)


def exited(seq, code=0, t=2.0, node="n1", gen=1, run=None, **kw):
    return S.RunExited(t, "p", node, gen, run or RunId(seq), code, start=t - 0.5, end=t, **kw)


# ---- nodes ------------------------------------------------------------------------

def test_a_pool_starts_its_agents_and_asks_for_a_window_of_work():
    st = S.CoordinatorState(TM)
    out = st.handle(S.PoolAdded(0.0, S.PoolInfo("p", 2), (S.NodeInfo("n1", "h1", 2),
                                                          S.NodeInfo("n2", "h2", 2))))
    assert out == [S.StartAgent("p", "n1", 1), S.StartAgent("p", "n2", 1),
                   S.LoadWindow("p", None, S.WINDOW_MIN),
                   node_rec("n1", NodeState.STARTING, slots=2, hello=False),
                   node_rec("n2", NodeState.STARTING, slots=2, hello=False)]


def test_hello_makes_a_node_idle_and_a_queued_task_runs_there():
    st = pool_up(hello=False, rows=[row(1)])
    st.handle(S.AgentUp(0.5, "p", "n1", 1))
    out = st.handle(S.AgentHello(1.0, "p", "n1", 1, f"{ROOT}/n1", 2,
                                 (("hostname", "h-n1"),)))
    assert out == [S.MarkPreparing(1, "n1", f"{ROOT}/n1/jobs/j/t1", 1.0), run_of(1),
                   node_rec(state=NodeState.RUNNING, hostname="h-n1")]


def test_a_start_task_runs_before_the_node_takes_work():
    st = pool_up(hello=False, rows=[row(1)], start_task="setup.sh")
    out = st.handle(S.AgentHello(1.0, "p", "n1", 1, "/r/n1", 2))
    tdir = "/r/n1/starttask"
    env = {E.POOL_ID: "p", E.NODE_ID: "n1", E.TASK_DIR: tdir, E.TASK_WORKING_DIR: f"{tdir}/wd",
           E.NODE_SHARED_DIR: "/r/n1/shared"}
    assert out == [S.RunStartTask("p", "n1", "setup.sh", tdir, tuple(sorted(env.items()))),
                   node_rec(state=NodeState.STARTING, reason="running its start task")]
    out = st.handle(S.RunExited(2.0, "p", "n1", 1, S.RunId.parse("__start_task__"), 1))
    assert out == [node_rec(state=NodeState.START_TASK_FAILED,
                            reason="start task exited with 1; see /r/n1/starttask/stderr.txt")]


def test_protocol_mismatch_is_one_line_naming_both_versions():
    st = pool_up(hello=False)
    out = st.handle(S.AgentHello(1.0, "p", "n1", 1, "/r/n1", 1))
    assert out[0] == S.StopAgent("p", "n1", 1)
    reason = out[-1].reason
    assert out[-1].state is NodeState.UNUSABLE
    assert "protocol 1" in reason and "coordinator 2" in reason and "\n" not in reason


def test_messages_of_a_replaced_agent_are_ignored():
    st = pool_up(rows=[row(1)])
    assert st.handle(exited(1, gen=7)) == []


def test_silence_loses_a_node_then_its_task_is_requeued_only_after_the_lease():
    st = pool_up(rows=[row(1)])
    st.handle(S.RunStarted(1.0, "p", "n1", 1, RunId(1), 4242))
    assert only(st.handle(S.Tick(1.0 + TM.node_timeout_s)), S.StopAgent) == []
    lost_at = 1.0 + TM.node_timeout_s + 0.1
    out = st.handle(S.Tick(lost_at))
    assert without(out, S.Log) == [
        S.StopAgent("p", "n1", 1, lost=True), S.FenceNode("p", "n1", 1, (4242,)),
        node_rec(state=NodeState.UNUSABLE,
                 reason="no word from its agent for 4.1 s; fencing it")]
    # the provider could not make sure (an unreachable node): wait out the lease
    assert st.handle(S.NodeFenced(lost_at + 1, "p", "n1", 1, sure=False)) == []
    assert st.handle(S.Tick(lost_at + TM.fence_wait_s - 0.1)) == []
    out = st.handle(S.Tick(lost_at + TM.fence_wait_s))
    assert out == [
        S.FinishAttempt(1, "requeue", "n1", 1.0, lost_at + TM.fence_wait_s, None, None,
                        FailureKind.NODE_LOST, "no word from its agent for 4.1 s", (), 0),
        node_rec(state=NodeState.UNUSABLE,
                 reason="no word from its agent for 4.1 s; trying again in 1 s")]


def test_a_sure_fence_requeues_at_once_and_the_task_runs_on_another_node():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2)])
    st.handle(exited(2, node="n2"))  # n2 is free now
    out = st.handle(S.AgentClosed(3.0, "p", "n1", 1, "exit status 137"))
    assert only(out, S.FinishAttempt, S.RunTask) == []
    out = st.handle(S.NodeFenced(3.1, "p", "n1", 1, sure=True))
    assert only(out, S.FinishAttempt)[0].outcome == "requeue"
    assert only(out, S.RunTask) == [run_of(1, node="n2", attempt=1)]  # its next attempt


def test_reconnect_back_off_doubles_up_to_the_maximum():
    tm = Timings(reconnect_max_s=4.0)
    st = pool_up(timings=tm)
    t = 2.0
    delays = []
    for _ in range(4):
        st.handle(S.AgentClosed(t, "p", "n1", st.node("p", "n1").gen))
        out = st.handle(S.NodeFenced(t, "p", "n1", st.node("p", "n1").gen, sure=True))
        delay = st.node("p", "n1").retry_at - t
        delays.append(delay)
        assert out[-1].reason.endswith(f"trying again in {delay:g} s")
        assert only(st.handle(S.Tick(t + delay - 0.01)), S.StartAgent) == []
        gen = st.node("p", "n1").gen
        assert only(st.handle(S.Tick(t + delay)), S.StartAgent) == [
            S.StartAgent("p", "n1", gen + 1)]
        assert st.node("p", "n1").state is NodeState.STARTING
        st.handle(S.AgentStartFailed(t + delay, "p", "n1", gen + 1, "connection refused"))
        t += delay
        # a failed start is another step of the back-off
        delays.append(st.node("p", "n1").retry_at - t)
        t = st.node("p", "n1").retry_at
        st.handle(S.Tick(t))
        st.handle(S.AgentUp(t, "p", "n1", st.node("p", "n1").gen))
    assert delays[:5] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_pings_keep_the_lease_of_every_connected_agent():
    st = pool_up((("n1", 1), ("n2", 1)))
    assert only(st.handle(S.Tick(2.0)), S.Ping) == [S.Ping("p", "n1", 2.0), S.Ping("p", "n2", 2.0)]
    assert only(st.handle(S.Tick(2.5)), S.Ping) == []


# ---- exits ------------------------------------------------------------------------

def test_success_completes_and_drains_the_job():
    st = pool_up(rows=[row(1)])
    out = st.handle(exited(1))
    assert out == [S.FinishAttempt(1, "success", "n1", 1.5, 2.0, 0, None, None, None, (), 0),
                   S.JobDrained("j"), node_rec()]


def test_a_failure_retries_with_the_next_attempt_number_then_fails():
    st = pool_up(rows=[row(1, max_retries=1)])
    out = st.handle(exited(1, code=3))
    assert out == [
        S.FinishAttempt(1, "retry", "n1", 1.5, 2.0, 3, None, FailureKind.EXIT_CODE, None, (), 1),
        S.MarkPreparing(1, "n1", f"{ROOT}/n1/jobs/j/t1", 2.0), run_of(1, attempt=1)]
    out = st.handle(exited(1, code=3, t=3.0))
    assert out == [
        S.FinishAttempt(1, "failure", "n1", 2.5, 3.0, 3, None, FailureKind.EXIT_CODE, None, (),
                        1),
        S.JobDrained("j"), node_rec()]


def test_running_is_written_once_a_task_outlasts_the_delay_and_never_for_a_short_one():
    d = S.RUNNING_WRITE_DELAY_S
    st = pool_up(rows=[row(1, max_retries=1), row(2)], nodes=(("n1", 2),))
    assert only(st.handle(S.RunStarted(1.1, "p", "n1", 1, RunId(1), 11)), S.MarkRunning) == []
    assert only(st.handle(S.RunStarted(1.1 + d / 4, "p", "n1", 1, RunId(2), 12)),
                S.MarkRunning) == []
    # t2 ends within the delay: its end's write is its only one (started_at with it)
    out = st.handle(exited(2, t=1.1 + d / 2))
    assert only(out, S.MarkRunning) == []
    assert only(out, S.FinishAttempt)[0].started_at == pytest.approx(1.1 + d / 2 - 0.5)
    # t1 runs on: written at the first event after the delay, once
    assert only(st.handle(S.Tick(1.1 + d * 0.9)), S.MarkRunning) == []
    assert only(st.handle(S.Tick(1.1 + d)), S.MarkRunning) == [S.MarkRunning(1, 1.1)]
    assert only(st.handle(S.Tick(5.0)), S.MarkRunning) == []
    # its retry starts, then ends before its delay: nothing more is marked running
    assert only(st.handle(exited(1, code=3, t=5.0)), S.FinishAttempt)[0].outcome == "retry"
    st.handle(S.RunStarted(5.1, "p", "n1", 1, RunId(1), 13))
    out = st.handle(exited(1, t=5.1 + d / 2))
    assert only(out, S.MarkRunning) == [] and only(out, S.FinishAttempt)[0].outcome == "success"
    assert st.started == {}


def test_start_failure_and_signal_details():
    st = pool_up(rows=[row(1), row(2)], nodes=(("n1", 2),))
    out = st.handle(exited(1, code=None, start_failed="embedded null byte"))
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.failure_kind, fa.failure_detail) == (FailureKind.START_FAILED, "embedded null byte")
    fa = only(st.handle(exited(2, code=None, signal=9)), S.FinishAttempt)[0]
    assert (fa.failure_kind, fa.failure_detail, fa.signal) == (FailureKind.SIGNAL, "9", 9)


def test_terminate_drain_job_when_asked():
    st = pool_up(rows=[row(1)])
    st.handle(S.JobsKnown(0.0, (S.JobInfo("j", "p", 0, terminate_when_done=True),)))
    out = st.handle(exited(1))
    assert only(out, S.JobDrained, S.CompleteJobIfDone) == [S.JobDrained("j"),
                                                           S.CompleteJobIfDone("j")]


# ---- terminate --------------------------------------------------------------------

def test_terminate_a_queued_task_completes_it_without_a_run():
    st = pool_up(rows=[row(1), row(2)])
    out = st.handle(S.TerminateAsked(1.5, 2, "j", reply=5))
    assert out == [S.CompleteUnstarted(2, FailureKind.KILLED, "terminate", 1.5), S.Reply(5)]
    assert only(st.handle(exited(1)), S.RunTask) == []  # t2 never runs


def test_terminate_a_running_task_kills_it_and_it_is_never_retried():
    st = pool_up(rows=[row(1, max_retries=3)])
    out = st.handle(S.TerminateAsked(1.5, 1, "j", reply=1))
    assert out == [S.Reply(1), S.KillRun("p", "n1", RunId(1), "terminate")]
    out = st.handle(exited(1, code=None, signal=15, killed="terminate"))
    assert out[0] == S.FinishAttempt(1, "failure", "n1", 1.5, 2.0, None, 15, FailureKind.KILLED,
                                     "terminate", (), 0)
    assert only(out, S.RunTask) == []


def test_terminate_while_its_files_are_copied_never_starts_it():
    st = pool_up(rows=[row(1, flags=S.FLAG_RESOURCE_FILES)])
    stage = only(st.hello_out, S.StageFiles)[0]
    assert stage.groups == (("resource", f"{ROOT}/n1/jobs/j/t1/wd"),)
    out = st.handle(S.TerminateAsked(1.5, 1, "j"))
    assert only(out, S.FinishAttempt)[0].failure_kind is FailureKind.KILLED
    assert st.handle(S.FilesStaged(1.6, 1, stage.run, stage.token)) == []  # late: dropped


def test_a_task_with_files_runs_once_they_are_copied_and_fails_if_they_are_not():
    st = pool_up(rows=[row(1, flags=S.FLAG_RESOURCE_FILES, max_retries=1)])
    stage = only(st.hello_out, S.StageFiles)[0]
    assert only(st.hello_out, S.RunTask) == []
    assert st.handle(S.FilesStaged(1.5, 1, stage.run, stage.token)) == [run_of(1)]
    st.handle(exited(1, code=1))  # retried: copied again
    stage = only(st.handle(S.Tick(2.1)), S.StageFiles) or [
        i for i in st.attempts[1].staging.items()]
    tok = st.attempts[1].staging[RunId(1)]
    out = st.handle(S.FilesStaged(2.2, 1, RunId(1), tok, error="no such file"))
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.outcome, fa.failure_kind, fa.failure_detail) == (
        "failure", FailureKind.PRE_PROCESSING_ERROR, "no such file")



def test_an_output_upload_error_fails_a_successful_attempt_and_adds_to_a_failed_one():
    st = pool_up(rows=[row(1), row(2)])
    fa = only(st.handle(exited(1, code=0, upload_error="container 'out' does not exist")),
              S.FinishAttempt)[0]
    assert (fa.outcome, fa.exit_code, fa.failure_kind, fa.failure_detail) == (
        "failure", 0, FailureKind.FILE_UPLOAD_ERROR, "container 'out' does not exist")
    fa = only(st.handle(exited(2, code=3, upload_error="container 'out' does not exist")),
              S.FinishAttempt)[0]
    assert (fa.failure_kind, fa.failure_detail) == (
        FailureKind.EXIT_CODE, "and container 'out' does not exist")

# ---- prefetch, windows, bounded turns ----------------------------------------------

def test_prefetch_queues_short_tasks_on_agents_and_none_for_long_ones():
    st = pool_up(prefetch=4, rows=[row(i) for i in range(1, 30)])
    # before any task was timed: one queued per slot
    assert len(only(st.hello_out, S.RunTask)) == 2
    out = st.handle(exited(1, t=2.0))  # 0.5 s tasks: none queued
    assert len(only(out, S.RunTask)) == 0
    st2 = pool_up(prefetch=4, rows=[row(i) for i in range(1, 30)])
    out = st2.handle(S.RunExited(2.0, "p", "n1", 1, RunId(1), 0, start=1.999, end=2.0))
    assert len(only(out, S.RunTask)) == 4  # 1 ms tasks: the slot queues the maximum


def test_a_window_is_asked_for_when_the_queue_runs_low_and_not_when_exhausted():
    st = S.CoordinatorState(TM, prefetch=0)
    st.handle(S.PoolAdded(0.0, S.PoolInfo("p", 1), (S.NodeInfo("n1", "h", 1),)))
    rows = tuple(row(i) for i in range(1, S.WINDOW_MIN + 1))
    out = st.handle(S.WindowLoaded(0.1, "p", rows, exhausted=False))
    assert only(out, S.LoadWindow) == []
    st.handle(S.AgentUp(0.2, "p", "n1", 1))
    st.handle(S.AgentHello(0.3, "p", "n1", 1, "/r", 2))
    t = 1.0
    asked = []
    for seq in range(1, S.WINDOW_MIN // 2 + 2):
        out = st.handle(exited(seq, t=t))
        asked += only(out, S.LoadWindow)
        t += 0.01
    assert asked == [S.LoadWindow("p", (0, S.WINDOW_MIN), S.WINDOW_MIN)]


def test_new_work_beyond_the_window_is_left_in_the_store():
    st = pool_up(rows=[row(1)])
    st.pools["p"].exhausted = False
    st.pools["p"].cursor = (0, 1)
    st.handle(S.WorkAdded(1.1, (row(2), row(3, prio=5)), more=False))
    assert 3 in st.rows and 2 not in st.rows  # a higher-priority job's task: before the cursor
    assert st.open["j"] == 3  # both counted open, loaded or not


def test_placements_per_turn_are_bounded(monkeypatch):
    monkeypatch.setattr(S, "PLACE_BUDGET", 3)
    st = pool_up(nodes=(("n1", 8),), rows=[row(i) for i in range(1, 9)])
    assert len(only(st.hello_out, S.RunTask)) == 3
    assert len(only(st.handle(S.Tick(1.1)), S.RunTask)) == 3


# ---- multi-instance tasks ---------------------------------------------------------

def mi_pool(flags=S.FLAG_COORDINATION, max_retries=0):
    return pool_up((("n1", 2), ("n2", 2), ("n3", 2)),
                   rows=[row(1, instances=2, flags=flags, max_retries=max_retries)])


def test_multi_instance_phases_coordination_then_application_then_reap():
    st = mi_pool()
    c0, c1 = (RunId(1, RunKind.COORDINATION, i) for i in (0, 1))
    runs = only(st.hello_out, S.RunTask)
    assert [(r.node_id, r.run, r.log_prefix, r.instance) for r in runs] == [
        ("n1", c0, "coordination-", True), ("n2", c1, "coordination-", True)]
    env = env_of(runs[1])
    assert (env[E.INSTANCE_INDEX], env[E.NUM_INSTANCES], env[E.HOST_LIST], env[E.NODE_LIST],
            env[E.MASTER_NODE]) == ("1", "2", "h-n1,h-n2", "n1,n2", "h-n1")
    assert runs[0].files == (("hostfile", "h-n1 slots=2\nh-n2 slots=2\n"),)
    assert only(st.handle(exited(1, run=c1, node="n2")), S.RunTask) == []
    app = only(st.handle(exited(1, run=c0)), S.RunTask)
    assert [(a.node_id, a.run, a.log_prefix) for a in app] == [
        ("n1", RunId(1, RunKind.APPLICATION), "")]
    assert only(st.handle(S.RunStarted(3.0, "p", "n1", 1, app[0].run, 99)), S.MarkRunning) == []
    assert only(st.handle(S.Tick(3.0 + S.RUNNING_WRITE_DELAY_S)), S.MarkRunning) == [
        S.MarkRunning(1, 3.0)]
    out = st.handle(exited(1, run=app[0].run, t=4.0))
    match = ((E.JOB_ID, "j"), (E.TASK_ID, "t1"), (E.TASK_ATTEMPT, "0"))
    assert only(out, S.Reap, S.FinishAttempt) == [
        S.Reap("p", "n1", match), S.Reap("p", "n2", match),
        S.FinishAttempt(1, "success", "n1", 3.5, 4.0, 0, None, None, None, (), 0)]


def test_a_wide_task_waiting_for_busy_nodes_says_which_tasks_hold_them():
    st = pool_up((("n1", 1), ("n2", 1), ("n3", 1)),
                 rows=[row(1, task="busy"), row(2, job="k", task="wide", instances=3)])
    assert [r.node_id for r in only(st.hello_out, S.RunTask)] == ["n1"]
    assert st.waiting == {2: ("k", "wide", "waiting for 3 nodes of pool p; n1 runs j/busy")}
    waiting = st.waiting
    st.handle(S.Tick(1.5))
    assert st.waiting is waiting  # replaced only when it changes (read by other threads)
    out = st.handle(exited(1))  # n1 is free: the wide task starts, and waits no more
    assert [r.run for r in only(out, S.RunTask)] == [RunId(2, RunKind.APPLICATION)]
    assert st.waiting == {}


def test_a_waiting_wide_task_that_is_terminated_waits_no_more():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2, instances=2)])
    assert st.waiting[2][2] == "waiting for 2 nodes of pool p; n1 runs j/t1"
    st.handle(S.TerminateAsked(1.5, 2, "j"))
    assert st.waiting == {}


def test_a_failed_coordination_command_kills_the_others_and_retries():
    st = mi_pool(max_retries=1)
    c0, c1 = (RunId(1, RunKind.COORDINATION, i) for i in (0, 1))
    out = st.handle(exited(1, run=c1, node="n2", code=127))
    assert only(out, S.KillRun) == [S.KillRun("p", "n1", c0, "instance_failed")]
    out = st.handle(exited(1, run=c0, code=None, signal=15, killed="instance_failed"))
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.outcome, fa.failure_kind, fa.exit_code) == ("retry", FailureKind.EXIT_CODE, 127)
    assert [r.run for r in only(out, S.RunTask)] == [c0, c1]  # the next attempt
    assert env_of(only(out, S.RunTask)[0])[E.TASK_ATTEMPT] == "1"


def test_terminate_in_coordination_kills_every_instance_and_never_starts_the_application():
    st = mi_pool(max_retries=2)
    c0, c1 = (RunId(1, RunKind.COORDINATION, i) for i in (0, 1))
    out = st.handle(S.TerminateAsked(1.5, 1, "j"))
    assert out == [S.KillRun("p", "n1", c0, "terminate"), S.KillRun("p", "n2", c1, "terminate")]
    st.handle(exited(1, run=c0, code=0))  # exits 0 anyway
    out = st.handle(exited(1, run=c1, node="n2", code=0))
    assert only(out, S.RunTask) == []
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.outcome, fa.failure_kind, fa.failure_detail) == ("failure", FailureKind.KILLED,
                                                                "terminate")


def test_terminate_while_staging_ends_the_attempt_at_once():
    st = mi_pool(flags=S.FLAG_COMMON_FILES)
    stages = only(st.hello_out, S.StageFiles)
    assert [(s.node_id, s.groups) for s in stages] == [
        ("n1", (("common", "/r/n1/jobs/j/t1/shared"),)),
        ("n2", (("common", "/r/n2/jobs/j/t1/shared"),))]
    out = st.handle(S.TerminateAsked(1.5, 1, "j"))
    assert only(out, S.FinishAttempt)[0].failure_detail == "terminate"
    assert st.handle(S.FilesStaged(1.6, 1, stages[0].run, stages[0].token)) == []


def test_a_lost_node_fails_the_attempt_which_ends_only_once_that_node_is_fenced():
    st = mi_pool(flags=0, max_retries=1)  # no coordination command: application at once
    app = RunId(1, RunKind.APPLICATION)
    st.handle(S.AgentClosed(2.0, "p", "n2", 1))
    out = st.handle(exited(1, run=app, code=None, signal=9, killed="instance_failed"))
    assert only(out, S.FinishAttempt) == []  # n2 is not fenced yet: nothing is retried
    out = st.handle(S.NodeFenced(2.5, "p", "n2", 1, sure=True))
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.outcome, fa.failure_kind) == ("retry", FailureKind.NODE_LOST)
    # retried on the nodes that are usable
    assert {r.node_id for r in only(out, S.RunTask)} == {"n1"}
    assert only(out, S.RunTask)[0].run == app


def test_node_loss_requeues_ordinary_tasks_but_completes_a_terminated_one():
    st = pool_up(nodes=(("n1", 2),), rows=[row(1), row(2)])
    st.handle(S.TerminateAsked(1.5, 2, "j"))
    st.handle(S.AgentClosed(2.0, "p", "n1", 1))
    out = st.handle(S.NodeFenced(2.1, "p", "n1", 1, sure=True))
    assert [(f.seq, f.outcome, f.failure_kind) for f in only(out, S.FinishAttempt)] == [
        (1, "requeue", FailureKind.NODE_LOST), (2, "failure", FailureKind.KILLED)]


@pytest.mark.parametrize("policy,expect", [("pack", "n1"), ("spread", "n2")])
def test_policy_picks_the_node(policy, expect):
    st = pool_up((("n1", 4), ("n2", 4)), rows=[row(1)], policy=policy)
    runs = only(st.hello_out, S.RunTask)
    assert runs[0].node_id == "n1"
    second = only(st.handle(S.WorkAdded(1.1, (row(2),))), S.RunTask)  # the window is exhausted:
    assert [r.node_id for r in second] == [expect]  # new work joins it


def test_a_cold_pool_queues_nothing_on_a_busy_node_while_another_is_coming_up():
    """Issue 11: on a cold 3-node, 1-slot pool the first node up must not take a second
    task into its agent's queue while the other two nodes are still starting."""
    nodes = (("n1", 1), ("n2", 1), ("n3", 1))
    st = pool_up(nodes, prefetch=S.DEFAULT_PREFETCH, rows=[row(1), row(2), row(3)],
                 hello=False)
    for n, _ in nodes:
        st.handle(S.AgentUp(0.5, "p", n, 1))
    placed = []
    for t, n in ((1.0, "n1"), (1.1, "n2"), (1.2, "n3")):
        out = st.handle(S.AgentHello(t, "p", n, 1, f"{ROOT}/{n}", 2))
        placed.append([(r.seq, r.node_id) for r in only(out, S.RunTask)])
    assert placed == [[(1, "n1")], [(2, "n2")], [(3, "n3")]]
    # once every node is up, the untimed depth (one per slot) is back
    assert st.pools["p"].per_slot == 1


@pytest.mark.parametrize("avg_s,per_slot", [(None, 1), (0.001, 4), (0.008, 2), (5.0, 0)])
def test_prefetch_depth_follows_the_pools_task_durations(avg_s, per_slot):
    st = pool_up(prefetch=4)
    st.pools["p"].avg_run_s = avg_s
    assert st._per_slot(st.pools["p"]) == per_slot


# ---- node scheduling, leaving, resizing (service operations) -----------------------

def test_disabling_a_node_places_nothing_new_there_and_lets_its_task_finish():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2), row(3)])
    st.handle(S.RunStarted(1.1, "p", "n1", 1, RunId(1), 11))
    out = st.handle(S.NodeSchedulingSet(1.5, "p", "n1", enabled=False, reply=4))
    assert out == [S.Reply(4),
                   node_rec(state=NodeState.RUNNING, scheduling="disabled"),
                   S.MarkRunning(1, 1.1)]  # (held back until it ran a while)
    out = st.handle(exited(1))  # t1 finishes there; t3 waits for a node that takes work
    assert without(out, S.JobDrained) == [
        S.FinishAttempt(1, "success", "n1", 1.5, 2.0, 0, None, None, None, (), 0),
        node_rec(state=NodeState.IDLE, scheduling="disabled")]
    out = st.handle(S.NodeSchedulingSet(2.5, "p", "n1", enabled=True))
    assert out == [S.MarkPreparing(3, "n1", f"{ROOT}/n1/jobs/j/t3", 2.5), run_of(3),
                   node_rec(state=NodeState.RUNNING)]


def test_disable_with_requeue_kills_and_requeues_without_counting_a_retry():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1, max_retries=0), row(2)])
    st.handle(exited(2, node="n2"))  # n2 is free
    out = st.handle(S.NodeSchedulingSet(2.1, "p", "n1", enabled=False, running=S.REQUEUE))
    assert out == [S.KillRun("p", "n1", RunId(1), "requeue"),
                   node_rec(state=NodeState.RUNNING, scheduling="disabled")]
    out = st.handle(exited(1, code=None, signal=15, t=2.5, killed="requeue"))
    assert out == [
        S.FinishAttempt(1, "requeue", "n1", 2.0, 2.5, None, 15, FailureKind.KILLED, "requeue",
                        (), 0),
        S.MarkPreparing(1, "n2", f"{ROOT}/n2/jobs/j/t1", 2.5), run_of(1, node="n2", attempt=1),
        node_rec(state=NodeState.IDLE, scheduling="disabled"),
        node_rec("n2", state=NodeState.RUNNING)]


def test_disable_with_terminate_completes_its_tasks_as_killed():
    st = pool_up(rows=[row(1, max_retries=3)])
    out = st.handle(S.NodeSchedulingSet(1.5, "p", "n1", enabled=False, running=S.TERMINATE))
    assert only(out, S.KillRun) == [S.KillRun("p", "n1", RunId(1), "terminate")]
    out = st.handle(exited(1, code=None, signal=15, killed="terminate"))
    assert only(out, S.FinishAttempt) == [
        S.FinishAttempt(1, "failure", "n1", 1.5, 2.0, None, 15, FailureKind.KILLED, "terminate",
                        (), 0)]


def test_disable_requeues_a_task_queued_on_its_agent_that_has_not_started():
    st = pool_up(prefetch=4, rows=[row(1), row(2)])  # t2 queued behind t1 on the agent
    st.handle(S.RunStarted(1.1, "p", "n1", 1, RunId(1), 11))
    out = st.handle(S.NodeSchedulingSet(1.5, "p", "n1", enabled=False))
    assert only(out, S.KillRun) == [S.KillRun("p", "n1", RunId(2), "requeue")]
    out = st.handle(exited(2, code=None, t=1.6, killed="requeue"))
    assert only(out, S.FinishAttempt)[0].outcome == "requeue"
    assert 2 in st.rows and only(out, S.RunTask) == []


def test_disabled_is_kept_when_the_pool_is_added_again_and_unknown_nodes_are_refused():
    st = S.CoordinatorState(TM)
    out = st.handle(S.PoolAdded(0.0, S.PoolInfo("p", 1),
                                (S.NodeInfo("n1", "h1", 1, disabled=True),)))
    assert out[-1] == node_rec(state=NodeState.STARTING, hello=False, scheduling="disabled")
    out = st.handle(S.NodeSchedulingSet(0.1, "p", "n9", enabled=True, reply=3))
    assert out == [S.Reply(3, "node 'n9' is not in pool 'p'")]


def test_a_leaving_node_requeues_its_task_then_stops_and_is_dropped():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2), row(3)])
    out = st.handle(S.NodeLeaving(1.5, "p", "n1", running=S.REQUEUE, reply=2))
    assert out == [S.KillRun("p", "n1", RunId(1), "requeue"), S.Reply(2),
                   node_rec(state=NodeState.LEAVING,
                            reason="leaving the pool once its tasks are requeued")]
    out = st.handle(exited(1, code=None, signal=15, t=2.5, killed="requeue"))
    assert out == [
        S.StopAgent("p", "n1", 1), S.DropNode("p", "n1"),
        S.FinishAttempt(1, "requeue", "n1", 2.0, 2.5, None, 15, FailureKind.KILLED, "requeue",
                        (), 0)]
    assert st.node("p", "n1") is None
    out = st.handle(exited(2, node="n2", t=3.0))  # t1 and t3 run on n2 now
    assert only(out, S.RunTask) == [run_of(1, node="n2", attempt=1)]


def test_an_idle_node_leaves_at_once():
    st = pool_up((("n1", 1), ("n2", 1)))
    assert st.handle(S.NodeLeaving(1.5, "p", "n2")) == [S.StopAgent("p", "n2", 1),
                                                      S.DropNode("p", "n2")]
    assert st.handle(S.NodeLeaving(1.6, "p", "n2", reply=1)) == [
        S.Reply(1, "node 'n2' is not in pool 'p'")]


def test_a_leaving_node_that_is_lost_goes_once_fenced():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1)])
    st.handle(S.NodeLeaving(1.5, "p", "n1", running=S.TASK_COMPLETION))
    out = st.handle(S.AgentClosed(2.0, "p", "n1", 1))
    assert only(out, S.FinishAttempt, S.DropNode) == []
    out = st.handle(S.NodeFenced(2.1, "p", "n1", 1, sure=True))
    assert [type(i) for i in without(out, S.Log)] == [
        S.StopAgent, S.DropNode, S.FinishAttempt, S.MarkPreparing, S.RunTask, S.PersistNode]
    assert only(out, S.FinishAttempt)[0].outcome == "requeue"
    assert only(out, S.RunTask) == [run_of(1, node="n2", attempt=1)]


def test_resize_grows_with_the_providers_next_nodes_and_shrinks_idle_nodes_first():
    st = pool_up((("n1", 1), ("n2", 1), ("n3", 1)), rows=[row(1)])  # t1 on n1
    nodes = tuple(S.NodeInfo(f"n{i}", f"h-n{i}", 1) for i in range(1, 6))
    out = st.handle(S.PoolResized(1.5, "p", 5, nodes, reply=7))
    assert out == [S.StartAgent("p", "n4", 1), S.StartAgent("p", "n5", 1), S.Reply(7),
                   node_rec("n4", NodeState.STARTING, hello=False),
                   node_rec("n5", NodeState.STARTING, hello=False)]
    # to 1: the idle ones go first (the newest first), the busy n1 stays
    out = st.handle(S.PoolResized(1.6, "p", 1, nodes))
    assert without(out, S.Reply) == [
        x for n in ("n5", "n4", "n3", "n2")  # (requeue: their task directories go too)
        for x in (S.StopAgent("p", n, 1), S.DropNode("p", n), S.RemoveNodeData("p", n))]
    assert list(st.pools["p"].nodes) == ["n1"]


def test_a_shrink_with_retaineddata_keeps_task_directories_and_spares_a_wide_tasks_nodes():
    st = pool_up((("n1", 1), ("n2", 1), ("n3", 1)))
    st.pools["p"].nodes["n3"].held = 1  # (as if a multi-instance task held it)
    st.pools["p"].nodes["n3"].runs[RunId(9)] = 1
    st.pools["p"].nodes["n2"].runs[RunId(8)] = 1
    out = st.handle(S.PoolResized(1.5, "p", 1, running=S.RETAINED_DATA))
    # n1 (idle) goes at once, then n2 (busy, not held); n3's wide task is never cut
    assert only(out, S.RemoveNodeData, S.KillRun) == []
    assert only(out, S.DropNode) == [S.DropNode("p", "n1")]
    assert st.pools["p"].nodes["n2"].leaving and not st.pools["p"].nodes["n3"].leaving


def test_a_node_still_leaving_when_the_pool_grows_again_comes_back_once_gone():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2)])  # t2 on n2
    nodes = (S.NodeInfo("n1", "h-n1", 1), S.NodeInfo("n2", "h-n2", 1))
    st.handle(S.PoolResized(1.5, "p", 1, nodes, keep=("n1",), running=S.TASK_COMPLETION))
    assert st.pools["p"].nodes["n2"].leaving
    out = st.handle(S.PoolResized(1.6, "p", 2, nodes, keep=("n1", "n2")))
    assert only(out, S.StartAgent) == []  # n2 is still there, leaving
    out = st.handle(exited(2, node="n2", code=0))
    # gone, and back at once with the next generation; its directories stay (it is back)
    assert only(out, S.StopAgent, S.DropNode, S.StartAgent, S.RemoveNodeData) == [
        S.StopAgent("p", "n2", 1), S.DropNode("p", "n2"), S.StartAgent("p", "n2", 2)]
    assert not st.pools["p"].nodes["n2"].leaving
    # what the old agent (generation 1) still says is not the new one's
    assert st.handle(S.AgentClosed(2.5, "p", "n2", 1)) == []


def test_a_shrink_of_a_provider_that_names_its_nodes_drains_the_others():
    st = pool_up((("n1", 1), ("n2", 1), ("n3", 1)))
    out = st.handle(S.PoolResized(1.5, "p", 1, keep=("n3",), running=S.TASK_COMPLETION))
    assert only(out, S.DropNode) == [S.DropNode("p", "n2"), S.DropNode("p", "n1")]
    assert list(st.pools["p"].nodes) == ["n3"]


def test_shrinking_below_the_busy_nodes_requeues_their_work():
    st = pool_up((("n1", 1), ("n2", 1)), rows=[row(1), row(2)])
    out = st.handle(S.PoolResized(1.5, "p", 1))
    assert only(out, S.KillRun) == [S.KillRun("p", "n2", RunId(2), "requeue")]
    out = st.handle(exited(2, node="n2", code=None, signal=15, killed="requeue"))
    assert [type(i) for i in out] == [S.StopAgent, S.DropNode, S.RemoveNodeData,
                                      S.FinishAttempt]
    assert 2 in st.rows  # waits for n1


# ---- job terminate, reactivate ----------------------------------------------------

def test_terminate_job_completes_what_waits_in_the_store_and_kills_what_runs():
    st = pool_up(rows=[row(1, max_retries=2), row(2), row(3)])
    st.handle(S.JobsKnown(0.0, (S.JobInfo("j", "p"),)))
    out = st.handle(S.JobTerminateAsked(1.5, "j", reply=9))
    assert out == [S.TerminateJobTasks("j", 1.5), S.Reply(9),
                   S.KillRun("p", "n1", RunId(1), "terminate")]
    assert st.rows == {} and len(st.pools["p"].queue) == 0
    out = st.handle(exited(1, code=None, signal=15, killed="terminate"))
    assert out == [
        S.FinishAttempt(1, "failure", "n1", 1.5, 2.0, None, 15, FailureKind.KILLED, "terminate",
                        (), 0),
        S.JobDrained("j"), S.CompleteJobIfDone("j"), node_rec()]


def test_terminate_job_with_nothing_running_completes_it_at_once():
    st = pool_up(hello=False, rows=[row(1), row(2)])
    assert st.handle(S.JobTerminateAsked(1.5, "j")) == [
        S.TerminateJobTasks("j", 1.5), S.JobDrained("j"), S.CompleteJobIfDone("j")]


def test_a_reactivated_task_runs_again_with_its_retries_from_zero():
    st = pool_up(rows=[row(1, max_retries=1)])
    st.handle(exited(1, code=3))
    st.handle(exited(1, code=3, t=3.0))  # failed for good, after attempts 0 and 1
    again = row(1, max_retries=1, retry_count=1, attempt=2)
    out = st.handle(S.ReactivateAsked(4.0, again, reply=2))
    assert out == [S.ReactivateTask(1, "j", 4.0), S.Reply(2),
                   S.MarkPreparing(1, "n1", f"{ROOT}/n1/jobs/j/t1", 4.0), run_of(1, attempt=2),
                   node_rec(state=NodeState.RUNNING)]
    assert st.open["j"] == 1
    out = st.handle(exited(1, code=3, t=5.0))  # its retries count from 0 again
    assert only(out, S.FinishAttempt)[0].outcome == "retry"


def test_reactivate_of_a_task_the_state_holds_is_refused():
    st = pool_up(rows=[row(1)])
    out = st.handle(S.ReactivateAsked(1.5, row(1), reply=3))
    assert out == [S.Reply(3, "task j/t1 is not completed; only a failed completed task can "
                              "be reactivated")]


def test_a_terminated_job_reopened_by_a_reactivated_task_is_not_completed_again_by_it():
    st = pool_up(hello=False, rows=[row(1)])
    st.handle(S.JobTerminateAsked(1.5, "j"))
    st.handle(S.AgentUp(1.6, "p", "n1", 1))
    st.handle(S.AgentHello(1.7, "p", "n1", 1, f"{ROOT}/n1", 2))
    out = st.handle(S.ReactivateAsked(2.0, row(1)))
    assert only(out, S.RunTask) == [run_of(1)]
    out = st.handle(exited(1, t=3.0))
    assert only(out, S.JobDrained, S.CompleteJobIfDone) == [S.JobDrained("j")]


# ---- multi-instance tasks on a node that is disabled ------------------------------

def test_disable_with_requeue_ends_a_multi_instance_attempt_and_requeues_it():
    st = mi_pool(max_retries=0)
    c0, c1 = (RunId(1, RunKind.COORDINATION, i) for i in (0, 1))
    out = st.handle(S.NodeSchedulingSet(1.5, "p", "n2", enabled=False, running=S.REQUEUE))
    assert only(out, S.KillRun) == [S.KillRun("p", "n1", c0, "requeue"),
                                    S.KillRun("p", "n2", c1, "requeue")]
    st.handle(exited(1, run=c1, node="n2", code=None, signal=15, killed="requeue"))
    out = st.handle(exited(1, run=c0, code=None, signal=15, killed="instance_failed"))
    fa = only(out, S.FinishAttempt)[0]
    assert (fa.outcome, fa.failure_kind, fa.failure_detail, fa.retry_count) == (
        "requeue", FailureKind.KILLED, "requeue", 0)
    # placed again at once, without n2
    assert {r.node_id for r in only(out, S.RunTask)} == {"n1", "n3"}
