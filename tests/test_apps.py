"""Application packages: archives checked at upload, unpacked once per node, on PATH.

Real archives, a real CLI and real agents: local pools, and the session's three sshd
nodes (tests/conftest_ssh.py) where the archive goes over SFTP."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import gate, poll

from hpcbatch.apps import AppStore, env_key
from hpcbatch.errors import Conflict, NotFound, ValidationError
from hpcbatch.launch import appunpack

TOOL = '#!/bin/sh\necho "tool $TOOL_VERSION $*"\n'


def make_tgz(path: Path, files: dict[str, str | bytes], *, links: dict[str, str] = (),
             modes: dict[str, int] = ()) -> Path:
    """A .tar.gz of files (name -> text), symlinks (name -> target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = dict(modes).get(name, 0o644)
            tf.addfile(info, io.BytesIO(raw))
        for name, target in dict(links).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def tool_archive(tmp_path: Path, version: str, fmt: str = "tar.gz") -> Path:
    files = {"bin/mytool": TOOL.replace("$TOOL_VERSION", version), "share/v.txt": version}
    if fmt == "zip":
        path = tmp_path / f"tool-{version}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in files.items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o100755 if name.startswith("bin/") else 0o100644) << 16
                zf.writestr(info, text)
        return path
    return make_tgz(tmp_path / f"tool-{version}.tar.gz", files, modes={"bin/mytool": 0o755})


# ---- the archive rules (no processes) ------------------------------------------------

@pytest.mark.parametrize("case", ["dotdot", "absolute", "link_out", "link_climb", "corrupt",
                                  "not_gzip", "device"])
def test_a_bad_archive_is_refused_in_one_line_and_nothing_is_stored(tmp_path, case):
    path = tmp_path / "bad.tar.gz"
    if case == "dotdot":
        make_tgz(path, {"bin/../../evil": "x"})
    elif case == "absolute":
        make_tgz(path, {"/etc/evil": "x"})
    elif case == "link_out":
        make_tgz(path, {"a": "x"}, links={"lib": "../../etc"})
    elif case == "link_climb":  # each link lexically inside, together they climb out
        make_tgz(path, {"a": "x"}, links={"s": ".", "s/s/s/t": "../../.."})
    elif case == "corrupt":
        make_tgz(path, {"bin/tool": "x" * 100_000})
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif case == "not_gzip":
        path.write_bytes(b"just some text, not an archive\n")
    else:
        with tarfile.open(path, "w:gz") as tf:
            info = tarfile.TarInfo("dev")
            info.type = tarfile.CHRTYPE
            tf.addfile(info)
    store = AppStore(tmp_path / "home")
    with pytest.raises(ValidationError) as exc:
        store.upload("tool", "1.0", path)
    assert exc.value.field == "archive" and "\n" not in str(exc.value)
    assert "nothing was stored" in str(exc.value)
    assert store.list() == []
    assert not (tmp_path / "home" / "apps" / "tool" / "1.0").exists()


def test_links_that_stay_inside_are_taken(tmp_path):
    path = make_tgz(tmp_path / "ok.tar.gz", {"libexec/python": "#!/bin/sh\n"},
                    links={"bin/python": "../libexec/python", "cur": "."})
    assert appunpack.check(str(path), "tar.gz")["has_bin"] is True


def test_upload_list_default_and_delete(tmp_path):
    store = AppStore(tmp_path / "home")
    v1 = store.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
    assert (v1.name, v1.version, v1.default, v1.has_bin, v1.format) == \
        ("tool", "1.0", True, True, "tar.gz")
    assert v1.sha256 == appunpack.sha256_of(str(tool_archive(tmp_path, "1.0")))
    v2 = store.upload("tool", "2.0", tool_archive(tmp_path, "2.0", "zip"))
    assert not v2.default  # the first version stays the default
    with pytest.raises(Conflict):
        store.upload("tool", "2.0", tool_archive(tmp_path, "2.0"))
    for name, version, field in (("bad name", "1", "name"), ("tool", "../x", "version"),
                                 ("tool", ".hidden", "version")):
        with pytest.raises(ValidationError) as exc:
            store.upload(name, version, tool_archive(tmp_path, "1.0"))
        assert exc.value.field == field
    store.set_default("tool", "2.0")
    assert [(a.version, a.default) for a in store.list()] == [("1.0", False), ("2.0", True)]
    home_files = [p for p in (tmp_path / "home" / "apps").rglob("*") if p.is_file()]
    assert home_files and all(p.stat().st_mode & 0o077 == 0 for p in home_files)
    assert store.delete("tool", "2.0") == ["tool:2.0"]
    assert [(a.version, a.default) for a in store.list()] == [("1.0", True)]
    with pytest.raises(NotFound, match="has no version '3'"):
        store.delete("tool", "3")
    assert store.delete("tool") == ["tool:1.0"]
    assert store.list() == []
    assert env_key("my-app.x") == "MY_APP_X"


def test_concurrent_unpackers_unpack_once(tmp_path):
    """Three unpackers of one package at once (as three agents of a node root would
    be): the lock lets one unpack; the others find it whole."""
    archive = tool_archive(tmp_path, "1.0")
    sha = appunpack.sha256_of(str(archive))
    app_dir = tmp_path / "root" / "apps" / "tool"
    procs = [subprocess.Popen([sys.executable, appunpack.__file__, "unpack", str(archive),
                               str(app_dir), "1.0", sha]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert len((app_dir / "unpack.log").read_text().splitlines()) == 1
    assert (app_dir / "1.0" / "share" / "v.txt").read_text() == "1.0"
    assert not [p for p in app_dir.iterdir() if ".tmp-" in p.name]
    # a damaged copy on the node is refused, not unpacked
    bad = subprocess.run([sys.executable, appunpack.__file__, "unpack", str(archive),
                          str(app_dir), "2.0", "0" * 64], capture_output=True, text=True)
    assert bad.returncode == 1 and "a damaged copy" in bad.stderr
    assert not (app_dir / "2.0").exists()


# ---- the CLI and real tasks -------------------------------------------------------

def test_cli_upload_list_delete_and_a_corrupt_archive(cli, tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    r = cli("app", "upload", "tool", "1.0", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "broken.zip" in r.stderr and "nothing was stored" in r.stderr
    r = cli("app", "upload", "tool", "1.0", str(tool_archive(tmp_path, "1.0")))
    assert r.returncode == 0 and "(default)" in r.stdout, r.stderr
    r = cli("app", "upload", "tool", "2.0", str(tool_archive(tmp_path, "2.0", "zip")),
            "--default")
    assert r.returncode == 0, r.stderr
    listed = cli("app", "list").stdout
    assert "│ tool        │ 1.0     │         │" in listed, listed
    assert "│ tool        │ 2.0     │ yes     │" in listed, listed
    r = cli("app", "set-default", "tool", "9")
    assert r.returncode == 2 and "has no version '9'" in r.stderr
    r = cli("submit", "--app", "nosuch", "--", "true")
    assert r.returncode == 2 and "no application 'nosuch'" in r.stderr, r.stderr
    assert cli("app", "delete", "tool").returncode == 0
    assert "no application packages" in cli("app", "list").stdout


def test_a_task_finds_its_package_on_path_and_in_its_variables(cli, tmp_path, home):
    for v in ("1.0", "2.0"):
        assert cli("app", "upload", "tool", v, str(tool_archive(tmp_path, v))).returncode == 0
    r = cli("submit", "--job", "usedef", "--app", "tool", "--", "sh", "-c",
            'mytool a; echo "$HPCBATCH_APP_TOOL"; echo "$HPCBATCH_APP_TOOL_1_0"; '
            'cat "$HPCBATCH_APP_TOOL/share/v.txt"')
    assert r.returncode == 0, r.stdout + r.stderr
    lines = cli("task", "logs", "usedef", "task-1").stdout.splitlines()
    root = home / "nodes" / "local" / "local-1"
    assert lines == ["tool 1.0 a", f"{root}/apps/tool/1.0", f"{root}/apps/tool/1.0", "1.0"]
    # a version named: its own variable, and no HPCBATCH_APP_TOOL (not the default)
    r = cli("submit", "--job", "use2", "--app", "tool:2.0", "--", "sh", "-c",
            'mytool b; echo "${HPCBATCH_APP_TOOL-unset}"; echo "$HPCBATCH_APP_TOOL_2_0"')
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli("task", "logs", "use2", "task-1").stdout.splitlines() == \
        ["tool 2.0 b", "unset", f"{root}/apps/tool/2.0"]


def test_concurrent_tasks_on_a_node_unpack_once(batch, tmp_path, home):
    batch.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
    batch.pools.create("four", task_slots_per_node=4, target_nodes=1)
    opened = tmp_path / "go"
    job = batch.jobs.create("many", pool="four")
    job.add_tasks({"id": f"t{i}", "command_line": f"{gate(opened)}; mytool {i}",
                   "application_package_references": [{"application_id": "tool"}]}
                  for i in range(8))
    opened.touch()
    job.wait(timeout_s=90)
    assert sorted(t.stdout().strip() for t in job.tasks()) == \
        sorted(f"tool 1.0 {i}" for i in range(8))
    log = home / "nodes" / "four" / "local-1" / "apps" / "tool" / "unpack.log"
    assert len(log.read_text().splitlines()) == 1, log.read_text()
    archives = list((home / "nodes" / "four" / "local-1" / "apps" / ".archives").iterdir())
    assert len(archives) == 1


def test_a_pool_start_task_checks_the_package(batch, tmp_path, home):
    batch.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0", "zip"))
    batch.pools.create("withapp", target_nodes=2, start_task='mytool start > started.txt && '
                       'test -x "$HPCBATCH_APP_TOOL/bin/mytool"',
                       application_package_references=["tool"])
    job = batch.jobs.create("pooled", pool="withapp")
    job.add_tasks({"id": f"t{i}", "command_line": 'mytool "$HPCBATCH_NODE_ID"'}
                  for i in range(4))
    job.wait(timeout_s=90)
    assert all(t.succeeded for t in job.tasks()), [t.view for t in job.tasks()]
    # (the 4 tasks may all have run on the node that came up first: wait for the other's
    # start task rather than assume it ran before the job was done)
    poll(lambda: {n.state for n in batch.pools.nodes("withapp")} == {"idle"}, timeout_s=60,
         what="both nodes idle, their start tasks done")
    for n in ("local-1", "local-2"):
        root = home / "nodes" / "withapp" / n
        assert (root / "starttask" / "wd" / "started.txt").read_text() == "tool 1.0 start\n"
    with pytest.raises(ValidationError, match="no application 'gone'"):
        batch.pools.create("noapp", application_package_references=["gone"])


@pytest.mark.slow
def test_ssh_nodes_get_the_package_over_sftp(batch, ssh_cluster, tmp_path):
    from test_ssh_pool import ssh_pool
    batch.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
    ssh_pool(batch, ssh_cluster.directory, tmp_path, "appssh", ["node1", "node2", "node3"],
             scheduling_policy="spread", application_package_references=["tool"],
             start_task='test -x "$HPCBATCH_APP_TOOL_1_0/bin/mytool"')
    job = batch.jobs.create("sshapp", pool="appssh")
    # two tasks a node: each node unpacked it once (one line in its unpack.log)
    job.add_tasks({"id": f"t{i}", "command_line": 'mytool "$HPCBATCH_NODE"; '
                   'wc -l < "$(dirname "$HPCBATCH_APP_TOOL")/unpack.log"'}
                  for i in range(6))
    job.wait(timeout_s=120)
    outs = {tuple(t.stdout().split()) for t in job.tasks()}
    assert outs == {("tool", "1.0", f"node{i}", "1") for i in (1, 2, 3)}, outs


def test_the_service_takes_an_app_over_http(tmp_path, home):
    """hpcbatch serve: the archive is streamed (PUT /v1/uploads), then kept (POST)."""
    from helpers import wait_for_service

    import hpcbatch
    log = tmp_path / "serve.err"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hpcbatch.cli", "serve", "--home",
                                 str(home), "--bind", "127.0.0.1:0"], stdout=f, stderr=f,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "HPCBATCH_HOME": str(home)})
    try:
        record, key = wait_for_service(home, proc, log.read_text)
        with hpcbatch.Batch(url=record["url"], key=key) as b:
            v = b.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
            assert v.default and v.has_bin
            bad = tmp_path / "x.tar.gz"
            bad.write_bytes(b"\x1f\x8b not gzip")
            with pytest.raises(ValidationError, match="nothing was stored"):
                b.apps.upload("tool", "2.0", bad)
            prepfile = tmp_path / "prep-input.txt"
            prepfile.write_text("from the client\n")
            job = b.jobs.create("remote", preparation_task={
                "command_line": "cat prep-input.txt > copied", "resource_files": [
                    str(prepfile)]})
            job.add_task("t", 'mytool over-http; cat "$HPCBATCH_JOB_PREP_DIR/copied"',
                         application_package_references=[{"application_id": "tool"}])
            job.wait(timeout_s=60)
            assert job.task("t").stdout() == "tool 1.0 over-http\nfrom the client\n"
            status = job.preparation_and_release()
            assert status["preparation_task"]["command_line"] == "cat prep-input.txt > copied"
            assert [(n["node_id"], n["kind"], n["state"]) for n in status["nodes"]] == \
                [("local-1", "preparation", "succeeded")]
            from hpcbatch.models import JobSpec
            b.service.submit(JobSpec("sub", "local", on_all_tasks_complete="terminate_job",
                                     preparation_task={"command_line": "echo p > p.txt"},
                                     release_task={"command_line": "true"}),
                             [{"id": "t", "command_line": 'cat "$HPCBATCH_JOB_PREP_DIR/p.txt"'}])
            b.jobs.get("sub").wait(timeout_s=60)
            assert b.jobs.get("sub").task("t").stdout() == "p\n"
            assert b.jobs.get("sub").state == "completed"
            assert [a.version for a in b.apps.list()] == ["1.0"]
            assert b.apps.delete("tool", "1.0") == ["tool:1.0"]
            with pytest.raises(NotFound):
                b.apps.delete("tool")
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_package_a_pool_uses_is_not_deleted_under_it(batch, tmp_path):
    """Deleting a package a pool names would leave each of its new nodes unusable (it
    gets its pool's packages before its start task): refused, naming the pool, until the
    pool is gone; a version no pool needs goes."""
    batch.apps.upload("tool", "1.0", tool_archive(tmp_path, "1.0"))
    batch.apps.upload("tool", "2.0", tool_archive(tmp_path, "2.0"))
    batch.apps.upload("other", "1.0", tool_archive(tmp_path, "1.0"))
    batch.pools.create("uses", target_nodes=1, application_package_references=["tool:2.0",
                                                                                "other"])
    for name, version in (("tool", "2.0"), ("tool", None), ("other", "1.0"), ("other", None)):
        with pytest.raises(Conflict, match="is used by pool 'uses'.*hpcbatch pool delete uses"):
            batch.apps.delete(name, version)
    assert batch.apps.delete("tool", "1.0") == ["tool:1.0"]  # no pool needs it
    with pytest.raises(NotFound, match="has no version '9'"):
        batch.apps.delete("tool", "9")
    job = batch.jobs.create("still", pool="uses")
    job.add_task("t", '"$HPCBATCH_APP_TOOL_2_0/bin/mytool" ok')
    job.wait(timeout_s=60)
    assert job.task("t").stdout() == "tool 2.0 ok\n"
    batch.jobs.delete("still")
    batch.pools.delete("uses")
    assert batch.apps.delete("tool") == ["tool:2.0"]
    assert batch.apps.delete("other") == ["other:1.0"]
