"""Slurm-style host lists: expansion, compression, and refusal of bad or hostile input."""

from __future__ import annotations

import random
import time

import pytest

from hpcbatch.errors import ValidationError
from hpcbatch.hostlist import MAX_HOSTS, HostlistError, compress_hostlist, expand_hostlist


@pytest.mark.parametrize("text,names", [
    ("node1", ["node1"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[1-2,5],login1", ["gpu1", "gpu2", "gpu5", "login1"]),
    ("gpu[5,1-2]", ["gpu5", "gpu1", "gpu2"]),
    ("rack[1-2]-n[1-3]", ["rack1-n1", "rack1-n2", "rack1-n3", "rack2-n1", "rack2-n2",
                          "rack2-n3"]),
    ("r[1-2]n[01-02]-ib", ["r1n01-ib", "r1n02-ib", "r2n01-ib", "r2n02-ib"]),
    ("[1-3]", ["1", "2", "3"]),
    ("n[7]", ["n7"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[0-1]", ["n0", "n1"]),
    ("n[00-01]", ["n00", "n01"]),
    ("a,b,a", ["a", "b"]),
    ("n[1-3],n2", ["n1", "n2", "n3"]),
    ("host.example.org,h_2", ["host.example.org", "h_2"]),
    ("  node[1-2] , login1 ", ["node1", "node2", "login1"]),
    ("node[1-16]", [f"node{i}" for i in range(1, 17)]),
    ("node[01-16]", [f"node{i:02d}" for i in range(1, 17)]),
])
def test_expand(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text,pos,why", [
    ("node[01-03", 4, "'[' is never closed"),
    ("node[1-", 4, "'[' is never closed"),
    ("node]", 4, "']' without '['"),
    ("n[1-2]]", 6, "']' without '['"),
    ("node[3-1]", 5, "runs backwards"),
    ("node[a-b]", 5, "'a' in range 'a-b' is not a digit"),
    ("node[1-x]", 7, "'x' in range '1-x' is not a digit"),
    ("n[1-]", 4, "a number is missing"),
    ("n[-1]", 2, "a number is missing"),
    ("n[1--3]", 4, "not a digit"),
    ("n[]", 1, "'[]' is empty"),
    ("n[1,,2]", 4, "empty range between commas"),
    ("n[1-[2]]", 4, "brackets nest"),
    ("a,,b", 2, "empty name between commas"),
    ("a,", 2, "empty name between commas"),
    (",a", 0, "empty name between commas"),
    ("", 0, "empty host list"),
    ("   ", 0, "empty host list"),
    ("n;rm -rf", 1, "character ';' is not allowed"),
    ("n 1", 1, "character ' ' is not allowed"),
    ("n$(id)", 1, "character '$' is not allowed"),
    ("n`id`", 1, "character '`' is not allowed"),
    ("a\nb", 1, "not allowed"),
    ("nöde1", 1, "not allowed"),
    ("n[１-2]", 2, "not a digit"),  # a full-width digit
    ("-oProxyCommand=x", 0, "may not start with '-'"),
    ("ok,-x[1-2]", 3, "may not start with '-'"),
    (".hidden", 0, "may not start with '.'"),
    ("n[1234567890123456789]", 2, "more than 18 digits"),
])
def test_bad_syntax_names_the_text_and_position(text, pos, why):
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    err = info.value
    assert err.pos == pos, str(err)
    assert why in str(err)
    assert str(err).startswith(f"hostlist: {text!r} at position {pos}: ")
    assert "\n" not in str(err)
    assert isinstance(err, ValueError) and isinstance(err, ValidationError)


def test_hostile_sizes_are_refused_before_expanding():
    t0 = time.monotonic()
    for text in ("n[0-99999][0-99999]", "n[0-999999999999999999]",
                 ",".join(["x[1-1000]"] * 200), "a[1-9]" * 40):
        with pytest.raises(HostlistError, match=f"more than {MAX_HOSTS} hosts"):
            expand_hostlist(text)
    assert time.monotonic() - t0 < 1.0


def test_the_largest_allowed_list_expands_quickly():
    t0 = time.monotonic()
    names = expand_hostlist(f"n[1-{MAX_HOSTS}]")
    assert len(names) == MAX_HOSTS and names[-1] == f"n{MAX_HOSTS}"
    assert compress_hostlist(names) == f"n[1-{MAX_HOSTS}]"
    assert time.monotonic() - t0 < 5.0


def test_a_long_bad_list_is_quoted_around_the_problem_only():
    text = "node1," * 500 + "bad;name"
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    msg = str(info.value)
    assert f"at position {text.index(';')}" in msg and "bad;name" in msg and len(msg) < 300


def test_overlong_names_are_refused():
    with pytest.raises(HostlistError, match="longer than 253"):
        expand_hostlist("x" * 300)


def test_not_text_is_refused():
    with pytest.raises(HostlistError, match="a host list is text"):
        expand_hostlist(["node1"])  # type: ignore[arg-type]


@pytest.mark.parametrize("names,text", [
    (["node01", "node02", "node03", "x"], "node[01-03],x"),
    (["gpu1", "gpu2", "gpu5", "login1"], "gpu[1-2,5],login1"),
    (["a"], "a"),
    (["n5"], "n5"),
    (["n8", "n9", "n10"], "n[8-10]"),
    (["n09", "n10", "n11"], "n[09-11]"),
    (["n3", "n1", "n2"], "n[1-3]"),
    (["n1-ib", "n2-ib", "n4-ib"], "n[1-2,4]-ib"),
    (["n1", "n01"], "n1,n01"),
    (["a", "a", "n1", "n1"], "a,n1"),
    (["r1-n1", "r1-n2", "r2-n1"], "r1-n[1-2],r2-n1"),
    ([], ""),
])
def test_compress(names, text):
    assert compress_hostlist(names) == text


@pytest.mark.parametrize("text", [
    "node[01-16]", "gpu[1-2,5],login1", "rack[1-2]-n[1-3]", "n[8-10],n[098-101]",
    "a,b.c,d_e", "n[1-3]-ib,n[5-6]", "n[0-10],m[00-03]",
])
def test_round_trip(text):
    names = expand_hostlist(text)
    again = expand_hostlist(compress_hostlist(names))
    assert sorted(again) == sorted(names) and len(again) == len(names)


def test_round_trip_random():
    rng = random.Random(7)
    for _ in range(200):
        names = {f"{rng.choice(['n', 'gpu', 'r1-n', ''])}"
                 f"{str(rng.randint(0, 120)).zfill(rng.choice([0, 2, 3]))}"
                 f"{rng.choice(['', '-ib'])}" for _ in range(rng.randint(1, 30))}
        names = {n for n in names if n and n[0] not in "-."}
        if not names:
            continue
        again = expand_hostlist(compress_hostlist(sorted(names)))
        assert set(again) == names and len(again) == len(names)


@pytest.mark.parametrize("bad", ["a b", "x;y", "", "-x", "n[1]"])
def test_compress_refuses_what_is_not_a_host_name(bad):
    with pytest.raises(HostlistError):
        compress_hostlist(["ok", bad])

