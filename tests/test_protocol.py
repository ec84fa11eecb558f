"""The agent protocol module: every message round-trips; bad lines say what is wrong."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from hpcbatch.launch import protocol as P

COORD = [
    P.Run(id=1, cmd="echo hi", dir="/n/jobs/j/t", env={"A": "b"}),
    P.Run(id="12.c0", cmd="sh -c 'x'", dir="/d", env={}, timeout_s=2.5, slots=4,
          files={"hostfile": "node1 slots=4\n"}, dirs=("shared",), log_prefix="coordination-"),
    P.Run(id="__start_task__", cmd="true", dir="/d", env={"U": "ünï \"q\" $HOME\n"},
          timeout_s=None, files=None),
    P.Kill(id=3), P.Kill(id="3.a", reason="instance_failed"),
    P.Reap(match={"HPCBATCH_JOB_ID": "j"}), P.Reap(match={}, sessions=(123, 456)),
    P.Ping(), P.Ping(t=1700000000.25), P.Shutdown(),
]
AGENT = [
    P.Hello(node_id="n1", root="/r", pid=10, hostname="h", slots=2, cores=8,
            python="/usr/bin/python3", protocol=P.PROTOCOL_VERSION, token="abc"),
    P.Hello(node_id="n1", root="/r", pid=10, hostname="h", slots=2, cores=None,
            python="python3", protocol=1),
    P.Events(items=()),
    P.Events(items=(
        P.Started(id=1, pid=99, t=1.5),
        P.Exited(id=1, exit_code=0, start=1.5, end=2.0,
                 usage={"utime_s": 0.1, "stime_s": 0.0, "maxrss_kb": 1000}),
        P.Exited(id="5.a", exit_code=None, signal=9, timed_out=True, killed="terminate"),
        P.Exited(id=2, exit_code=None, start_failed="environment variable X: NUL"),
        P.Reaped(match={"A": "1"}, pids=(1, 2)),
        P.Error(message="agent skipped a line"), P.Error(message="about a run", id="4.c1"),
    )),
    P.Heartbeat(t=3.0), P.Heartbeat(t=3.0, running=(1, "2.a"), queued=(3,)),
    P.Bye(),
]


@pytest.mark.parametrize("msg", COORD, ids=lambda m: type(m).__name__)
def test_coordinator_messages_round_trip(msg):
    line = P.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert P.decode_op(line) == msg
    assert P.decode_op(line.decode()) == msg  # str lines too


@pytest.mark.parametrize("msg", AGENT, ids=lambda m: type(m).__name__)
def test_agent_messages_round_trip(msg):
    line = P.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert P.decode_ev(line) == msg


def test_every_message_class_is_covered_and_named_once():
    covered = {type(m) for m in COORD + AGENT}
    covered |= {type(i) for m in AGENT if isinstance(m, P.Events) for i in m.items}
    assert covered == set(P.OPS.values()) | set(P.EVS.values()) | set(P.ITEMS.values())
    names = [*P.OPS, *P.EVS, *P.ITEMS]
    assert len(names) == len(set(names))


def test_the_wire_keeps_its_shape():
    """What older tooling and logs read: an "op"/"ev" key and plain JSON fields."""
    assert json.loads(P.encode(P.Kill(id=3))) == {"op": "kill", "id": 3, "reason": "terminate"}
    ev = json.loads(P.encode(P.Events((P.Started(id=1, pid=2, t=0.5),))))
    assert ev == {"ev": "events", "items": [{"ev": "started", "id": 1, "pid": 2, "t": 0.5}]}


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.Kill(id=1).id = 2  # type: ignore[misc]


def test_unknown_fields_are_ignored_and_defaults_fill_in():
    msg = P.decode_op(b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "new": 1}')
    assert msg == P.Run(id=1, cmd="c", dir="d", env={})
    assert P.decode_ev(b'{"ev": "events", "items": [{"ev": "exited", "id": 1, '
                       b'"exit_code": 3}]}').items[0] == P.Exited(id=1, exit_code=3)


BAD_OPS = [
    (b"not json at all", r"line from the coordinator is not JSON .*'not json at all'"),
    (b"", r"not JSON"),
    (b'{"op": "run"', r"not JSON"),
    (b"\xff\xfe", r"not JSON"),
    (b"[1, 2]", r"not a JSON object: '\[1, 2\]'"),
    (b'"run"', r"not a JSON object"),
    (b'{"id": 1}', r"has no 'op' \(known: run, kill, reap, ping, shutdown\)"),
    (b'{"op": "launch"}', r"has unknown 'launch' as 'op'"),
    (b'{"op": 5}', r"has unknown 5 as 'op'"),
    (b'{"ev": "hello"}', r"has no 'op'"),
    (b'{"op": "run", "id": 1, "dir": "d", "env": {}}', r"bad 'run' message .*'cmd' is missing"),
    (b'{"op": "run", "id": 1.5, "cmd": "c", "dir": "d", "env": {}}',
     r"'id' must be a run id .*got float 1.5"),
    (b'{"op": "run", "id": true, "cmd": "c", "dir": "d", "env": {}}', r"'id' must be a run id"),
    (b'{"op": "run", "id": 1, "cmd": 7, "dir": "d", "env": {}}', r"'cmd' must be a string"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {"A": 1}}',
     r"'env' must map names to strings; 'A' maps to int 1"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": []}', r"'env' must be an object"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "slots": "2"}',
     r"'slots' must be an integer"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "timeout_s": NaN}',
     r"NaN is not a number this protocol allows"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "timeout_s": 1e999}',
     r"'timeout_s' must be a finite number"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "dirs": "shared"}',
     r"'dirs' must be a list of names"),
    (b'{"op": "run", "id": 1, "cmd": "c", "dir": "d", "env": {}, "dirs": [1]}',
     r"'dirs' must be a list of names: an element must be a string"),
    (b'{"op": "reap", "match": {}, "sessions": [1, "2"]}', r"'sessions' must be a list of"),
    (b'{"op": "reap"}', r"'match' is missing"),
    (b'{"op": "kill", "id": null}', r"'id' must be a run id"),
    (b'{"op": "ping", "t": "now"}', r"'t' must be a finite number"),
]


@pytest.mark.parametrize("line,pattern", BAD_OPS)
def test_malformed_coordinator_lines_raise_a_readable_protocol_error(line, pattern):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_op(line)
    text = str(info.value)
    assert re.search(pattern, text), text
    assert "\n" not in text
    assert isinstance(info.value, ValueError)


BAD_EVS = [
    (b'{"ev": "hello", "node_id": "n", "root": "/r", "pid": 1, "hostname": "h", '
     b'"slots": 1, "python": "p", "protocol": 2}', r"bad 'hello' message .*'cores' is missing"),
    (b'{"ev": "events"}', r"'items' is missing"),
    (b'{"ev": "events", "items": {}}', r"'items' must be a list of events"),
    (b'{"ev": "events", "items": [1]}', r"'items' \[0\] must be an object"),
    (b'{"ev": "events", "items": [{"ev": "finished", "id": 1}]}',
     r"'items' \[0\] has unknown event 'finished'"),
    (b'{"ev": "events", "items": [{"ev": "started", "id": 1, "pid": 2, "t": 0}, '
     b'{"ev": "exited", "id": 1, "exit_code": "0"}]}',
     r"'items' \[1\] \(exited\): field 'exit_code' must be an integer, got str '0'"),
    (b'{"ev": "events", "items": [{"ev": "exited", "id": 1, "exit_code": 0, '
     b'"timed_out": 1}]}', r"'timed_out' must be true or false"),
    (b'{"ev": "heartbeat", "t": 1, "running": [1, [2]]}', r"'running' must be a list of run"),
    (b'{"ev": "events", "items": [{"ev": "reaped", "match": {}, "pids": ["x"]}]}',
     r"'pids' must be a list of pids"),
    (b'{"ev": "goodbye"}', r"line from the agent has unknown 'goodbye' as 'ev' \(known: hello"),
    (b'{"op": "run"}', r"has no 'ev'"),
]


@pytest.mark.parametrize("line,pattern", BAD_EVS)
def test_malformed_agent_lines_raise_a_readable_protocol_error(line, pattern):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_ev(line)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_a_long_bad_line_is_quoted_truncated():
    line = b'{"op": "nope", "pad": "' + b"x" * 10_000 + b'"}'
    text = str(pytest.raises(P.ProtocolError, P.decode_op, line).value)
    assert len(text) < 400 and f"({len(line)} characters)" in text


def test_encoding_refuses_what_the_other_side_could_not_read():
    with pytest.raises(P.ProtocolError, match="not a message of this protocol"):
        P.encode({"op": "run"})
    with pytest.raises(P.ProtocolError, match="cannot encode Ping"):
        P.encode(P.Ping(t=float("nan")))
    with pytest.raises(P.ProtocolError, match="cannot encode Run"):
        P.encode(P.Run(id=1, cmd="c", dir="d", env={"A": object()}))


def test_wire_names_are_spelled_only_in_the_protocol_module():
    """The agent and the transport build classes, never wire names."""
    root = Path(__file__).resolve().parent.parent
    names = [*P.OPS, *P.EVS, *P.ITEMS]
    pattern = re.compile("[\"'](" + "|".join(map(re.escape, names)) + ")[\"']")
    for rel in ("launch/agent.py", "hpcbatch/transport.py"):
        hits = pattern.findall((root / rel).read_text())
        assert not hits, f"{rel} spells wire names {hits}"
