"""SSH pools on real loopback sshd nodes, against baselines measured in the same run.

(1) bootstrap of an 8-node pool (strict host keys, agent upload, agent start, all
    idle) vs OpenSSH's `ssh -F cfg nodeN true` to all 8 in parallel
(2) submit -> first rank running, 2-node multi-instance task through hpcbatch-mpiexec,
    vs bare `mpiexec` with the same hostfile and ssh config, with the MPI beside this
    python: MPICH on loopback nodes, Open MPI on network-namespace nodes (root only;
    PRRTE refuses loopback interfaces)

    python benchmarks/bench_ssh.py [--nodes 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, timed, write_results  # noqa: E402

import hpcbatch  # noqa: E402
from hpcbatch.launch import mpi  # noqa: E402
from hpcbatch.launch.cluster import (  # noqa: E402
    ClusterError,
    check_netns,
    cluster_down,
    cluster_up,
)

STAMP = "import sys, time; open(sys.argv[1] + '.' + sys.argv[2], 'w').write(repr(time.time()))"


def spec(d: Path, names: list[str]) -> Path:
    s = json.loads((d / "pool.json").read_text())
    s["hosts"] = [h for h in s["hosts"] if h["name"] in names]
    s["python"] = sys.executable
    s["node_root"] = str(d / "node-roots")
    p = d / f"pool-{len(names)}-{time.monotonic_ns()}.json"
    p.write_text(json.dumps(s))
    return p


def wait_idle(batch, pool: str, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = batch.pools.nodes(pool)
        if sum(x["state"] == "idle" for x in nodes) == n:
            return
        time.sleep(0.005)
    raise RuntimeError(f"pool {pool} not idle: {nodes}")


def bench_bootstrap(d: Path, n: int, repeats: int) -> dict:
    names = [f"node{i}" for i in range(1, n + 1)]
    ours, ssh = [], []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as home, hpcbatch.Batch(home) as batch:
            path = spec(d, names)

            def boot(batch=batch, path=path, r=r) -> None:
                batch.pools.create(f"p{r}", "ssh", spec=str(path))
                wait_idle(batch, f"p{r}", n)
            ours.append(timed(boot))
        ssh.append(timed(lambda: [p.wait() for p in [subprocess.Popen(
            ["ssh", "-F", str(d / "ssh_config"), name, "true"]) for name in names]]))
    return {"nodes": n, "hpcbatch_s": median(ours), "openssh_parallel_true_s": median(ssh),
            "ratio": median(ssh) / median(ours), "all_s": {"hpcbatch": ours, "ssh": ssh}}


def bench_first_rank(tmp: Path, repeats: int) -> dict:
    flavour = mpi.detect_flavour(mpi.default_mpiexec())
    netns = flavour == "openmpi"
    if netns:
        try:
            check_netns()
        except ClusterError as exc:
            return {"skipped": f"Open MPI across nodes needs network-namespace nodes: {exc}"}
    elif flavour != "mpich":
        return {"skipped": f"no MPI beside {sys.executable} (found {flavour})"}
    d = tmp / "first-rank"
    cluster_up(2, d, netns=netns)
    try:
        return {"cluster": "netns" if netns else "loopback",
                **_first_rank(d, flavour, repeats)}
    finally:
        cluster_down(d)


def _first_rank(d: Path, flavour: str, repeats: int) -> dict:
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as home, hpcbatch.Batch(home) as batch:
        batch.pools.create("two", "ssh", spec=str(spec(d, ["node1", "node2"])))
        wait_idle(batch, "two", 2)
        job = batch.jobs.create("first-rank", pool="two")
        for r in range(repeats):
            stamp = Path(home) / f"ours{r}"
            cmd = (f"{sys.executable} -m hpcbatch.launch.mpi -- {sys.executable} -c "
                   f"\"{STAMP}\" {stamp} $HPCBATCH_INSTANCE_INDEX")
            t0 = time.time()
            job.add_task(f"t{r}", cmd, multi_instance={"instances": 2})
            job.wait(timeout_s=60)
            assert job.task(f"t{r}").succeeded, job.task(f"t{r}").stderr()
            ours.append(float(Path(f"{stamp}.0").read_text()) - t0)
        hostfile = Path(home) / "hf"
        hostfile.write_text(mpi.hostfile_for(flavour, [("node1", 1), ("node2", 1)]))
        for r in range(repeats):
            stamp = Path(home) / f"bare{r}"
            cmd, env = mpi.mpiexec_command(2, [sys.executable, "-c", STAMP, str(stamp), "0"],
                                           hostfile=hostfile, ssh_config=d / "ssh_config",
                                           workdir=home)
            t0 = time.time()
            subprocess.run(cmd, env=env, check=True)
            bare.append(float(Path(f"{stamp}.0").read_text()) - t0)
    return {"flavour": flavour, "hpcbatch_submit_to_first_rank_s": median(ours),
            "bare_mpiexec_to_first_rank_s": median(bare),
            "overhead_ms": (median(ours) - median(bare)) * 1e3,
            "all_s": {"hpcbatch": ours, "bare": bare}}


# ---- hpcbatch bench ------------------------------------------------------------------------

def launch_pairs(d: Path | None, flavour: str, repeats: int, progress=lambda s: None) -> dict:
    """Per repeat, interleaved: submit -> first rank and -> done, for a task running
    mpiexec (or on an SSH pool a 2-instance task through hpcbatch-mpiexec) vs bare
    mpiexec with the same settings. ``d``: an SSH cluster of 2 nodes, or None (local)."""
    v: dict[str, list[float]] = {k: [] for k in ("ours_first", "ours_total", "bare_first",
                                                 "bare_total")}
    with tempfile.TemporaryDirectory() as home, hpcbatch.Batch(home) as batch:
        if d is not None:
            batch.pools.create("two", "ssh", spec=str(spec(d, ["node1", "node2"])))
            wait_idle(batch, "two", 2)
            job = batch.jobs.create("first-rank", pool="two")
            hostfile = Path(home) / "hf"
            hostfile.write_text(mpi.hostfile_for(flavour, [("node1", 1), ("node2", 1)]))
        else:
            job = batch.jobs.create("first-rank")
            assert batch.coordinator is not None  # it starts lazily: not in the clock
            wait_idle(batch, "local", 1)
            hostfile = None
        for r in range(repeats):
            progress(f"launch {'ssh' if d else 'local'} {flavour}, repeat {r + 1}/{repeats}")
            stamp = Path(home) / f"ours{r}"
            if d is not None:
                cmd = (f"{sys.executable} -m hpcbatch.launch.mpi -- {sys.executable} -c "
                       f"\"{STAMP}\" {stamp} $HPCBATCH_INSTANCE_INDEX")
                extra = {"multi_instance": {"instances": 2}}
            else:
                argv, env = mpi.mpiexec_command(2, [sys.executable, "-c", STAMP, str(stamp),
                                                    "0"], workdir=home)
                cmd = " ".join(map(shlex.quote, argv))
                extra = {"environment": {k: v for k, v in env.items()
                                         if os.environ.get(k) != v}, "required_slots": 2}
            t0 = time.time()
            job.add_task(f"t{r}", cmd, **extra)
            job.wait(timeout_s=120)
            done = time.time()
            assert job.task(f"t{r}").succeeded, job.task(f"t{r}").stderr()
            v["ours_first"].append(float(Path(f"{stamp}.0").read_text()) - t0)
            v["ours_total"].append(done - t0)
            stamp = Path(home) / f"bare{r}"
            if d is not None:
                cmd2, env2 = mpi.mpiexec_command(2, [sys.executable, "-c", STAMP, str(stamp),
                                                     "0"], hostfile=hostfile,
                                                 ssh_config=d / "ssh_config", workdir=home)
            else:
                cmd2, env2 = mpi.mpiexec_command(2, [sys.executable, "-c", STAMP, str(stamp),
                                                     "0"], workdir=home)
            t0 = time.time()
            subprocess.run(cmd2, env=env2, check=True, capture_output=True)
            v["bare_total"].append(time.time() - t0)
            v["bare_first"].append(float(Path(f"{stamp}.0").read_text()) - t0)
    return v


def part_launch(args) -> dict:
    """--part launch: this python's MPI, local and on a 2-node SSH cluster."""
    flavour = mpi.detect_flavour(mpi.default_mpiexec())
    res: dict = {"flavour": flavour}
    if flavour not in ("openmpi", "mpich"):
        res["skipped"] = f"no MPI beside {sys.executable} (found {flavour})"
        return res
    res["local"] = launch_pairs(None, flavour, args.repeats, _say)
    netns = flavour == "openmpi"
    why = None
    if netns:
        try:
            check_netns()
        except ClusterError as exc:
            why = f"Open MPI across nodes needs network-namespace nodes: {exc}"
    if why:
        res["ssh_skipped"] = why
        return res
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cluster"
        cluster_up(2, d, netns=netns)
        try:
            res["ssh"] = launch_pairs(d, flavour, args.repeats, _say)
            res["cluster"] = "netns" if netns else "loopback"
        finally:
            cluster_down(d)
    return res


def _say(text: str) -> None:
    print(text, flush=True)


def other_mpi_python() -> tuple[str | None, str]:
    """A python whose MPI is the other flavour: $HPCBATCH_BENCH_MPICH_PYTHON (or ..._OPENMPI),
    else .venv-mpich beside this checkout; (None, why not)."""
    mine = mpi.detect_flavour(mpi.default_mpiexec())
    other = "mpich" if mine == "openmpi" else "openmpi"
    var = f"HPCBATCH_BENCH_{other.upper()}_PYTHON"
    cand = os.environ.get(var) or str(Path(__file__).resolve().parent.parent /
                                      f".venv-{other}" / "bin" / "python")
    if Path(cand).exists():
        return cand, other
    return None, (f"no {other} python: set {var}, or python3 -m venv .venv-{other} && "
                  f".venv-{other}/bin/pip install -e '.[{other}]'")


def bootstrap_pairs(d: Path, sizes: list[int], repeats: int, progress) -> tuple[dict, dict]:
    """Values per (who, nodes), and why a size failed (it is then skipped, not a zero)."""
    v: dict[tuple[str, int], list[float]] = {}
    failed: dict[int, str] = {}
    for r in range(repeats):
        for n in sizes:
            if n in failed:
                continue
            progress(f"bootstrap {n} nodes, repeat {r + 1}/{repeats}")
            try:
                b = bench_bootstrap(d, n, 1)
            except Exception as exc:  # noqa: BLE001 - the reason is the figure
                failed[n] = f"failed in repeat {r + 1}: {type(exc).__name__}: {exc}"[:300]
                continue
            v.setdefault(("hpcbatch", n), []).append(b["all_s"]["hpcbatch"][0])
            v.setdefault(("ssh", n), []).append(b["all_s"]["ssh"][0])
    return v, failed


def suite(ctx) -> list[dict]:
    """hpcbatch bench: pool bootstrap vs nodes against parallel ssh; MPI launch (first rank,
    total) through hpcbatch vs bare mpiexec, local and on 2 SSH nodes, both MPI flavours."""
    sizes = [1, 2, 4] if ctx.quick else [1, 2, 4, 8, 16, 32]
    figs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cluster"
        ctx.progress(f"starting {max(sizes)} sshd nodes")
        cluster_up(max(sizes), d)
        try:
            boot, failed = bootstrap_pairs(d, sizes, ctx.repeats, ctx.progress)
        finally:
            cluster_down(d)
    for n in sizes:
        why = failed.get(n)
        figs += [
            {"name": f"ssh.bootstrap_openssh_true.{n}", "unit": "s",
             "values": [] if why else boot[("ssh", n)], "higher_is_better": False,
             "baseline": None, "ratios": None, "aim": None, "skipped": why,
             "notes": f"ssh -F cfg nodeN true to {n} loopback sshd nodes in parallel",
             "x": {"name": "SSH nodes", "value": n}, "series": "parallel ssh true"},
            {"name": f"ssh.bootstrap.{n}", "unit": "s",
             "values": [] if why else boot[("hpcbatch", n)],
             "higher_is_better": False, "baseline": f"ssh.bootstrap_openssh_true.{n}",
             "ratios": None, "aim": None, "skipped": why,
             "notes": f"pool create -> {n} nodes idle (host keys, agent upload and start)",
             "x": {"name": "SSH nodes", "value": n}, "series": "hpcbatch pool bootstrap"}]
    if ctx.quick:
        ctx.progress("launch: full run only")
    runs = {}
    mine = mpi.detect_flavour(mpi.default_mpiexec())
    for py, flavour in ((sys.executable, mine), other_mpi_python()):
        if ctx.quick or py is None:
            runs[flavour] = {"skipped": "full run only (--quick)" if ctx.quick else flavour}
            continue
        ctx.progress(f"launch, {flavour}")
        out = ctx.out / f"launch-{flavour}.json"
        r = subprocess.run([py, str(Path(__file__).resolve()), "--part", "launch",
                            "--repeats", str(ctx.repeats), "--json-out", str(out)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            runs[flavour] = {"skipped": f"failed: {r.stderr.strip().splitlines()[-1:]}"}
        else:
            runs[flavour] = json.loads(out.read_text())["launch"]
    for flavour in ("openmpi", "mpich"):
        res = runs.get(flavour, {"skipped": f"no {flavour}"})
        for where in ("local", "ssh"):
            why = res.get("skipped") or (res.get("ssh_skipped") if where == "ssh" else None)
            got = res.get(where, {})
            if not why and not got:
                why = f"{where}: not measured"
            for what in ("first", "total"):
                base = f"ssh.launch.{where}.{flavour}.bare_mpiexec_{what}"
                label = "submit -> first rank running" if what == "first" else \
                    "submit -> done"
                figs += [
                    {"name": base, "unit": "s", "values": [] if why else got[f"bare_{what}"],
                     "higher_is_better": False, "baseline": None, "ratios": None,
                     "aim": None, "skipped": why or None,
                     "notes": f"mpiexec -n 2 (same hostfile and ssh config), {label}"},
                    {"name": f"ssh.launch.{where}.{flavour}.hpcbatch_{what}", "unit": "s",
                     "values": [] if why else got[f"ours_{what}"], "higher_is_better": False,
                     "baseline": base, "ratios": None, "aim": None, "skipped": why or None,
                     "notes": ("a 2-instance task through hpcbatch-mpiexec" if where == "ssh"
                               else "a task running the same mpiexec on the local pool")
                     + f", coordinator up; {label}"}]
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part", choices=("all", "launch"), default="all",
                    help="launch: only the MPI launch pairs, local and on 2 SSH nodes")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    flavour = mpi.detect_flavour(mpi.default_mpiexec())
    if args.part == "launch":
        res = {"launch": part_launch(args)}
        print(f"results: {write_results(f'ssh_launch_{flavour}', res, args.json_out)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cluster"
        cluster_up(args.nodes, d)
        try:
            res = {"bootstrap": bench_bootstrap(d, args.nodes, args.repeats)}
        finally:
            cluster_down(d)
        res["first_rank"] = bench_first_rank(Path(tmp), args.repeats)
    b, f = res["bootstrap"], res["first_rank"]
    rows = [[f"bootstrap {b['nodes']} nodes to idle (s)", b["hpcbatch_s"],
             b["openssh_parallel_true_s"], b["ratio"]]]
    if "skipped" not in f:
        rows.append([f"submit -> first rank, 2 nodes, {f['flavour']} (s)",
                     f["hpcbatch_submit_to_first_rank_s"],
                     f["bare_mpiexec_to_first_rank_s"],
                     f["bare_mpiexec_to_first_rank_s"] / f["hpcbatch_submit_to_first_rank_s"]])
    print_table(f"SSH pools (median of {args.repeats})",
                ["measure", "hpcbatch", "baseline", "ratio"], rows)
    if "skipped" in f:
        print(f"first-rank benchmark skipped: {f['skipped']}")
    # one file per MPI flavour: the MPICH run no longer overwrites the Open MPI one
    print(f"results: {write_results(f'ssh_{flavour}', res, args.json_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
