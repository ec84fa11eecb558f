"""Random faults against real processes: do runs of one task ever overlap, and how long
does the lease make a requeue wait? (issue 9)

    python benchmarks/fence_faults.py --kills 20 [--seed N] [--out FILE]

Each round submits a job of two tasks that mark their runs (tests/test_fencing.py's
``marks.sh``: start/tick/end lines with pid and time, and an flock held while any
process of the run lives), drives it with ``hpcbatch job wait`` (production timings:
heartbeat 1 s, node timeout 4 s, lease 4 s, kill grace 2 s), and once both run, after
a random 0-1.5 s, injects one fault:

* ``coordinator``    SIGKILL of the ``job wait`` process, which is then started again
* ``process group``  ``kill -KILL -- -PGID`` of it (its agents have sessions of their
                     own), then started again
* ``agent``          SIGKILL of the local agent that runs one of the tasks
* ``link``           (root, a --netns cluster) the link of the SSH node that runs one
                     of the tasks goes down for 10 s
* ``link+coordinator`` (only with --kinds) as ``link``, and the coordinator is
                     SIGKILLed and started again right after the cut

``agent`` picks the local pool or (with a netns cluster) the SSH pool at random.

The requeue wait is from the fault to the start of the victim's next run. At the end:
the overlaps (pairs of runs of one task whose marked intervals cross, plus runs that
found the task's lock taken), per kind and in all. Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_fencing import Bench, processes_of  # noqa: E402

from hpcbatch.launch import cluster as ct  # noqa: E402
from hpcbatch.store import Store  # noqa: E402

KINDS = ("coordinator", "process group", "agent", "link")
EXTRA = ("link+coordinator",)  # with --kinds: the link goes down, then the coordinator dies
LINK_DOWN_S = 10.0


def cli(home: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HPCBATCH_HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "hpcbatch.cli", *args], env=env,
                       capture_output=True, text=True, timeout=timeout_s,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SystemExit(f"hpcbatch {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def coordinator(home: Path, job: str) -> subprocess.Popen:
    """``setsid hpcbatch job wait JOB``, its output appended to HOME/../JOB.log."""
    with open(home.parent / f"{job}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", "job", "wait", job,
                                 "--no-progress"],
                                env=dict(os.environ, HPCBATCH_HOME=str(home)),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def poll(pred, timeout_s: float, what: str, interval_s: float = 0.02):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise SystemExit(f"{what}: not within {timeout_s} s")


def node_of(home: Path, job: str, task: str) -> str:
    store = Store(home / "state.db")
    try:
        return store.get_task(job, task)["node_id"] or ""
    finally:
        store.close()


def agent_pid(root: Path, pool: str, node: str) -> int:
    """The agent of POOL's NODE whose node root is under ``root``."""
    found = [p for p, c in processes_of(str(root)).items()
             if "agent.py" in c and f"/{pool}/{node} " in c]
    if len(found) != 1:
        raise SystemExit(f"expected one agent of {node} under {root}, found {found}")
    return found[0]


def one_round(i: int, kind: str, home: Path, bench: Bench, tmp: Path, info, rng) -> dict:
    pool = "part" if kind.startswith("link") else "loc"
    if kind == "agent" and info is not None and rng.random() < 0.5:
        pool = "part"
    job = f"r{i:02d}"
    gate = tmp / f"gate-{job}"
    names = [f"{job}-a", f"{job}-b"]
    lines = tmp / f"{job}.txt"
    lines.write_text("".join(bench.command(n, 0, gate) + "\n" for n in names))
    cli(home, "submit", "--each-line", str(lines), "--job", job, "--pool", pool, "--no-wait")
    proc = coordinator(home, job)
    # (both, or one: the first node up may take the other into its queue, behind it)
    poll(lambda: any(bench.started(n) for n in names), 120, f"{job} running")
    time.sleep(rng.random() * 1.5)  # a random point in the runs
    v = rng.choice([k for k, n in enumerate(names) if bench.started(n)])
    victim, victim_id = names[v], ("line-00001", "line-00002")[v]
    before = len(bench.read().of(victim))
    t_fault = time.time()
    timer = None
    if kind in ("coordinator", "process group"):
        if kind == "coordinator":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = coordinator(home, job)
        where = pool
    elif kind == "agent":
        where = node_of(home, job, victim_id)
        roots = home / "nodes" / "loc" if pool == "loc" else tmp / "node-roots"
        os.kill(agent_pid(roots, pool, where), signal.SIGKILL)
    else:
        where = bench.read().of(victim)[-1].node
        ct.set_link(info.directory, where, up=False)
        timer = threading.Timer(LINK_DOWN_S, ct.set_link, (info.directory, where, True))
        timer.start()
        if kind == "link+coordinator":
            proc.kill()
            proc.wait()
            proc = coordinator(home, job)
    poll(lambda: len(bench.read().of(victim)) > before, 120, f"{job}: {victim} requeued")
    wait_s = bench.read().of(victim)[before].start - t_fault
    if timer is not None:
        timer.join()
    gate.touch()
    proc.wait(300)
    marks = bench.read()
    overlaps = sum(1 for a, _ in marks.overlaps() if a.task in names) + \
        sum(1 for line in marks.locked_out if line.split()[1] in names)
    return {"round": i, "kind": kind, "where": where, "victim": victim,
            "requeue_wait_s": round(wait_s, 3), "overlaps": overlaps, "exit": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "fence_faults.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated, of {', '.join(KINDS + EXTRA)}")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else time.time_ns() % 10**6
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="fence-faults-"))
    home = tmp / "home"
    bench = Bench(tmp / "bench")
    no_netns = None
    try:
        ct.check_netns()
        ct.check_sshd()
    except ct.ClusterError as exc:
        no_netns = str(exc)
    kinds = [k for k in args.kinds.split(",") if not (k.startswith("link") and no_netns)]
    unknown = set(kinds) - set(KINDS + EXTRA)
    if unknown:
        raise SystemExit(f"--kinds: unknown {', '.join(sorted(unknown))}")
    plan = [kinds[i % len(kinds)] for i in range(args.kills)]
    rng.shuffle(plan)
    info = None
    rounds = []
    try:
        cli(home, "pool", "create", "loc", "--nodes", "3")
        if not no_netns:
            info = ct.cluster_up(3, tmp / "cluster", netns=True)
            spec = json.loads(info.pool_json.read_text())
            spec["python"] = sys.executable
            spec["node_root"] = str(tmp / "node-roots")
            (tmp / "pool.json").write_text(json.dumps(spec))
            cli(home, "pool", "create", "part", "--spec", str(tmp / "pool.json"),
                "--no-inter-node-communication")
        for i, kind in enumerate(plan):
            r = one_round(i, kind, home, bench, tmp, info, rng)
            rounds.append(r)
            print(f"{i:2d} {kind:13s} {r['where']:8s} requeue after {r['requeue_wait_s']:6.2f} "
                  f"s  overlaps {r['overlaps']}  job wait exit {r['exit']}", flush=True)
    finally:
        if info is not None:
            for nd in info.nodes:
                try:
                    ct.set_link(info.directory, nd.name, up=True)
                except ct.ClusterError:
                    pass
            ct.cluster_down(info.directory)
        left = processes_of(str(home), str(tmp))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(r["overlaps"] for r in rounds)
    summary = {}
    for kind in KINDS + EXTRA:
        waits = [r["requeue_wait_s"] for r in rounds if r["kind"] == kind]
        if waits:
            summary[kind] = {"kills": len(waits), "overlaps": sum(
                r["overlaps"] for r in rounds if r["kind"] == kind),
                "requeue_wait_s": {"min": min(waits), "median": statistics.median(waits),
                                   "max": max(waits)}}
    print(f"overlaps across {len(rounds)} kills: {total} (seed {seed})")
    for kind, s in summary.items():
        w = s["requeue_wait_s"]
        print(f"  {kind:13s} {s['kills']:2d} kills, {s['overlaps']} overlaps, requeue wait "
              f"{w['min']:.2f} / {w['median']:.2f} / {w['max']:.2f} s (min/median/max)")
    if no_netns:
        print(f"  (no link faults: {no_netns})")
    result = {"seed": seed, "kills": len(rounds), "overlaps": total, "summary": summary,
              "rounds": rounds, "leftover_processes": len(left),
              "timings": "production (heartbeat 1 s, node timeout 4 s, lease 4 s, "
                         "kill grace 2 s)", "no_link_faults": no_netns}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if total == 0 and not left else 1


if __name__ == "__main__":
    sys.exit(main())
