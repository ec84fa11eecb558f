"""Azure Batch's basic scenario end to end, as a new user would run it (issue 14).

The seven steps (upload, pool, job, tasks, monitor, outputs, download) on real sshd
nodes (tests/conftest_ssh.py):

* through a real ``hpcbatch serve`` with ``Batch(url=...)``: containers, an application
  package and 20 input files uploaded; an SSH pool of 3 nodes whose start task runs the
  package; a job with a preparation and a release task; a task per input (its resource
  file from the input container, its result through an output file into the output
  container); progress followed; every output downloaded and compared with what is
  computed here; the release marker of each node that ran tasks; then one node killed
  (sshd and agent) and its tasks' logs still read; then everything deleted, and gone
* the same seven steps through the CLI (6 inputs), on the session's cluster
* bad inputs (a resource file that does not exist, '..', a container that does not
  exist, an upload to a deleted container, a corrupt archive): each refused at input or
  recorded on its task with the reason naming it, the job's other tasks unaffected
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from helpers import poll, run_cli
from test_apps import make_tgz

from hpcbatch.errors import NotFound, ValidationError

# the application: bin/shout NODE FILE prints "NODE:" and FILE upper-cased
SHOUT = '#!/bin/sh\nprintf "%s:" "$1"; tr a-z A-Z < "$2"\n'
TASK_CMD = ('mkdir -p res && shout "$(cat "$HPCBATCH_JOB_PREP_DIR/prep.txt")" in.txt '
            '> res/out.txt && echo "done $HPCBATCH_TASK_ID"')


def app_archive(tmp_path: Path) -> Path:
    return make_tgz(tmp_path / "shout-1.0.tar.gz", {"bin/shout": SHOUT, "VERSION": "1.0\n"},
                    modes={"bin/shout": 0o755})


def inputs(tmp_path: Path, n: int) -> dict[str, bytes]:
    d = tmp_path / "inputs"
    d.mkdir()
    files = {}
    for i in range(n):
        data = f"input {i} {os.urandom(6).hex()}\nline two of {i}\n".encode()
        (d / f"in{i:02d}.txt").write_bytes(data)
        files[f"in{i:02d}.txt"] = data
    return files


def expected(node: str, data: bytes) -> bytes:
    return f"{node}:".encode() + data.upper()


def release_cmd(markers: Path) -> str:
    return f'echo "released $HPCBATCH_JOB_ID" > {shlex.quote(str(markers))}/"$HPCBATCH_NODE"'


START = 'shout start "$HPCBATCH_APP_SHOUT/VERSION" > started.txt && test -x ' \
    '"$HPCBATCH_APP_SHOUT_1_0/bin/shout"'
PREP = 'echo "$HPCBATCH_NODE" > prep.txt'


@pytest.fixture
def serve(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_server import Served
    made = []

    def start(home: Path):
        s = Served(home, tmp_path / "logs")
        made.append(s)
        return s
    try:
        yield start
    finally:
        for s in reversed(made):
            s.stop()


@pytest.mark.slow
def test_the_seven_steps_through_the_service_then_a_node_lost(serve, make_cluster, tmp_path):
    from test_ssh_pool import spec_for

    import hpcbatch
    from hpcbatch.launch.cluster import kill_node
    info = make_cluster(3, "wf")  # the test's own: it kills a node
    files = inputs(tmp_path, 20)
    markers = tmp_path / "release markers"
    markers.mkdir()
    srv = serve(tmp_path / "home")
    with hpcbatch.Batch(url=srv.url, key=srv.key) as b:
        # 1. upload: containers, the application, the inputs
        b.storage.create("input")
        b.storage.create("output")
        v = b.apps.upload("shout", "1.0", app_archive(tmp_path))
        assert (v.default, v.has_bin) == (True, True)
        for name, data in files.items():
            b.storage.put_bytes("input", f"set/{name}", data)
        listed = {x.name: x for x in b.storage.ls("input", "set/")}
        assert sorted(listed) == sorted(f"set/{n}" for n in files)
        # 2. pool: the 3 nodes; its start task runs the package
        spec = spec_for(info.directory, ["node1", "node2", "node3"], tmp_path)
        b.pools.create("wfpool", "ssh", spec=str(spec), scheduling_policy="spread",
                       task_slots_per_node=2, application_package_references=["shout"],
                       start_task=START)
        poll(lambda: sum(n["state"] == "idle" for n in b.pools.nodes("wfpool")) == 3,
             timeout_s=60, what="3 idle nodes")
        roots = Path(json.loads(spec.read_text())["node_root"])  # the start task ran there
        started = sorted(roots.glob("*/wfpool/node*/starttask/wd/started.txt"))
        assert [p.parent.parent.parent.name for p in started] == ["node1", "node2", "node3"]
        assert {p.read_bytes() for p in started} == {expected("start", b"1.0\n")}
        # 3. job: a preparation task and a release task
        job = b.jobs.create("wf", pool="wfpool", on_all_tasks_complete="terminate_job",
                            preparation_task={"command_line": PREP},
                            release_task={"command_line": release_cmd(markers)})
        # 4. tasks: one per input, its resource file in, its result out
        out = [{"pattern": "res/*.txt", "upload_condition": "task_success",
                "destination": {"container": "output", "path": "{job}/{task}/"}}]
        assert job.add_tasks({"id": n.removesuffix(".txt"), "command_line": TASK_CMD,
                              "resource_files": [{"storage_path": f"input/set/{n}",
                                                  "file_path": "in.txt"}],
                              "output_files": out} for n in files) == 20
        # 5. monitor: the change feed (server-sent events, the job's counts at each
        # change) until all 20 are done, then wait (which also waits out the release)
        events = []
        with srv.client.stream("GET", "/v1/events", params={"job_id": "wf", "timeout": 180},
                               timeout=200) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:])["counts"])
                    if events[-1]["completed"] == 20:
                        break
        done = [e["completed"] for e in events]
        assert done == sorted(done) and done[-1] == 20 and events[0]["total"] == 20, events
        seen: list[dict] = []
        counts = b.service.wait_job("wf", timeout_s=180, on_progress=seen.append)
        assert (counts["completed"], counts["total"]) == (20, 20), counts
        assert seen and seen[-1]["completed"] == 20, seen
        tasks = {t.id: t for t in job.tasks()}
        assert all(t.succeeded for t in tasks.values()), \
            {t.id: (t.failure_kind, t.failure) for t in tasks.values() if not t.succeeded}
        ran_on = {tid: t.attempts()[-1].node_id for tid, t in tasks.items()}
        assert set(ran_on.values()) == {"node1", "node2", "node3"}, ran_on
        # 6 and 7. outputs: uploaded by the nodes; downloaded (below the prefix) and compared
        dl = tmp_path / "download"
        got = b.storage.download("output", "wf/", dl)
        assert len(got) == 20
        for name, data in files.items():
            tid = name.removesuffix(".txt")
            assert (dl / tid / "out.txt").read_bytes() == expected(ran_on[tid], data)
            assert tasks[tid].stdout() == f"done {tid}\n"
        # the release task ran on each node that ran tasks, once the job completed
        poll(lambda: b.jobs.get("wf").state == "completed", timeout_s=60, what="completed")
        poll(lambda: sorted(p.name for p in markers.iterdir()) == sorted(set(ran_on.values())),
             timeout_s=60, what="a release marker per node")
        for n in set(ran_on.values()):
            assert (markers / n).read_text() == "released wf\n"
        status = b.jobs.get("wf").preparation_and_release()
        assert sorted((n["node_id"], n["kind"], n["state"]) for n in status["nodes"]) == \
            sorted((f"node{i}", k, "succeeded") for i in (1, 2, 3)
                   for k in ("preparation", "release"))
        # a node lost (its sshd and agent killed): its tasks' logs are still read
        assert kill_node(info.directory, "node2")
        poll(lambda: next(n for n in b.pools.nodes("wfpool") if n["id"] == "node2")["state"]
             not in ("idle", "running"), timeout_s=60, what="node2 seen lost")
        on_node2 = [tid for tid, n in ran_on.items() if n == "node2"]
        assert on_node2
        for tid in on_node2:
            assert job.task(tid).stdout() == f"done {tid}\n"
            assert b.service.read_task_file("wf", tid, "stdout.txt") == f"done {tid}\n".encode()
        r = run_cli(srv.home, "task", "logs", "wf", on_node2[0])  # the CLI, to the service
        assert (r.returncode, r.stdout) == (0, f"done {on_node2[0]}\n"), r.stderr
        # delete everything, and it is gone
        b.jobs.delete("wf")
        b.pools.delete("wfpool")
        b.storage.delete("input")
        b.storage.delete("output")
        b.apps.delete("shout")
        with pytest.raises(NotFound):
            b.jobs.get("wf")
        with pytest.raises(NotFound):
            b.pools.get("wfpool")
        assert b.storage.list() == [] and b.apps.list() == []


@pytest.mark.slow
def test_the_seven_steps_through_the_cli(ssh_cluster, tmp_path):
    home = tmp_path / "cli home"
    files = inputs(tmp_path, 6)
    markers = tmp_path / "markers"
    markers.mkdir()
    ups = tmp_path / "ups"  # a file per node whose start task ran
    ups.mkdir()
    start = f'{START} && touch {shlex.quote(str(ups))}/"$HPCBATCH_NODE"'
    # each task waits (2 min at most) until all three nodes are up: one node slow to
    # start on a loaded machine would otherwise see the other two run every task
    task_cmd = (f'i=0; while [ "$(ls {shlex.quote(str(ups))} | wc -l)" -lt 3 ] && '
                f'[ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; {TASK_CMD}')

    def cli(*args: str) -> str:
        r = run_cli(home, *args, timeout_s=180)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout
    # 1. upload
    cli("storage", "create", "input")
    cli("storage", "create", "output")
    assert "(default)" in cli("app", "upload", "shout", "1.0", str(app_archive(tmp_path)))
    assert "uploaded 6 blob(s)" in cli("storage", "upload", "input", str(tmp_path / "inputs"),
                                       "--name", "set")
    # 2. pool: a host list, as on a real cluster (the test cluster's ssh_config says
    # where each node listens; its key and known_hosts)
    d = Path(ssh_cluster.directory)
    cli("pool", "create", "clipool", "--ssh", "node[1-3]", "--ssh-config",
        str(d / "ssh_config"), "--key", str(d / "id_ed25519"), "--known-hosts",
        str(d / "known_hosts"), "--authorized-keys", str(d / "authorized_keys"),
        "--python", sys.executable, "--node-root", str(tmp_path / "node roots"),
        "--policy", "spread", "--app", "shout", "--start-task", start)
    # 3. job
    cli("job", "create", "cj", "--pool", "clipool", "--on-all-tasks-complete",
        "terminate_job", "--prep-command", PREP, "--release-command", release_cmd(markers))
    # 4. tasks
    for name in files:
        tid = name.removesuffix(".txt")
        cli("task", "add", "cj", tid, "--resource", f"input/set/{name}=in.txt",
            "--output", "res/*.txt=output/{job}/{task}/@success", "--", "sh", "-c", task_cmd)
    # 5. monitor: job wait drives it to the end
    cli("job", "wait", "cj", "--no-progress")
    # 6. outputs, 7. download
    dl = tmp_path / "dl"
    assert "downloaded 6 file(s)" in cli("storage", "download", "output", "cj/", str(dl))
    nodes = set()
    for name, data in files.items():
        tid = name.removesuffix(".txt")
        got = (dl / tid / "out.txt").read_bytes()
        node = got.split(b":")[0].decode()
        assert got == expected(node, data)
        nodes.add(node)
        assert cli("task", "logs", "cj", tid) == f"done {tid}\n"
    assert nodes == {"node1", "node2", "node3"}, nodes
    poll(lambda: sorted(p.name for p in markers.iterdir()) == sorted(nodes), timeout_s=60,
         what="a release marker per node")
    # delete everything
    cli("job", "delete", "cj")
    cli("pool", "delete", "clipool")
    cli("storage", "delete", "input")
    cli("storage", "delete", "output")
    cli("app", "delete", "shout")
    assert "no application packages" in cli("app", "list")
    assert "clipool" not in cli("pool", "list")
    listed = cli("storage", "list")
    assert "input" not in listed and "output" not in listed, listed
    r = run_cli(home, "job", "show", "cj")
    assert r.returncode == 2 and "cj" in r.stderr


def test_bad_inputs_are_refused_or_recorded_naming_what(batch, tmp_path):
    batch.storage.create("input")
    batch.storage.create("doomed")
    batch.storage.put_bytes("input", "ok.txt", b"fine\n")
    # a corrupt archive: refused at upload, named, nothing stored
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(app_archive(tmp_path).read_bytes()[:40])
    with pytest.raises(ValidationError, match="nothing was stored") as e:
        batch.apps.upload("shout", "1.0", broken)
    assert e.value.field == "archive" and "\n" not in str(e.value)
    r = run_cli(Path(batch.home), "app", "upload", "shout", "1.0", str(broken))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "broken.tar.gz" in r.stderr and "nothing was stored" in r.stderr
    assert batch.apps.list() == []
    job = batch.jobs.create("bad")
    # refused at input, naming the field and the thing
    for rf, field, words in (
            ({"storage_path": "input/../etc/passwd"}, "resource_files[0].storage_path",
             "'..'"),
            ({"storage_path": "input/ok.txt", "file_path": "../up.txt"},
             "resource_files[0].file_path", "'../up.txt' leaves the task's working"),
            ({"storage_path": "nosuch/ok.txt"}, "resource_files[0].storage_path",
             "container 'nosuch' does not exist")):
        with pytest.raises(ValidationError, match=words) as e:
            job.add_tasks([{"id": "refused", "command_line": "true", "resource_files": [rf]}])
        assert e.value.field == f"task refused: {field}"
    delete = shlex.join([sys.executable, "-m", "hpcbatch.cli", "--home", str(batch.home),
                         "storage", "delete", "doomed"])
    job.add_tasks([
        {"id": "good", "command_line": "cat in.txt",
         "resource_files": [{"storage_path": "input/ok.txt", "file_path": "in.txt"}]},
        {"id": "missing", "command_line": "echo never",
         "resource_files": [{"storage_path": "input/absent.txt"}]},
        {"id": "lost", "command_line": f"echo r > r.txt; {delete}",
         "output_files": [{"pattern": "r.txt", "container": "doomed"}]},
        {"id": "bystander", "command_line": "echo unaffected"},
    ])
    # recorded on the task where it is not checked at input (a collection)
    assert batch.service.add_task_collection("bad", [{
        "id": "nocontainer", "command_line": "true",
        "resource_files": [{"container": "gone"}]}]).added == 1
    job.wait(timeout_s=60)
    t = {x.id: x for x in job.tasks()}
    assert (t["good"].result, t["good"].stdout()) == ("success", "fine\n")
    assert t["bystander"].stdout() == "unaffected\n"
    assert t["missing"].failure_kind == "pre_processing_error"
    assert "blob 'absent.txt' is not in container 'input'" in t["missing"].failure
    assert t["missing"].attempts()[-1].exit_code is None  # its command never ran
    assert t["nocontainer"].failure_kind == "pre_processing_error"
    assert "container 'gone' does not exist" in t["nocontainer"].failure
    assert (t["lost"].failure_kind, t["lost"].exit_code) == ("file_upload_error", 0)
    assert "container 'doomed' does not exist" in t["lost"].failure
