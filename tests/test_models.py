import pytest

from hpcbatch.errors import ValidationError
from hpcbatch.models import JobSpec, NodeState, PoolSpec, TaskSpec, TaskState, check_unique_ids


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "x" * 65, "é", "a;rm -rf", None, 3])
def test_ids_are_checked(bad):
    with pytest.raises(ValidationError, match="task.id"):
        TaskSpec(bad, "true")


def test_id_at_the_length_limit_is_fine():
    assert TaskSpec("x" * 64, "true").id == "x" * 64


@pytest.mark.parametrize("field,kwargs", [
    ("pool.task_slots_per_node", {"task_slots_per_node": 0}),
    ("pool.scheduling_policy", {"scheduling_policy": "random"}),
    ("pool.provider", {"provider": "cloud"}),
    ("pool.task_slots_per_node", {"task_slots_per_node": True}),
])
def test_pool_rules_name_the_field(field, kwargs):
    with pytest.raises(ValidationError) as info:
        PoolSpec("p", **kwargs)
    assert info.value.field == field


def test_job_rules():
    with pytest.raises(ValidationError, match="job.priority"):
        JobSpec("j", "local", priority=5000)
    with pytest.raises(ValidationError, match="on_all_tasks_complete"):
        JobSpec("j", "local", on_all_tasks_complete="explode")
    with pytest.raises(ValidationError, match="max_task_retry_count"):
        JobSpec("j", "local", max_task_retry_count=-2)


def test_task_rules():
    with pytest.raises(ValidationError, match="command_line"):
        TaskSpec("t", "   ")
    with pytest.raises(ValidationError, match="required_slots"):
        TaskSpec("t", "true", required_slots=0)
    with pytest.raises(ValidationError, match="max_wall_clock_time_s"):
        TaskSpec("t", "true", max_wall_clock_time_s=-1)
    with pytest.raises(ValidationError, match="environment"):
        TaskSpec("t", "true", environment={"1BAD": "x"})
    with pytest.raises(ValidationError, match="unknown field"):
        TaskSpec.coerce({"id": "t", "command_line": "true", "slots": 2})


def test_duplicate_ids_in_one_request():
    with pytest.raises(ValidationError, match="'a' appears twice"):
        check_unique_ids([TaskSpec("a", "true"), TaskSpec("b", "true"), TaskSpec("a", "x")])


def test_state_transitions_are_checked():
    assert TaskState.ACTIVE.check_move(TaskState.RUNNING) is TaskState.RUNNING
    with pytest.raises(RuntimeError, match="completed -> running"):
        TaskState.COMPLETED.check_move(TaskState.RUNNING)
    with pytest.raises(RuntimeError):
        NodeState.OFFLINE.check_move(NodeState.RUNNING)
