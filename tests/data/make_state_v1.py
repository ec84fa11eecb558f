"""Make tests/data/state-v1.db with the hpcbatch from before schema 2 (kept for the record).

Run from a checkout of that code (commit 32a35ec):
    cd OLD_CHECKOUT && PYTHONPATH=. python /path/to/make_state_v1.py OUT.db

A real coordinator runs the finished tasks (success, a retried failure, a success on its
retry, a signal, a timeout, a start failure, a terminate, a multi-instance task); then,
with the coordinator gone, tasks are left active (never dispatched) and in flight
(preparing / running) and retried exactly as that coordinator writes them.

A fixture generator for the schema-1 code, not a test: it keeps its raw SQL (VACUUM and
PRAGMAs that make the file small), which the tests themselves leave to Store methods.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hpcbatch.client import Batch, open_store
from hpcbatch.models import JobSpec, PoolSpec, TaskSpec

out = Path(sys.argv[1])
work = Path(tempfile.mkdtemp(prefix="hpcbatch-v1-"))
home = work / "home"
marker = work / "marker"
gone = work / "gone.txt"
gone.write_text("staged\n")

store = open_store(home)
store.create_pool(PoolSpec("pair", "local", task_slots_per_node=2, target_nodes=2))
store.create_job(JobSpec("done", "local", priority=5, max_task_retry_count=1,
                         on_all_tasks_complete="terminate_job"))
store.create_job(JobSpec("mpi", "pair", priority=0, on_all_tasks_complete="terminate_job"))
store.add_tasks("done", [
    TaskSpec("ok", "true", environment={"X": "1"}),
    TaskSpec("flaky", "exit 3"),  # the job's one retry, then a failure
    TaskSpec("second-try", f"test -e {marker} || {{ touch {marker}; exit 1; }}"),
    TaskSpec("sig", "kill -TERM $$", max_task_retry_count=0),
    TaskSpec("slow", "sleep 5", max_wall_clock_time_s=0.3, max_task_retry_count=0),
    TaskSpec("nofile", "cat gone.txt", resource_files=[str(gone)], max_task_retry_count=0),
])
store.add_tasks("mpi", [TaskSpec("mi", "true", multi_instance={
    "instances": 2, "coordination_command": "true", "slots_per_instance": 1})])
store.close()
gone.unlink()  # staging it fails: 'start_failed: ...'

with Batch(home, local_slots=2) as batch:
    job = batch.jobs.get("done")
    job.add_task("stop-me", "sleep 30", max_task_retry_count=0)
    deadline = time.monotonic() + 30
    while batch.store.get_task("done", "stop-me")["state"] != "running":
        assert time.monotonic() < deadline, "stop-me never ran"
        time.sleep(0.05)
    job.terminate_task("stop-me")
    job.wait(timeout_s=60)
    batch.jobs.get("mpi").wait(timeout_s=60)

store = open_store(home)
store.create_job(JobSpec("later", "local", priority=-3, max_task_retry_count=2))
store.add_tasks("later", [
    TaskSpec("a", "true"),
    TaskSpec("b", "echo b", required_slots=2, max_task_retry_count=-1),
    TaskSpec("c", "true"),
    TaskSpec("d", "true"),
    TaskSpec("e", "exit 1"),
])
now = time.time()
root = str(home / "nodes" / "local" / "local-1")
with store.transaction():
    for tid, state in (("c", "preparing"), ("d", "running")):
        seq = store.get_task("later", tid)["seq"]
        store.update_task(seq, state="preparing", node_id="local-1",
                          task_dir=os.path.join(root, "jobs", "later", tid), started_at=now)
        if state == "running":
            store.update_task(seq, state="running", started_at=now + 0.1)
    # a failed attempt that is retried: back in the queue, its exit kept (as _record_exit does)
    store.update_task(store.get_task("later", "e")["seq"], state="active", node_id=None,
                      retry_count=1, exit_code=1, signal=None, failure="exit_code",
                      started_at=now - 2, ended_at=now - 1, usage='{"maxrss_kb": 1000}')
for pragma in ("journal_mode=DELETE", "page_size=1024", "journal_mode=WAL"):  # small file
    if pragma.startswith("journal_mode=WAL"):
        store.db.execute("VACUUM")
    store.db.execute(f"PRAGMA {pragma}")
store.close()
shutil.copyfile(home / "state.db", out)
shutil.rmtree(work)
print(f"{out}: {out.stat().st_size} bytes")
