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


def test_waiting_transaction_keeps_the_lock_wait_short_only_for_itself(tmp_path):
    """A transaction with while_waiting waits in slices (calling it between them) while
    another connection holds the write lock; a plain one afterwards waits the full
    BUSY_TIMEOUT_S again."""
    import sqlite3
    import threading
    import time

    from hpcbatch.store import BUSY_TIMEOUT_S

    st = _fresh(tmp_path / "s.db")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.4, lambda: other.execute("COMMIT")).start()
    calls = []
    t0 = time.monotonic()
    with st.transaction(while_waiting=lambda: calls.append(time.monotonic()),
                        wait_slice_s=0.05):
        st.write_turn(preparing=[(1, "n1", "/r/1", 1.0)])
    assert time.monotonic() - t0 >= 0.3 and len(calls) >= 3
    busy = lambda: st.db.execute("PRAGMA busy_timeout").fetchone()  # noqa: E731
    assert list(busy().values()) == [50]
    with st.transaction():
        st.write_turn(preparing=[(2, "n1", "/r/2", 1.0)])
    assert list(busy().values()) == [int(BUSY_TIMEOUT_S * 1000)]
    assert st.task_counts("j")["preparing"] == 2
    other.close()
    st.close()
