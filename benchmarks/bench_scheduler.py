"""Placement cost of the pure scheduler at scale, against the implementation it replaced.

1,000,000 runnable tasks queued for 1,000 nodes x 32 slots (queue_slots 0):
  (a) drain: 100,000 placements onto empty nodes (when all are full they are emptied
      again with set_node, as completions would, and that cost is counted);
  (b) steady: one slot frees (set_node), one round places one task, 100,000 times;
  (c) wide: 4-instance tasks onto 16,000 idle nodes until none fits, whole nodes and
      8 slots per instance;
  (d) a 4-instance task waits at the head of the queue at 16,000 busy nodes: each round
      reserves its nodes again and places one narrow task behind it.
CPU time (time.process_time) per placement, in microseconds. The baseline is the
scheduler before the Placer, loaded from git at run time (the parent of the commit that
added `class Placer`, or HEAD while that is uncommitted), run on the same queue with
fewer placements (it costs O(nodes) per placement, O(nodes^2) for wide ones).

    python benchmarks/bench_scheduler.py
    python benchmarks/bench_scheduler.py --tasks 200000 --drain 20000 --steady 20000
"""

from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, write_results  # noqa: E402

from hpcbatch.scheduler import Placer, Runnable, RunQueue, schedule_from_queue  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "bench_scheduler.json"
# issue 8's figures for the old scheduler, used when it cannot be loaded from git
ISSUE_US = {"drain": 128.0, "steady": 297.0, "wide_whole": 2.0e6, "wide_8": 2.0e6}


def load_baseline(ref: str | None) -> tuple[types.ModuleType | None, str]:
    """The pre-Placer scheduler module from git, or (None, why not)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True,
                              capture_output=True, text=True).stdout
    try:
        if ref is None:
            added = git("log", "-1", "--format=%H", "-S", "class Placer", "--",
                        "hpcbatch/scheduler.py").strip()
            ref = f"{added}^" if added else "HEAD"
        src = git("show", f"{ref}:hpcbatch/scheduler.py")
        if "class Placer" in src or "class _Round" not in src:
            return None, f"{ref}:hpcbatch/scheduler.py is not the old scheduler"
        mod = types.ModuleType("_hpcbatch_scheduler_baseline")
        sys.modules[mod.__name__] = mod  # dataclasses look their module up
        exec(compile(src, f"{ref}:hpcbatch/scheduler.py", "exec"), mod.__dict__)
        return mod, git("rev-parse", "--short", ref).strip()
    except (subprocess.CalledProcessError, OSError, SyntaxError, ImportError) as e:
        return None, f"could not load the old scheduler from git: {e}"


def cpu_us(fn: Callable[[], int]) -> tuple[float, int]:
    """(CPU microseconds per placement, placements) of fn, which returns its placements."""
    gc.collect()
    t0 = time.process_time()
    n = fn()
    return (time.process_time() - t0) * 1e6 / max(n, 1), n


def tasks(n: int) -> list[Runnable]:
    return [Runnable(0, seq, 1) for seq in range(n)]


# ---- the Placer ---------------------------------------------------------------------

def full_placer(nodes: int, slots: int, used: int) -> Placer:
    p = Placer("pack")
    for i in range(nodes):
        p.set_node(f"n{i}", slots, used)
    return p


def new_drain(queue: RunQueue, nodes: int, slots: int, count: int,
              budget: int) -> Callable[[], int]:
    placer = full_placer(nodes, slots, 0)

    def run() -> int:
        done = 0
        while done < count:
            out = schedule_from_queue(queue, placer, budget=min(budget, count - done))
            done += len(out)
            if not placer.has_capacity:  # all full: the tasks end, the nodes empty again
                for i in range(nodes):
                    placer.set_node(f"n{i}", slots, 0)
        return done
    return run


def new_steady(queue: RunQueue, nodes: int, slots: int, count: int) -> Callable[[], int]:
    placer = full_placer(nodes, slots, slots)
    rng = random.Random(1)
    freed = [f"n{rng.randrange(nodes)}" for _ in range(count)]

    def run() -> int:
        done = 0
        for nid in freed:
            placer.set_node(nid, slots, slots - 1)  # a task ended
            done += len(schedule_from_queue(queue, placer))
        return done
    return run


def new_wide(nodes: int, slots: int, per: int, budget: int) -> Callable[[], int]:
    placer = full_placer(nodes, slots, 0)
    placer.place(Runnable(0, -1, 1, 1, 1))  # builds the wide views (once per Placer)
    placer.set_node("n0", slots, 0)
    queue = RunQueue(Runnable(0, seq, 1, 4, per) for seq in range(nodes * slots // 4))

    def run() -> int:
        done = 0
        while out := schedule_from_queue(queue, placer, budget=budget):
            done += len(out)
        return done
    return run


def new_waiting(nodes: int, slots: int, count: int) -> Callable[[], int]:
    placer = full_placer(nodes, slots, slots)
    placer.place(Runnable(0, -1, 1, 1, 1))  # builds the wide views (once per Placer)
    queue = RunQueue([Runnable(-1, 0, 1, 4, 0)] + tasks(count + 1)[1:])
    rng = random.Random(2)
    freed = [f"n{rng.randrange(nodes)}" for _ in range(count)]

    def run() -> int:
        for nid in freed:
            placer.set_node(nid, slots, slots - 1)
            schedule_from_queue(queue, placer)
        return count  # rounds
    return run


# ---- the old scheduler --------------------------------------------------------------

def capped(old: types.ModuleType, items: list[Runnable], pops: int):
    """The old RunQueue holding every task, that reads empty after ``pops`` pops (the old
    schedule_from_queue has no budget)."""
    class Capped(old.RunQueue):
        def __init__(self) -> None:
            super().__init__()
            self.left = pops

        def __len__(self) -> int:
            return len(self._heap) if self.left > 0 else 0

        def pop(self):
            self.left -= 1
            return super().pop()
    q = Capped()
    q.extend(items)
    return q


def old_drain(old: types.ModuleType, items: list[Runnable], nodes: int, slots: int,
              count: int) -> tuple[float, int]:
    q = capped(old, items, count)
    snap = [old.NodeSlots(f"n{i}", slots) for i in range(nodes)]
    return cpu_us(lambda: len(old.schedule_from_queue(q, snap, "pack")))


def old_steady(old: types.ModuleType, items: list[Runnable], nodes: int, slots: int,
               count: int) -> tuple[float, int]:
    q = old.RunQueue()
    q.extend(items)
    snap = [old.NodeSlots(f"n{i}", slots, slots) for i in range(nodes)]
    by_id = {n.node_id: n for n in snap}
    rng = random.Random(1)

    def run() -> int:
        done = 0
        for _ in range(count):
            snap[rng.randrange(nodes)].used_slots -= 1
            for d in old.schedule_from_queue(q, snap, "pack"):
                by_id[d.node_id].used_slots += d.slots
                done += 1
        return done
    return cpu_us(run)


def old_wide(old: types.ModuleType, nodes: int, slots: int, per: int,
             count: int) -> tuple[float, int]:
    q = capped(old, [Runnable(0, seq, 1, 4, per) for seq in range(count)], count)
    snap = [old.NodeSlots(f"n{i}", slots) for i in range(nodes)]
    return cpu_us(lambda: len(old.schedule_from_queue(q, snap, "pack")))


def old_waiting(old: types.ModuleType, nodes: int, slots: int,
                count: int) -> tuple[float, int]:
    q = old.RunQueue()
    q.extend([Runnable(-1, 0, 1, 4, 0)] + tasks(count + 1)[1:])
    snap = [old.NodeSlots(f"n{i}", slots, slots) for i in range(nodes)]
    by_id = {n.node_id: n for n in snap}
    rng = random.Random(2)

    def run() -> int:
        for _ in range(count):
            snap[rng.randrange(nodes)].used_slots -= 1
            for d in old.schedule_from_queue(q, snap, "pack"):
                by_id[d.node_id].used_slots += d.slots
        return count
    return cpu_us(run)


# ---- main ---------------------------------------------------------------------------

def suite(ctx) -> list[dict]:
    """hpcbatch bench: CPU us per placement of the Placer at 1,000 nodes x 32 slots, the
    old scheduler (from git) measured beside it in each repeat where it can be loaded."""
    n_tasks = 100_000 if ctx.quick else 1_000_000
    drain, steady = (10_000, 10_000) if ctx.quick else (100_000, 100_000)
    old_drain_n, old_steady_n = (1_000, 300) if ctx.quick else (10_000, 2_000)
    wide = 4_000 if ctx.quick else 16_000
    N, S = 1000, 32
    items = tasks(n_tasks)
    old, where = load_baseline(None)
    v: dict[str, list[float]] = {}
    for r in range(ctx.repeats):
        ctx.progress(f"placer, {n_tasks:,} queued, repeat {r + 1}/{ctx.repeats}")
        v.setdefault("drain", []).append(cpu_us(new_drain(RunQueue(items), N, S, drain,
                                                          1024))[0])
        v.setdefault("steady", []).append(cpu_us(new_steady(RunQueue(items), N, S, steady))[0])
        v.setdefault("wide_8", []).append(cpu_us(new_wide(wide, S, 8, 1024))[0])
        if old is not None:
            ctx.progress(f"old scheduler ({where}), repeat {r + 1}/{ctx.repeats}")
            v.setdefault("old_drain", []).append(old_drain(old, items, N, S, old_drain_n)[0])
            v.setdefault("old_steady", []).append(old_steady(old, items, N, S, old_steady_n)[0])
    size = f"{n_tasks // 1000}k" if n_tasks < 1_000_000 else "1M"
    figs = []
    for case, label in (("drain", f"drain {drain:,} placements onto {N:,}x{S} empty"),
                        ("steady", f"steady: one slot frees, one placed, x{steady:,}")):
        oname = f"scheduler.old_{case}.{size}"
        figs.append({"name": oname, "unit": "us", "values": v.get(f"old_{case}", []),
                     "higher_is_better": False, "baseline": None, "ratios": None,
                     "aim": None, "skipped": None if old is not None else
                     f"the old scheduler could not be loaded from git: {where}",
                     "notes": f"the scheduler before the Placer ({where}), same queue, fewer "
                              "placements (it costs O(nodes) each)"})
        figs.append({"name": f"scheduler.{case}.{size}", "unit": "us", "values": v[case],
                     "higher_is_better": False, "baseline": oname, "ratios": None,
                     "aim": {"value_at_most": 10.0}, "skipped": None,
                     "notes": f"{label}; {n_tasks:,} queued; CPU per placement"})
    figs.append({"name": f"scheduler.wide_4x8.{wide // 1000}k_nodes", "unit": "us",
                 "values": v["wide_8"], "higher_is_better": False, "baseline": None,
                 "ratios": None, "aim": None, "skipped": None,
                 "notes": f"4-instance tasks of 8 slots each onto {wide:,} idle nodes"})
    return figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000, help="runnable tasks queued")
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--slots", type=int, default=32, help="slots per node")
    ap.add_argument("--drain", type=int, default=100_000, help="placements in (a)")
    ap.add_argument("--steady", type=int, default=100_000, help="placements in (b)")
    ap.add_argument("--wide-nodes", type=int, default=16_000, help="nodes in (c) and (d)")
    ap.add_argument("--waiting", type=int, default=20_000, help="rounds in (d)")
    ap.add_argument("--budget", type=int, default=1024, help="placements per round, (a)/(c)")
    ap.add_argument("--old-drain", type=int, default=10_000, help="old: placements in (a)")
    ap.add_argument("--old-steady", type=int, default=2_000, help="old: placements in (b)")
    ap.add_argument("--old-wide", type=int, default=2, help="old: placements in (c), rounds in (d)")
    ap.add_argument("--baseline", default=None, help="git ref of the old scheduler")
    ap.add_argument("--no-baseline", action="store_true", help="skip the old scheduler")
    ap.add_argument("--json-out", default=str(RESULT))
    args = ap.parse_args()

    items = tasks(args.tasks)
    N, S, W = args.nodes, args.slots, args.wide_nodes
    rows: dict[str, dict] = {}

    q = RunQueue(items)
    rows["drain"] = dict(zip(("us", "n"), cpu_us(new_drain(q, N, S, args.drain, args.budget))))
    q = RunQueue(items)
    rows["steady"] = dict(zip(("us", "n"), cpu_us(new_steady(q, N, S, args.steady))))
    del q
    rows["wide_whole"] = dict(zip(("us", "n"), cpu_us(new_wide(W, S, 0, args.budget))))
    rows["wide_8"] = dict(zip(("us", "n"), cpu_us(new_wide(W, S, 8, args.budget))))
    rows["waiting"] = dict(zip(("us", "n"), cpu_us(new_waiting(W, S, args.waiting))))

    old, where = (None, "skipped") if args.no_baseline else load_baseline(args.baseline)
    if old is not None:
        rows["drain"]["old_us"], _ = old_drain(old, items, N, S, args.old_drain)
        rows["steady"]["old_us"], _ = old_steady(old, items, N, S, args.old_steady)
        rows["wide_whole"]["old_us"], _ = old_wide(old, W, S, 0, args.old_wide)
        rows["wide_8"]["old_us"], _ = old_wide(old, W, S, 8, args.old_wide)
        rows["waiting"]["old_us"], _ = old_waiting(old, W, S, args.old_wide)
        source = f"measured, old scheduler at {where}"
    else:
        for k, us in ISSUE_US.items():
            rows[k]["old_us"] = us
        source = f"issue 8's figures ({where})"
    for r in rows.values():
        if "old_us" in r:
            r["speedup"] = r["old_us"] / r["us"]

    labels = {"drain": f"(a) drain {args.drain:,} onto {N:,}x{S} empty",
              "steady": f"(b) steady: 1 slot frees, 1 placed, x{args.steady:,}",
              "wide_whole": f"(c) 4 whole nodes each, {W:,} nodes",
              "wide_8": f"(c) 4 x 8 slots each, {W:,} nodes",
              "waiting": f"(d) wide task waiting, per round, {W:,} nodes"}
    table = [[labels[k], r["n"], r["us"], r.get("old_us", "-"),
              f"{r['speedup']:.0f}x" if "speedup" in r else "-"] for k, r in rows.items()]
    print_table(f"CPU us per placement, {args.tasks:,} queued (baseline: {source})",
                ["case", "placements", "us", "old us", "speedup"], table)
    path = write_results("scheduler", {
        "tasks_queued": args.tasks, "nodes": N, "slots": S, "wide_nodes": W,
        "budget": args.budget, "baseline": source, "aim_us": 10.0,
        "old_placements": {"drain": args.old_drain, "steady": args.old_steady,
                           "wide": args.old_wide},
        "cases": {k: {**r, "label": labels[k]} for k, r in rows.items()}}, args.json_out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
