"""Command-task throughput: N `true` tasks through hpcbatch vs `xargs -P <cores>`.

xargs runs each line through /bin/sh; hpcbatch runs it as a task (its own task
directory with wd/, stdout.txt and stderr.txt, a process group, a store record).
All runners are interleaved over repeats in the same run; ratios use medians.

Task directories are real files, so the filesystem under HPCBATCH_HOME matters:
the runs are made with the home on tmpfs (/dev/shm, like a node's local scratch)
and on the disk holding the temp directory.

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


def run_api(n: int, cores: int, root: str | None) -> float:
    """Seconds from add_tasks to the last completion (coordinator already up)."""
    with tempfile.TemporaryDirectory(dir=root) as home, \
            hpcbatch.Batch(home, local_slots=cores) as b:
        job = b.jobs.create("bench")

        def go() -> None:
            job.add_tasks({"id": f"t{i}", "command_line": "true"} for i in range(n))
            counts = job.wait(poll_s=0.01)
            assert counts["succeeded"] == n, counts

        return timed(go)


def run_cli(lines: Path, cores: int, root: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=root) as home:
        env = dict(os.environ, HPCBATCH_HOME=home)
        subprocess.run([sys.executable, "-m", "hpcbatch.cli", "submit", "--each-line",
                        str(lines), "--no-progress"], env=env, check=True,
                       stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--disk", action="store_true", help="also run with the home on the disk "
                    "of the temp directory (on a discard-mounted ext4, its deletes slow every "
                    "later run: measured last, kept out of the default)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    disk = tempfile.gettempdir()
    runners = {
        "xargs": lambda lines: timed(lambda: run_xargs(lines, args.cores)),
        "api_tmpfs": lambda lines: run_api(args.tasks, args.cores, shm),
        "cli_tmpfs": lambda lines: timed(lambda: run_cli(lines, args.cores, shm)),
    }
    if args.disk:
        runners["api_disk"] = lambda lines: run_api(args.tasks, args.cores, disk)
    labels = {
        "xargs": f"xargs -P {args.cores} (sh -c per line)",
        "api_tmpfs": "hpcbatch API, home on tmpfs",
        "cli_tmpfs": "hpcbatch submit CLI, home on tmpfs (incl. start-up)",
        "api_disk": f"hpcbatch API, home on disk ({disk})",
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "tasks.txt"
        lines.write_text("true\n" * args.tasks)
        for _ in range(args.repeats):
            for name, fn in runners.items():
                times[name].append(fn(lines))
    n = args.tasks
    rate = {k: n / median(v) for k, v in times.items()}
    ratio = {k: rate[k] / rate["xargs"] for k in times}
    print_table(f"{n} `true` tasks, {args.cores} slots, median of {args.repeats}",
                ["runner", "seconds", "tasks/s", "ratio vs xargs"],
                [[labels[k], median(times[k]), rate[k], ratio[k]] for k in times])
    path = write_results("tasks", {
        "tasks": n, "cores": args.cores, "repeats": args.repeats, "tmpfs": shm, "disk": disk,
        "seconds": times, "tasks_per_s": rate, "ratio_vs_xargs": ratio,
        "aim": {"ratio_vs_xargs": 0.8},
    }, args.json_out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
