"""The pure state's job preparation and release tasks: events in, instructions out."""

from __future__ import annotations

from test_state import ROOT, TM, exited, only, row, run_of

from hpcbatch import env as E
from hpcbatch import state as S
from hpcbatch.models import FailureKind, NodeState, RunId, RunKind
from hpcbatch.scheduler import Placer, Runnable, RunQueue, schedule_from_queue

PREP = RunId(1, RunKind.JOB_PREP)  # job j is the state's job number 1
RELEASE = RunId(1, RunKind.JOB_RELEASE)


def setup(nodes=("n1", "n2"), rows=(), *, slots=1, **job):
    """Pool p with these nodes up, job j (its JobInfo from ``job``) and its rows queued;
    returns (state, what the hellos gave)."""
    st = S.CoordinatorState(TM, prefetch=0)
    st.handle(S.Started(0.0, (("j", len(rows)),), max((r.seq for r in rows), default=0)))
    st.handle(S.JobsKnown(0.0, (S.JobInfo("j", "p", **job),)))
    st.handle(S.PoolAdded(0.0, S.PoolInfo("p", slots), tuple(
        S.NodeInfo(n, f"h-{n}", slots) for n in nodes)))
    st.handle(S.WindowLoaded(0.0, "p", tuple(rows), True))
    for n in nodes:
        st.handle(S.AgentUp(0.5, "p", n, 1))
    out = [i for n in nodes for i in st.handle(S.AgentHello(1.0, "p", n, 1, f"{ROOT}/{n}", 2))]
    return st, out


def prep_env(node, which="jobpreparation", attempt=0):
    tdir = f"{ROOT}/{node}/jobs/j/{which}"
    return tuple(sorted({
        E.POOL_ID: "p", E.NODE_ID: node, E.JOB_ID: "j", E.TASK_ID: which, E.TASK_DIR: tdir,
        E.TASK_WORKING_DIR: tdir, E.NODE_SHARED_DIR: f"{ROOT}/{node}/shared",
        E.TASK_ATTEMPT: str(attempt),
        E.JOB_PREP_DIR: f"{ROOT}/{node}/jobs/j/jobpreparation"}.items()))


def prep_run(node, attempt=0):
    return S.RunJobTask("p", node, "j", PREP, f"{ROOT}/{node}/jobs/j/jobpreparation",
                        prep_env(node, attempt=attempt))


def task_run(seq, node):
    run = run_of(seq, node)
    env = {**run.env, E.JOB_PREP_DIR: f"{ROOT}/{node}/jobs/j/jobpreparation"}
    return S.RunTask("p", node, seq, run.run, run.task_dir, env, 1)


def persisted(out):
    return [(p.node_id, p.kind, p.state, p.detail) for p in only(out, S.PersistJobTask)]


def test_the_preparation_task_runs_first_and_holds_the_jobs_tasks_on_its_node():
    st, out = setup(("n1",), [row(1), row(2)], slots=2, prep=True)
    # placed, but not sent: the preparation task runs first, once
    assert only(out, S.RunJobTask, S.RunTask) == [prep_run("n1")]
    assert persisted(out) == [("n1", "preparation", "running", None)]
    assert [m.seq for m in only(out, S.MarkPreparing)] == [1, 2]
    out = st.handle(exited(0, node="n1", run=PREP))
    assert only(out, S.RunTask) == [task_run(1, "n1"), task_run(2, "n1")]
    assert persisted(out) == [("n1", "preparation", "succeeded", None)]
    # a later task of the job on that node: no second preparation task
    out = st.handle(exited(1, t=3.0, node="n1"), S.WorkAdded(3.0, (row(3),)))
    assert only(out, S.RunJobTask) == [] and only(out, S.RunTask) == [task_run(3, "n1")]


def test_without_wait_for_success_the_tasks_start_with_it():
    st, out = setup(("n1",), [row(1)], prep=True, prep_wait=False)
    assert only(out, S.RunJobTask, S.RunTask) == [prep_run("n1"), task_run(1, "n1")]
    out = st.handle(exited(0, 1, node="n1", run=PREP))
    assert persisted(out) == [("n1", "preparation", "failed", "exited with 1")]
    assert only(out, S.FinishAttempt) == []  # recorded only: the task runs on


def test_a_failed_preparation_task_is_retried_then_the_node_skips_the_job():
    st, out = setup(("n1", "n2"), [row(1)], prep=True, prep_retries=1)
    assert only(out, S.RunJobTask) == [prep_run("n1")]
    out = st.handle(exited(0, 3, node="n1", run=PREP))
    assert only(out, S.RunJobTask) == [prep_run("n1", attempt=1)]  # its retry
    out = st.handle(exited(0, 3, t=3.0, node="n1", run=PREP))
    why = "job preparation task failed on node n1: exited with 3"
    assert persisted(out)[0] == ("n1", "preparation", "failed", "exited with 3")
    fin = only(out, S.FinishAttempt)
    assert [(f.seq, f.outcome, f.failure_kind, f.failure_detail) for f in fin] == \
        [(1, "requeue", FailureKind.START_FAILED, why)]
    # the task goes to the other node (never n1 again), which prepares first
    assert only(out, S.RunJobTask) == [prep_run("n2")]
    assert [(m.seq, m.node_id) for m in only(out, S.MarkPreparing)] == [(1, "n2")]
    out = st.handle(exited(0, t=4.0, node="n2", run=PREP))
    assert [r.node_id for r in only(out, S.RunTask)] == ["n2"]
    assert st.excluded == {"j": {"n1": "exited with 3"}}


def test_a_job_no_node_can_prepare_fails_its_tasks_saying_why():
    st, out = setup(("n1", "n2"), [row(1), row(2), row(3)], prep=True)
    st.handle(exited(0, 1, node="n1", run=PREP))
    out = st.handle(exited(0, 2, t=3.0, node="n2", run=PREP))
    done = only(out, S.CompleteUnstarted)
    assert sorted(c.seq for c in done) == [1, 2, 3]
    assert all(c.failure_kind is FailureKind.START_FAILED for c in done)
    assert done[0].failure_detail == ("the job preparation task failed on every node of pool "
                                      "p: n1: exited with 1; n2: exited with 2")
    assert S.JobDrained("j") in out and not st.rows and not st.attempts
    # a task added later fails the same way, never placed
    out = st.handle(S.WorkAdded(4.0, (row(4),)))
    assert [c.seq for c in only(out, S.CompleteUnstarted)] == [4]
    assert only(out, S.MarkPreparing) == []


def test_the_release_task_runs_on_each_node_that_ran_tasks_then_the_job_completes():
    st, out = setup(("n1", "n2", "n3"), [row(1), row(2)], release=True,
                    terminate_when_done=True)
    assert sorted(r.node_id for r in only(out, S.RunTask)) == ["n1", "n2"]
    st.handle(exited(1, node="n1"))
    out = st.handle(exited(2, t=3.0, node="n2"))
    rel = only(out, S.RunJobTask)
    assert [(r.node_id, r.run) for r in rel] == [("n1", RELEASE), ("n2", RELEASE)]
    assert dict(rel[0].env)[E.TASK_ID] == "jobrelease"
    assert S.JobDrained("j") in out and only(out, S.CompleteJobIfDone) == []
    out = st.handle(exited(0, t=4.0, node="n1", run=RELEASE))
    assert persisted(out) == [("n1", "release", "succeeded", None)]
    assert only(out, S.CompleteJobIfDone) == []
    out = st.handle(exited(0, 1, t=5.0, node="n2", run=RELEASE, timed_out=True))
    assert persisted(out) == [("n2", "release", "failed",
                               "timed out (its max_wall_clock_time_s)")]
    assert only(out, S.CompleteJobIfDone) == [S.CompleteJobIfDone("j")]


def test_terminate_kills_a_running_preparation_task_and_runs_the_release():
    st, out = setup(("n1",), [row(1)], prep=True, release=True)
    out = st.handle(S.JobTerminateAsked(2.0, "j", 7))
    # the held task never started: completed as terminated; the preparation task killed
    assert [f.seq for f in only(out, S.FinishAttempt)] == [1]
    assert S.KillRun("p", "n1", PREP, "terminate") in out
    assert [r.run for r in only(out, S.RunJobTask)] == [RELEASE]
    assert only(out, S.CompleteJobIfDone) == []
    out = st.handle(exited(0, t=3.0, node="n1", run=RELEASE))
    assert only(out, S.CompleteJobIfDone) == [S.CompleteJobIfDone("j")]


def test_a_node_lost_during_its_release_task_does_not_hold_the_job():
    st, out = setup(("n1", "n2"), [row(1), row(2)], release=True, terminate_when_done=True)
    st.handle(exited(1, node="n1"))
    out = st.handle(exited(2, t=3.0, node="n2"))
    assert len(only(out, S.RunJobTask)) == 2
    st.handle(exited(0, t=4.0, node="n1", run=RELEASE))
    out = st.handle(S.AgentClosed(5.0, "p", "n2", 1, "gone"))
    assert persisted(out)[0][:3] == ("n2", "release", "failed")
    assert only(out, S.CompleteJobIfDone) == [S.CompleteJobIfDone("j")]


def test_a_new_agent_on_the_node_runs_the_preparation_task_again():
    st, out = setup(("n1",), [row(1)], prep=True)
    st.handle(exited(0, node="n1", run=PREP))
    st.handle(exited(1, t=3.0, node="n1"))
    # the agent restarts (a reboot): the next task of the job prepares again
    st.handle(S.AgentClosed(4.0, "p", "n1", 1))
    st.handle(S.NodeFenced(4.1, "p", "n1", 1, True))
    st.handle(S.Tick(4.1 + TM.reconnect_max_s))
    st.handle(S.AgentUp(30.0, "p", "n1", 2))
    st.handle(S.AgentHello(30.0, "p", "n1", 2, f"{ROOT}/n1", 2))
    assert st.node("p", "n1").state is NodeState.IDLE
    out = st.handle(S.WorkAdded(31.0, (row(2),)))
    assert only(out, S.RunJobTask) == [prep_run("n1")]


def test_schedule_from_queue_leaves_out_a_tasks_excluded_nodes():
    placer = Placer("pack")
    for n in ("a", "b"):
        placer.set_node(n, 2, 0)
    q = RunQueue([Runnable.of(1), Runnable.of(2), Runnable.of(3)])
    out = schedule_from_queue(q, placer, excluded=lambda t: {"a"} if t.seq != 3 else None)
    assert [(d.seq, d.node_id) for d in out] == [(1, "b"), (2, "b"), (3, "a")]
    assert placer.node("a").used_slots == 1 and placer.node("b").used_slots == 2
