"""The elastic half of the provider seam (Provider.elastic, grow, shrink), as a Slurm
provider will use it: a local provider made elastic (its nodes come only from grow and
go back through shrink; real agents), driven by the real coordinator through resize.

Cases:
* a pool of an elastic provider asks grow() for its target when it starts, and for the
  shortfall on a resize up; each granted node joins and takes work
* a resize down: the nodes leave as the deallocation option says, and each one is given
  back (shrink) only once it has left (its task finished, with task_completion)
"""

from __future__ import annotations

import threading

from helpers import gate, poll

import hpcbatch.poolops
import hpcbatch.providers
from hpcbatch.providers import NodeDesc
from hpcbatch.providers.local import LocalProvider


class ElasticLocal(LocalProvider):
    """Local agents, granted one by one (as allocations would be)."""

    elastic = True
    granted: list[str] = []
    given_back: list[str] = []
    lock = threading.Lock()

    def fixed_nodes(self) -> list[NodeDesc]:
        return []

    def grow(self, n: int) -> list[NodeDesc]:
        with self.lock:
            start = len(self.granted)
            ids = [f"e-{start + i + 1}" for i in range(n)]
            self.granted.extend(ids)
        return [NodeDesc(i, "localhost", self.spec.task_slots_per_node) for i in ids]

    def shrink(self, node_ids) -> None:
        with self.lock:
            self.given_back.extend(node_ids)


def test_an_elastic_provider_grows_and_shrinks_through_the_seam(batch, monkeypatch,
                                                               tmp_path):
    ElasticLocal.granted, ElasticLocal.given_back = [], []
    real = hpcbatch.providers.provider_for

    def provider_for(spec, home):
        return ElasticLocal(spec, home) if spec.id == "el" else real(spec, home)
    monkeypatch.setattr(hpcbatch.providers, "provider_for", provider_for)
    monkeypatch.setattr(hpcbatch.poolops, "provider_for", provider_for)

    def states():
        return {n.id: n.state for n in batch.pools.nodes("el")}
    batch.pools.create("el", task_slots_per_node=1, target_nodes=1)
    poll(lambda: states() == {"e-1": "idle"}, what=f"e-1 granted and up: {states()}")
    batch.pools.resize("el", 3)
    poll(lambda: states() == {"e-1": "idle", "e-2": "idle", "e-3": "idle"},
         what=f"two more granted: {states()}")
    assert ElasticLocal.granted == ["e-1", "e-2", "e-3"]
    job = batch.jobs.create("j", pool="el")
    job.add_tasks({"id": f"t{i}", "command_line": gate(tmp_path / "go")} for i in range(3))
    poll(lambda: job.counts()["running"] == 3, what="a task on each node")
    batch.pools.resize("el", 1, deallocation="task_completion")
    poll(lambda: list(states().values()).count("leaving") == 2, what=f"two leaving: {states()}")
    assert ElasticLocal.given_back == []  # not before their tasks end
    (tmp_path / "go").touch()
    job.wait(timeout_s=60)
    assert job.counts()["succeeded"] == 3 and all(
        len(job.task(f"t{i}").attempts()) == 1 for i in range(3))
    poll(lambda: len(states()) == 1, what=f"one node left: {states()}")
    poll(lambda: len(ElasticLocal.given_back) == 2, what="two nodes given back")
    assert sorted(ElasticLocal.given_back) == sorted(set(ElasticLocal.granted) - set(states()))
