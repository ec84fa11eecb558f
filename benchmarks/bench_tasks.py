"""Command-task throughput: N `true` tasks through hpcbatch vs `xargs -P <cores>`.

Both run each line through /bin/sh, on the same machine, in the same run,
interleaved over repeats; the ratio uses medians.

    python benchmarks/bench_tasks.py --tasks 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, print_table, timed, write_results  # noqa: E402

import hpcbatch  # noqa: E402


def run_xargs(lines: Path, cores: int) -> None:
    with open(lines) as f:
        subprocess.run(["xargs", "-P", str(cores), "-d", "\n", "-n", "1", "sh", "-c"],
                       stdin=f, check=True)


def run_api(n: int, cores: int) -> float:
    """Seconds from add_tasks to the last completion (coordinator already up)."""
    with tempfile.TemporaryDirectory() as home, hpcbatch.Batch(home, local_slots=cores) as b:
        job = b.jobs.create("bench")

        def go() -> None:
            job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(n))
            counts = job.wait(poll_s=0.01)
            assert counts["succeeded"] == n, counts

        return timed(go)


def run_cli(lines: Path, cores: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HPCBATCH_HOME=home)
        subprocess.run([sys.executable, "-m", "hpcbatch.cli", "submit", "--each-line",
                        str(lines), "--no-progress"], env=env, check=True,
                       stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--json-out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "tasks.txt"
        lines.write_text("true\n" * args.tasks)
        t_x, t_api, t_cli = [], [], []
        for _ in range(args.repeats):
            t_x.append(timed(lambda: run_xargs(lines, args.cores)))
            t_api.append(run_api(args.tasks, args.cores))
            t_cli.append(timed(lambda: run_cli(lines, args.cores)))
    n = args.tasks
    rate = {k: n / median(v) for k, v in (("xargs", t_x), ("api", t_api), ("cli", t_cli))}
    rows = [[f"xargs -P {args.cores}", median(t_x), rate["xargs"], 1.0],
            ["hpcbatch API (embedded)", median(t_api), rate["api"], rate["api"] / rate["xargs"]],
            ["hpcbatch submit (CLI, incl. start-up)", median(t_cli), rate["cli"],
             rate["cli"] / rate["xargs"]]]
    print_table(f"{n} `true` tasks, {args.cores} slots, median of {args.repeats}",
                ["runner", "seconds", "tasks/s", "ratio vs xargs"], rows)
    path = write_results("tasks", {
        "tasks": n, "cores": args.cores, "repeats": args.repeats,
        "seconds": {"xargs": t_x, "api": t_api, "cli": t_cli},
        "tasks_per_s": rate,
        "ratio_vs_xargs": {"api": rate["api"] / rate["xargs"],
                           "cli": rate["cli"] / rate["xargs"]},
        "aim": {"ratio_vs_xargs": 0.8},
    }, args.json_out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
