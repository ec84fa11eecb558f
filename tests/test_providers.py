"""SSH pool configs built from pool.json specs and options (no connection made)."""

from __future__ import annotations


def test_pool_paths_given_on_the_command_line_are_relative_to_where_it_runs(tmp_path,
                                                                          monkeypatch):
    from hpcbatch.providers import ssh_pool_config
    specdir, here = tmp_path / "spec", tmp_path / "here"
    specdir.mkdir()
    here.mkdir()
    (specdir / "kh").write_text("")
    (here / "kh").write_text("")
    (specdir / "pool.json").write_text('{"hosts": ["n1"], "known_hosts": "kh"}')
    monkeypatch.chdir(here)
    assert ssh_pool_config(spec=str(specdir / "pool.json"))["known_hosts"] == \
        str(specdir / "kh")  # the spec's own relative paths: the spec's folder
    assert ssh_pool_config(spec=str(specdir / "pool.json"), known_hosts="kh")[
        "known_hosts"] == str(here / "kh")  # an option's: the current folder
