"""A big resource file from a storage container to 3 real sshd nodes, against `scp` of
the same file to the same nodes in the same run.

(1) upload: the file into a default container (`batch.storage`, sha256 as it goes)
(2) staging: 3 tasks on a 3-node SSH pool (one per node), each with the blob as a
    resource file; each node's staging time (SFTP into the node cache, the node's
    sha256 check, the copy into wd/) as a rate, and the file checked in every task
    (sha256sum on the node); the baseline: `scp -F <cluster ssh_config>` of the same
    file to each node, one after another, interleaved with the staging repeats
(3) a second task per node: the file comes from the node's cache (nothing sent)

    python benchmarks/bench_storage.py [--size-mb 1024] [--repeats 1] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, write_results  # noqa: E402

import hpcbatch  # noqa: E402
from hpcbatch.launch.cluster import ClusterError, cluster_down, cluster_up  # noqa: E402

NODES = ["node1", "node2", "node3"]


def _spec(d: Path) -> Path:
    s = json.loads((d / "pool.json").read_text())
    s["python"] = sys.executable
    s["node_root"] = str(d / "node-roots")
    p = d / "pool-storage.json"
    p.write_text(json.dumps(s))
    return p


def _wait_idle(batch, pool: str, n: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(x["state"] == "idle" for x in batch.pools.nodes(pool)) == n:
            return
        time.sleep(0.05)
    raise RuntimeError(f"pool {pool} not idle: {batch.pools.nodes(pool)}")


def _make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            chunk = (block[:8] + i.to_bytes(8, "little") + block[16:])[:min(left, 1 << 20)]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return h.hexdigest()


def run(size: int, repeats: int, progress=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    d = work / "cluster"
    try:
        info = cluster_up(3, d)
    except ClusterError as exc:
        return {"skipped": f"no sshd test cluster here: {exc}"}
    try:
        src = work / "big.bin"
        progress(f"making a {size >> 20} MiB file")
        digest = _make_file(src, size)
        # (a loaded shared box: clocks that do not call a busy node lost)
        with hpcbatch.Batch(work / "home", node_timeout_s=20, lease_s=20) as batch:
            batch.storage.create("in")
            t0 = time.perf_counter()
            view = batch.storage.upload("in", src, "big.bin")[0]
            upload_s = time.perf_counter() - t0
            assert view.sha256 == digest
            batch.pools.create("st", "ssh", spec=str(_spec(d)), scheduling_policy="spread")
            _wait_idle(batch, "st", 3)
            rates, scp_rates, hit_s, walls, scp_walls = [], [], [], [], []
            for r in range(repeats):
                # the node caches emptied: every repeat sends the file again
                for root in (d / "node-roots").glob("*/st/*/cache"):
                    for f in root.iterdir():
                        f.unlink()
                progress(f"repeat {r + 1}: staging to 3 nodes")
                job = batch.jobs.create(f"big{r}", pool="st")
                job.add_tasks([{"id": f"t{i}", "command_line": "sha256sum big.bin",
                                "resource_files": [{"storage_path": "in/big.bin"}]}
                               for i in range(3)])
                job.wait(timeout_s=1800)
                stager = batch.coordinator.stager
                staged = [h for h in list(stager.history)[-3:] if h[3] == 1]
                tasks = list(job.tasks())
                sums = {t.stdout().split()[0] for t in tasks}
                assert sums == {digest}, sums  # intact on every node
                assert {t.node_id for t in tasks} == set(NODES), [t.node_id for t in tasks]
                rates.append([size / h[1] / 1e6 for h in staged])
                walls.append(max(h[1] for h in staged))
                # the same nodes again: from each node's cache
                before = dict(stager.counts)
                job.add_tasks([{"id": f"again{i}", "command_line": "sha256sum big.bin",
                                "resource_files": [{"storage_path": "in/big.bin"}]}
                               for i in range(3)])
                job.wait(timeout_s=600)
                after = stager.counts
                assert after["bytes_sent"] == before["bytes_sent"], (before, after)
                assert after["hits"] - before["hits"] == 3, (before, after)
                hit_s.append(max(h[1] for h in list(stager.history)[-3:]))
                progress(f"repeat {r + 1}: scp to 3 nodes")
                per = []
                t_all = time.perf_counter()
                for n in NODES:
                    t0 = time.perf_counter()
                    subprocess.run(["scp", "-q", "-F", str(info.ssh_config), str(src),
                                    f"{n}:scp-big.bin"], check=True, timeout=1800)
                    per.append(size / (time.perf_counter() - t0) / 1e6)
                    subprocess.run(["ssh", "-F", str(info.ssh_config), n, "rm -f scp-big.bin"],
                                   check=True, timeout=60)
                scp_rates.append(per)
                scp_walls.append(time.perf_counter() - t_all)
        return {"size_bytes": size, "upload_MBps": size / upload_s / 1e6,
                "staging_MBps_per_node": rates, "scp_MBps_per_node": scp_rates,
                "cache_hit_stage_s": hit_s, "stage_3_nodes_wall_s": walls,
                "scp_3_nodes_wall_s": scp_walls}
    finally:
        cluster_down(d)
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def figures(res: dict, repeats: int) -> list[dict]:
    size = res.get("size_bytes", 0)
    tag = f"{size >> 20}MiB" if size else "?"
    if "skipped" in res:
        return [{"name": n, "unit": u, "values": [], "higher_is_better": h, "baseline": None,
                 "ratios": None, "aim": None, "skipped": res["skipped"], "notes": ""}
                for n, u, h in (("storage.stage_3_ssh_nodes", "MB/s", True),
                                ("storage.scp_3_ssh_nodes", "MB/s", True))]
    ours = [median(r) for r in res["staging_MBps_per_node"]]
    scp = [median(r) for r in res["scp_MBps_per_node"]]
    return [
        {"name": f"storage.stage_3_ssh_nodes.{tag}", "unit": "MB/s", "values": ours,
         "higher_is_better": True, "baseline": f"storage.scp_3_ssh_nodes.{tag}",
         "ratios": [a / b for a, b in zip(ours, scp)], "aim": {"ratio_at_least": 0.5},
         "skipped": None, "notes": "per node (median of 3): SFTP into the node cache + "
         "sha256 check on the node + copy into wd/; 3 nodes at once"},
        {"name": f"storage.scp_3_ssh_nodes.{tag}", "unit": "MB/s", "values": scp,
         "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
         "skipped": None, "notes": "scp -F ssh_config, node by node"},
        {"name": f"storage.stage_3_nodes_total.{tag}", "unit": "MB/s",
         "values": [3 * size / w / 1e6 for w in res["stage_3_nodes_wall_s"]],
         "higher_is_better": True, "baseline": f"storage.scp_3_nodes_total.{tag}",
         "ratios": [b / a for a, b in zip(res["stage_3_nodes_wall_s"],
                                          res["scp_3_nodes_wall_s"])],
         "aim": {"ratio_at_least": 0.5}, "skipped": None,
         "notes": "3 copies delivered / wall time (the 3 nodes staged at once)"},
        {"name": f"storage.scp_3_nodes_total.{tag}", "unit": "MB/s",
         "values": [3 * size / w / 1e6 for w in res["scp_3_nodes_wall_s"]],
         "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
         "skipped": None, "notes": "scp to the 3 nodes one after another"},
        {"name": f"storage.cache_hit_stage.{tag}", "unit": "s",
         "values": res["cache_hit_stage_s"], "higher_is_better": False, "baseline": None,
         "ratios": None, "aim": None, "skipped": None,
         "notes": "a second task per node: nothing sent, copied from the node cache"},
        {"name": f"storage.upload.{tag}", "unit": "MB/s", "values": [res["upload_MBps"]],
         "higher_is_better": True, "baseline": None, "ratios": None, "aim": None,
         "skipped": None, "notes": "batch.storage.upload into a default container"},
    ]


def suite(ctx) -> list[dict]:
    size = (64 if ctx.quick else 1024) << 20
    repeats = 1 if ctx.quick else max(1, ctx.repeats)
    res = run(size, repeats, progress=ctx.progress)
    return figures(res, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a 64 MiB file, one repeat")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    size = (64 if args.quick else args.size_mb) << 20
    res = run(size, 1 if args.quick else args.repeats)
    figs = figures(res, args.repeats)
    print_table("storage: a resource file to 3 SSH nodes", ["figure", "unit", "values",
                                                             "ratio vs baseline"],
                [[f["name"], f["unit"], ", ".join(f"{v:.2f}" for v in f["values"]) or
                  f.get("skipped") or "", ", ".join(f"{r:.2f}" for r in f["ratios"] or [])]
                 for f in figs])
    path = write_results("bench_storage", {"raw": res, "figures": figs}, args.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
