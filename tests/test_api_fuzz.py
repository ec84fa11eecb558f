"""The API fuzzed from its own OpenAPI document (schemathesis), against a live server.

`hpcbatch serve --store-only` (the API and the store, no coordinator: generated command
lines are stored, never run) on a fresh home with a job and a task in it, so that some
generated requests reach real objects. Every operation of /openapi.json gets a bounded
number of generated requests, valid and invalid ones, and every answer is checked:
no 5xx, the status code, content type, headers and body are the ones the document
gives, invalid data is refused, valid data is taken, and auth is not ignored.

Bounded: FUZZ_EXAMPLES per operation (HPCBATCH_FUZZ_EXAMPLES to change it), about a
minute on two cores.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from test_server import Served  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("HPCBATCH_FUZZ_EXAMPLES", "12"))

# a collection's body is validated task by task by design (Azure Batch's addCollection):
# a bad task is reported in the 200 answer, so "invalid data" is taken
PER_ITEM = {"POST /v1/jobs/{job_id}/addtaskcollection"}
# valid per the document, yet refused (400) for what only the server knows: whether a
# resource file exists on its disk, a provider's options, a kernel's parameters, a filter
# in the query language, a continuation token it made, the SHA-256 of the bytes sent,
# whether a container URL's fsspec backend is installed there, an archive uploaded to it
STATEFUL = {"POST /v1/pools", "POST /v1/submit", "POST /v1/jobs/{job_id}/tasks",
            "POST /v1/jobs/{job_id}/addtaskcollection", "POST /v1/runs", "GET /v1/jobs",
            "GET /v1/jobs/{job_id}/tasks", "PUT /v1/uploads/{sha256}",
            "POST /v1/storage", "POST /v1/apps"}
# long-polls and streams end at once under the fuzzer
QUICK = {"GET /v1/changes": {"timeout": 0}, "GET /v1/events": {"timeout": 0}}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    s = Served(base / "hpc home", base / "logs", "--store-only")
    try:
        c = s.client
        assert c.post("/v1/jobs", json={"id": "x"}).status_code == 201
        assert c.post("/v1/jobs/x/tasks", json={"id": "x", "command_line": "true"}
                      ).status_code == 201
        yield s
    finally:
        s.stop()


def _fuzz(strategy, auth: dict, excluded: list):
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        case.call_and_validate(headers=auth, timeout=30, excluded_checks=excluded)
    return check


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_api_holds_to_its_openapi_document(fuzzed, mode):
    """Each operation: FUZZ_EXAMPLES generated requests of the mode (valid or invalid)."""
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
    )
    auth = {"Authorization": f"Bearer {fuzzed.key}"}
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", headers=auth,
                                           timeout=30)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        excluded = [negative_data_rejection] if op.label in PER_ITEM else []
        if op.label in STATEFUL:
            excluded.append(positive_data_acceptance)
        strategy = op.as_strategy(GenerationMode(mode), query=QUICK.get(op.label))
        try:
            _fuzz(strategy, auth, excluded)()
        except Unsatisfiable:  # nothing of this operation can be made invalid (GET /health)
            assert mode == "negative", op.label
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - report them all
            failures.append(f"{op.label}: {type(exc).__name__}: {exc}"[:3000])
    assert operations >= 30
    assert not failures, "\n\n".join(failures)
