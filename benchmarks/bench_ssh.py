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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out")
    args = ap.parse_args()
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
    print(f"results: {write_results('ssh', res, args.json_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
