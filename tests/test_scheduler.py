"""The scheduler is pure: feed it tasks and free slots, compare the exact assignments."""

import time

import pytest

from hpcbatch.models import TaskResult
from hpcbatch.scheduler import (
    Allocation,
    Assignment,
    Exit,
    NodeSlots,
    Placer,
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


# ---- the incremental Placer ---------------------------------------------------------

def placer(*free, total=4, policy="pack"):
    p = Placer(policy)
    for i, f in enumerate(free):
        p.set_node(f"n{i}", total, total - f)
    return p


def test_placer_takes_a_slot_once_set_node_says_it_freed():
    p = placer(0, 0)
    assert not p.has_capacity and p.place(Runnable.of(1)) is None
    p.set_node("n1", 4, 3)
    assert p.capacity == 1
    assert p.place(Runnable.of(1)) == Assignment(1, "n1", 1)
    assert p.node("n1") == NodeSlots("n1", 4, 4) and not p.has_capacity
    p.set_node("n0", 4, 2)
    p.release("n1", 1)
    assert p.capacity == 3
    assert [p.place(Runnable.of(s)) for s in (2, 3)] == [Assignment(2, "n1", 1),
                                                         Assignment(3, "n0", 1)]


def test_placer_capacity_counts_queue_slots_and_is_a_running_total():
    p = Placer()
    p.set_node("a", 2, 0, queue_slots=2)
    p.set_node("b", 2, 3, queue_slots=0)  # over-full: counts as 0, not -1
    assert p.capacity == 4 and len(p) == 2 and "a" in p and "c" not in p
    got = [p.place(Runnable.of(s)) for s in range(5)]
    assert got == [Assignment(0, "a", 1), Assignment(1, "a", 1), Assignment(2, "a", 1),
                   Assignment(3, "a", 1), None]
    p.remove_node("a")
    p.remove_node("a")  # a no-op the second time
    assert p.capacity == 0 and len(p) == 1 and "a" not in p


def test_placer_ties_follow_the_order_nodes_were_first_added():
    for policy in ("pack", "spread"):
        p = Placer(policy)
        for nid in ("z", "y", "x"):
            p.set_node(nid, 4, 2)
        p.set_node("z", 4, 2)  # an update keeps z first
        assert p.place(Runnable.of(1)).node_id == "z"
        p.set_node("z", 4, 2)
        p.remove_node("y")
        p.set_node("y", 4, 2)  # back again, in its old place: before x
        p.set_node("z", 4, 3 if policy == "spread" else 1)
        assert p.place(Runnable.of(2)).node_id == "y", policy


def test_placer_pack_and_spread_choose_busiest_and_emptiest():
    assert placer(3, 1, 2).place(Runnable.of(1)) == Assignment(1, "n1", 1)
    assert placer(3, 1, 3, policy="spread").place(Runnable.of(1)) == Assignment(1, "n0", 1)
    # pack: the busiest node that still fits the task, not the busiest one
    assert placer(3, 1, 2).place(Runnable.of(1, required_slots=2)) == Assignment(1, "n2", 2)


def test_placer_real_free_slots_before_queue_slots():
    p = Placer("spread")
    p.set_node("q", 1, 1, queue_slots=8)  # full, but a long queue
    p.set_node("r", 4, 3)
    assert p.place(Runnable.of(1)) == Assignment(1, "r", 1)
    assert p.place(Runnable.of(2)) == Assignment(2, "q", 1)


def test_unknown_policy_and_bad_counts_are_refused():
    with pytest.raises(ValueError, match="'fifo' is unknown; use one of pack, spread"):
        Placer("fifo")
    with pytest.raises(ValueError, match="node n0: .*used_slots=-1"):
        Placer().set_node("n0", 4, -1)
    with pytest.raises(KeyError, match="'n9' is not in"):
        placer(1).release("n9", 1)
    with pytest.raises(ValueError, match="release of 2 slots but only 0"):
        placer(4).release("n0", 2)
    with pytest.raises(TypeError, match="the policy is the Placer's"):
        schedule_from_queue(RunQueue(), placer(1), "pack")


def test_a_reservation_lasts_one_round():
    p = placer(3, 2, 4)
    assert p.place(wide(1, 2)) is None  # only n2 is whole: n2 and n0 are held
    assert p.reserved == ("n0", "n2") and p.reservation == 1
    assert p.capacity == 2  # only n1's
    assert p.place(Runnable.of(2, required_slots=3)) is None
    assert p.place(wide(3, 2, per=1)) is None  # n1 alone is free: one reservation a round
    assert p.reserved == ("n0", "n2")
    p.begin_round()
    assert p.reserved == () and p.reservation is None and p.capacity == 9
    assert p.place(Runnable.of(2, required_slots=3)) == Assignment(2, "n0", 3)


def test_rounds_from_a_queue_reserve_again_until_the_wide_task_starts():
    p = placer(3, 4, 4, 2)
    q = RunQueue([wide(1, 3, priority=1)] + [Runnable.of(s) for s in range(2, 6)])
    # two nodes idle of three needed: the three least used are held, n3 backfills
    assert schedule_from_queue(q, p) == [Assignment(2, "n3", 1), Assignment(3, "n3", 1)]
    assert p.reserved == ("n0", "n1", "n2") and q.peek().seq == 1
    assert schedule_from_queue(q, p) == [] and p.reserved == ("n0", "n1", "n2")
    p.set_node("n0", 4, 0)  # n0's task ended
    assert schedule_from_queue(q, p) == [Allocation(1, ("n0", "n1", "n2"), 0)]
    assert p.node("n0") == NodeSlots("n0", 4, 4, 0) and p.reserved == ()
    p.release("n3", 2)
    assert schedule_from_queue(q, p) == [Assignment(4, "n3", 1), Assignment(5, "n3", 1)]
    assert len(q) == 0


def test_an_allocation_drops_its_nodes_queue_slots_until_set_node():
    p = Placer()
    p.set_node("a", 2, 0, queue_slots=4)
    p.set_node("b", 2, 0, queue_slots=4)
    assert p.place(wide(1, 1)) == Allocation(1, ("a",), 0)
    assert p.node("a") == NodeSlots("a", 2, 2, 0)
    assert [p.place(Runnable.of(s)).node_id for s in range(2, 8)] == ["b"] * 6
    p.set_node("a", 2, 2, queue_slots=4)  # the coordinator's say, as the allocation holds
    assert p.place(Runnable.of(8)).node_id == "a"


def test_lookahead_bounds_the_tasks_set_aside():
    def queue():
        return RunQueue([Runnable.of(s, required_slots=3) for s in range(3)] + [Runnable.of(9)])
    q = queue()
    assert schedule_from_queue(q, placer(2), lookahead=3) == []
    assert len(q) == 4 and q.peek().seq == 0
    q = queue()
    assert schedule_from_queue(q, placer(2), lookahead=4) == [Assignment(9, "n0", 1)]
    assert [t.seq for t in q.take(10)] == [0, 1, 2]


def test_budget_bounds_the_placements_of_a_round():
    q = RunQueue([Runnable.of(s) for s in range(10)])
    p = placer(4, 4)
    assert schedule_from_queue(q, p, budget=3) == [Assignment(s, "n0", 1) for s in range(3)]
    assert q.peek() == Runnable.of(3) and len(q) == 7
    assert [a.seq for a in schedule_from_queue(q, p, budget=100)] == [3, 4, 5, 6, 7]  # full
    p.release("n1", 2)
    assert schedule_from_queue(q, p, budget=0) == [] and len(q) == 2


def big_pool(n):
    """n nodes, mixed sizes and loads; (total, used) per node in order."""
    spec = [(16 if i % 5 == 0 else 32, (i * 7) % 33 if i % 11 else 0) for i in range(n)]
    spec = [(t, min(u, t)) for t, u in spec]
    return spec


def test_wide_allocation_at_5000_nodes_gets_the_right_nodes():
    spec = big_pool(5000)
    for policy in ("pack", "spread"):
        sign = 1 if policy == "pack" else -1
        for per in (0, 8, 20):
            p = Placer(policy)
            for i, (t, u) in enumerate(spec):
                p.set_node(f"n{i}", t, u)
            got = p.place(wide(1, 4, per=per))
            fits = [(sign * (t - u), i) for i, (t, u) in enumerate(spec)
                    if (t - u >= per if per else u == 0)]
            want = sorted(i for _, i in sorted(fits)[:4])
            assert got == Allocation(1, tuple(f"n{i}" for i in want), per), (policy, per)
            for i in want:
                t, u = spec[i]
                assert p.node(f"n{i}") == NodeSlots(f"n{i}", t, u + (per or t))


def test_wide_reservation_at_5000_nodes_holds_the_nodes_closest_to_free():
    spec = [(t, max(u, 1)) for t, u in big_pool(5000)]  # no node idle
    p = Placer("pack")
    for i, (t, u) in enumerate(spec):
        p.set_node(f"n{i}", t, u)
    assert p.place(wide(1, 4)) is None
    held = sorted(sorted((u, i) for i, (t, u) in enumerate(spec))[:4], key=lambda x: x[1])
    assert p.reserved == tuple(f"n{i}" for _, i in held)
    # with slots per instance: the most real free slots among nodes big enough
    p.begin_round()
    for i, (t, u) in enumerate(spec):
        p.set_node(f"n{i}", t, t if t == 32 else u)  # every 32-slot node full
    assert p.place(wide(2, 4, per=20)) is None
    held = [i for i, (t, _) in enumerate(spec) if t >= 20][:4]  # all 0 free: by order
    assert p.reserved == tuple(f"n{i}" for i in held)
    # the narrow task goes to the busiest unreserved node that fits
    nid = p.place(Runnable.of(3)).node_id
    free = [(t - u, i) for i, (t, u) in enumerate(spec) if t != 32 and t - u >= 1]
    assert nid == f"n{min(free)[1]}"


def test_run_queue_discard_contains_and_peek():
    q = RunQueue([Runnable.of(s) for s in range(5)])
    assert 3 in q and len(q) == 5
    q.discard(3)
    q.discard({0, 42})  # unknown seqs are ignored
    assert 3 not in q and 0 not in q and len(q) == 3 and q.peek() == Runnable.of(1)
    q.push(Runnable.of(0, priority=-1))  # back, behind the others
    q.push(Runnable.of(4, priority=1))  # a queued seq pushed again replaces it
    assert len(q) == 4
    assert [t.seq for t in q.take(10)] == [4, 1, 2, 0]
    assert q.peek() is None and len(q) == 0
    with pytest.raises(IndexError):
        q.pop()


def test_run_queue_discard_of_one_task_does_not_rebuild_the_heap():
    q = RunQueue([Runnable.of(s) for s in range(200_000)])
    t0 = time.process_time()
    for s in range(0, 200_000, 200):
        q.discard(s)
        assert s not in q
    # a rebuild per discard (the old way) took about 10 s here
    assert time.process_time() - t0 < 0.5
    assert len(q) == 199_000 and q.peek() == Runnable.of(1)
    assert [t.seq for t in q.take(3)] == [1, 2, 3]


@pytest.mark.parametrize("seed", range(40))
def test_a_round_places_as_one_task_at_a_time_would(seed):
    """A pack round books a run of same-size tasks on one node at once; what it decides
    is exactly what placing them one at a time decides (sizes mixed, nodes partly busy,
    prefetch queues, a budget that cuts a run short)."""
    import random
    rng = random.Random(seed)
    specs = [(f"n{i}", rng.randint(1, 12), rng.randint(0, 4)) for i in range(rng.randint(1, 9))]
    used = {nid: rng.randint(0, total) for nid, total, _ in specs}
    tasks = [Runnable(-rng.choice((0, 0, 1)), s, rng.choice((1, 1, 1, 2, 3)))
             for s in range(rng.randint(1, 120))]
    budget = rng.choice((None, None, 7, 23))

    def placer():
        p = Placer("pack")
        for nid, total, queue in specs:
            p.set_node(nid, total, used[nid], queue)
        return p
    got = schedule_from_queue(RunQueue(tasks), placer(), budget=budget)
    one, q, want = placer(), RunQueue(tasks), []
    while budget is None or len(want) < budget:
        step = schedule_from_queue(q, one, budget=1)
        if not step:
            break
        want += step
    assert got == want
