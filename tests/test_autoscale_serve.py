"""Autoscale and resize under a real `hpcbatch serve` (over HTTP): the CLI and REST drive
a formula that the service's coordinator evaluates, and the errors come back as 4xx
{code, message, target}.

Cases:
* `pool autoscale enable` through the service: the pool goes to 0, grows to 2 when a task
  is pending, back to 0 once idle; GET /v1/pools/{id} shows the formula, the evaluations
  and the resizes
* `pool autoscale evaluate` through the service prints the sampled variables
* POST .../evaluateautoscale with a bad formula, .../resize with -1 or an unknown option,
  a manual resize while it autoscales: 400/409 naming the fault, the pool unchanged
"""

from __future__ import annotations

import pytest
from helpers import gate, poll, run_cli

pytest.importorskip("fastapi")
from test_server import Served  # noqa: E402 - the server fixture's class


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path / "hpc home", tmp_path / "logs")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.slow
def test_a_formula_runs_in_the_service_and_its_errors_are_4xx(served):
    c = served.client
    home = served.home
    ok = run_cli(home, "pool", "create", "p", "--nodes", "1", "--slots", "1")
    assert ok.returncode == 0, ok.stderr
    formula = "$TargetNodes = $PendingTasks.GetSample(1) > 0 ? 2 : 0"
    r = run_cli(home, "pool", "autoscale", "enable", "p", "--formula", formula,
                "--interval", "1s")
    assert r.returncode == 0 and "autoscale on, every 1 s" in r.stdout, r.stderr
    poll(lambda: c.get("/v1/pools/p").json()["target_nodes"] == 0, what="p at 0")
    assert run_cli(home, "job", "create", "j", "--pool", "p").returncode == 0
    go = served.home.parent / "go"
    assert run_cli(home, "task", "add", "j", "t", "--", "sh", "-c", gate(go)).returncode == 0
    poll(lambda: c.get("/v1/pools/p").json()["target_nodes"] == 2, what="p at 2")
    poll(lambda: c.get("/v1/jobs/j/taskcounts").json()["running"] == 1, what="t running")
    r = run_cli(home, "pool", "autoscale", "evaluate", "p",
                "$TargetNodes = $CurrentNodes; busy = $RunningTasks")
    assert r.returncode == 0 and "$CurrentNodes = 2 (" in r.stdout and \
        "busy = 1" in r.stdout and "$TargetNodes = 2" in r.stdout, r.stdout + r.stderr
    go.touch()
    poll(lambda: c.get("/v1/jobs/j/taskcounts").json()["succeeded"] == 1, what="t done")
    poll(lambda: c.get("/v1/pools/p").json()["target_nodes"] == 0, what="p at 0 again")
    view = c.get("/v1/pools/p").json()
    assert view["autoscale"]["formula"] == formula and view["autoscale"]["interval_s"] == 1
    moves = [(e["result"]["from"], e["result"]["to"]) for e in view["autoscale_events"]
             if e["kind"] == "resize"]
    assert moves[:3] == [(2, 0), (0, 2), (1, 0)]

    before = c.get("/v1/pools/p").json()
    for path, body, status, words in [
        ("/v1/pools/p/evaluateautoscale", {"formula": "$TargetNodes = 1 +"}, 400,
         "formula: line 1:19: expected a value"),
        ("/v1/pools/p/evaluateautoscale", {"formula": "$TargetNodes = 1 / 0"}, 400,
         "line 1:18: division by zero"),
        ("/v1/pools/p/enableautoscale", {"formula": "$TargetNodes = $Idle"}, 400,
         "unknown variable $Idle"),
        ("/v1/pools/p/resize", {"target_nodes": -1}, 400, "-1 is not a number of nodes"),
        ("/v1/pools/p/resize", {"target_nodes": 1, "deallocation": "soon"}, 400,
         "'soon' is not one of"),
        ("/v1/pools/p/resize", {"target_nodes": 1}, 409, "sized by its autoscale formula"),
    ]:
        r = c.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()
        assert set(err) >= {"code", "message", "target"} and words in err["message"], err
    after = c.get("/v1/pools/p").json()
    assert (after["target_nodes"], after["autoscale"]) == (before["target_nodes"],
                                                           before["autoscale"])
    r = c.post("/v1/pools/p/disableautoscale")
    assert r.status_code == 200 and r.json()["autoscale"] is None
    r = c.post("/v1/pools/p/resize", json={"target_nodes": 1, "deallocation": "terminate"})
    assert r.status_code == 200 and r.json()["target_nodes"] == 1
