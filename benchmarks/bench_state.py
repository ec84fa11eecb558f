"""The pure coordinator state at scale: placements for 1,000,000 runnable tasks.

1,000 nodes x 32 slots, tasks fed through windows exactly as the store would serve
them. Measures CPU per placement (time.process_time) while

  (a) draining onto empty nodes (every node gets its slots plus its prefetch queue),
  (b) the steady state: one task exits, the state places the next, 100,000 times,
  (c) terminate of a queued task with the queue full,

and compares with the figures the issue measured on the previous coordinator
(128 µs and 297 µs per placement; 0.25 s per terminate). Writes
benchmarks/results/bench_state.json beside the table.

    python benchmarks/bench_state.py [--nodes 1000 --slots 32 --tasks 1000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from hpcbatch import state as S
from hpcbatch.timings import Timings

BEFORE = {"drain_us": 128.0, "steady_us": 297.0, "terminate_ms": 250.0}


class Feeder:
    """Answers the state's queries from a synthetic store of `tasks` runnable tasks."""

    def __init__(self, tasks: int):
        self.tasks = tasks
        self.next_seq = 1

    def answer(self, st: S.CoordinatorState, out: list) -> list:
        work = list(out)
        done = []
        while work:
            ins = work.pop(0)
            if isinstance(ins, S.LoadWindow):
                lo = self.next_seq
                hi = min(self.tasks + 1, lo + ins.limit)
                self.next_seq = hi
                rows = tuple(S.TaskRow(s, "job", f"t{s}", "p", 0) for s in range(lo, hi))
                work += st.handle(S.WindowLoaded(0.0, "p", rows, exhausted=hi > self.tasks))
            else:
                done.append(ins)
        return done


def placements(out: list) -> list[tuple[str, object]]:
    """(node, run) of each task placed: the benchmark keeps no more than the shell would
    (it sends the RunTask and drops it), so its own garbage does not load the GC."""
    return [(i.node_id, i.run) for i in out if isinstance(i, S.RunTask)]


def measure(nodes_n: int, slots: int, tasks: int, steady: int) -> dict:
    """(a) drain, (b) steady state, (c) terminate on a fresh state: the results dict."""
    st = S.CoordinatorState(Timings(), prefetch=4)
    feed = Feeder(tasks)
    nodes = tuple(S.NodeInfo(f"n{i:05d}", f"h{i:05d}", slots) for i in range(nodes_n))
    st.handle(S.Started(0.0, (("job", tasks),), 0))
    feed.answer(st, st.handle(S.PoolAdded(0.0, S.PoolInfo("p", slots), nodes)))
    st.pools["p"].avg_run_s = 0.001  # millisecond tasks: each slot queues the maximum
    for n in nodes:
        st.handle(S.AgentUp(0.0, "p", n.node_id, 1))
    gc.collect()

    # (a) drain onto empty nodes
    t0 = time.process_time()
    placed: list[tuple[str, object]] = []
    t = 1.0
    for n in nodes:
        placed += placements(feed.answer(st, st.handle(
            S.AgentHello(t, "p", n.node_id, 1, f"/r/{n.node_id}", 2))))
    while True:
        more = placements(feed.answer(st, st.handle(S.Tick(t))))
        if not more:
            break
        placed += more
    drain_s = time.process_time() - t0
    drain_us = drain_s / max(len(placed), 1) * 1e6

    # (b) steady state: one exits, one is placed
    running = list(placed)
    t0 = time.process_time()
    steady_placed = 0
    for i in range(min(steady, len(running))):
        node_id, run = running[i]
        t += 1e-5
        out = feed.answer(st, st.handle(S.RunExited(t, "p", node_id, 1, run, 0,
                                                    start=t - 0.001, end=t)))
        new = placements(out)
        steady_placed += len(new)
        running += new
        if not new and feed.next_seq > tasks:
            break
    steady_s = time.process_time() - t0
    steady_us = steady_s / max(steady_placed, 1) * 1e6

    # (c) terminate of a queued task
    queued = sorted(st.rows)
    t0 = time.perf_counter()
    n_term = min(100, len(queued))
    for seq in queued[len(queued) - n_term:]:
        st.handle(S.TerminateAsked(t, seq, "job"))
    terminate_ms = (time.perf_counter() - t0) / max(n_term, 1) * 1e3

    return {
        "nodes": nodes_n, "slots_per_node": slots, "tasks": tasks,
        "drain": {"placements": len(placed), "cpu_s": round(drain_s, 3),
                  "us_per_placement": round(drain_us, 2)},
        "steady": {"placements": steady_placed, "cpu_s": round(steady_s, 3),
                   "us_per_placement": round(steady_us, 2)},
        "terminate_ms": round(terminate_ms, 3), "terminated": n_term,
        "queued_in_memory": len(st.rows),
        "before": BEFORE,
    }


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def suite(ctx) -> list[dict]:
    """hpcbatch bench: CPU per decision of the pure state at 10k / 100k / 1M runnable
    tasks on 1,000 nodes x 32 slots (quick: 10k and 100k, fewer steady placements)."""
    sizes = [10_000, 100_000] if ctx.quick else [10_000, 100_000, 1_000_000]
    steady = 5_000 if ctx.quick else 50_000
    vals: dict[tuple[str, int], list[float]] = {}
    extra: dict[int, dict] = {}
    for r in range(ctx.repeats):
        for n in sizes:
            ctx.progress(f"state {_size(n)} tasks, repeat {r + 1}/{ctx.repeats}")
            res = measure(1000, 32, n, steady)
            extra[n] = res
            vals.setdefault(("drain", n), []).append(res["drain"]["us_per_placement"])
            if res["steady"]["placements"]:
                vals.setdefault(("steady", n), []).append(res["steady"]["us_per_placement"])
            if res["terminated"]:
                vals.setdefault(("terminate", n), []).append(res["terminate_ms"])
    figs = []
    for (what, n), v in vals.items():
        e = extra[n]
        unit, aim, note = "us", None, ""
        if what == "drain":
            note = (f"{e['drain']['placements']:,} placements onto empty nodes (slots + "
                    f"prefetch); CPU time; {BEFORE['drain_us']:g} us before the pure state")
        elif what == "steady":
            note = (f"one exits, one is placed, {e['steady']['placements']:,} times; "
                    f"{BEFORE['steady_us']:g} us before")
        else:
            unit = "ms"
            note = f"terminate of a queued task, queue full; {BEFORE['terminate_ms']:g} ms before"
        figs.append({"name": f"state.{what}.{_size(n)}", "unit": unit, "values": v,
                     "higher_is_better": False, "baseline": None, "ratios": None,
                     "aim": aim, "skipped": None, "notes": note,
                     "x": {"name": "runnable tasks", "value": n},
                     "series": f"{what} ({unit} per decision)"})
    return figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--steady", type=int, default=100_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_state.json"))
    args = ap.parse_args()
    results = measure(args.nodes, args.slots, args.tasks, args.steady)
    drain_us = results["drain"]["us_per_placement"]
    steady_us = results["steady"]["us_per_placement"]
    terminate_ms = results["terminate_ms"]
    rows = [("drain, µs/placement", BEFORE["drain_us"], drain_us),
            ("steady, µs/placement", BEFORE["steady_us"], steady_us),
            ("terminate, ms", BEFORE["terminate_ms"], terminate_ms)]
    print(f"{args.nodes} nodes x {args.slots} slots, {args.tasks:,} runnable tasks "
          f"({results['queued_in_memory']:,} in memory at a time)")
    print(f"{'':24} {'before':>10} {'now':>10} {'speed-up':>9}")
    for name, before, now in rows:
        print(f"{name:24} {before:10.2f} {now:10.2f} {before / now:8.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
