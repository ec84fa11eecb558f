"""Autoscale on real sshd nodes (tests/conftest_ssh.py's three-node cluster): the
acceptance test of issue 12's ssh half, and the host list as an SSH pool's capacity.

Cases:
* a formula takes a 3-host SSH pool from 0 to 3 nodes when 50 tasks are pending and back
  to 0 when it is idle, each within two evaluation intervals (1.5 s); every task runs
  exactly once (a marker file per task, one line each); every evaluation and resize is
  recorded and shown by the pool's view
* the pool's host list stays as it was; a resize to 2 takes the first two hosts in, a
  resize to 4 is refused naming both numbers
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import poll

from hpcbatch.errors import ValidationError

INTERVAL_S = 1.5
FORMULA = """
// as many nodes as 10 pending tasks need, at most the 3 hosts; none when idle
$pending = $PendingTasks.GetSample(1);
$TargetNodes = $pending > 0 ? min(3, ceil($pending / 10)) : 0;
$NodeDeallocationOption = taskcompletion;
"""


def node_ids(batch, pool: str) -> list[str]:
    return sorted(n.id for n in batch.pools.nodes(pool))


def resizes(batch, pool: str, to: int) -> list[dict]:
    return [e for e in batch.pools.get(pool).autoscale_events
            if e["kind"] == "resize" and e["result"]["to"] == to and not e["error"]]


@pytest.mark.slow
def test_a_formula_grows_an_ssh_pool_from_0_to_3_and_back_within_two_intervals(
        ssh_cluster, batch, tmp_path):
    spec = json.loads((ssh_cluster.directory / "pool.json").read_text())
    spec["python"] = sys.executable
    spec["node_root"] = str(tmp_path / "node roots")
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(spec))
    batch.pools.create("elastic", "ssh", spec=str(path), task_slots_per_node=2)
    hosts = [h["name"] for h in batch.pools.get("elastic").provider_config["hosts"]]
    assert hosts == ["node1", "node2", "node3"]
    batch.pools.enable_autoscale("elastic", FORMULA, interval_s=INTERVAL_S)
    poll(lambda: resizes(batch, "elastic", 0), timeout_s=30, what="a resize to 0 (idle)")
    poll(lambda: node_ids(batch, "elastic") == [], timeout_s=60, what="the pool at 0")
    assert batch.pools.get("elastic").target_nodes == 0

    marks = tmp_path / "marks"
    marks.mkdir()
    job = batch.jobs.create("j", pool="elastic")
    job.add_tasks({"id": f"t{i:02d}", "command_line":
                   f'echo "$HPCBATCH_NODE_ID" >> "{marks}/$HPCBATCH_TASK_ID"; sleep 0.2'}
                  for i in range(50))
    asked = time.time()
    grown = poll(lambda: resizes(batch, "elastic", 3), timeout_s=30, what="a resize to 3")
    assert grown[-1]["at"] - asked <= 2 * INTERVAL_S, grown[-1]
    poll(lambda: node_ids(batch, "elastic") == hosts, timeout_s=30, what="3 nodes in")
    job.wait(timeout_s=120)
    done = time.time()
    # every task once: 50 markers of one line each
    runs = {p.name: p.read_text().split() for p in marks.iterdir()}
    assert sorted(runs) == [f"t{i:02d}" for i in range(50)]
    assert all(len(v) == 1 for v in runs.values()), runs
    assert job.counts()["succeeded"] == 50
    assert len({n for v in runs.values() for n in v}) >= 2  # spread over the nodes

    shrunk = poll(lambda: [e for e in resizes(batch, "elastic", 0) if e["at"] > asked],
                  timeout_s=30, what="a resize back to 0")
    assert shrunk[-1]["at"] - done <= 2 * INTERVAL_S, shrunk[-1]
    print(f"\nautoscale figures: pending -> resize to 3 in {grown[-1]['at'] - asked:.2f} s, "
          f"job done -> resize to 0 in {shrunk[-1]['at'] - done:.2f} s "
          f"(interval {INTERVAL_S} s)")
    poll(lambda: node_ids(batch, "elastic") == [], timeout_s=30, what="the pool at 0 again")
    view = batch.pools.get("elastic")
    assert view.autoscale["interval_s"] == INTERVAL_S
    evals = [e for e in view.autoscale_events if e["kind"] == "evaluation"]
    assert evals and all(e["error"] is None for e in evals)
    assert evals[0]["result"]["deallocation"] == "taskcompletion"
    assert [h["name"] for h in view.provider_config["hosts"]] == hosts  # unchanged

    # by hand: the host list is the capacity
    batch.pools.disable_autoscale("elastic")
    batch.pools.resize("elastic", 2)
    poll(lambda: node_ids(batch, "elastic") == ["node1", "node2"], timeout_s=30,
         what="the first two hosts in")
    with pytest.raises(ValidationError, match="has 3 host.s. in its host list, fewer than "
                       "the target of 4"):
        batch.pools.resize("elastic", 4)
    assert batch.pools.get("elastic").target_nodes == 2
    batch.pools.resize("elastic", 1, deallocation="retained_data")
    poll(lambda: node_ids(batch, "elastic") == ["node1"], timeout_s=30, what="node2 out")
    assert [h["name"] for h in batch.pools.get("elastic").provider_config["hosts"]] == hosts
