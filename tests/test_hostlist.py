import pytest

from hpcbatch.hostlist import HostlistError, compress_hostlist, expand_hostlist


@pytest.mark.parametrize("text,names", [
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("gpu[1-2,5],login1", ["gpu1", "gpu2", "gpu5", "login1"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("a,b,a", ["a", "b"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("host.example.org", ["host.example.org"]),
])
def test_expand(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize("text,pos,why", [
    ("node[01-03", 4, "never closed"),
    ("node]", 4, "without '['"),
    ("node[3-1]", 4, "backwards"),
    ("node[a-b]", 4, "bad range"),
    ("a,,b", 2, "empty name"),
    ("", 0, "empty host list"),
    ("n;rm -rf", 1, "not allowed"),
    ("n 1", 1, "not allowed"),
])
def test_bad_syntax_names_the_place(text, pos, why):
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    assert info.value.pos == pos and why in str(info.value)
    assert str(info.value).startswith("hostlist: ")


@pytest.mark.parametrize("names", [
    ["node01", "node02", "node03", "login1"], ["gpu1", "gpu2", "gpu5"], ["a"], ["n8", "n9", "n10"],
])
def test_compress_round_trips(names):
    assert expand_hostlist(compress_hostlist(names)) == names


def test_compress_spelling():
    assert compress_hostlist(["node01", "node02", "node03", "x"]) == "node[01-03],x"
