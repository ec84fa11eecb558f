"""Store.write_turn (the coordinator's one write per turn) leaves the rows, the attempts
and the kept counts exactly as mark_running, finish_attempts and mark_preparing called
one after the other do."""

import random

from hpcbatch.models import JobSpec, PoolSpec, TaskSpec
from hpcbatch.store import Store


def _fresh(path):
    st = Store(path)
    st.create_pool(PoolSpec(id="p"))
    st.create_job(JobSpec(id="j", pool_id="p", max_task_retry_count=3))
    st.add_tasks("j", [TaskSpec(id=f"t{i}", command_line="true") for i in range(60)])
    return st


def _end(seq, outcome, retries, started):
    return dict(seq=seq, outcome=outcome, node_id="n1", started_at=started, ended_at=5.0,
                exit_code=0 if outcome == "success" else 1, signal=None,
                failure_kind=None if outcome == "success" else "exit_code",
                failure_detail=None, usage={"cpu": 1}, retry_count=retries)


def _turns(seed):
    """Turns of (running, finished, preparing) over 60 tasks, as the coordinator makes
    them: a task placed, then started and ended (in one turn or two), retried, requeued."""
    rng = random.Random(seed)
    state = {s: ("active", 0) for s in range(1, 61)}
    turns = []
    for _ in range(40):
        running, finished, preparing = [], [], []
        for seq, (st, retries) in list(state.items()):
            r = rng.random()
            if st == "preparing" and r < 0.4:
                running.append((seq, 2.0))
                st = "running"
                if rng.random() < 0.5:  # ended in the same turn
                    r = 0.0
                else:
                    state[seq] = (st, retries)
                    continue
            if st in ("preparing", "running") and r < 0.3:
                outcome = rng.choice(["success", "failure", "retry", "requeue"])
                started = None if st == "preparing" else rng.choice([2.0, 2.5, None])
                n = retries + 1 if outcome == "retry" else retries
                finished.append(_end(seq, outcome, n, started))
                st = "completed" if outcome in ("success", "failure") else "active"
                retries = n
            if st == "active" and rng.random() < 0.5:
                preparing.append((seq, "n1", f"/r/{seq}", 1.0))
                st = "preparing"
            state[seq] = (st, retries)
        turns.append((running, finished, preparing))
    return turns


def test_write_turn_is_the_three_writes(tmp_path):
    for seed in range(3):
        a = _fresh(tmp_path / f"a{seed}.db")
        b = _fresh(tmp_path / f"b{seed}.db")
        for running, finished, preparing in _turns(seed):
            with a.transaction():
                a.write_turn(running, finished, preparing)
            with b.transaction():
                if running:
                    b.mark_running(running)
                if finished:
                    b.finish_attempts(finished)
                if preparing:
                    b.mark_preparing(preparing)
            assert a.task_counts("j") == b.task_counts("j")
        ta, tb = a.dump_tables(["tasks", "task_attempts", "job_counts"]), \
            b.dump_tables(["tasks", "task_attempts", "job_counts"])
        assert ta == tb
        assert a.count_problems() == [] and b.count_problems() == []
        assert any(r["outcome"] == "requeue" for r in ta["task_attempts"])
        a.close()
        b.close()


def test_write_turn_nothing(tmp_path):
    st = _fresh(tmp_path / "s.db")
    before = st.change_counter()
    st.write_turn()
    assert st.change_counter() == before
    st.close()
