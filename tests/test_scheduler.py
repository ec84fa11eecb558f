"""The scheduler is pure: feed it tasks and free slots, compare the exact assignments."""

from hpcbatch.models import TaskResult
from hpcbatch.scheduler import (
    Allocation,
    Assignment,
    Exit,
    NodeSlots,
    Runnable,
    RunQueue,
    decide_exit,
    schedule,
    schedule_from_queue,
)


def nodes(*free, total=4):
    return [NodeSlots(f"n{i}", total, used_slots=total - f) for i, f in enumerate(free)]


def test_pack_fills_the_busiest_node_that_fits():
    tasks = [Runnable.of(seq=i) for i in range(3)]
    got = schedule(tasks, nodes(4, 2, 3), "pack")
    assert got == [Assignment(0, "n1", 1), Assignment(1, "n1", 1), Assignment(2, "n2", 1)]


def test_spread_takes_the_emptiest_node():
    tasks = [Runnable.of(seq=i) for i in range(3)]
    got = schedule(tasks, nodes(4, 2, 3), "spread")
    assert got == [Assignment(0, "n0", 1), Assignment(1, "n0", 1), Assignment(2, "n2", 1)]


def test_ties_go_to_the_first_listed_node():
    got = schedule([Runnable.of(seq=1)], nodes(2, 2), "pack")
    assert got == [Assignment(1, "n0", 1)]


def test_job_priority_then_submission_order():
    tasks = [Runnable.of(seq=1, priority=0), Runnable.of(seq=2, priority=10),
             Runnable.of(seq=3, priority=10), Runnable.of(seq=0, priority=-5)]
    got = schedule(tasks, nodes(2), "pack")
    assert [a.seq for a in got] == [2, 3]


def test_required_slots_and_backfill_of_smaller_tasks():
    tasks = [Runnable.of(seq=1, required_slots=3), Runnable.of(seq=2, required_slots=2),
             Runnable.of(seq=3, required_slots=1)]
    # node has 2 free: the 3-slot task does not fit, the 2-slot one does, nothing left for 3
    assert schedule(tasks, nodes(2), "pack") == [Assignment(2, "n0", 2)]
    # two nodes with 2 and 3 free: the 3-slot task takes n1, 2-slot n0
    assert schedule(tasks, nodes(2, 3), "pack") == [Assignment(1, "n1", 3),
                                                    Assignment(2, "n0", 2)]


def test_no_nodes_or_no_slots_assigns_nothing():
    assert schedule([Runnable.of(seq=1)], [], "pack") == []
    assert schedule([Runnable.of(seq=1)], nodes(0, 0), "spread") == []


def test_run_queue_keeps_unassigned_tasks_in_order():
    q = RunQueue()
    q.extend([Runnable.of(seq=i, required_slots=2 if i == 0 else 1) for i in range(5)])
    got = schedule_from_queue(q, nodes(1), "pack")
    assert got == [Assignment(1, "n0", 1)]
    assert [t.seq for t in q.take(10)] == [0, 2, 3, 4]


def test_run_queue_discard():
    q = RunQueue()
    q.extend([Runnable.of(seq=i) for i in range(4)])
    q.discard({1, 2})
    assert [t.seq for t in q.take(10)] == [0, 3]


def test_exit_code_zero_succeeds():
    out = decide_exit(Exit(exit_code=0), retry_count=0, max_task_retry_count=3)
    assert (out.retry, out.result, out.failure) == (False, TaskResult.SUCCESS, None)


def test_failures_retry_until_the_limit():
    ex = Exit(exit_code=1)
    assert decide_exit(ex, 0, 2).retry
    assert decide_exit(ex, 1, 2).retry
    final = decide_exit(ex, 2, 2)
    assert (final.retry, final.result, final.failure) == (False, TaskResult.FAILURE, "exit_code")


def test_unlimited_retries_and_no_retries():
    assert decide_exit(Exit(exit_code=1), 1000, -1).retry
    assert not decide_exit(Exit(exit_code=1), 0, 0).retry


def test_failure_categories():
    assert decide_exit(Exit(None, signal=9, timed_out=True), 0, 0).failure == "timeout"
    assert decide_exit(Exit(None, signal=11), 0, 0).failure == "signal"
    assert decide_exit(Exit(None, start_failed="ENOENT"), 0, 0).failure == "start_failed"
    assert decide_exit(Exit(None, node_lost=True), 0, 0).failure == "node_lost"


def wide(seq, instances, per=0, priority=0):
    return Runnable.of(seq, priority, instances=instances, slots_per_instance=per)


def test_multi_instance_gets_all_its_nodes_at_once():
    got = schedule([wide(1, 3)], nodes(4, 4, 4, 4), "pack")
    assert got == [Allocation(1, ("n0", "n1", "n2"), 0)]


def test_multi_instance_whole_node_needs_idle_nodes():
    # n0 has a task running: only n1 and n2 are whole; 3 instances cannot start
    assert schedule([wide(1, 3)], nodes(3, 4, 4), "pack") == []


def test_a_waiting_wide_task_reserves_nodes_against_narrow_ones():
    # n0 and n1 busy with one task each, n2 idle: the wide task reserves all three,
    # so the narrow tasks behind it do not start anywhere
    tasks = [wide(1, 3), Runnable.of(2), Runnable.of(3)]
    assert schedule(tasks, nodes(3, 3, 4), "pack") == []
    # with a fourth node: the reservation takes the three closest to free (n2, n3 idle,
    # then n0), and narrow tasks backfill only on n1
    got = schedule(tasks, nodes(3, 2, 4, 4), "pack")
    assert got == [Assignment(2, "n1", 1), Assignment(3, "n1", 1)]


def test_higher_priority_narrow_tasks_go_before_a_wide_one():
    tasks = [wide(1, 2), Runnable.of(2, priority=5)]
    got = schedule(tasks, nodes(4, 4), "pack")
    assert got == [Assignment(2, "n0", 1)]  # n0 no longer whole, so the wide one waits


def test_slots_per_instance_shares_nodes():
    got = schedule([wide(1, 2, per=2), Runnable.of(2, required_slots=2)], nodes(2, 4, 2), "pack")
    assert got == [Allocation(1, ("n0", "n2"), 2), Assignment(2, "n1", 2)]


def test_prefetch_slots_take_narrow_tasks_but_not_allocations():
    n = [NodeSlots("n0", 2, used_slots=2, queue_slots=2)]
    assert schedule([Runnable.of(1), Runnable.of(2), Runnable.of(3)], n, "pack") == [
        Assignment(1, "n0", 1), Assignment(2, "n0", 1)]
    assert schedule([wide(4, 1, per=1)], n, "pack") == []


def test_queue_keeps_a_reserved_wide_task_first():
    q = RunQueue()
    q.extend([wide(1, 2)] + [Runnable.of(i) for i in range(2, 10)])
    first = schedule_from_queue(q, nodes(3, 4), "pack")
    assert first == []  # both nodes reserved: n0 is draining, n1 idle
    assert q.take(1)[0].seq == 1


def test_prefetch_never_queues_behind_a_busy_node_while_another_is_idle():
    n = [NodeSlots("n0", 1, queue_slots=1), NodeSlots("n1", 1, queue_slots=1)]
    got = schedule([Runnable.of(i) for i in range(4)], n, "pack")
    assert got == [Assignment(0, "n0", 1), Assignment(1, "n1", 1), Assignment(2, "n0", 1),
                   Assignment(3, "n1", 1)]


def test_an_allocated_node_takes_no_queued_work_in_the_same_round():
    n = [NodeSlots("n0", 1, queue_slots=1), NodeSlots("n1", 1, queue_slots=1)]
    got = schedule([wide(1, 2), Runnable.of(2)], n, "pack")
    assert got == [Allocation(1, ("n0", "n1"), 0)]
