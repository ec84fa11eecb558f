"""List queries and kept counts, on real SQLite files in tmp_path.

* the filter language: good filters select what their Python meaning selects (two-valued
  as in OData), bad ones name the position; SQL in a filter, a select or a token is a
  ValidationError and changes nothing
* pages: every matching task exactly once, in submission order, whatever the page size
  and whichever index serves the query (EXPLAIN QUERY PLAN shows an index or a seq
  range, never a scan of the table); select; max_results; continuation tokens
* kept counts equal a COUNT(*) of the rows after random transitions through every write
  of the store, after a process killed inside a transaction and the restart's
  requeue_in_flight, and after the migration from schema 1 and from schema 2
* add_task_collection: per-task errors, all-or-nothing, bounded memory from a generator
* Job.tasks() pages, the CLI's task list / job list page, and the end-of-run summary
  reads a bounded number of rows
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from helpers import run_cli

import hpcbatch.store as store_module
from hpcbatch import query as Q
from hpcbatch.client import Batch
from hpcbatch.errors import Conflict, NotFound, ValidationError
from hpcbatch.models import TaskSpec
from hpcbatch.service import LocalService
from hpcbatch.store import COUNT_KEYS, SCHEMA_VERSION, Store
from hpcbatch.views import AddResult, Page, TaskView

DATA = Path(__file__).parent / "data"
N = 2500  # tasks in the shared job


# ---- a job with tasks in every state ---------------------------------------------------

def _task_id(i: int) -> str:
    return f"sim-{i:05d}" if i % 2 == 0 else f"ana-{i:05d}"


def _finish(seq: int, outcome: str, **kw) -> dict:
    it = dict(seq=seq, outcome=outcome, node_id=None, started_at=None, ended_at=None,
              exit_code=None, signal=None, failure_kind=None, failure_detail=None,
              usage=None, retry_count=0)
    it.update(kw)
    return it


def fill(store: Store, job_id: str, n: int) -> None:
    """n tasks: i % 10 in 0..5 completed (exit 0; 1 when i % 4 == 1; none when i % 20 ==
    5: a timeout), 6 running, 7 preparing, 8..9 active; a retry before the end for
    i % 3 == 0 and a requeue for i % 11 == 0; nodes n0..n3; started_at 1000 + i."""
    store.add_tasks(job_id, (TaskSpec(_task_id(i), f"run {i}") for i in range(n)))
    seqs = [r["seq"] for r in store.list_tasks(job_id)]
    placed = [(i, q) for i, q in enumerate(seqs) if i % 10 <= 7]

    def place(rows):
        store.mark_preparing((q, f"n{i % 4}", f"/tmp/t/{i}", 1000.0 + i) for i, q in rows)

    place(placed)
    store.finish_attempts(_finish(q, "retry", node_id=f"n{i % 4}", started_at=1000.0 + i,
                                  ended_at=1000.5 + i, exit_code=7,
                                  failure_kind="exit_code", retry_count=1)
                          for i, q in placed if i % 3 == 0)
    store.finish_attempts(_finish(q, "requeue", node_id=f"n{i % 4}")
                          for i, q in placed if i % 11 == 0 and i % 3)
    again = [(i, q) for i, q in placed if i % 3 == 0 or i % 11 == 0]
    place(again)
    store.mark_running((q, 1000.0 + i) for i, q in placed if i % 10 <= 6)
    done = []
    for i, q in placed:
        if i % 10 > 5:
            continue
        retries = 1 if i % 3 == 0 else 0
        if i % 20 == 5:
            done.append(_finish(q, "failure", node_id=f"n{i % 4}", started_at=1000.0 + i,
                                ended_at=1000.0 + i + 3, signal=9, failure_kind="timeout",
                                retry_count=retries))
        elif i % 4 == 1:
            done.append(_finish(q, "failure", node_id=f"n{i % 4}", started_at=1000.0 + i,
                                ended_at=1000.0 + i + i % 7, exit_code=1,
                                failure_kind="exit_code", retry_count=retries))
        else:
            done.append(_finish(q, "success", node_id=f"n{i % 4}", started_at=1000.0 + i,
                                ended_at=1000.0 + i + i % 7, exit_code=0,
                                retry_count=retries))
    store.finish_attempts(done)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A home with job 'big' (N tasks, see fill) and an empty job 'empty'; read only."""
    home = tmp_path_factory.mktemp("query") / "home"
    service = LocalService(home)
    service.create_job("big", priority=3)
    fill(service.store, "big", N)
    service.create_job("empty")
    yield service
    service.close()


@pytest.fixture
def service(tmp_path):
    s = LocalService(tmp_path / "home")
    yield s
    s.close()


def rows_of(service: LocalService, job_id: str) -> list[dict]:
    return service.store.list_tasks(job_id)


def ids(page_or_items) -> list[str]:
    items = page_or_items.items if isinstance(page_or_items, Page) else page_or_items
    return [i["id"] for i in items]


def everything(service, job_id: str, flt: str | None, page: int = 1000,
               select=("id", "seq")) -> list[dict]:
    out, token, pages = [], None, 0
    while True:
        p = service.query_tasks(job_id, filter=flt, select=select, max_results=page,
                                continuation=token)
        out += p.items
        pages += 1
        assert len(p.items) <= page
        token = p.continuation
        if token is None:
            return out
        assert p.items, "a page before the last one is full or at least not empty"


# ---- the filter language ----------------------------------------------------------------

def _ne(a, b):
    return a != b  # a null column is "not equal" (two-valued, as OData)


def _lt(a, b):
    return a is not None and a < b


# (filter, what it means on a row)
MEANINGS = [
    ("state eq 'completed' and exit_code ne 0",
     lambda t: t["state"] == "completed" and _ne(t["exit_code"], 0)),
    ("startswith(id,'sim-')", lambda t: t["id"].startswith("sim-")),
    ("startswith(id, 'sim-0001')", lambda t: t["id"].startswith("sim-0001")),
    ("node_id eq 'n3'", lambda t: t["node_id"] == "n3"),
    ("not (exit_code eq 0)", lambda t: t["exit_code"] != 0),
    ("exit_code eq null", lambda t: t["exit_code"] is None),
    ("exit_code ne null and state ne 'completed'",
     lambda t: t["exit_code"] is not None and t["state"] != "completed"),
    ("retry_count ge 1 or requeue_count gt 0",
     lambda t: t["retry_count"] >= 1 or t["requeue_count"] > 0),
    ("(state eq 'active' or state eq 'running') and startswith(id,'ana-')",
     lambda t: t["state"] in ("active", "running") and t["id"].startswith("ana-")),
    ("started_at gt 1500.5", lambda t: t["started_at"] is not None and t["started_at"] > 1500.5),
    ("started_at ge '1970-01-01T00:25:00Z' and started_at lt '1970-01-01T00:30:00+00:00'",
     lambda t: t["started_at"] is not None and 1500 <= t["started_at"] < 1800),
    ("not (ended_at lt 1100)", lambda t: not _lt(t["ended_at"], 1100)),
    ("result eq 'failure' and failure_kind eq 'timeout'",
     lambda t: t["result"] == "failure" and t["failure_kind"] == "timeout"),
    ("failure_kind ne 'timeout' and result eq 'failure'",
     lambda t: t["failure_kind"] != "timeout" and t["result"] == "failure"),
    ("signal eq 9", lambda t: t["signal"] == 9),
    ("priority eq 3 and required_slots le 1 and id le 'ana-00100'",
     lambda t: t["id"] <= "ana-00100"),
    ("id eq 'sim-00042'", lambda t: t["id"] == "sim-00042"),
    ("id gt 'sim-02400' or id lt 'ana-00010'",
     lambda t: t["id"] > "sim-02400" or t["id"] < "ana-00010"),
    ("State EQ 'active' AND Not (node_id Eq 'n1') oR id eq 'sim-00000'",
     lambda t: (t["state"] == "active" and t["node_id"] != "n1") or t["id"] == "sim-00000"),
    ("startswith(id,'')", lambda t: True),
    ("startswith(node_id,'n')", lambda t: t["node_id"] is not None),
    ("not startswith(node_id,'n2')",
     lambda t: not (t["node_id"] or "").startswith("n2")),
    ("startswith(command_line, 'run 12')", lambda t: t["command_line"].startswith("run 12")),
    ("exit_code ge -1 and exit_code lt 1.5e0", None),  # 1.5e0 is not an integer: an error
]


@pytest.mark.parametrize("text,meaning", [m for m in MEANINGS if m[1] is not None],
                         ids=[m[0] for m in MEANINGS if m[1] is not None])
def test_a_filter_selects_what_it_means(shared, text, meaning):
    want = [t["id"] for t in rows_of(shared, "big") if meaning(t)]
    got = ids(everything(shared, "big", text))
    assert got == want
    assert want or text.startswith("exit_code ne null"), "every case matches something"


def test_quotes_unicode_and_long_prefixes(service):
    service.create_job("q")
    names = ["it's", "it''s", "é-1", "é-2", "ê", "a\U0010ffff", "a\U0010ffffb", "b"]
    service.add_tasks("q", [TaskSpec(f"t{i}", "true") for i in range(len(names))])
    # ids must be plain ids; the odd text goes in command lines, filtered by startswith
    for i, name in enumerate(names):
        service.store.update_task(service.store.get_task("q", f"t{i}")["seq"],
                                  command_line=name)
    by = {n: f"t{i}" for i, n in enumerate(names)}
    cases = {
        "command_line eq 'it''s'": ["it's"],
        "command_line eq 'it''''s'": ["it''s"],
        "startswith(command_line,'é')": ["é-1", "é-2"],
        "startswith(command_line,'a\U0010ffff')": ["a\U0010ffff", "a\U0010ffffb"],
        "command_line gt 'é'": ["é-1", "é-2", "ê"],
    }
    for text, want in cases.items():
        assert ids(service.query_tasks("q", filter=text)) == [by[n] for n in want], text


BAD = [
    # (filter, position, what the message says)
    ("state eq 'x'; DROP TABLE tasks", 13, "unexpected character ';'"),  # read first
    ("state eq 'x' or id eq 'y'", 10, "'x' is not a state"),
    ("state eq 'active'; DROP TABLE tasks", 18, "unexpected character ';'"),
    ("1=1 or state eq 'active'", 2, "unexpected character '='"),
    ("1 eq 1", 1, "expected a field name, found '1'"),
    ("state eq 'active' or", 21, "expected a field name, found the end of the filter"),
    ("state eq", 9, "expected a value for state, found the end"),
    ("state = 'active'", 7, "unexpected character '='"),
    ("state equals 'active'", 7, "expected a comparison operator"),
    ("id eq 'abc", 7, "unterminated string"),
    ("foo eq 1", 1, "unknown field 'foo'"),
    ("exit_code eq 'a'", 14, "exit_code is an integer"),
    ("exit_code eq 1.5", 14, "exit_code is an integer"),
    ("exit_code eq 99999999999999999999", 14, "out of range"),
    ("exit_code lt null", 14, "null compares with eq or ne only"),
    ("state gt 'active'", 10, "state compares with eq or ne only"),
    ("(state eq 'active'", 19, "expected ')'"),
    ("state eq 'active')", 18, "expected 'and', 'or' or the end"),
    ("state eq 'active' and and id eq 'x'", 23, "expected a field name, found the keyword"),
    ("startswith(id 'x')", 15, "expected ','"),
    ("startswith(retry_count,'1')", 12, "startswith takes a text field"),
    ("startswith(id, 3)", 16, "startswith takes a quoted prefix"),
    ("started_at gt 'yesterday'", 15, "ISO-8601"),
    ("id eq 'a' -- comment", 11, "unexpected character '-'"),
    ("id eq 'a' /* x */", 11, "unexpected character '/'"),
    ("exit_code eq 1x", 15, "unexpected character 'x' after the number"),
    ("id eq \"a\"", 7, "unexpected character '\"'"),
    ("not", 4, "expected a field name, found the end"),
    ("x" * 2001, 2001, "longer than 2000"),
    ("not " * 40 + "id eq 'a'", 129, "nests deeper than 32"),
    (" or ".join(["id eq 'a'"] * 70), 64 * 13 + 1, "more than 64 conditions"),
]


@pytest.mark.parametrize("text,pos,what", BAD, ids=[b[0][:40] for b in BAD])
def test_a_bad_filter_names_the_position(shared, text, pos, what):
    with pytest.raises(ValidationError) as e:
        shared.query_tasks("big", filter=text)
    assert e.value.field == "filter"
    assert what in e.value.rule, e.value.rule
    assert f"at position {pos}" in e.value.rule, e.value.rule


def test_sql_in_a_query_is_refused_and_changes_nothing(service):
    service.create_job("j")
    service.add_tasks("j", [TaskSpec(f"t{i}", "true") for i in range(5)])
    before = service.store.dump_tables()
    attempts = [
        "state eq 'x'; DROP TABLE tasks",
        "1=1 or",
        "state eq 'active' or 1=1",
        "id eq '' OR '1'='1'",
        "id eq 'x' UNION SELECT * FROM meta",
        "state eq 'active'); DELETE FROM tasks; --",
        "id eq 'a'; UPDATE tasks SET state='completed'",
        "exit_code eq 0 or exit_code eq (SELECT 1)",
        "startswith(id,'t') and id in (select id from tasks)",
        "state eq 'active' --",
        "\0state eq 'active'",
        "id eq 'a'\0",
    ]
    for text in attempts:
        with pytest.raises(ValidationError) as e:
            service.query_tasks("j", filter=text)
        assert e.value.field == "filter", text
    # SQL inside a string is a value, matched as text: nothing has that id
    for text in ["id eq 'x''; DROP TABLE tasks; --'", "id eq ''' OR 1=1 --'",
                 "startswith(id, '%')", "startswith(id, '_')"]:
        assert service.query_tasks("j", filter=text).items == ()
    for select in (["id; DROP TABLE tasks"], ["*"], ["id", "1=1"], "id,state FROM meta"):
        with pytest.raises(ValidationError) as e:
            service.query_tasks("j", select=select)
        assert e.value.field == "select"
    for token in ("'; DROP TABLE tasks; --", "eyJhIjoxfQ", "a" * 2000, "x==", "é"):
        with pytest.raises(ValidationError) as e:
            service.query_tasks("j", continuation=token)
        assert e.value.field == "continuation"
    for text in ("state eq 'active'; DROP TABLE jobs", "id eq 'j' or 1=1"):
        with pytest.raises(ValidationError):
            service.query_jobs(filter=text)
    assert service.store.dump_tables() == before
    assert service.store.integrity_problems() == []


# ---- pages ---------------------------------------------------------------------------------

PAGED = [None, "state eq 'completed'", "state eq 'completed' and exit_code ne 0",
         "startswith(id,'sim-')", "startswith(id,'sim-0001')", "node_id eq 'n1'",
         "exit_code ne 0", "id eq 'ana-00777'", "state eq 'preparing' and startswith(id,'ana')"]


@pytest.mark.parametrize("sparse_rows", [3, store_module.SPARSE_ID_ROWS])
@pytest.mark.parametrize("size", [1000, 97, 1])
def test_paging_returns_every_task_once_in_order(shared, monkeypatch, size, sparse_rows):
    monkeypatch.setattr(store_module, "SPARSE_ID_ROWS", sparse_rows)
    rows = rows_of(shared, "big")
    for text in PAGED if size > 1 else PAGED[4:5] + PAGED[7:8]:
        flt = Q.parse_filter(text)
        meaning = dict((m[0], m[1]) for m in MEANINGS).get(text)
        got = everything(shared, "big", text, size)
        seqs = [i["seq"] for i in got]
        assert seqs == sorted(set(seqs)), text  # each once, in submission order
        if meaning is not None:
            assert [i["id"] for i in got] == [t["id"] for t in rows if meaning(t)], text
        elif text is None:
            assert len(got) == N
        else:  # evaluated by SQLite without the planner's help
            want = [r[0] for r in shared.store._tuples(
                f"SELECT id FROM tasks NOT INDEXED WHERE job_id='big' AND {flt.sql} "
                "ORDER BY seq", flt.params)]
            assert [i["id"] for i in got] == want, text


def test_query_plans_search_an_index_or_a_seq_range(shared, monkeypatch):
    s = shared.store
    monkeypatch.setattr(store_module, "SPARSE_ID_ROWS", 100)  # 5 'sim-0001' ids: few

    def plan(text):
        lines = s.explain_query_tasks("big", Q.parse_filter(text), after=10)
        assert not any(re.match(r"SCAN tasks\b", x) for x in lines), (text, lines)
        return " ".join(lines)

    assert "tasks_by_state (job_id=? AND state=? AND seq>?)" in plan(
        "state eq 'completed' and exit_code ne 0")
    assert "COVERING" in plan("state eq 'completed' and exit_code ne 0")
    sparse = plan("startswith(id,'sim-0001')")
    assert "sqlite_autoindex_tasks_1 (job_id=? AND id>? AND id<?)" in sparse
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan("startswith(id,'sim-')")
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan(None)
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan("node_id eq 'n3'")
    assert "tasks_by_state" in plan("state eq 'active' and startswith(id,'sim-')")
    monkeypatch.setattr(store_module, "SPARSE_ID_ROWS", 3)
    assert "sqlite_autoindex_tasks_1" in plan("id eq 'sim-00042' and state eq 'completed'")
    assert "INTEGER PRIMARY KEY" in plan("startswith(id,'sim-0001')")  # 5 ids: many now
    # the job's seq range is found by seeks, not by walking a state's tasks: SQLite runs
    # a LIMIT 1 in index order as a seek (there is no "B-TREE" sort and no aggregate)
    for sql in (store_module._FIRST_SEQ_SQL, store_module._LAST_SEQ_SQL):
        lines = [r[-1] for r in s._tuples(f"EXPLAIN QUERY PLAN {sql}", ("big", "active"))]
        assert lines == ["SEARCH tasks USING COVERING INDEX tasks_by_state "
                         "(job_id=? AND state=?)"], lines
    assert [r[-1] for r in s._tuples("EXPLAIN QUERY PLAN SELECT active FROM job_counts "
                                     "WHERE job_id=?", ("big",))] == \
        ["SEARCH job_counts USING PRIMARY KEY (job_id=?)"]


def test_select_and_whole_items(shared):
    whole = shared.query_tasks("big", max_results=50).items
    rows = rows_of(shared, "big")[:50]
    assert list(whole) == [TaskView.from_row(r).to_dict() for r in rows]
    assert tuple(whole[0]) == Q.TASK_ITEM_FIELDS
    some = shared.query_tasks("big", select=["exit_code", "id", "id"], max_results=3).items
    assert [tuple(i) for i in some] == [("exit_code", "id")] * 3
    assert shared.query_tasks("big", select="id, state", max_results=1).items[0].keys() == \
        {"id", "state"}
    for bad in (["nope"], [], "", ["id", 3], 7):
        with pytest.raises(ValidationError) as e:
            shared.query_tasks("big", select=bad)
        assert e.value.field == "select"


def test_max_results_is_one_to_a_thousand(shared):
    assert len(shared.query_tasks("big", max_results=1000).items) == 1000
    assert len(shared.query_tasks("big", max_results=1).items) == 1
    for bad in (0, -1, 1001, 10**9, "10", 2.0, True, None):
        with pytest.raises(ValidationError) as e:
            shared.query_tasks("big", max_results=bad)
        assert e.value.field == "max_results"
    last = shared.query_tasks("big", filter="id eq 'sim-00000'")
    assert ids(last) == ["sim-00000"] and last.continuation is None
    assert shared.query_tasks("empty").items == ()
    with pytest.raises(NotFound):
        shared.query_tasks("nojob")


def test_continuation_tokens_are_checked(shared):
    text = "state eq 'completed'"
    first = shared.query_tasks("big", filter=text, max_results=10)
    token = first.continuation
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    second = shared.query_tasks("big", filter=text, max_results=10, continuation=token)
    assert ids(second)[0] not in ids(first)
    raw = bytearray(__import__("base64").urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body = json.loads(raw[:-16])
    assert body["a"] == first.items[-1]["seq"]
    # another position with the old signature: refused
    forged = json.dumps({**body, "a": 1}, separators=(",", ":"), sort_keys=True).encode()
    b64 = __import__("base64").urlsafe_b64encode
    tampered = [token[:-1] + ("A" if token[-1] != "A" else "B"), token[:-3],
                b64(forged + raw[-16:]).decode().rstrip("="), token[1:], token + "AA"]
    for bad in tampered:
        with pytest.raises(ValidationError) as e:
            shared.query_tasks("big", filter=text, continuation=bad)
        assert e.value.field == "continuation"
    with pytest.raises(ValidationError, match="another filter"):
        shared.query_tasks("big", filter="state eq 'active'", continuation=token)
    with pytest.raises(ValidationError, match="another list"):
        shared.query_tasks("empty", filter=text, continuation=token)
    jobs_token = shared.query_jobs(max_results=1).continuation
    with pytest.raises(ValidationError, match="another list"):
        shared.query_tasks("big", continuation=jobs_token)
    # a token of another home's key is refused too
    other = Q.make_token(b"k" * 32, "tasks", "big", Q.parse_filter(text), 5)
    with pytest.raises(ValidationError):
        shared.query_tasks("big", filter=text, continuation=other)


def test_iter_tasks_pages_through(shared):
    got = list(shared.iter_tasks("big", filter="state eq 'running'", page_size=100))
    assert [i["id"] for i in got] == [t["id"] for t in rows_of(shared, "big")
                                      if t["state"] == "running"]
    assert shared.iter_tasks("big").__next__()["id"] == "sim-00000"


def test_query_jobs(service):
    service.create_job("a", priority=5)
    service.create_job("b", priority=-1, on_all_tasks_complete="terminate_job")
    service.create_job("c")
    service.add_tasks("b", [TaskSpec("x", "true"), TaskSpec("y", "true")])
    page = service.query_jobs()
    assert ids(page) == ["a", "b", "c"] and page.continuation is None
    assert [tuple(j) for j in page.items] == [Q.JOB_ITEM_FIELDS] * 3
    views = {v.id: v.to_dict() for v in service.list_jobs(counts=True)}
    assert {j["id"]: j for j in page.items} == views
    assert page.items[1]["counts"] == {**{k: 0 for k in COUNT_KEYS}, "active": 2, "total": 2}
    assert ids(service.query_jobs(filter="priority gt 0")) == ["a"]
    assert ids(service.query_jobs(filter="on_all_tasks_complete eq 'terminate_job'")) == ["b"]
    assert ids(service.query_jobs(filter="startswith(id,'b') or state ne 'active'")) == ["b"]
    assert ids(service.query_jobs(filter="created_at gt '2001-01-01T00:00:00'")) == \
        ["a", "b", "c"]
    assert ids(service.query_jobs(filter="completed_at ne null")) == []
    one = service.query_jobs(max_results=2, select=["id"])
    assert one.items == ({"id": "a"}, {"id": "b"})
    rest = service.query_jobs(max_results=2, select=["id"], continuation=one.continuation)
    assert rest.items == ({"id": "c"},) and rest.continuation is None
    with pytest.raises(ValidationError, match="unknown field 'exit_code'"):
        service.query_jobs(filter="exit_code eq 0")


# ---- kept counts ---------------------------------------------------------------------------

def assert_counts_right(store: Store, *jobs: str) -> None:
    assert store.count_problems() == []
    for j in jobs:
        assert store.task_counts(j) == store.counted_task_counts(j)
        c = store.task_counts(j)
        assert store.unfinished(j) == c["active"] + c["preparing"] + c["running"]


OPS = ["add", "prepare", "run", "finish", "finish_one", "unstarted", "update", "restart",
       "reactivate", "delete", "collection"]


def test_the_shared_jobs_counts_are_right(shared):
    assert_counts_right(shared.store, "big", "empty")
    c = shared.job_counts("big")
    assert (c["total"], c["completed"], c["running"], c["preparing"]) == (N, 1500, 250, 250)
    assert c["timed_out"] == sum(1 for i in range(N) if i % 10 <= 5 and i % 20 == 5) > 0


def test_counts_follow_random_transitions(service):
    s = service.store
    rng = random.Random(10)
    service.create_job("r", max_task_retry_count=2)
    service.create_job("other")
    s.add_tasks("other", [TaskSpec("o", "true")])
    n = 0
    ran = set()
    for _ in range(150):
        rows = s.list_tasks("r")
        by = {st: [r for r in rows if r["state"] == st]
              for st in ("active", "preparing", "running", "completed")}
        op = rng.choices(OPS, weights=[2, 4, 4, 4, 2, 1, 1, 1, 1, 1, 1])[0]
        if op == "add" or not rows:
            ran.add(op)
            k = rng.randint(1, 30)
            s.add_tasks("r", (TaskSpec(f"t{n + i}", "true") for i in range(k)))
            n += k
        elif op == "prepare" and by["active"]:
            ran.add(op)
            k = min(rng.choice([3, 40]), len(by["active"]))  # 40: a batch bound as JSON
            s.mark_preparing((r["seq"], "n1", "/d", 1.0) for r in rng.sample(by["active"], k))
        elif op == "run" and by["preparing"]:
            ran.add(op)
            picked = rng.sample(by["preparing"], min(rng.choice([3, 40]), len(by["preparing"])))
            picked += by["active"][:1]  # an active one is left as it is
            s.mark_running((r["seq"], 2.0) for r in picked)
        elif op == "finish" and by["running"] + by["preparing"]:
            ran.add(op)
            pool = by["running"] + by["preparing"]
            items = []
            for r in rng.sample(pool, min(rng.choice([3, 40]), len(pool))):
                outcome = rng.choice(["success", "failure", "retry", "requeue"])
                items.append(_finish(
                    r["seq"], outcome, node_id="n1", started_at=2.0, ended_at=3.0,
                    exit_code=0 if outcome == "success" else 1,
                    failure_kind=None if outcome == "success" else
                    rng.choice(["exit_code", "timeout"]),
                    retry_count=r["retry_count"] + (outcome == "retry")))
            s.finish_attempts(items)
        elif op == "finish_one" and by["running"]:
            ran.add(op)
            r = rng.choice(by["running"])
            s.finish_attempt(r["seq"], outcome=rng.choice(["failure", "retry", "requeue"]),
                             node_id="n1", started_at=2.0, ended_at=3.0, exit_code=None,
                             signal=15, failure_kind="timeout", failure_detail=None,
                             usage=None, retry_count=r["retry_count"] + 1)
        elif op == "unstarted" and by["active"]:
            ran.add(op)
            s.complete_unstarted(rng.choice(by["active"])["seq"], "killed", "terminate", 4.0)
        elif op == "update":
            ran.add(op)
            r = rng.choice(rows)
            s.update_task(r["seq"], state=rng.choice(["active", "completed"]),
                          result=rng.choice([None, "success", "failure"]),
                          failure="timeout", requeue_count=rng.randint(0, 3))
        elif op == "restart":  # as a coordinator starting on the home does
            ran.add(op)
            again = Store(s.path)
            again.requeue_in_flight()
            again.close()
        elif op == "reactivate":
            ran.add(op)
            failed = [r for r in by["completed"] if r["result"] == "failure"]
            if failed:
                s.reactivate_task(rng.choice(failed)["seq"])
        elif op == "delete":
            ran.add(op)
            s.delete_task(rng.choice(rows)["seq"])
        elif op == "collection":
            ran.add(op)
            got = service.add_task_collection(
                "r", [{"id": f"t{n}", "command_line": "x"}, {"id": rows[0]["id"],
                                                             "command_line": "x"},
                      {"nope": 1}], atomic=False)
            assert got.added == 1 and len(got.errors) == 2
            n += 1
        assert_counts_right(s, "r", "other")
    assert len(ran) == 11, " ".join(sorted(ran))  # every kind of write was made
    assert s.task_counts("other")["total"] == 1
    s.terminate_job_tasks("r", 9.0, in_flight=True)
    assert_counts_right(s, "r")
    assert s.unfinished("r") == 0
    s.delete_job("r")
    assert_counts_right(s, "other")
    assert s.task_counts("r")["total"] == 0


CRASH = textwrap.dedent("""
    import os, signal, sys
    from hpcbatch.store import Store
    s = Store(sys.argv[1])
    rows = s.list_tasks("crash")
    s.mark_preparing((r["seq"], "n1", "/d", 1.0) for r in rows[:300])
    s.mark_running((r["seq"], 2.0) for r in rows[:200])
    with s.transaction() as db:  # killed with half a turn written
        s.finish_attempts([dict(seq=r["seq"], outcome="success", node_id="n1",
                                started_at=2.0, ended_at=3.0, exit_code=0, signal=None,
                                failure_kind=None, failure_detail=None, usage=None,
                                retry_count=0) for r in rows[:100]])
        s.mark_preparing((r["seq"], "n2", "/d", 1.0) for r in rows[300:400])
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_counts_after_a_kill_and_the_restarts_requeue(service):
    service.create_job("crash")
    service.add_tasks("crash", [TaskSpec(f"t{i}", "true") for i in range(1000)])
    p = subprocess.run([sys.executable, "-c", CRASH, str(service.store.path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    s = Store(service.store.path)
    try:
        assert_counts_right(s, "crash")
        c = s.task_counts("crash")
        assert (c["preparing"], c["running"], c["completed"]) == (100, 200, 0)
        assert s.requeue_in_flight() == 300
        assert_counts_right(s, "crash")
        assert s.task_counts("crash")["requeued"] == 300
        assert s.task_counts("crash")["active"] == 1000
    finally:
        s.close()


def test_the_migration_counts_a_schema_1_home(tmp_path):
    path = tmp_path / "state.db"
    shutil.copyfile(DATA / "state-v1.db", path)
    s = Store(path)
    try:
        assert s.schema_version() == store_module.SCHEMA_VERSION
        assert_counts_right(s, *[j["id"] for j in s.list_jobs()])
        assert s.task_counts("done")["total"] == 7 and s.task_counts("later")["active"] >= 1
        assert len(s.query_key()) == 32
    finally:
        s.close()


def test_the_migration_counts_a_schema_2_home(tmp_path):
    """A home made by schema-2 code: its tasks were counted by scanning; opened by this
    code its counts are backfilled once, and the index widened."""
    home = tmp_path / "home"
    service = LocalService(home)
    service.create_job("j")
    fill(service.store, "j", 300)
    want = service.store.counted_task_counts("j")
    service.close()
    db = sqlite3.connect(home / "state.db")  # back to what schema 2 wrote
    db.executescript("""
        DROP TABLE job_counts;
        DROP TABLE autoscale;
        DROP TABLE pool_events;
        DROP TABLE job_node_tasks;
        DROP INDEX tasks_by_state;
        CREATE INDEX tasks_by_state ON tasks (job_id, state);
        DELETE FROM meta WHERE key = 'query_key';
        UPDATE meta SET value = '2' WHERE key = 'schema_version';
    """)
    db.close()
    s = Store(home / "state.db")
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.task_counts("j") == want
        assert_counts_right(s, "j")
        index = s._tuples("SELECT sql FROM sqlite_master WHERE name='tasks_by_state'")[0][0]
        assert "(job_id, state, seq, exit_code)" in index
        assert s.integrity_problems() == []
    finally:
        s.close()


def test_recount_repairs_counts_changed_outside_the_store(service):
    service.create_job("j")
    service.add_tasks("j", [TaskSpec("a", "true")])
    service.store.db.execute("UPDATE job_counts SET total = 99")  # as another tool might
    assert service.store.count_problems() != []
    service.store.recount()
    assert_counts_right(service.store, "j")


# ---- adding collections ----------------------------------------------------------------------

def test_a_collection_reports_each_bad_task_and_stores_the_rest(service):
    service.create_pool("two", task_slots_per_node=2, target_nodes=1)
    service.create_job("c", "two")
    service.add_tasks("c", [TaskSpec("old", "true")])
    tasks = [
        {"id": "a", "command_line": "true"},
        {"id": "old", "command_line": "true"},  # already in the job
        {"id": "b", "command_line": "true", "required_slots": 3},  # wider than a node
        {"id": "bad id!", "command_line": "true"},
        {"command_line": "true"},
        "not a task",
        {"id": "a", "command_line": "again"},  # twice in this request
        TaskSpec("c", "true"),
        {"id": "d", "command_line": "true", "colour": "red"},
    ]
    got = service.add_task_collection("c", tasks, atomic=False)
    assert isinstance(got, AddResult) and got.added == 2
    assert [(e.index, e.task_id, e.code, e.target) for e in got.errors] == [
        (1, "old", "Conflict", None),
        (2, "b", "Conflict", None),
        (3, "bad id!", "ValidationError", "task.id"),
        (4, None, "ValidationError", "task"),
        (5, None, "ValidationError", "task"),
        (6, "a", "ValidationError", "task.id"),
        (8, "d", "ValidationError", "task"),
    ]
    assert "already exists in job 'c'" in got.errors[0].message
    assert got.errors[5].message == "task.id: 'a' appears twice in this request"
    assert AddResult.from_dict(got.to_dict()) == got
    assert [t["id"] for t in service.store.list_tasks("c")] == ["old", "a", "c"]
    assert_counts_right(service.store, "c")


def test_an_atomic_collection_is_all_or_nothing(service):
    service.create_job("c")
    service.add_tasks("c", [TaskSpec("old", "true")])
    before = service.store.dump_tables()
    many = [{"id": f"t{i}", "command_line": "true"} for i in range(2500)]
    cases = [
        (many + [{"id": "old", "command_line": "x"}], Conflict, "'old' already exists"),
        (many + [{"id": "t5", "command_line": "x"}], ValidationError, "'t5' appears twice"),
        (many[:1500] + [{"id": "x"}] + many[1500:], ValidationError, "needs both"),
    ]
    for tasks, kind, what in cases:
        with pytest.raises(kind, match=what):
            service.add_task_collection("c", iter(tasks), atomic=True)
        with pytest.raises(kind, match=what):
            service.add_tasks("c", iter(tasks))
        assert service.store.dump_tables() == before
    assert service.add_task_collection("c", iter(many)) == AddResult(2500, ())
    assert_counts_right(service.store, "c")


def test_tasks_from_a_generator_are_added_in_bounded_memory(service):
    service.create_job("g")
    n = 20_000
    consumed = []

    def tasks():
        for i in range(n):
            consumed.append(i)
            yield {"id": f"task-{i:06d}", "command_line": f"echo {i} " + "x" * 200,
                   "environment": {"I": str(i)}}

    tracemalloc.start()
    try:
        assert service.add_tasks("g", tasks()) == n
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # these 20,000 tasks held at once take ~15 MiB in Python; a chunk at a time, ~1 MiB
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert len(consumed) == n and service.job_counts("g")["total"] == n


# ---- the Python API and the CLI ------------------------------------------------------------

def test_job_tasks_is_a_paged_iterable(shared, monkeypatch):
    calls = []
    real = shared.query_tasks

    def counting(*a, **kw):
        calls.append(kw.get("max_results"))
        return real(*a, **kw)

    monkeypatch.setattr(shared, "query_tasks", counting)
    batch = Batch(service=shared)
    job = batch.jobs.get("big")
    tasks = job.tasks(page_size=300)
    first = next(iter(tasks))
    assert first.id == "sim-00000" and calls == [300]
    everything_ = list(tasks)
    assert len(everything_) == N and len(calls) == 1 + 9
    assert [t.id for t in everything_] == [t["id"] for t in rows_of(shared, "big")]
    running = job.tasks("running")
    assert len(running) == shared.job_counts("big")["running"] == len(list(running))
    assert len(job.tasks(filter="startswith(id,'sim-')")) == N // 2
    assert len(job.tasks("completed") + job.tasks("active")) == \
        shared.job_counts("big")["completed"] + shared.job_counts("big")["active"]
    assert all(t.state == "running" for t in running)
    with pytest.raises(ValidationError, match="state"):
        job.tasks("bogus")
    page = job.query("exit_code ne 0 and state eq 'completed'", select=["id"], max_results=5)
    assert len(page.items) == 5 and page.continuation
    assert [j.id for j in batch.jobs.list(filter="priority eq 3")] == ["big"]
    assert batch.jobs.list(filter="priority eq 3", counts=True)[0].counts["total"] == N
    assert batch.jobs.query(select=["id"]).items == ({"id": "big"}, {"id": "empty"})


def test_cli_lists_page_with_a_continuation(shared):
    home = shared.home
    first = run_cli(home, "task", "list", "big", "--max", "5", "--state", "completed")
    assert first.returncode == 0, first.stderr
    completed = [t["id"] for t in rows_of(shared, "big") if t["state"] == "completed"]
    assert re.findall(r"(?:sim|ana)-\d{5}", first.stdout) == completed[:5]
    m = re.search(r"showing 5 of (\d+) tasks; the next ones: add --continuation (\S+)",
                  first.stderr)
    assert m and int(m.group(1)) == len(completed), first.stderr
    second = run_cli(home, "task", "list", "big", "--max", "1500", "--state", "completed",
                     "--continuation", m.group(2))
    assert re.findall(r"(?:sim|ana)-\d{5}", second.stdout) == completed[5:1505]
    picked = run_cli(home, "task", "list", "big", "--filter",
                     "exit_code ne 0 and startswith(id,'ana-')", "--select", "id,exit_code",
                     "--max", "3", "--failed")
    assert picked.returncode == 0, picked.stderr
    header = picked.stdout.splitlines()[1]
    assert "id" in header and "exit_code" in header and "state" not in header
    want = [t["id"] for t in rows_of(shared, "big") if t["result"] == "failure"
            and t["exit_code"] != 0 and t["id"].startswith("ana-")]
    assert re.findall(r"ana-\d{5}", picked.stdout) == want[:3]
    assert "showing 3 tasks; the next ones" in picked.stderr
    bad = run_cli(home, "task", "list", "big", "--filter", "state eq 'done'")
    assert bad.returncode == 2
    assert "error: filter: 'done' is not a state at position 10" in bad.stderr
    bad = run_cli(home, "task", "list", "big", "--select", "id,nope")
    assert bad.returncode == 2 and "select: unknown field 'nope'" in bad.stderr
    jobs = run_cli(home, "job", "list", "--filter", "priority gt 0")
    assert "big" in jobs.stdout and "empty" not in jobs.stdout and str(N) in jobs.stdout
    jobs = run_cli(home, "job", "list", "--max", "1", "--select", "id,state")
    assert "big" in jobs.stdout and "empty" not in jobs.stdout
    assert "showing 1 jobs; the next ones: add --continuation" in jobs.stderr
    show = run_cli(home, "job", "show", "big")
    c = shared.job_counts("big")
    assert f"tasks {N}: active {c['active']}" in show.stdout


def test_the_summary_reads_a_bounded_number_of_rows(shared, monkeypatch, capsys):
    from hpcbatch import cli
    read: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(shared, name)

        def query_tasks(self, *a, **kw):
            page = shared.query_tasks(*a, **kw)
            read.append(len(page.items))
            return page

        def iter_tasks(self, *a, **kw):
            return LocalService.iter_tasks(self, *a, **kw)

        def list_tasks(self, *a, **kw):
            raise AssertionError("the summary must not list every task")

    counts = shared.job_counts("big")
    cli._summary(Counting(), "big", counts)
    text = capsys.readouterr().out
    assert sum(read) <= cli.SUMMARY_FAILED + N  # this job is small enough for 'slowest'
    assert "slowest tasks" in text and f"failed tasks ({counts['failed']})" in text
    assert re.search(rf"│\s+{N} │\s+{counts['succeeded']} │\s+{counts['failed']} │\s+"
                     rf"{counts['timed_out']} │\s+{counts['retried']} │\s+"
                     rf"{counts['requeued']} │", text), text
    read.clear()
    monkeypatch.setattr(cli, "SUMMARY_SLOWEST_UP_TO", 100)  # as for a big job
    cli._summary(Counting(), "big", counts)
    text = capsys.readouterr().out
    assert sum(read) == cli.SUMMARY_FAILED and "slowest tasks" not in text
    assert f"({counts['failed'] - cli.SUMMARY_FAILED} more" in text
